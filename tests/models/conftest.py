"""Fixtures for the model tests: tiny synthetic cases, a tiny trained checkpoint and package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rtcontour.models.data import CaseArrays, default_data_dir

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")

from rtcontour.models.train import TrainConfig, train  # noqa: E402


def make_cases(count: int = 3, shape: tuple[int, int, int] = (24, 40, 40)) -> list[CaseArrays]:
    """Synthetic cases: noise with bright blobs labelled per channel; one unknown structure."""
    rng = np.random.default_rng(0)
    cases = []
    for index in range(count):
        image = rng.normal(0.0, 0.3, shape).astype(np.float32)
        labels = np.zeros(shape, dtype=np.uint8)
        for channel in range(7):
            centre = rng.integers([4, 6, 6], [shape[0] - 4, shape[1] - 10, shape[2] - 10])
            box = tuple(slice(c - 3, c + 3) for c in centre)
            labels[box] |= np.uint8(1 << channel)
            image[box] += 0.2 * (channel + 1)
        known = np.ones(7, dtype=bool)
        known[index % 7] = False
        cases.append(CaseArrays(f"syn{index}", image.astype(np.float16), labels, known,
                                (3.0, 4.0, 4.0)))
    return cases


def tiny_config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = dict(
        run="tiny", base_channels=4, levels=3, max_channels=16, patch_size=(16, 32, 32),
        batch_size=2, steps=4, warmup_steps=2, val_every=1000, val_cases=0, threads=1,
        checkpoint_minutes=100.0, seed=7,
        # bf16 autocast is emulated (~10x slower) on CPUs without AVX-512 BF16, and two
        # threads of a tiny network only wait on each other on a busy 2-core machine
        bf16=False,
    )
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_config(steps=3), make_cases(), [], run_dir)
    return run_dir / "last.pt"


@pytest.fixture(scope="session")
def tiny_package(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rtcontour.models.export import write_package

    root = tmp_path_factory.mktemp("packages")
    return write_package(tiny_checkpoint, root, "tiny-test", "0.0.1", "pytest")


@pytest.fixture(scope="session")
def openkbp_dir() -> Path:
    folder = default_data_dir()
    if not (folder / "validation").is_dir():
        pytest.skip(f"OpenKBP data not found at {folder} (set RTCONTOUR_OPENKBP_DIR)")
    return folder
