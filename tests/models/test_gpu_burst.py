"""The GPU burst on the CPU with a budget of seconds: pack, train, resume, export."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")

from rtcontour.models.gpu_burst import main, read_pack, write_pack  # noqa: E402
from rtcontour.models.train import TrainConfig, load_checkpoint, train  # noqa: E402

from .conftest import make_cases  # noqa: E402

TINY = ["--base-channels", "4", "--levels", "3", "--max-channels", "16", "--patch", "16,32,32",
        "--batch", "2", "--threads", "1", "--no-bf16", "--deep-supervision", "1",
        "--ema-decay", "0.9", "--spatial-aug", "0.5", "--warmup-steps", "2"]


@pytest.fixture
def pack(tmp_path):
    cases = make_cases(4)
    return write_pack(tmp_path / "pack.npz", cases, ["train", "train", "train", "validation"])


def test_pack_round_trip_keeps_labels_exactly_and_the_image_within_quantisation(tmp_path):
    cases = make_cases(3)
    path = write_pack(tmp_path / "pack.npz", cases, ["train", "validation", "train"])
    splits = read_pack(path)
    assert [c.case_id for c in splits["train"]] == ["syn0", "syn2"]
    for original, restored in zip([cases[0], cases[2]], splits["train"], strict=True):
        np.testing.assert_array_equal(restored.labels, original.labels)
        np.testing.assert_array_equal(restored.known, original.known)
        clipped = np.clip(original.image.astype(np.float32), -1, 1)
        assert np.abs(restored.image.astype(np.float32) - clipped).max() <= 1 / 127.5 + 1e-3


def test_burst_trains_for_its_budget_and_leaves_a_checkpoint_that_resumes_and_exports(
        tmp_path, pack):
    out = tmp_path / "runs" / "burst"
    assert main(["--pack", str(pack), "--out", str(out), "--minutes", "0.4", "--val-cases",
                 "1", "--device", "cpu", *TINY]) == 0
    payload = load_checkpoint(out / "last.pt")
    config = TrainConfig.from_dict(payload["config"])
    assert payload["step"] >= 10 and payload["step"] <= config.steps
    assert config.deep_supervision == 1 and config.ema_decay == 0.9 and "ema" in payload
    assert payload["history"], "validated at the end"
    # rtcontour train --resume continues it (a warm restart with a CPU-sized batch)
    config.steps, config.batch_size = payload["step"] + 2, 1
    resumed = train(config, make_cases(2), [], out, resume=True, restart_schedule=True)
    assert resumed["step"] == payload["step"] + 2
    from rtcontour.models.export import write_package

    folder = write_package(out / "last.pt", tmp_path / "packages", "burst", "0.0.1", "pytest")
    assert (folder / "model.onnx").exists()


def test_burst_warm_restart_of_a_checkpoint_with_threaded_batches(tmp_path, pack):
    from .conftest import tiny_config

    train(tiny_config(steps=3), make_cases(), [], tmp_path / "base")
    out = tmp_path / "warm"
    assert main(["--pack", str(pack), "--out", str(out), "--minutes", "0.3", "--val-cases",
                 "0", "--device", "cpu", "--init", str(tmp_path / "base" / "last.pt"),
                 "--sampler-threads", "2", "--batch", "2", "--threads", "1", "--no-bf16"]) == 0
    payload = load_checkpoint(out / "last.pt")
    assert payload["step"] > 3
    config = TrainConfig.from_dict(payload["config"])
    assert config.schedule_start == 3 and config.base_channels == 4
