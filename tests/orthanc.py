"""Orthanc on loopback as a test peer: a PACS (C-STORE, C-FIND, C-MOVE/C-GET) and, with its
DICOMweb plugin (Debian ``orthanc-dicomweb``), a STOW-RS/QIDO-RS server.

``running_orthanc(folder, ...)`` starts ``Orthanc`` with a configuration of its own (free
ports, storage under ``folder``) and stops it afterwards; it skips the test when Orthanc (or
the plugin, when asked for) is not installed.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "rtcontour", "orthanc-test-password"


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc: its AE title and ports, and its REST API (basic auth)."""

    ae_title: str
    dicom_port: int
    http_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.dicom_port}"

    def _request(self, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(f"{self.base_url}{path}", data=body)  # noqa: S310
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            data = response.read()
        return json.loads(data) if data[:1] in (b"[", b"{") else data

    def get(self, path: str) -> Any:
        return self._request(path)

    def post(self, path: str, body: bytes) -> Any:
        return self._request(path, body)

    def instances(self) -> list[str]:
        found = self.get("/instances")
        assert isinstance(found, list)
        return found

    def instance_file(self, orthanc_id: str) -> bytes:
        data = self.get(f"/instances/{orthanc_id}/file")
        assert isinstance(data, bytes)
        return data

    def upload(self, path: Path) -> None:
        """Store a DICOM file through the REST API (as if a modality had sent it)."""
        self.post("/instances", path.read_bytes())


@contextmanager
def running_orthanc(
    folder: Path,
    *,
    dicomweb: bool = False,
    modalities: dict[str, tuple[str, str, int]] | None = None,
    ae_title: str = "ORTHANC",
    dicomweb_servers: dict[str, dict[str, Any]] | None = None,
) -> Iterator[Orthanc]:
    """Orthanc with storage in ``folder``; ``modalities`` name the peers it may C-MOVE to
    (name -> (AE title, host, port)); ``dicomweb`` loads the DICOMweb plugin (at
    ``/dicom-web``, basic auth ``USER``/``PASSWORD``); ``dicomweb_servers``: the DICOMweb
    servers it may STOW to (name -> {"Url": ..., "HttpHeaders": {...}}), through
    ``POST /dicom-web/servers/<name>/stow``."""
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if binary is None:
        pytest.skip("orthanc is not installed (apt-get install orthanc)")
    if dicomweb and not DICOMWEB_PLUGIN.exists():
        pytest.skip("orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    orthanc = Orthanc(ae_title, _free_port(), _free_port())
    config: dict[str, Any] = {
        "Name": "rtcontour-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "DicomAet": ae_title,
        "DicomPort": orthanc.dicom_port,
        "HttpPort": orthanc.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomServerEnabled": True,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
        "DicomModalities": {
            name: [ae, host, port] for name, (ae, host, port) in (modalities or {}).items()
        },
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/",
                     "Servers": dict(dicomweb_servers or {})},
    }
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log_path = folder / "orthanc.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    orthanc.get("/system")
                    break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        pytest.fail(f"Orthanc did not start: {log_path.read_text()}")
                    time.sleep(0.2)
            yield orthanc
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
