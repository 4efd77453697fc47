"""Export of checkpoints trained with the recipe options: one output, the EMA weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (extra 'train')")

from rtcontour.models.export import write_package  # noqa: E402
from rtcontour.models.train import TrainConfig, build_model, train  # noqa: E402

from .conftest import make_cases, tiny_config  # noqa: E402


def _onnx_logits(folder, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


def test_deep_supervised_network_exports_one_output_without_the_heads(tmp_path):
    payload = train(tiny_config(steps=2, deep_supervision=1), make_cases(), [], tmp_path / "ds")
    folder = write_package(tmp_path / "ds" / "last.pt", tmp_path / "pkg", "ds", "0.0.1", "pytest")
    graph = onnx.load(str(folder / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["logits"]
    assert not any("aux_heads" in init.name for init in graph.initializer)
    model = build_model(TrainConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["model"])
    model.eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_onnx_logits(folder, x), expected, rtol=1e-4, atol=1e-4)


def test_export_uses_the_ema_weights_when_the_run_kept_them(tmp_path):
    payload = train(tiny_config(steps=4, ema_decay=0.9), make_cases(), [], tmp_path / "ema")
    folder = write_package(tmp_path / "ema" / "last.pt", tmp_path / "pkg", "ema", "0.0.1",
                           "pytest")
    x = torch.randn(1, 1, 16, 32, 32)
    config = TrainConfig.from_dict(payload["config"])
    outputs = {}
    for kind, weights in (("ema", payload["ema"]["average"]), ("raw", payload["model"])):
        model = build_model(config)
        model.load_state_dict(weights)
        model.eval()
        with torch.no_grad():
            outputs[kind] = model(x).numpy()
    exported = _onnx_logits(folder, x)
    np.testing.assert_allclose(exported, outputs["ema"], rtol=1e-4, atol=1e-4)
    assert not np.allclose(exported, outputs["raw"], atol=1e-4)
    assert "moving average" in (folder / "MODEL_CARD.md").read_text()
