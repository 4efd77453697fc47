"""Sending to ``+tls`` destinations: DCMTK storescp with TLS as the TPS, certificates from the
``pki`` fixture. rtcontour verifies the TPS and presents its own certificate."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rtcontour.common.errors import DestinationUnavailable
from rtcontour.common.settings import Destination, Settings
from rtcontour.service.api.app import c_echo
from rtcontour.worker.sender import Sender
from tests.service.conftest import DCMTK_ENV, Pki, StorescpPeer, requires_dcmtk, wait_for_port

pytestmark = requires_dcmtk


@pytest.fixture
def tls_storescp(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., StorescpPeer]]:
    """``tls_storescp(cert, key) -> StorescpPeer``: storescp requiring a client certificate
    from the clinic CA and presenting ``cert``."""
    from tests.conftest import free_port

    processes: list[subprocess.Popen[bytes]] = []

    def start(cert: Path, key: Path) -> StorescpPeer:
        folder = tmp_path / f"tps{len(processes)}"
        folder.mkdir()
        port = free_port()
        process = subprocess.Popen(
            ["storescp", "-aet", "TPS", "+tls", str(key), str(cert), "+cf", str(pki.ca),
             "-od", str(folder), str(port)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        wait_for_port(port)
        return StorescpPeer(port, folder, "TPS", process)

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


def _settings(tmp_path: Path, pki: Pki, *, with_certificate: bool = True) -> Settings:
    values: dict[str, object] = {"tls_ca_file": pki.ca}
    if with_certificate:
        values.update(tls_cert_file=pki.rtcontour_cert, tls_key_file=pki.rtcontour_key)
    return Settings(data_dir=tmp_path / "var", send_attempts=1, send_backoff_s=0, **values)


def test_destination_syntax_with_tls() -> None:
    destination = Destination.parse("TPS@tps.example.org:2762+tls")
    assert (destination.ae_title, destination.host, destination.port, destination.tls) == (
        "TPS", "tps.example.org", 2762, True)
    assert str(destination) == "TPS@tps.example.org:2762+tls"
    assert Destination.parse("TPS@10.0.0.5:104").tls is False
    with pytest.raises(ValueError, match=r"AE@host:port\[\+tls\]"):
        Destination.parse("TPS@10.0.0.5:104+ssl")


def test_rtstruct_is_stored_over_tls(tmp_path, pki, tls_storescp, ct_series) -> None:
    peer = tls_storescp(pki.tps_scp_cert, pki.tps_scp_key)
    destination = Destination.parse(f"TPS@127.0.0.1:{peer.port}+tls")
    [file] = ct_series(n_slices=1)
    settings = _settings(tmp_path, pki)
    Sender(settings).send_file(file, destination)
    assert len(peer.wait_for_files(1)) == 1
    assert c_echo(destination, settings, timeout_s=5.0) == (True, "C-ECHO succeeded")


def test_tps_requiring_a_client_certificate_refuses_us_without_one(
    tmp_path, pki, tls_storescp, ct_series
) -> None:
    peer = tls_storescp(pki.tps_scp_cert, pki.tps_scp_key)
    destination = Destination.parse(f"TPS@127.0.0.1:{peer.port}+tls")
    with pytest.raises(DestinationUnavailable, match="TLS handshake failed"):
        Sender(_settings(tmp_path, pki, with_certificate=False)).send_file(
            ct_series(n_slices=1)[0], destination)
    assert peer.received_files() == []


def test_tps_with_an_untrusted_certificate_gets_nothing(
    tmp_path, pki, tls_storescp, ct_series
) -> None:
    peer = tls_storescp(pki.rogue_scp_cert, pki.rogue_scp_key)
    destination = Destination.parse(f"TPS@127.0.0.1:{peer.port}+tls")
    settings = _settings(tmp_path, pki)
    with pytest.raises(DestinationUnavailable, match="TLS handshake failed"):
        Sender(settings).send_file(ct_series(n_slices=1)[0], destination)
    assert peer.received_files() == []
    assert c_echo(destination, settings, timeout_s=5.0) == (
        False, "unreachable or TLS handshake failed")
