"""Dose model inputs, model grid and the OpenKBP challenge metrics (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from rtcontour.models.dose.features import (
    CHANNEL_NAMES,
    N_CHANNELS,
    OAR_NAMES,
    body_mask_from_hu,
    input_channels,
    make_model_grid,
    point_sampled_dose,
    prefiltered_resample,
    ptv_prescription_map,
    to_input_grid,
)
from rtcontour.models.dose.metrics import dose_score, dvh_metrics, dvh_score
from tests.phantoms import head_phantom

SPACING = (2.5, 3.9, 3.9)


def _ball(shape, centre, radius_vox):
    grid = np.indices(shape).astype(float)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius_vox ** 2


def test_model_grid_covers_the_body_box_with_margin_and_is_padded_to_the_divisor():
    body = np.zeros((60, 50, 50), dtype=bool)
    body[10:40, 5:30, 12:45] = True
    grid = make_model_grid(body, SPACING, (5.0, 8.0, 8.0), divisor=8, margin_mm=10.0)
    assert grid.box == (slice(6, 44), slice(2, 33), slice(9, 48))
    assert all(p % 8 == 0 and p >= s for p, s in zip(grid.padded_shape, grid.shape, strict=True))
    assert grid.shape == (19, 15, 19)


def test_model_grid_refuses_an_empty_body():
    with pytest.raises(ValueError, match="body_mask is empty"):
        make_model_grid(np.zeros((4, 4, 4), dtype=bool), SPACING)


def test_a_mask_filtered_over_its_own_box_equals_the_whole_crop_filtered():
    shape = (50, 60, 70)
    body = np.ones(shape, dtype=bool)
    grid = make_model_grid(body, (1.0, 0.9, 0.9), divisor=1, margin_mm=0.0)
    for mask in (_ball(shape, (25, 30, 35), 6), _ball(shape, (2, 3, 66), 5),
                 np.zeros(shape, dtype=bool)):
        fast = prefiltered_resample(mask, grid)
        slow = prefiltered_resample(mask.astype(np.float32), grid, sparse=False)
        np.testing.assert_allclose(fast, slow, atol=1e-6)


def test_highest_prescription_wins_where_ptvs_overlap():
    low = np.zeros((4, 4, 4), dtype=bool)
    high = np.zeros_like(low)
    low[:, :, :3] = True
    high[:, :, 2:] = True
    prescription = ptv_prescription_map([(high, 70.0), (low, 56.0)], low.shape)
    assert prescription[0, 0, 0] == 56.0
    assert prescription[0, 0, 2] == 70.0
    assert prescription[0, 0, 3] == 70.0


def test_prescription_out_of_range_is_refused_with_its_index():
    with pytest.raises(ValueError, match=r"ptvs\[0\] prescription"):
        ptv_prescription_map([(np.ones((2, 2, 2), dtype=bool), 7000.0)], (2, 2, 2))


def test_input_channels_have_one_channel_per_name_and_air_padding():
    shape = (40, 48, 48)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = _ball(shape, (20, 24, 24), 15)
    hu[body] = 40.0
    ptv = _ball(shape, (20, 24, 24), 5)
    oars: list[np.ndarray | None] = [None] * len(OAR_NAMES)
    oars[0] = _ball(shape, (10, 24, 24), 3)
    grid = make_model_grid(body, SPACING, divisor=8)
    channels = input_channels(hu, oars, [(ptv, 70.0)], body, grid)
    assert channels.shape == (N_CHANNELS, *grid.padded_shape) and len(CHANNEL_NAMES) == N_CHANNELS
    assert channels[0].min() >= -1.0 and channels[0].max() <= 1.0
    inner = tuple(slice(0, n) for n in grid.shape)
    assert channels[1][inner].max() > 0.3 and not channels[2].any()
    ptv_channel = channels[CHANNEL_NAMES.index("PTV")]
    assert 0.9 < ptv_channel.max() <= 1.0
    if grid.padded_shape[0] > grid.shape[0]:
        assert np.all(channels[0][grid.shape[0]:] == -1.0)
        assert not channels[1:, grid.shape[0]:].any()


def test_smooth_dose_survives_the_trip_to_the_model_grid_and_back():
    shape = (64, 64, 64)
    body = _ball(shape, (32, 32, 32), 28)
    z, y, x = np.indices(shape).astype(np.float32)
    dose = 60.0 * np.exp(-((z - 32) ** 2 + (y - 30) ** 2 + (x - 34) ** 2) / (2 * 12.0 ** 2))
    dose = np.where(body, dose, 0.0).astype(np.float32)
    grid = make_model_grid(body, SPACING, divisor=8)
    model = point_sampled_dose(dose, body, grid)
    back = to_input_grid(model, grid, shape)
    assert back.shape == shape
    assert dose_score(dose, back, body) < 0.5
    assert not back[:, :, :grid.box[2].start].any()


def test_body_mask_from_hu_fills_the_head_and_drops_the_couch():
    phantom = head_phantom()
    hu = phantom.hu.copy()
    hu[:, -2:, :] = 200.0  # a couch touching nothing
    hu[phantom.body & (hu < 100)] = -900.0  # air cavity inside the head
    body = body_mask_from_hu(hu)
    assert not body[:, -2:, :].any()
    assert np.array_equal(body[5:-5], phantom.body[5:-5]) or (
        (body ^ phantom.body).sum() < 0.02 * phantom.body.sum())


def test_dose_score_is_the_mean_absolute_error_over_the_possible_dose_mask():
    mask = np.zeros((2, 2, 2), dtype=bool)
    mask[0] = True
    reference = np.where(mask, 10.0, 0.0)
    predicted = np.full((2, 2, 2), 12.0)  # outside the mask it is masked away
    assert dose_score(reference, predicted, mask) == pytest.approx(2.0)


def test_dvh_metrics_follow_the_challenge_percentiles():
    dose = np.arange(1000, dtype=np.float64).reshape(10, 10, 10)
    mask = np.ones_like(dose, dtype=bool)
    # 2 mm voxels: 8 mm^3, so 0.1 cc = round(12.5) = 12 voxels -> percentile 100 - 1.2
    values = dvh_metrics(dose, {"Brainstem": mask}, {"PTV70": mask}, (2.0, 2.0, 2.0))
    assert values[("D_0.1_cc", "Brainstem")] == pytest.approx(np.percentile(dose, 98.8))
    assert values[("mean", "Brainstem")] == pytest.approx(499.5)
    assert values[("D_99", "PTV70")] == pytest.approx(np.percentile(dose, 1))
    assert values[("D_95", "PTV70")] == pytest.approx(np.percentile(dose, 5))
    assert values[("D_1", "PTV70")] == pytest.approx(np.percentile(dose, 99))


def test_dvh_metrics_of_an_oar_under_a_tenth_of_a_cc_clip_the_percentile_at_zero():
    dose = np.arange(8, dtype=np.float64).reshape(2, 2, 2)
    values = dvh_metrics(dose, {"Larynx": np.ones((2, 2, 2), bool)}, {}, (1.0, 1.0, 1.0))
    assert values[("D_0.1_cc", "Larynx")] == 0.0


def test_dvh_score_pools_every_metric_of_every_patient():
    reference = [{("mean", "A"): 10.0, ("D_1", "P"): 70.0}, {("mean", "A"): 5.0}]
    predicted = [{("mean", "A"): 12.0, ("D_1", "P"): 69.0}, {("mean", "A"): 5.0}]
    assert dvh_score(reference, predicted) == pytest.approx(1.0)
