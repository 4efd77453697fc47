"""Real anatomy: an OpenKBP patient's structures on a 512x512 CT survive our RTSTRUCT exactly,
as rasterised independently by plastimatch (holes and islands included)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from rtcontour.common.volume import load_series
from rtcontour.worker.contours import trace_outlines
from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, save_rtstruct
from tests.phantoms import openkbp_ct, openkbp_masks, write_ct_series
from tests.worker.conftest import dciodvfy_errors, openkbp_patient, plastimatch_masks

PATIENT = "pt_10.npz"  # PTV56/PTV70 have holes and several islands on these slices
SLICES = slice(40, 72)
UPSAMPLE = 4  # 128 -> 512 pixels in-plane, nearest neighbour


def _upsample(array: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(array[SLICES], UPSAMPLE, axis=1), UPSAMPLE, axis=2)


def test_openkbp_structures_round_trip_through_plastimatch_with_dice_one(tmp_path: Path) -> None:
    if shutil.which("plastimatch") is None:
        pytest.skip("plastimatch is not installed")
    npz = openkbp_patient(PATIENT)
    hu, spacing = openkbp_ct(npz)
    masks = {name: _upsample(mask) for name, mask in openkbp_masks(npz).items()}
    masks = {name: mask for name, mask in masks.items() if mask.any()}
    outlines = trace_outlines(np.stack([m for m in masks.values()]).reshape(-1, 512, 512))
    assert (outlines.signed_area_px < 0).any(), "the chosen slices should hold holes"
    islands_per_slice = np.bincount(outlines.slice_index[outlines.signed_area_px > 0])
    assert islands_per_slice.max() > 1, "the chosen slices should hold several islands"

    ct_dir = tmp_path / "ct"
    paths = write_ct_series(
        ct_dir, _upsample(hu), (spacing[0], spacing[1] / UPSAMPLE, spacing[2] / UPSAMPLE)
    )
    series = load_series(paths, min_slices=10)
    assert series.volume.shape == (SLICES.stop - SLICES.start, 512, 512)
    on_grid = {name: series.volume.array_from_canonical(mask) for name, mask in masks.items()}
    rois = [RoiSpec(name, (255, 128, 0)) for name in on_grid]
    dataset = build_rtstruct(
        series, on_grid, rois, model_name="openkbp-truth", model_version="1", min_area_mm2=0.0
    )
    rs_path = save_rtstruct(dataset, tmp_path / "rs" / "rs.dcm")
    assert dciodvfy_errors(rs_path) == []

    rasterised = plastimatch_masks(rs_path, ct_dir, tmp_path / "out", series.volume)
    dice = {
        name: 2 * np.sum(rasterised[name] & mask) / (rasterised[name].sum() + mask.sum())
        for name, mask in on_grid.items()
    }
    assert min(dice.values()) >= 0.99, dice
