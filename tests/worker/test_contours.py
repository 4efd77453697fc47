"""Mask -> pixel-edge contours: exact round trip, holes, islands, corners, specks, LPS."""

from __future__ import annotations

import numpy as np
import pytest

from rtcontour.common.volume import Volume, load_series
from rtcontour.worker.contours import mask_to_contours, trace_outlines
from tests.phantoms import PATIENT_POSITIONS, ct_datasets, head_phantom
from tests.worker.conftest import rasterise


def _volume(shape: tuple[int, int, int], spacing=(2.0, 0.8, 1.2)) -> Volume:
    affine = np.eye(4)  # slices along z, rows along y, columns along x
    affine[:3, :3] = [[0, 0, spacing[2]], [0, spacing[1], 0], [spacing[0], 0, 0]]
    affine[:3, 3] = (-10.0, 20.0, 30.0)
    return Volume(np.zeros(shape, np.float32), affine, "1.2.3")


def _round_trip(mask: np.ndarray, volume: Volume) -> np.ndarray:
    contours = mask_to_contours(mask, volume)
    polygons = [(c.slice_index, volume.lps_to_index(c.points_mm)[:, 1:]) for c in contours]
    return rasterise(polygons, mask.shape)


@pytest.mark.parametrize("seed", range(6), ids=[f"seed{s}" for s in range(6)])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.7], ids=["sparse", "half", "dense"])
def test_random_masks_rasterise_back_exactly(seed: int, density: float) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((3, 17, 23)) < density
    np.testing.assert_array_equal(_round_trip(mask, _volume(mask.shape)), mask)


def test_hole_is_a_separate_inner_contour() -> None:
    mask = np.zeros((1, 9, 9), bool)
    mask[0, 1:8, 1:8] = True
    mask[0, 3:6, 3:6] = False
    contours = mask_to_contours(mask, _volume(mask.shape, (1.0, 1.0, 1.0)))
    assert sorted((c.is_hole, c.area_mm2) for c in contours) == [(False, 49.0), (True, 9.0)]
    np.testing.assert_array_equal(_round_trip(mask, _volume(mask.shape)), mask)


def test_each_island_is_its_own_contour_and_diagonal_neighbours_are_separate() -> None:
    mask = np.zeros((1, 6, 8), bool)
    mask[0, 1, 1] = mask[0, 2, 2] = True  # touching only at a corner
    mask[0, 3:5, 5:7] = True
    contours = mask_to_contours(mask, _volume(mask.shape, (1.0, 1.0, 1.0)))
    assert sorted(c.area_mm2 for c in contours) == [1.0, 1.0, 4.0]
    assert not any(c.is_hole for c in contours)
    np.testing.assert_array_equal(_round_trip(mask, _volume(mask.shape)), mask)


def test_diagonal_holes_inside_a_block_rasterise_back() -> None:
    mask = np.ones((1, 6, 6), bool)
    mask[0, 2, 2] = mask[0, 3, 3] = False
    np.testing.assert_array_equal(_round_trip(mask, _volume(mask.shape)), mask)


def test_single_pixel_contour_follows_the_pixel_edges() -> None:
    mask = np.zeros((2, 5, 5), bool)
    mask[1, 2, 3] = True
    volume = _volume(mask.shape, (2.0, 0.8, 1.2))
    (contour,) = mask_to_contours(mask, volume)
    assert contour.slice_index == 1 and contour.area_mm2 == pytest.approx(0.96)
    centre = volume.index_to_lps(np.array([[1, 2, 3]]))[0]
    offsets = np.abs(contour.points_mm - centre)
    np.testing.assert_allclose(offsets, [[0.6, 0.4, 0.0]] * 4)
    assert len(contour.points_mm) == 4


def test_straight_runs_keep_only_their_corners() -> None:
    mask = np.zeros((1, 20, 30), bool)
    mask[0, 2:18, 3:27] = True
    (contour,) = mask_to_contours(mask, _volume(mask.shape))
    assert len(contour.points_mm) == 4


def test_specks_below_the_area_are_dropped_and_small_holes_filled() -> None:
    mask = np.zeros((1, 20, 20), bool)
    mask[0, 2:12, 2:12] = True
    mask[0, 5, 5] = False  # 1 mm2 hole
    mask[0, 15, 15] = True  # 1 mm2 speck
    mask[0, 15:18, 2:5] = True  # 9 mm2 island
    volume = _volume(mask.shape, (1.0, 1.0, 1.0))
    contours = mask_to_contours(mask, volume, min_area_mm2=2.0)
    assert sorted(c.area_mm2 for c in contours) == [9.0, 100.0]
    kept = rasterise(
        [(c.slice_index, volume.lps_to_index(c.points_mm)[:, 1:]) for c in contours], mask.shape
    )
    expected = mask.copy()
    expected[0, 5, 5], expected[0, 15, 15] = True, False
    np.testing.assert_array_equal(kept, expected)


def test_smoothing_is_off_by_default_and_keeps_the_area_close_when_on() -> None:
    yy, xx = np.mgrid[:40, :40]
    mask = (((yy - 20) ** 2 + (xx - 20) ** 2) < 15**2)[None]
    volume = _volume(mask.shape, (1.0, 1.0, 1.0))
    (plain,) = mask_to_contours(mask, volume)
    (smooth,) = mask_to_contours(mask, volume, smoothing=True)
    assert len(smooth.points_mm) > len(plain.points_mm)
    x, y = smooth.points_mm[:, 0], smooth.points_mm[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    assert area == pytest.approx(mask.sum(), rel=0.03)


def test_empty_mask_has_no_contours() -> None:
    assert mask_to_contours(np.zeros((2, 4, 4), bool), _volume((2, 4, 4))) == []
    assert len(trace_outlines(np.zeros((2, 4, 4), bool)).slice_index) == 0


@pytest.mark.parametrize("position", PATIENT_POSITIONS)
def test_contours_lie_on_the_marker_in_patient_space_for_every_position(position: str) -> None:
    phantom = head_phantom()
    series = load_series(
        ct_datasets(phantom.hu, phantom.spacing_mm, patient_position=position), min_slices=1
    )
    volume = series.volume
    mask = volume.array > 1200
    contours = mask_to_contours(mask, volume)
    np.testing.assert_array_equal(_round_trip(mask, volume), mask)
    marker_mm = volume.index_to_lps(np.argwhere(mask))
    points = np.concatenate([c.points_mm for c in contours])
    # Pixel-edge outlines reach half a pixel beyond the marker's voxel centres, in x and y.
    half_pixel_mm = 0.5 * np.abs(volume.directions[1:, :2]).T @ np.array(volume.spacing_mm[1:])
    for axis in (0, 1):
        extent = half_pixel_mm[axis]
        assert points[:, axis].min() == pytest.approx(marker_mm[:, axis].min() - extent)
        assert points[:, axis].max() == pytest.approx(marker_mm[:, axis].max() + extent)
    slice_z = {round(z, 3) for z in marker_mm[:, 2]}
    assert {round(z, 3) for z in points[:, 2]} == slice_z
