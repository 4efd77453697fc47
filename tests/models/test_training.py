from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")

from rtcontour.models.labels import ORGANS  # noqa: E402
from rtcontour.models.train import (  # noqa: E402
    PatchSampler,
    TrainConfig,
    load_checkpoint,
    masked_dice_bce_loss,
    mirror_left_right,
    train,
)

from .conftest import make_cases, tiny_config  # noqa: E402


def test_unknown_structure_contributes_no_gradient():
    logits = torch.randn(2, 7, 4, 6, 6, requires_grad=True)
    target = (torch.rand(2, 7, 4, 6, 6) > 0.7).float()
    known = torch.ones(2, 7, dtype=torch.bool)
    known[0, 4] = False  # Esophagus unknown for sample 0
    known[1, 5] = False
    loss, _ = masked_dice_bce_loss(logits, target, known)
    loss.backward()
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad[0, 4]) == 0
    assert torch.count_nonzero(logits.grad[1, 5]) == 0
    assert torch.count_nonzero(logits.grad[0, 5]) > 0


def test_unknown_structure_target_does_not_change_the_loss():
    logits = torch.randn(1, 7, 4, 6, 6)
    target = (torch.rand(1, 7, 4, 6, 6) > 0.7).float()
    known = torch.ones(1, 7, dtype=torch.bool)
    known[0, 2] = False
    other = target.clone()
    other[0, 2] = 1.0 - other[0, 2]
    assert masked_dice_bce_loss(logits, target, known)[0] == pytest.approx(
        float(masked_dice_bce_loss(logits, other, known)[0]))


def test_dice_term_ignores_patches_without_the_structure():
    logits = torch.full((1, 7, 4, 4, 4), -8.0, requires_grad=True)
    target = torch.zeros(1, 7, 4, 4, 4)
    target[0, 0, 1:3, 1:3, 1:3] = 1.0
    known = torch.ones(1, 7, dtype=torch.bool)
    _, parts = masked_dice_bce_loss(logits, target, known)
    # only channel 0 is eligible for Dice: an all-background prediction gives ~1 loss there
    assert parts["dice_loss"] > 0.85
    loss, _ = masked_dice_bce_loss(logits, target, known)
    loss.backward()
    bce_only = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[0, 1], target[0, 1], reduction="mean") / 7
    grad_expected = torch.autograd.grad(bce_only, logits)[0][0, 1]
    torch.testing.assert_close(logits.grad[0, 1], grad_expected)


def test_left_right_mirror_swaps_parotid_channels():
    target = np.zeros((7, 2, 2, 4), dtype=np.float32)
    left, right = [o.roi_name for o in ORGANS].index("Parotid_L"), [
        o.roi_name for o in ORGANS].index("Parotid_R")
    target[left, :, :, 3] = 1.0  # Parotid_L at high column (patient left)
    target[right, :, :, 0] = 1.0
    mirrored = mirror_left_right(target, channel_axis=0)
    # after mirroring, the structure at the high column is the former right parotid, and it
    # must now be labelled Parotid_L again
    assert mirrored[left, :, :, 3].all() and mirrored[right, :, :, 0].all()
    assert mirrored[left].sum() == target[left].sum()


def test_sampler_mirror_keeps_parotid_side_consistent_with_anatomy():
    cases = make_cases(1, shape=(16, 32, 32))
    labels = np.zeros_like(cases[0].labels)
    labels[:, :, :8] |= 1 << 3  # Parotid_R on patient right = low columns
    labels[:, :, 24:] |= 1 << 2  # Parotid_L on patient left = high columns
    cases[0].labels = labels
    cases[0].known[:] = True
    sampler = PatchSampler(cases, (16, 32, 32), 0.0, np.random.default_rng(1))
    for _ in range(8):
        _, target, _ = sampler.batch(1)
        assert target[0, 2, :, :, 24:].all() and target[0, 3, :, :, :8].all()


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    cases = make_cases()
    config = tiny_config(steps=4)
    full = train(config, cases, [], tmp_path / "full")
    train(tiny_config(steps=4), cases, [], tmp_path / "split", stop_after=2)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 2
    resumed = train(tiny_config(steps=4), cases, [], tmp_path / "split", resume=True)
    assert resumed["step"] == full["step"] == 4
    for name, tensor in full["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=0, msg=name)
    assert resumed["rng"]["numpy"] == full["rng"]["numpy"]
    assert torch.equal(resumed["rng"]["torch"], full["rng"]["torch"])


def test_warm_restart_raises_the_lr_again_and_resumes_exactly(tmp_path):
    # a finished run (LR decayed to 0) continued with a new schedule, once in one go and once
    # interrupted: the interrupted one resumes from its own checkpoint's config and schedule
    cases = make_cases()
    finished = train(tiny_config(steps=4), cases, [], tmp_path / "base")
    assert finished["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0)
    for name in ("whole", "split"):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "base" / "last.pt", tmp_path / name / "last.pt")
    whole = train(tiny_config(steps=8, lr=1e-3), cases, [], tmp_path / "whole", resume=True,
                  restart_schedule=True)
    part = train(tiny_config(steps=8, lr=1e-3), cases, [], tmp_path / "split", resume=True,
                 restart_schedule=True, stop_after=7)
    # three steps into a four-step schedule after a two-step warm-up
    assert part["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.25 ** 0.9)
    stored = TrainConfig.from_dict(part["config"])
    assert stored.schedule_start == 4 and stored.steps == 8 and stored.lr == 1e-3
    resumed = train(stored, cases, [], tmp_path / "split", resume=True)
    assert resumed["step"] == whole["step"] == 8
    for name, tensor in whole["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=0, msg=name)
        assert not torch.equal(tensor, finished["model"][name]) or "num_batches" in name
    with pytest.raises(ValueError, match="must exceed"):
        train(tiny_config(steps=8, lr=1e-3), cases, [], tmp_path / "whole", resume=True,
              restart_schedule=True)


def test_checkpoint_loads_with_weights_only(tiny_checkpoint):
    payload = torch.load(tiny_checkpoint, weights_only=True)
    assert payload["step"] == 3 and "optimizer" in payload and "scheduler" in payload


def test_old_checkpoint_config_loads_with_every_recipe_option_off():
    from pathlib import Path

    committed = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "resume.pt"
    if not committed.exists():
        pytest.skip("no committed resume checkpoint")
    config = TrainConfig.from_dict(load_checkpoint(committed)["config"])
    assert config.spatial_aug_p == 0.0 and not config.intensity_aug
    assert config.ema_decay == 0.0 and config.deep_supervision == 0
    assert config.spatial_augmentation() is None


@pytest.mark.parametrize(
    "recipe",
    [dict(spatial_aug_p=1.0, intensity_aug=True), dict(ema_decay=0.9),
     dict(deep_supervision=1)],
    ids=["augmentation", "ema", "deep-supervision"],
)
def test_recipe_options_resume_exactly(tmp_path, recipe):
    cases = make_cases()
    full = train(tiny_config(steps=4, **recipe), cases, [], tmp_path / "full")
    train(tiny_config(steps=4, **recipe), cases, [], tmp_path / "split", stop_after=2)
    resumed = train(tiny_config(steps=4, **recipe), cases, [], tmp_path / "split", resume=True)
    for name, tensor in full["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=0, msg=name)
    if "ema" in full:
        for name, tensor in full["ema"]["average"].items():
            torch.testing.assert_close(resumed["ema"]["average"][name], tensor, rtol=0, atol=0)
        assert resumed["ema"]["updates"] == full["ema"]["updates"] == 4
    assert resumed["rng"]["numpy"] == full["rng"]["numpy"]


def test_ema_differs_from_the_raw_weights_and_lags_them(tmp_path):
    cases = make_cases()
    start = train(tiny_config(steps=1), cases, [], tmp_path / "start")["model"]
    final = train(tiny_config(steps=6, ema_decay=0.9), cases, [], tmp_path / "ema")
    raw, average = final["model"], final["ema"]["average"]
    weight = "head.weight"
    assert not torch.equal(raw[weight], average[weight])
    # the average sits between the first weights and the last
    assert (average[weight] - raw[weight]).abs().sum() < (start[weight] - raw[weight]).abs().sum()


def test_warm_restart_adds_deep_supervision_heads_and_ema(tmp_path):
    cases = make_cases()
    plain = train(tiny_config(steps=3), cases, [], tmp_path / "run")
    restarted = train(tiny_config(steps=6, deep_supervision=1, ema_decay=0.9), cases, [],
                      tmp_path / "run", resume=True, restart_schedule=True)
    assert "aux_heads.0.weight" in restarted["model"] and "ema" in restarted
    assert not torch.equal(restarted["model"]["head.weight"], plain["model"]["head.weight"])
    state = restarted["optimizer"]["state"]
    assert len(state) == len(restarted["model"]) - sum(
        "num_batches" in name for name in restarted["model"])
    with pytest.raises(ValueError, match="deep supervision"):
        train(tiny_config(steps=9), cases, [], tmp_path / "run", resume=True,
              restart_schedule=True)


def test_deep_supervision_loss_weights_levels_and_downsamples_the_target():
    from rtcontour.models.train import deep_supervision_loss

    target = (torch.rand(1, 7, 8, 8, 8) > 0.5).float()
    known = torch.ones(1, 7, dtype=torch.bool)
    full = torch.randn(1, 7, 8, 8, 8)
    half = torch.randn(1, 7, 4, 4, 4)
    single, _ = deep_supervision_loss([full], target, known)
    assert single == masked_dice_bce_loss(full, target, known)[0]
    both, _ = deep_supervision_loss([full, half], target, known)
    half_target = target[:, :, ::2, ::2, ::2]
    expected = (masked_dice_bce_loss(full, target, known)[0]
                + 0.5 * masked_dice_bce_loss(half, half_target, known)[0]) / 1.5
    assert float(both) == pytest.approx(float(expected), rel=1e-6)


def test_resume_refuses_a_recipe_change_without_restart_schedule(tmp_path):
    from rtcontour.models.train import main

    train(tiny_config(steps=2), make_cases(), [], tmp_path / "tiny")
    with pytest.raises(SystemExit, match="spatial_aug_p"):
        main(["--run", "tiny", "--runs-dir", str(tmp_path), "--resume", "--spatial-aug", "0.5"])
