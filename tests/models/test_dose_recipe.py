"""The dose recipe of issue 21: a loss that holds the targets' cold end, and augmentation that
fits dose (rotation about the long axis, sub-voxel shifts), resumable and fixed for a run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")

from rtcontour.models.dose.train import (  # noqa: E402
    DoseTrainConfig,
    augment_batch,
    dose_loss,
    generalised_means,
    train,
)

from .test_dose_training import synthetic_cases, tiny_config  # noqa: E402


def _ptv_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    target = torch.full((1, 8, 8, 8), 70.0)
    weight = torch.ones(1, 8, 8, 8)
    structures = torch.zeros(1, 10, 8, 8, 8)
    structures[0, 9] = 1.0  # PTV70 everywhere
    return target, weight, structures


def test_cold_moment_follows_the_cold_end_of_a_ptv():
    dose = torch.full((1, 1, 1, 100), 70.0)
    dose[..., :5] = 50.0  # 5 % of the PTV 20 Gy cold: D95 falls, the mean barely moves
    occupancy = torch.ones(1, 1, 1, 1, 100)
    mean, cold, colder = generalised_means(dose, occupancy, (1.0, -8.0, -16.0))[0, 0]
    assert float(mean) == pytest.approx(69.0, rel=1e-4)
    assert 70.0 - float(cold) > 4 * (70.0 - float(mean))
    assert float(colder) < float(cold) < 70.0


def test_an_underdosed_ptv_edge_costs_more_with_the_target_terms():
    target, weight, structures = _ptv_case()
    cold = target.clone()
    cold[0, 0] = 55.0  # one slab of the PTV 15 Gy short: the under-dosing planners see first
    plain, _ = dose_loss(cold, target, weight, structures)
    held, parts = dose_loss(cold, target, weight, structures, ptv_weight=3.0,
                            ptv_cold_moment=-8.0)
    assert parts["ptv_cold_gy2"] > 10.0  # the cold end sits > 3 Gy below the planned
    assert float(held) - float(plain) > 0.1  # the cold end adds to the gradient on the edge
    perfect, _ = dose_loss(target, target, weight, structures, ptv_weight=3.0,
                           ptv_cold_moment=-8.0)
    assert float(perfect) == pytest.approx(0.0, abs=1e-3)
    empty, _ = dose_loss(torch.zeros_like(target), target, weight, structures,
                         ptv_cold_moment=-8.0)
    assert torch.isfinite(empty)


def test_augmentation_moves_dose_and_structures_together_and_keeps_the_dose():
    cases = synthetic_cases(1, shape=(16, 24, 24))
    inputs = torch.from_numpy(cases[0].inputs.astype(np.float32))[None]
    target = torch.from_numpy(cases[0].target_gy)[None]
    structures = inputs[:, 1:].clone()
    same = augment_batch(inputs, target, structures, np.random.default_rng(0), 1.0, 0.0, 0.0)
    torch.testing.assert_close(same[1], target, atol=1e-4, rtol=0)
    x, y, s = augment_batch(inputs, target, structures, np.random.default_rng(1), 1.0, 10.0, 0.5)
    assert not torch.allclose(y, target, atol=0.5)
    # the PTV (input channel and structure) and the dose peak move as one
    ptv_in, ptv_s = x[0, -2], s[0, -2]
    torch.testing.assert_close(ptv_in, ptv_s)
    inside = float((y[0] * ptv_in).sum() / ptv_in.sum())
    assert inside > 60.0  # the hot region still lies on the PTV
    assert float(y.max()) <= 70.0 + 1e-3 and float(ptv_in.sum()) == pytest.approx(
        float(inputs[0, -2].sum()), rel=0.1)
    untouched = augment_batch(inputs, target, structures, np.random.default_rng(1), 0.0, 10.0, 0.5)
    assert untouched[1] is target


def test_recipe_trains_resumes_exactly_and_is_stored(tmp_path):
    recipe = dict(augment_p=1.0, ptv_weight=3.0, ptv_cold_moment=-8.0)
    cases = synthetic_cases()
    straight = train(tiny_config(**recipe), cases, [], tmp_path / "straight")
    train(tiny_config(**recipe), cases, [], tmp_path / "split", stop_after=2)
    resumed = train(tiny_config(**recipe), cases, [], tmp_path / "split", resume=True)
    for name, tensor in straight["model"].items():
        assert torch.allclose(tensor, resumed["model"][name], atol=1e-6), name
    stored = DoseTrainConfig.from_dict(resumed["config"])
    assert (stored.augment_p, stored.ptv_weight, stored.ptv_cold_moment) == (1.0, 3.0, -8.0)


def test_cli_refuses_to_change_the_recipe_of_a_run_on_resume(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    train(tiny_config(steps=4, ptv_weight=3.0), synthetic_cases(), [], run_dir, stop_after=1)
    result = subprocess.run(
        [sys.executable, "-m", "rtcontour.models.dose.train", "--run", "r", "--runs-dir",
         str(tmp_path / "runs"), "--resume", "--ptv-weight", "5"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--ptv-weight differ from the checkpoint's recipe" in result.stderr


def test_normalisation_brings_the_highest_ptv_d95_to_its_prescription():
    from rtcontour.models.dose.predict import normalise_to_prescription

    rng = np.random.default_rng(0)
    dose = rng.uniform(60.0, 68.0, (10, 10, 10)).astype(np.float32)
    high = np.zeros(dose.shape, dtype=bool)
    high[2:8, 2:8, 2:8] = True
    low = np.zeros(dose.shape, dtype=bool)
    low[:2] = True
    scaled, factor = normalise_to_prescription(dose, [(low, 56.0), (high, 70.0)])
    assert factor > 1.0
    assert float(np.percentile(scaled[high], 5)) == pytest.approx(70.0, rel=1e-4)
    np.testing.assert_allclose(scaled, dose * factor, rtol=1e-6)
    nothing, unit = normalise_to_prescription(np.zeros_like(dose), [(high, 70.0)])
    assert unit is None and not nothing.any()
