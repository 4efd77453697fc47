"""DICOM TLS with DCMTK's TLS-enabled echoscu/storescu: trusted clients in, others out.

Certificates come from the ``pki`` fixture (tests/service/conftest.py, Debian's ``openssl``).
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from rtcontour.service.dicom_status import Status
from tests.service.conftest import Pki, requires_dcmtk, run_echoscu, run_storescu

pytestmark = [
    requires_dcmtk,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]


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


def test_a_tcp_probe_of_a_tls_listener_is_not_recorded_as_a_refusal(tls_listener, pki):
    """Kubernetes and compose probe the DICOM port with a bare TCP connect: every 10 s, that
    must not become a refusal or an audit row; a client that speaks plain DICOM still does."""
    for _ in range(3):
        socket.create_connection(("127.0.0.1", tls_listener.port)).close()
    assert run_echoscu(tls_listener.port).returncode != 0  # plain DICOM to a TLS port
    time.sleep(0.3)
    [(event, detail)] = tls_listener.audit_events
    assert "TLS handshake failed" in detail["reason"]
    args = tls_args(pki, key=pki.client_key, cert=pki.client_cert)
    assert run_echoscu(tls_listener.port, args=args).returncode == 0  # still serving
