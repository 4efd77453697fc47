"""Shared helpers of the worker tests: an even-odd rasteriser, dciodvfy, OpenKBP location."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

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
