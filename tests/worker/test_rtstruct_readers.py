"""Independent readers open rtcontour's RTSTRUCT: rt-utils, plastimatch, dicompyler-core, Orthanc.

One RTSTRUCT on a head phantom carries a large structure (External), one with holes (Shell),
one with two islands per slice (Islands) and an empty one (Empty, left out by the writer).
Each reader must open it without error; volumes are printed (run with ``-s``) to document
how readers differ on pixel-edge contours.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from rtcontour.common.volume import CtSeries, load_series
from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, save_rtstruct
from tests.phantoms import head_phantom, write_ct_series
from tests.worker.conftest import dciodvfy_errors, plastimatch_masks

ROIS = [
    RoiSpec("External", (0, 255, 0), "EXTERNAL"),
    RoiSpec("Empty", (255, 255, 0), "ORGAN"),
    RoiSpec("Shell", (0, 0, 255), "ORGAN"),
    RoiSpec("Islands", (255, 0, 0), "ORGAN"),
]
PRESENT = ["External", "Shell", "Islands"]


def _masks(series: CtSeries) -> dict[str, np.ndarray]:
    hu = series.volume.array
    marker = hu > 1200
    return {
        "External": hu > -500,
        "Empty": np.zeros_like(marker),
        "Shell": (hu > 800) & (hu < 1000),  # rings: outer and hole contours
        "Islands": marker | marker[:, :, ::-1],  # the marker and its mirror: two per slice
    }


def _voxel_cc(series: CtSeries) -> float:
    return float(np.prod(series.volume.spacing_mm)) / 1000.0


def _report(reader: str, volumes_cc: dict[str, float], series: CtSeries) -> None:
    masks = _masks(series)
    for name, volume_cc in volumes_cc.items():
        ours = masks[name].sum() * _voxel_cc(series)
        print(  # noqa: T201 - the measured numbers the README quotes (pytest -s)
            f"{reader:>14} {name:>9}: {volume_cc:8.2f} cc vs mask {ours:8.2f} cc "
            f"({100 * (volume_cc / ours - 1):+.1f} %)"
        )


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, CtSeries]:
    """(CT folder, RTSTRUCT path, series) for the phantom."""
    phantom = head_phantom()
    ct_dir = tmp_path_factory.mktemp("ct")
    paths = write_ct_series(ct_dir, phantom.hu, phantom.spacing_mm, patient_id="PID-READERS")
    series = load_series(paths, min_slices=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = build_rtstruct(
            series, _masks(series), ROIS, model_name="hn-unet", model_version="1.2.0",
            min_area_mm2=0.0,
        )  # fmt: skip
    assert any("'Empty'" in str(w.message) and "left out" in str(w.message) for w in caught)
    rs_path = save_rtstruct(dataset, tmp_path_factory.mktemp("rs") / "rs.dcm")
    return ct_dir, rs_path, series


def test_empty_structure_is_left_out_and_dciodvfy_reports_no_error(
    written: tuple[Path, Path, CtSeries],
) -> None:
    dataset = pydicom.dcmread(written[1])
    names = {item.ROINumber: item.ROIName for item in dataset.StructureSetROISequence}
    assert names == {1: "External", 3: "Shell", 4: "Islands"}  # numbers keep their places
    assert [int(r.ReferencedROINumber) for r in dataset.ROIContourSequence] == [1, 3, 4]
    assert all(len(r.ContourSequence) > 0 for r in dataset.ROIContourSequence)
    observed = [int(o.ReferencedROINumber) for o in dataset.RTROIObservationsSequence]
    assert observed == [1, 3, 4]
    assert dciodvfy_errors(written[1]) == []


def test_every_roi_empty_still_gives_a_valid_rtstruct(
    written: tuple[Path, Path, CtSeries], tmp_path: Path
) -> None:
    series = written[2]
    empty = np.zeros(series.volume.shape, dtype=bool)
    with pytest.warns(UserWarning, match="no ROI has one"):
        dataset = build_rtstruct(
            series, {"Empty": empty}, [ROIS[1]], model_name="m", model_version="1"
        )
    assert [r.ROIName for r in dataset.StructureSetROISequence] == ["Empty"]
    assert dciodvfy_errors(save_rtstruct(dataset, tmp_path / "rs.dcm")) == []


def test_rt_utils_reads_every_structure(written: tuple[Path, Path, CtSeries]) -> None:
    rt_utils = pytest.importorskip("rt_utils")
    ct_dir, rs_path, series = written
    rtstruct = rt_utils.RTStructBuilder.create_from(
        dicom_series_path=str(ct_dir), rt_struct_path=str(rs_path)
    )
    assert sorted(rtstruct.get_roi_names()) == sorted(PRESENT)
    masks = _masks(series)
    volumes = {}
    for name in PRESENT:
        mask = rtstruct.get_roi_mask_by_name(name)  # (rows, columns, slices)
        assert mask.shape == (*series.volume.shape[1:], series.volume.shape[0])
        volumes[name] = mask.sum() * _voxel_cc(series)
        ours = masks[name].sum() * _voxel_cc(series)
        # rt-utils fills contour lines as well as insides: it reads more on pixel edges.
        assert ours <= volumes[name] <= 1.6 * ours, name
    _report("rt-utils", volumes, series)


def test_plastimatch_reads_every_structure_exactly(
    written: tuple[Path, Path, CtSeries], tmp_path: Path
) -> None:
    if shutil.which("plastimatch") is None:
        pytest.skip("plastimatch is not installed")
    ct_dir, rs_path, series = written
    read = plastimatch_masks(rs_path, ct_dir, tmp_path / "out", series.volume)
    masks = _masks(series)
    assert sorted(read) == sorted(PRESENT)
    for name in PRESENT:
        np.testing.assert_array_equal(read[name], masks[name], err_msg=name)
    _report("plastimatch", {n: read[n].sum() * _voxel_cc(series) for n in PRESENT}, series)


_DICOMPYLER_SCRIPT = """
import json, sys
from dicompylercore import dicomparser
parser = dicomparser.DicomParser(sys.argv[1])
out = {}
for number, structure in parser.GetStructures().items():
    coords = parser.GetStructureCoordinates(number)
    thickness = parser.CalculatePlaneThickness(coords) if coords else 0.0
    out[structure["name"]] = parser.CalculateStructureVolume(coords, thickness) if coords else 0.0
print(json.dumps(out))
"""


@pytest.fixture(scope="session")
def dicompyler_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway venv with dicompyler-core, pydicom < 3 and shapely (skips if pip cannot)."""
    venv = tmp_path_factory.mktemp("dicompyler") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    try:
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "dicompyler-core", "pydicom<3", "shapely"],
            check=True, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot install dicompyler-core with pydicom<3 (offline?): {exc}")
    return python


@pytest.mark.timeout(900)
def test_dicompyler_core_reads_every_structure(
    written: tuple[Path, Path, CtSeries], dicompyler_python: Path
) -> None:
    _, rs_path, series = written
    result = subprocess.run(
        [str(dicompyler_python), "-c", _DICOMPYLER_SCRIPT, str(rs_path)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    volumes = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(volumes) == sorted(PRESENT)
    masks = _masks(series)
    for name in PRESENT:
        ours = masks[name].sum() * _voxel_cc(series)
        # dicompyler integrates the contour polygons (holes subtracted) and slab thickness.
        assert 0.5 * ours <= volumes[name] <= 1.5 * ours, (name, volumes[name], ours)
    _report("dicompyler-core", volumes, series)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
        return json.loads(response.read())


@pytest.mark.timeout(120)
def test_orthanc_stores_the_rtstruct_sent_by_storescu(
    written: tuple[Path, Path, CtSeries], tmp_path: Path
) -> None:
    orthanc = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if orthanc is None:
        pytest.skip("orthanc is not installed (apt-get install orthanc)")
    if shutil.which("storescu") is None:
        pytest.skip("storescu (dcmtk) is not installed")
    _, rs_path, _ = written
    dicom_port, http_port = _free_port(), _free_port()
    config = {
        "Name": "rtcontour-test",
        "StorageDirectory": str(tmp_path / "storage"),
        "IndexDirectory": str(tmp_path / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomCheckCalledAet": True,
        "Plugins": [],
    }
    config_path = tmp_path / "orthanc.json"
    config_path.write_text(json.dumps(config))
    base = f"http://127.0.0.1:{http_port}"
    log = (tmp_path / "orthanc.log").open("w")
    process = subprocess.Popen([orthanc, str(config_path)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get_json(f"{base}/system")
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail(f"Orthanc did not start: {(tmp_path / 'orthanc.log').read_text()}")
                time.sleep(0.3)
        subprocess.run(
            ["storescu", "-aet", "RTCONTOUR", "-aec", "ORTHANC", "127.0.0.1", str(dicom_port),
             str(rs_path)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        instances = _get_json(f"{base}/instances")
        assert isinstance(instances, list) and len(instances) == 1
        tags = _get_json(f"{base}/instances/{instances[0]}/simplified-tags")
        assert isinstance(tags, dict)
        sent = pydicom.dcmread(rs_path)
        assert tags["SOPInstanceUID"] == sent.SOPInstanceUID
        assert tags["Modality"] == "RTSTRUCT"
        assert [r["ROIName"] for r in tags["StructureSetROISequence"]] == PRESENT
        with urllib.request.urlopen(f"{base}/instances/{instances[0]}/file") as response:  # noqa: S310
            stored = pydicom.dcmread(__import__("io").BytesIO(response.read()))
        for ours, theirs in zip(
            sent.ROIContourSequence, stored.ROIContourSequence, strict=True
        ):
            assert [list(c.ContourData) for c in ours.ContourSequence] == [
                list(c.ContourData) for c in theirs.ContourSequence
            ]
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
