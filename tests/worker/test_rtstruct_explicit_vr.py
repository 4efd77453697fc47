"""A contour whose Contour Data exceeds 64 KB reaches a TPS intact, or not at all.

Explicit VR gives DS a 16-bit length; pydicom then sends the element as UN (PS3.5 6.2.2) and
the receiver stores bytes that pydicom cannot read back as points (measured). The sender
therefore offers RTSTRUCTs in Implicit VR Little Endian only.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from rtcontour.common.errors import DestinationUnavailable
from rtcontour.common.settings import Destination, Settings
from rtcontour.common.volume import load_series
from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, save_rtstruct
from rtcontour.worker.sender import Sender
from tests.phantoms import ct_datasets

_CONFIG = """\
[[TransferSyntaxes]]
[ExplicitLittleOnly]
TransferSyntax1 = 1.2.840.10008.1.2.1
[[PresentationContexts]]
[RtStructOnly]
PresentationContext1 = 1.2.840.10008.5.1.4.1.1.481.3\\ExplicitLittleOnly
[[Profiles]]
[ExplicitOnly]
PresentationContexts = RtStructOnly
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(120)
def test_contour_over_64_kilobytes_arrives_intact_or_is_refused_loudly(
    tmp_path: Path,
) -> None:
    if shutil.which("storescp") is None:
        pytest.skip("storescp (dcmtk) is not installed")
    datasets = ct_datasets(np.zeros((2, 1024, 1024), np.float32), (3.0, 0.488, 0.488))
    series = load_series(datasets, min_slices=1)
    rows, cols = np.mgrid[:1024, :1024]
    diamond = np.abs(rows - 512) + np.abs(cols - 512) <= 500  # staircase edges: ~4,000 corners
    mask = np.stack([diamond, np.zeros_like(diamond)])
    dataset = build_rtstruct(
        series, {"Diamond": mask}, [RoiSpec("Diamond", (9, 9, 9))], model_name="m",
        model_version="1", min_area_mm2=0.0,
    )  # fmt: skip
    rs_path = save_rtstruct(dataset, tmp_path / "rs.dcm")
    (sent,) = pydicom.dcmread(rs_path).ROIContourSequence[0].ContourSequence
    assert sent.NumberOfContourPoints > 2800
    assert len(sent["ContourData"].value) > 0 and sum(
        len(str(v)) + 1 for v in sent.ContourData
    ) > 65535

    config = tmp_path / "storescp.cfg"
    config.write_text(_CONFIG)
    def send(*arguments: str) -> Path:
        received = tmp_path / f"received{len(arguments)}"
        received.mkdir()
        port = _free_port()
        process = subprocess.Popen(
            ["storescp", "-aet", "TPS", *arguments, "-od", str(received), str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(1.0)
            settings = Settings(data_dir=tmp_path / "var", send_attempts=1, send_backoff_s=0)
            Sender(settings).send_file(rs_path, Destination("TPS", "127.0.0.1", port))
            deadline = time.monotonic() + 20
            while not list(received.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            process.terminate()
            process.wait(timeout=10)
        (stored_path,) = list(received.iterdir())
        return stored_path

    # A TPS that accepts only Explicit VR LE refuses the RTSTRUCT loudly, never corrupts it.
    with pytest.raises(DestinationUnavailable):
        send("-xf", str(config), "ExplicitOnly")
    # A TPS that prefers Explicit VR (storescp's default) gets Implicit VR and every point.
    stored = pydicom.dcmread(send("+xe"))
    assert stored.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    (arrived,) = stored.ROIContourSequence[0].ContourSequence
    assert arrived.NumberOfContourPoints == sent.NumberOfContourPoints
    np.testing.assert_array_equal(
        np.asarray(arrived.ContourData, float), np.asarray(sent.ContourData, float)
    )
