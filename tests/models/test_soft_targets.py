"""Soft (partial-volume) training targets: what the reference occupies of each training voxel,
so thin organs keep their volume on the 3 x 4 x 4 mm grid (issue 20)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from rtcontour.models.data import (
    SOFT_SCALE,
    load_split,
    occupancy_matrix,
    preprocess_case,
    resample_occupancy,
)
from rtcontour.models.labels import ORGANS
from rtcontour.models.resampling import resample_linear

from .test_reference_qa import CORD, write_openkbp_case

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")

from rtcontour.models.train import PatchSampler, TrainConfig, load_checkpoint, train  # noqa: E402

from .conftest import make_cases, tiny_config  # noqa: E402


def test_occupancy_of_a_thin_cord_keeps_its_volume_where_thresholding_shrinks_it():
    # a cord 7 x 7 voxels of 1.2 mm on 2 mm slices, off the 4 mm grid's centres
    spacing, target = (2.0, 1.2, 1.2), (3.0, 4.0, 4.0)
    mask = np.zeros((60, 80, 80), dtype=bool)
    mask[5:55, 37:44, 41:48] = True
    volume = mask.sum() * np.prod(spacing)
    occupancy = resample_occupancy(mask, spacing, target)
    assert occupancy.sum() * np.prod(target) == pytest.approx(volume, rel=1e-4)
    assert occupancy.max() <= 1.0 and occupancy.min() >= 0.0
    thresholded = (resample_linear(mask.astype(np.float32), spacing, target) >= 0.5).sum()
    # what the hard labels taught: a volume off by a third here (too large at this offset,
    # too small at others)
    assert abs(thresholded * np.prod(target) - volume) > 0.3 * volume


def test_occupancy_matrix_rows_are_shares_of_the_output_voxel():
    matrix = occupancy_matrix(10, 2.0, 6, 3.0)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-6)
    # output voxel 1 spans 1.5..4.5 mm: input voxels 1 (1..3 mm) and 2 (3..5 mm), 1.5 mm each
    np.testing.assert_allclose(matrix[1, 1:3], [0.5, 0.5], rtol=1e-6)


def test_soft_cases_cache_apart_and_label_where_occupancy_reaches_a_half(tmp_path):
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    write_openkbp_case(split / "pt_1.npz", cord_half_width=1)
    (hard,) = load_split(tmp_path / "data", "train", tmp_path / "cache", workers=1)
    (soft,) = load_split(tmp_path / "data", "train", tmp_path / "cache", workers=1,
                         soft_targets=True)
    (cached,) = load_split(tmp_path / "data", "train", tmp_path / "cache", workers=1,
                           soft_targets=True)
    assert hard.soft is None and soft.soft is not None
    np.testing.assert_array_equal(cached.soft, soft.soft)
    cord = soft.soft[CORD]
    assert cord.dtype == np.uint8 and 0 < cord.max() <= SOFT_SCALE
    np.testing.assert_array_equal((soft.labels >> CORD) & 1, cord >= (SOFT_SCALE + 1) // 2)
    fresh = preprocess_case(split / "pt_1.npz", soft_targets=True)
    # 3 x 3 voxels of 4 mm per slice on 3 mm slices, 20 slices: 2,880 mm^3 exactly
    assert fresh.soft[CORD].sum() / SOFT_SCALE * 48.0 == pytest.approx(20 * 9 * 48.0, rel=0.01)
    assert len({p.parent.parent.name for p in (tmp_path / "cache").rglob("*.npz")}) == 2


def _soft_cases():
    cases = make_cases()
    for case in cases:
        soft = np.zeros((len(ORGANS), *case.labels.shape), dtype=np.uint8)
        for channel in range(len(ORGANS)):
            soft[channel] = ((case.labels >> channel) & 1) * 200  # 78 % occupancy inside
        case.soft = soft
    return cases


def test_sampler_hands_out_the_occupancy_as_the_target():
    sampler = PatchSampler(_soft_cases(), (16, 32, 32), 1.0, np.random.default_rng(1))
    _, target, known = sampler.batch(4)
    np.testing.assert_allclose(np.unique(target.numpy()), [0.0, 200 / 255], rtol=1e-6)


def test_soft_targets_train_resume_exactly_and_switch_on_at_a_resume(tmp_path):
    recipe = dict(spatial_aug_p=1.0, deep_supervision=1, soft_targets=True)
    cases = _soft_cases()
    full = train(tiny_config(steps=4, **recipe), cases, [], tmp_path / "full")
    train(tiny_config(steps=4, **recipe), cases, [], tmp_path / "split", stop_after=2)
    resumed = train(tiny_config(steps=4, **recipe), cases, [], tmp_path / "split", resume=True)
    for name, tensor in full["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=0, msg=name)
    # a hard-label run switched to soft targets keeps its schedule (no warm-up again)
    hard = dict(recipe, soft_targets=False)
    train(tiny_config(steps=6, **hard), cases, [], tmp_path / "switch", stop_after=3)
    lr_before = load_checkpoint(tmp_path / "switch" / "last.pt")["optimizer"][
        "param_groups"][0]["lr"]
    switched = train(tiny_config(steps=6, **recipe), cases, [], tmp_path / "switch",
                     resume=True, stop_after=4)
    assert TrainConfig.from_dict(switched["config"]).soft_targets
    lr_after = switched["optimizer"]["param_groups"][0]["lr"]
    assert 0 < lr_after < lr_before  # one more step down the same poly decay


def test_cli_switches_a_run_to_soft_targets_on_resume_and_says_so(tmp_path):
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    (tmp_path / "data" / "validation").mkdir()
    for number in (1, 2):
        write_openkbp_case(split / f"pt_{number}.npz", cord_half_width=2)
    common = [sys.executable, "-m", "rtcontour.models.train", "--run", "r", "--runs-dir",
              str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), "--cache-dir",
              str(tmp_path / "cache"), "--no-progress", "--no-bf16", "--threads", "1"]
    first = subprocess.run(common + ["--steps", "4", "--stop-after", "1", "--patch", "16,32,32",
                                     "--base-channels", "4", "--levels", "3",
                                     "--max-channels", "8", "--val-cases", "0"],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(common + ["--resume", "--soft-targets", "--stop-after", "2"],
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "switching to soft targets" in second.stderr
    payload = load_checkpoint(tmp_path / "runs" / "r" / "last.pt")
    assert payload["step"] == 2 and payload["config"]["soft_targets"] is True
