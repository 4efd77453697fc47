from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")

from rtcontour.models.inference import Segmenter, symmetric_window_starts  # noqa: E402
from rtcontour.models.package import (  # noqa: E402
    ModelPackageError,
    find_latest_package,
    load_package,
)
from rtcontour.models.train import TrainConfig, build_model, load_checkpoint  # noqa: E402


def test_onnx_logits_match_pytorch(tiny_checkpoint, tiny_package):
    import onnxruntime as ort

    payload = load_checkpoint(tiny_checkpoint)
    model = build_model(TrainConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["model"])
    model.eval()
    x = torch.randn(2, 1, 16, 40, 32)  # not the training patch: spatial axes are dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(tiny_package / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    actual = session.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_package_loads_and_validates(tiny_package):
    package = load_package(tiny_package)
    assert package.roi_names[:2] == ["Brainstem", "SpinalCord"]
    assert package.manifest.mirror_channel_swaps == [(2, 3)]


def _copy(package: Path, tmp_path: Path) -> Path:
    target = tmp_path / package.name
    shutil.copytree(package, target)
    return target


def test_checksum_mismatch_raises(tiny_package, tmp_path):
    copy = _copy(tiny_package, tmp_path)
    with open(copy / "model.onnx", "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(ModelPackageError, match="Checksum mismatch"):
        load_package(copy)


def test_missing_weights_raise(tiny_package, tmp_path):
    copy = _copy(tiny_package, tmp_path)
    (copy / "model.onnx").unlink()
    with pytest.raises(ModelPackageError, match="has no model.onnx"):
        load_package(copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(schema_version=99), "schema_version"),
        (lambda m: m.pop("labels"), "labels"),
        (lambda m: m["labels"][0].update(colour_rgb=[300, 0, 0]), "colour_rgb"),
    ],
    ids=["future-schema", "no-labels", "bad-colour"],
)
def test_bad_manifest_raises_with_a_sentence(tiny_package, tmp_path, edit, message):
    copy = _copy(tiny_package, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelPackageError, match=message):
        load_package(copy)


def test_find_latest_package_picks_highest_version(tiny_package, tmp_path):
    for version in ("0.9.0", "0.10.0", "0.2.1"):
        shutil.copytree(tiny_package, tmp_path / f"tiny-test-{version}")
    assert find_latest_package(tmp_path).name == "tiny-test-0.10.0"
    with pytest.raises(ModelPackageError):
        find_latest_package(tmp_path / "empty")


@pytest.mark.parametrize("provider", ["onnxruntime", "openvino"])
def test_sliding_window_returns_masks_of_input_shape(tiny_package, provider):
    segmenter = Segmenter(tiny_package, overlap=0.5, provider=provider, batch_size=2)
    hu = np.random.default_rng(0).normal(0, 300, (23, 50, 47)).astype(np.float32)
    masks = segmenter.predict(hu, (2.5, 1.5, 1.5))
    assert list(masks) == segmenter.package.roi_names
    for mask in masks.values():
        assert mask.shape == hu.shape and mask.dtype == bool


def test_cuda_asked_for_without_a_gpu_warns_and_runs_on_the_cpu(tiny_package, caplog,
                                                                  monkeypatch):
    # Issue 14: "auto" on a CPU machine is not a fallback (INFO, tests/models/
    # test_inference_provider.py); a GPU asked for and missing is, and says so.
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    segmenter = Segmenter(tiny_package, provider="cuda")
    assert any("CUDAExecutionProvider is not available" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    assert "CPU" in segmenter.backend


def test_openvino_and_onnxruntime_agree(tiny_package):
    image = np.random.default_rng(1).normal(0, 0.5, (20, 40, 36)).astype(np.float32)
    ort_probs = Segmenter(tiny_package, provider="onnxruntime").predict_probabilities(image)
    ov_probs = Segmenter(tiny_package, provider="openvino",
                         openvino_precision="f32").predict_probabilities(image)
    np.testing.assert_allclose(ov_probs, ort_probs, atol=1e-4)


def test_mirror_tta_is_equivariant_and_swaps_parotids_back(tiny_package):
    segmenter = Segmenter(tiny_package, overlap=0.5, mirror_tta=True, provider="onnxruntime")
    image = np.random.default_rng(2).normal(0, 0.5, (16, 32, 44)).astype(np.float32)
    probs = segmenter.predict_probabilities(image)
    mirrored = segmenter.predict_probabilities(np.ascontiguousarray(image[..., ::-1]))
    expected = probs[..., ::-1][[0, 1, 3, 2, 4, 5, 6]]
    np.testing.assert_allclose(mirrored, expected, atol=1e-5)


def test_window_starts_cover_and_are_symmetric():
    for size, patch in [(100, 32), (33, 32), (96, 96), (161, 96)]:
        starts = symmetric_window_starts(size, patch, 0.5)
        assert starts[0] == 0 and starts[-1] == size - patch
        if (size - patch) % 2 == 0:
            assert starts == sorted(size - patch - s for s in starts)
        step = round(patch * 0.5)
        assert len(starts) == -(-(size - patch) // step) + 1 if size > patch else len(starts) == 1
        assert all(b - a <= patch for a, b in zip(starts, starts[1:], strict=False))


def test_boxed_back_resampling_equals_full_resampling(tiny_package):
    from rtcontour.models.resampling import resample_to_shape

    segmenter = Segmenter(tiny_package, provider="onnxruntime")
    target = segmenter.manifest.target_spacing_mm
    rng = np.random.default_rng(3)
    probs = np.zeros((20, 24, 24), dtype=np.float32)
    probs[5:9, 10:15, 3:8] = rng.uniform(0.3, 1.0, (4, 5, 5))
    spacing, shape = (2.0, 0.9, 1.1), (30, 100, 86)
    boxed = segmenter._probabilities_to_mask(probs, spacing, shape)
    scale = [s / t for s, t in zip(spacing, target, strict=True)]
    full = resample_to_shape(probs, scale, shape, order=1) >= 0.5
    assert boxed.any() and np.array_equal(boxed, full)
