"""Shared helpers of the worker tests: an even-odd rasteriser, dciodvfy, OpenKBP location."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from rtcontour.common.volume import Volume
from rtcontour.worker.mask2rtstruct import LabelMap, resample_nearest

OPENKBP_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "openkbp"


def rasterise(
    polygons_by_slice: Iterable[tuple[int, np.ndarray]], shape: tuple[int, int, int]
) -> np.ndarray:
    """Fill polygons (slice index, (n, 2) row/column index coordinates) even-odd at pixel centres.

    Independent of worker.contours: a scanline crossing count, so overlapping contours on a
    slice combine by XOR (holes cut out), as treatment planning systems do.
    """
    crossings = np.zeros((shape[0], shape[1], shape[2] + 1), dtype=np.int64)
    rows = np.arange(shape[1], dtype=float)
    for slice_index, polygon in polygons_by_slice:
        start = polygon
        end = np.roll(polygon, -1, axis=0)
        for (r1, c1), (r2, c2) in zip(start, end, strict=True):
            if r1 == r2:
                continue
            low, high = min(r1, r2), max(r1, r2)
            hit = rows[(rows >= low) & (rows < high)]
            if hit.size == 0:
                continue
            cols = c1 + (hit - r1) * (c2 - c1) / (r2 - r1)
            first_inside = np.clip(np.ceil(cols).astype(int), 0, shape[2])
            np.add.at(crossings[slice_index], (hit.astype(int), first_inside), 1)
    return (np.cumsum(crossings, axis=2)[:, :, : shape[2]] % 2).astype(bool)


def rtstruct_masks(dataset: Dataset, volume: Volume) -> dict[str, np.ndarray]:
    """Fill each ROI's contours on the CT grid, locating slices by their referenced image."""
    names = {item.ROINumber: item.ROIName for item in dataset.StructureSetROISequence}
    slice_of = {uid: index for index, uid in enumerate(volume.sop_instance_uids)}
    masks = {}
    for roi in dataset.ROIContourSequence:
        polygons = []
        for contour in roi.get("ContourSequence", []):
            points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
            assert len(points) == contour.NumberOfContourPoints
            index = volume.lps_to_index(points)
            slice_index = slice_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            np.testing.assert_allclose(index[:, 0], slice_index, atol=1e-3)
            polygons.append((slice_index, index[:, 1:]))
        masks[names[roi.ReferencedROINumber]] = rasterise(polygons, volume.shape)
    return masks


def plastimatch_masks(
    rs_path: Path, ct_dir: Path, out: Path, volume: Volume
) -> dict[str, np.ndarray]:
    """Rasterise an RTSTRUCT with plastimatch on the CT's grid; masks on ``volume``'s grid."""
    import nrrd

    subprocess.run(
        [
            "plastimatch",
            "convert",
            "--input",
            str(rs_path),
            "--referenced-ct",
            str(ct_dir),
            "--output-prefix",
            str(out),
            "--prefix-format",
            "nrrd",
            "--xor-contours",
        ],
        check=True,
        capture_output=True,
    )
    masks = {}
    for path in sorted(out.glob("*.nrrd")):
        array, header = nrrd.read(str(path))
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(header["space directions"], float).T
        affine[:3, 3] = header["space origin"]
        masks[path.stem] = resample_nearest(LabelMap(array, affine), volume).astype(bool)
    return masks


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dciodvfy reports for a DICOM file (skips the test if it is missing)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dciodvfy_warnings(path: Path) -> list[str]:
    """The warning lines dciodvfy reports for a DICOM file."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Warning" in line]


def openkbp_patient(name: str = "pt_1.npz") -> Path:
    """Path of an OpenKBP training patient, or skip the test when the data is absent."""
    path = OPENKBP_DIR / "train" / name
    if not path.exists():
        pytest.skip(f"OpenKBP data not found at {path.resolve()}")
    return path
