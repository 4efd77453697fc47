"""The compact resume checkpoint committed after a campaign's session."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")

from rtcontour.models.run_files import compact, main  # noqa: E402
from rtcontour.models.train import TrainConfig, load_checkpoint, train  # noqa: E402

from .conftest import make_cases, tiny_config  # noqa: E402


def test_compact_checkpoint_is_smaller_and_a_run_resumes_from_it(tmp_path, capsys):
    cases = make_cases()
    config = dict(steps=6, ema_decay=0.9)
    train(tiny_config(**config), cases, [], tmp_path / "run", stop_after=3)
    full = tmp_path / "run" / "last.pt"
    assert main(["compact", str(full), str(tmp_path / "committed" / "last.pt")]) == 0
    assert "MB (was" in capsys.readouterr().out
    committed = load_checkpoint(tmp_path / "committed" / "last.pt")
    moments = [s["exp_avg_sq"] for s in committed["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)
    assert (tmp_path / "committed" / "last.pt").stat().st_size < 0.8 * full.stat().st_size
    # the committed copy resumes the same run: same step, schedule and weights to start from
    resumed = train(TrainConfig.from_dict(committed["config"]), cases, [],
                    tmp_path / "committed", resume=True)
    exact = train(tiny_config(**config), cases, [], tmp_path / "run", resume=True)
    assert resumed["step"] == exact["step"] == 6
    assert resumed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        exact["optimizer"]["param_groups"][0]["lr"])
    state = next(iter(resumed["optimizer"]["state"].values()))
    assert state["exp_avg"].dtype == torch.float32
    for name, tensor in exact["model"].items():
        if tensor.is_floating_point():
            torch.testing.assert_close(resumed["model"][name], tensor, rtol=0.05, atol=2e-3)


def test_compact_refuses_a_file_without_optimiser_state(tmp_path):
    torch.save({"model": {}}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="no optimiser state"):
        compact(tmp_path / "weights.pt", tmp_path / "out.pt")
