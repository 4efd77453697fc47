"""Shared fixtures for DICOM peers: free ports, DCMTK storescu/echoscu/storescp, a listener
with a recording sink, small CT series. Names here are stable (other service tests use them).

- ``run_storescu(port, files, ...) -> DcmtkRun`` (``.statuses``: one C-STORE status per file)
- ``run_echoscu(port, ...) -> DcmtkRun``
- ``storescp_peer`` fixture: DCMTK storescp on a free port writing into a temp folder
- ``listener_factory`` fixture: ``listener_factory(**settings) -> RunningListener``
- ``ct_series`` fixture: ``ct_series(n_slices=4, ...) -> list[Path]`` (tests.phantoms)
- ``RecordingSink``: a ``SeriesSink`` that keeps arrivals; ``wait_for(n, timeout_s)``
- ``pki`` fixture: CAs and certificates for DICOM TLS tests (``Pki``)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rtcontour.common.settings import Settings
from rtcontour.service.intake import SeriesArrival
from rtcontour.service.listener import ListenerHandle, start_listener
from rtcontour.service.spool import InstanceHeader
from tests.conftest import REPO_ROOT, free_port
from tests.phantoms import write_ct_series

__all__ = [
    "free_port",
    "run_storescu",
    "run_echoscu",
    "send_files_with_pynetdicom",
    "RecordingSink",
    "RunningListener",
    "Pki",
]

LISTENER_AE = "RTCONTOUR"
_SENDING = re.compile(r"Sending file: (?P<path>.+)$")
_STATUS = re.compile(r"DIMSE Status\s*: 0x(?P<code>[0-9a-fA-F]{4})")

# DCMTK as packaged by Debian leaves Nagle's algorithm on unless TCP_NODELAY=1 is set, which
# costs ~40 ms per C-STORE on loopback (delayed ACKs); real TPS senders usually disable it.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

requires_dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None, reason="DCMTK (storescu/storescp) is not installed"
)


@dataclass
class DcmtkRun:
    """A finished DCMTK command: exit code, output, and the C-STORE statuses by file."""

    returncode: int
    output: str
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def status_list(self) -> list[int]:
        return list(self.statuses.values())


def _parse_statuses(output: str) -> dict[str, int]:
    statuses: dict[str, int] = {}
    current: str | None = None
    for line in output.splitlines():
        if match := _SENDING.search(line):
            current = match["path"].strip()
        elif (match := _STATUS.search(line)) and current is not None:
            statuses[current] = int(match["code"], 16)
            current = None
    return statuses


def run_storescu(
    port: int,
    files: Sequence[Path | str],
    *,
    calling_ae: str = "STORESCU",
    called_ae: str = LISTENER_AE,
    host: str = "127.0.0.1",
    args: Sequence[str] = (),
    timeout_s: float = 120.0,
) -> DcmtkRun:
    """Send ``files`` with DCMTK storescu in one association (``-nh``: go on after failures).

    ``statuses`` maps each file sent to the status the listener answered (parsed from ``-d``).
    """
    command = [
        "storescu", "-d", "-nh", "-aet", calling_ae, "-aec", called_ae, *args, host, str(port),
        *map(str, files),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s, env=DCMTK_ENV
    )
    output = done.stdout + done.stderr
    return DcmtkRun(done.returncode, output, _parse_statuses(output))


def run_echoscu(
    port: int,
    *,
    calling_ae: str = "ECHOSCU",
    called_ae: str = LISTENER_AE,
    host: str = "127.0.0.1",
    args: Sequence[str] = (),
    timeout_s: float = 30.0,
) -> DcmtkRun:
    """One C-ECHO with DCMTK echoscu (``-v``, so rejections are in ``output``)."""
    command = ["echoscu", "-v", "-aet", calling_ae, "-aec", called_ae, *args, host, str(port)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s, env=DCMTK_ENV
    )
    return DcmtkRun(done.returncode, done.stdout + done.stderr)


def send_files_with_pynetdicom(
    port: int,
    files: Sequence[Path | str],
    *,
    calling_ae: str = "PYNETDICOM",
    called_ae: str = LISTENER_AE,
    host: str = "127.0.0.1",
) -> list[int | None]:
    """Send Part 10 files as they are (pynetdicom reads only their file meta; the dataset
    bytes go out exactly as stored, however broken) in one association, proposing each
    file's own SOP Class and transfer syntax; return one status per file (None: no
    response)."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, do not re-encode

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    contexts: dict[tuple[str, str], None] = {}
    for path in files:
        meta = read_file_meta_info(path)
        contexts[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))] = None
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError(f"association with {host}:{port} not established")
    statuses: list[int | None] = []
    try:
        for path in files:
            response = assoc.send_c_store(Path(path))
            statuses.append(int(response.Status) if "Status" in response else None)
    finally:
        assoc.release()
    return statuses


class FakeClock:
    """A monotonic clock the test moves by hand (``SeriesTracker(clock=...)``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def instance_header(series_uid: str, sop: int, description: str = "test") -> InstanceHeader:
    """The header of instance number ``sop`` of a CT series (UIDs derived from the numbers)."""
    return InstanceHeader(
        sop_instance_uid=f"{series_uid}.{sop}",
        series_instance_uid=series_uid,
        study_instance_uid="1.2.3.4",
        modality="CT",
        series_description=description,
    )


class RecordingSink:
    """A ``SeriesSink`` that records every arrival (thread-safe)."""

    def __init__(self) -> None:
        self.arrivals: list[SeriesArrival] = []
        self._changed = threading.Condition()

    def series_complete(self, arrival: SeriesArrival) -> None:
        with self._changed:
            self.arrivals.append(arrival)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[SeriesArrival]:
        """Wait until at least ``count`` arrivals were recorded; return them all."""
        with self._changed:
            self._changed.wait_for(lambda: len(self.arrivals) >= count, timeout=timeout_s)
            return list(self.arrivals)

    def wait_for_series(self, series_uid: str, timeout_s: float = 10.0) -> SeriesArrival | None:
        """Wait for an arrival of ``series_uid``; return the latest one (None on timeout)."""
        def latest() -> SeriesArrival | None:
            found = [a for a in self.arrivals if a.series_instance_uid == series_uid]
            return found[-1] if found else None

        with self._changed:
            self._changed.wait_for(lambda: latest() is not None, timeout=timeout_s)
            return latest()

    def by_series(self) -> dict[str, list[SeriesArrival]]:
        grouped: dict[str, list[SeriesArrival]] = {}
        for arrival in list(self.arrivals):
            grouped.setdefault(arrival.series_instance_uid, []).append(arrival)
        return grouped


@dataclass
class RunningListener:
    """A listener started in-process for a test, with its sink, settings and audit records."""

    handle: ListenerHandle
    sink: RecordingSink
    settings: Settings
    audit_events: list[tuple[str, dict[str, Any]]]

    @property
    def port(self) -> int:
        return self.handle.address[1]

    @property
    def incoming_dir(self) -> Path:
        return self.settings.spool_dir / "incoming"

    def spooled_files(self) -> list[Path]:
        return sorted(self.incoming_dir.glob("*/*"))


@pytest.fixture
def listener_factory(tmp_path: Path) -> Iterator[Any]:
    """``listener_factory(**settings_overrides) -> RunningListener``; stopped at teardown.

    Defaults: loopback, a free port, quiet period 0.3 s, no free-disk minimum.
    """
    running: list[RunningListener] = []

    def factory(**overrides: Any) -> RunningListener:
        values: dict[str, Any] = {
            "data_dir": tmp_path / f"var{len(running)}",
            "dicom_host": "127.0.0.1",
            "dicom_port": free_port(),
            "quiet_period_s": 0.3,
            "min_free_disk_bytes": 0,
        }
        values.update(overrides)
        settings = Settings(**values)
        sink = RecordingSink()
        audit_events: list[tuple[str, dict[str, Any]]] = []
        handle = start_listener(
            settings, sink, audit=lambda event, detail: audit_events.append((event, detail))
        )
        listener = RunningListener(handle, sink, settings, audit_events)
        running.append(listener)
        return listener

    yield factory
    for listener in running:
        listener.handle.shutdown(timeout_s=2.0)


@pytest.fixture
def ct_series(tmp_path: Path) -> Any:
    """``ct_series(n_slices=4, rows=16, columns=16, **write_ct_series_kwargs) -> list[Path]``:
    a small synthetic CT series (one file per slice) in a fresh folder."""
    counter = iter(range(1_000_000))

    def factory(
        n_slices: int = 4, rows: int = 16, columns: int = 16, **kwargs: Any
    ) -> list[Path]:
        hu = np.full((n_slices, rows, columns), -1000.0, dtype=np.float32)
        hu[:, rows // 4 : 3 * rows // 4, columns // 4 : 3 * columns // 4] = 40.0
        return write_ct_series(tmp_path / f"series{next(counter)}", hu, (2.5, 1.0, 1.0), **kwargs)

    return factory


@dataclass
class StorescpPeer:
    """DCMTK storescp listening on loopback, writing what it receives into ``folder``."""

    port: int
    folder: Path
    ae_title: str
    process: subprocess.Popen[bytes]

    def received_files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def wait_for_files(self, count: int, timeout_s: float = 10.0) -> list[Path]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(self.received_files()) < count:
            time.sleep(0.05)
        return self.received_files()


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    tps_scp_cert: Path  # a TPS receiving RTSTRUCTs over TLS (server certificate for 127.0.0.1)
    tps_scp_key: Path
    rtcontour_cert: Path  # rtcontour's client certificate when it sends
    rtcontour_key: Path
    rogue_scp_cert: Path  # a server for 127.0.0.1 signed by the other CA
    rogue_scp_key: Path


_SERVER_EXT = "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
_CLIENT_EXT = "extendedKeyUsage=clientAuth\n"
# Pki field prefix -> (file name, signing CA, extensions)
_CERTIFICATES = {
    "server": ("listener", "clinic-ca", _SERVER_EXT),
    "client": ("tps", "clinic-ca", _CLIENT_EXT),
    "rogue": ("rogue", "rogue-ca", _CLIENT_EXT),
    "tps_scp": ("tps-scp", "clinic-ca", _SERVER_EXT),
    "rtcontour": ("rtcontour", "clinic-ca", _CLIENT_EXT),
    "rogue_scp": ("rogue-scp", "rogue-ca", _SERVER_EXT),
}


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


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A clinic CA with the listener's, a TPS client's, a TPS server's and rtcontour's
    certificates, and a rogue CA with a client and a server certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "clinic-ca")
    _ca(folder, "rogue-ca")
    paths = {"ca": folder / "clinic-ca.crt"}
    for prefix, (name, ca, extensions) in _CERTIFICATES.items():
        _signed(folder, name, ca, extensions)
        paths[f"{prefix}_cert"] = folder / f"{name}.crt"
        paths[f"{prefix}_key"] = folder / f"{name}.key"
    return Pki(**paths)


@pytest.fixture
def storescp_peer(tmp_path: Path) -> Iterator[StorescpPeer]:
    """DCMTK storescp (AE ``STORESCP``) on a free loopback port; stopped at teardown."""
    folder = tmp_path / "storescp"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(folder), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield StorescpPeer(port, folder, "STORESCP", process)
    finally:
        process.terminate()
        process.wait(10)


class ListenerProcess:
    """``rtcontour listener --log-only`` as a subprocess on a free port (arrivals are logged)."""

    def __init__(self, data_dir: Path, log: Path, quiet_period_s: float) -> None:
        self.port = free_port()
        self.log_path = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("RTCONTOUR_")}
        env.update(
            RTCONTOUR_DATA_DIR=str(data_dir),
            RTCONTOUR_QUIET_PERIOD_S=str(quiet_period_s),
            RTCONTOUR_MIN_FREE_DISK_BYTES="0",
            PYTHONUNBUFFERED="1",
        )
        command = [sys.executable, "-m", "rtcontour.service.cli", "listener", "--log-only",
                   "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT
        )
        self.wait_for_log("listening on")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"{text!r} not logged:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def start_listener_process(tmp_path: Path) -> Iterator[Any]:
    """``start_listener_process(quiet_period_s=60.0) -> ListenerProcess``; killed at teardown."""
    started: list[ListenerProcess] = []

    def start(quiet_period_s: float = 60.0) -> ListenerProcess:
        process = ListenerProcess(tmp_path / "var", tmp_path / f"l{len(started)}.log",
                                  quiet_period_s)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
