"""DICOM TLS with DCMTK's TLS-enabled echoscu/storescu: trusted clients in, others out.

Certificates are generated at test time with Debian's ``openssl``: a CA, the listener's
certificate, a client certificate signed by the CA and one signed by another CA.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.dicom_status import Status
from tests.service.conftest import requires_dcmtk, run_echoscu, run_storescu

pytestmark = [
    requires_dcmtk,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(folder: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=folder,
    )


def _signed(folder: Path, name: str, ca: str, extensions: str) -> None:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder,
    )
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
        cwd=folder,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "clinic-ca")
    _ca(folder, "rogue-ca")
    _signed(folder, "listener", "clinic-ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _signed(folder, "tps", "clinic-ca", "extendedKeyUsage=clientAuth\n")
    _signed(folder, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return Pki(
        ca=folder / "clinic-ca.crt",
        server_cert=folder / "listener.crt",
        server_key=folder / "listener.key",
        client_cert=folder / "tps.crt",
        client_key=folder / "tps.key",
        rogue_cert=folder / "rogue.crt",
        rogue_key=folder / "rogue.key",
    )


@pytest.fixture
def tls_listener(listener_factory, pki):
    return listener_factory(
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_ca_file=pki.ca,
        acse_timeout_s=2.0,
    )


def tls_args(pki: Pki, *, key: Path, cert: Path) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(pki.ca)]


def test_client_with_trusted_certificate_can_echo_and_store(tls_listener, pki, ct_series):
    args = tls_args(pki, key=pki.client_key, cert=pki.client_cert)
    echo = run_echoscu(tls_listener.port, args=args)
    assert echo.returncode == 0 and "Echo Response (Success)" in echo.output, echo.output
    run = run_storescu(tls_listener.port, ct_series(n_slices=2), args=args)
    assert run.status_list == [Status.SUCCESS] * 2, run.output
    assert tls_listener.sink.wait_for(1)[0].n_instances == 2


def test_client_with_certificate_from_another_ca_is_refused(tls_listener, pki):
    run = run_echoscu(tls_listener.port, args=tls_args(pki, key=pki.rogue_key, cert=pki.rogue_cert))
    assert run.returncode != 0 and "Echo Response" not in run.output, run.output
    time.sleep(0.2)
    [(event, detail)] = tls_listener.audit_events
    assert detail["address"] == "127.0.0.1" and "TLS handshake failed" in detail["reason"]


def test_client_without_certificate_is_refused(tls_listener, pki):
    run = run_echoscu(tls_listener.port, args=["+tla", "+cf", str(pki.ca)])
    assert run.returncode != 0 and "Echo Response" not in run.output, run.output


def test_plain_tcp_client_is_refused_by_a_tls_listener(tls_listener):
    run = run_echoscu(tls_listener.port)
    assert run.returncode != 0 and "Echo Response" not in run.output


def test_silent_client_does_not_block_tls_handshakes_of_others(tls_listener, pki):
    with socket.create_connection(("127.0.0.1", tls_listener.port)):
        args = tls_args(pki, key=pki.client_key, cert=pki.client_cert)
        started = time.monotonic()
        assert run_echoscu(tls_listener.port, args=args).returncode == 0
        assert time.monotonic() - started < 1.5  # not queued behind the 2 s handshake timeout
