"""Dose model: loss, sampler, resumable training, export to a package and ONNX inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rtcontour.models.dose.data import DoseCase
from rtcontour.models.dose.features import N_CHANNELS, OAR_NAMES
from rtcontour.models.package import ModelPackageError, find_latest_package, load_package

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")

from rtcontour.models.dose.train import (  # noqa: E402
    DoseSampler,
    DoseTrainConfig,
    build_model,
    dose_loss,
    generalised_means,
    load_checkpoint,
    mirror_inputs,
    predict_case,
    train,
)


def synthetic_cases(count: int = 3, shape: tuple[int, int, int] = (12, 10, 14)) -> list[DoseCase]:
    """Balls of PTV in a box of body; dose falls off from the PTV."""
    rng = np.random.default_rng(0)
    cases = []
    for index in range(count):
        inputs = np.zeros((N_CHANNELS, *shape), dtype=np.float32)
        grid = np.indices(shape).astype(np.float32)
        centre = rng.uniform([4, 3, 4], [8, 7, 10])
        distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
        ptv = (distance <= 2.5).astype(np.float32)
        inputs[0] = rng.normal(0.0, 0.1, shape)
        inputs[1] = (distance > 5) & (distance <= 6)
        inputs[-2] = ptv
        inputs[-1] = 1.0
        target = (70.0 * np.exp(-np.maximum(distance - 2.5, 0) / 3.0)).astype(np.float32)
        occupancy = np.stack([np.zeros(shape), np.zeros(shape), ptv]).astype(np.float16)
        cases.append(DoseCase(f"syn{index}", inputs.astype(np.float16), target, occupancy))
    return cases


def tiny_config(**overrides: object) -> DoseTrainConfig:
    values: dict[str, object] = dict(run="tiny-dose", base_channels=4, levels=2, max_channels=8,
                                     steps=4, warmup_steps=1, val_every=2, val_cases=1,
                                     checkpoint_minutes=100.0, seed=3)
    values.update(overrides)
    return DoseTrainConfig(**values)  # type: ignore[arg-type]


def test_loss_of_a_perfect_prediction_is_zero_and_an_offset_inside_the_mask_is_its_mae():
    target = torch.rand(1, 4, 4, 4) * 70
    weight = torch.zeros(1, 4, 4, 4)
    weight[:, :2] = 1.0
    structures = weight[:, None].repeat(1, 2, 1, 1, 1)
    loss, parts = dose_loss(target, target, weight, structures)
    assert float(loss) == pytest.approx(0.0, abs=1e-4)
    shifted = target + 1.0
    shifted[:, 2:] += 100.0  # outside the mask: no loss
    _, parts = dose_loss(shifted, target, weight, structures, moment_weight=0.0)
    assert parts["mae_gy"] == pytest.approx(1.0, abs=1e-5)


def test_moment_loss_sees_a_hot_spot_that_barely_moves_the_mae():
    target = torch.full((1, 8, 8, 8), 20.0)
    weight = torch.ones(1, 8, 8, 8)
    structures = torch.ones(1, 1, 8, 8, 8)
    hot = target.clone()
    hot[0, 0, 0, 0] = 70.0
    _, parts = dose_loss(hot, target, weight, structures)
    assert parts["mae_gy"] < 0.1
    assert parts["moment_gy2"] > 10.0


def test_generalised_mean_of_order_one_is_the_weighted_mean_and_order_ten_nears_the_max():
    dose = torch.tensor([10.0, 20.0, 30.0, 60.0]).view(1, 1, 1, 4)
    occupancy = torch.ones(1, 1, 1, 1, 4)
    means = generalised_means(dose, occupancy, (1.0, 10.0))[0, 0]
    assert float(means[0]) == pytest.approx(30.0, rel=1e-4)
    assert 50.0 < float(means[1]) < 60.0


def test_mirror_swaps_the_parotid_channels_and_flips_left_right():
    inputs = np.zeros((N_CHANNELS, 2, 2, 3), dtype=np.float32)
    left, right = 1 + OAR_NAMES.index("Parotid_L"), 1 + OAR_NAMES.index("Parotid_R")
    inputs[left, :, :, 0] = 1.0
    mirrored = mirror_inputs(inputs)
    assert mirrored[right, :, :, 2].all() and not mirrored[left].any()


def test_sampler_pads_a_batch_to_the_divisor_with_air_and_no_loss_weight():
    cases = synthetic_cases(2, shape=(9, 10, 11))
    sampler = DoseSampler(cases, divisor=4, rng=np.random.default_rng(0))
    inputs, target, weight, structures = sampler.batch(2)
    assert inputs.shape == (2, N_CHANNELS, 12, 12, 12)
    assert structures.shape == (2, 10, 12, 12, 12)
    assert float(inputs[:, 0, 9:].max()) == -1.0
    assert float(weight[:, 9:].max()) == 0.0


def test_training_resumes_exactly_from_its_checkpoint(tmp_path):
    cases = synthetic_cases()
    straight = train(tiny_config(), cases, cases[:1], tmp_path / "straight")
    train(tiny_config(), cases, cases[:1], tmp_path / "resumed", stop_after=2)
    resumed = train(tiny_config(), cases, cases[:1], tmp_path / "resumed", resume=True)
    assert resumed["step"] == straight["step"] == 4
    for name, tensor in straight["model"].items():
        assert torch.allclose(tensor, resumed["model"][name], atol=1e-6), name
    payload = load_checkpoint(tmp_path / "resumed" / "best.pt")
    assert payload["kind"] == "dose"


@pytest.fixture(scope="module")
def tiny_dose_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rtcontour.models.dose.export import write_package

    run_dir = tmp_path_factory.mktemp("runs") / "tiny-dose"
    cases = synthetic_cases()
    train(tiny_config(steps=2, val_cases=0), cases, [], run_dir)
    root = tmp_path_factory.mktemp("packages")
    return write_package(run_dir / "last.pt", root, "tiny-dose", "0.0.1", "pytest")


def test_exported_package_is_of_kind_dose_and_runs_in_onnxruntime(tiny_dose_package):
    import onnxruntime as ort

    package = load_package(tiny_dose_package)
    assert package.manifest.kind == "dose" and package.manifest.dose is not None
    assert package.manifest.output_activation == "linear"
    case = synthetic_cases(1, shape=(8, 8, 12))[0]
    session = ort.InferenceSession(str(package.onnx_path), providers=["CPUExecutionProvider"])
    x = case.inputs.astype(np.float32)[None]
    onnx_dose = session.run(None, {"channels": x})[0]
    assert onnx_dose.shape == (1, 1, 8, 8, 12)
    assert np.isfinite(onnx_dose).all()
    assert package.manifest.spatial_divisor == build_model(tiny_config()).divisor


def test_onnx_and_torch_agree_on_the_same_weights(tmp_path):
    import onnxruntime as ort

    from rtcontour.models.dose.export import export_onnx

    config = tiny_config()
    model = build_model(config).eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, path, (4, 4, 4))
    case = synthetic_cases(1, shape=(8, 12, 16))[0]
    torch_dose = predict_case(model, case, model.divisor)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_dose = session.run(None, {"channels": case.inputs.astype(np.float32)[None]})[0][0, 0]
    np.testing.assert_allclose(onnx_dose, torch_dose, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("mirror_tta", [False, True], ids=["plain", "mirror-tta"])
def test_dose_predictor_returns_dose_on_the_ct_grid_and_zero_outside_the_body(
        tiny_dose_package, mirror_tta):
    from rtcontour.models.dose.predict import DosePredictor
    from tests.phantoms import head_phantom

    phantom = head_phantom((30, 40, 40), (2.5, 2.0, 2.0))
    ptv = np.zeros_like(phantom.body)
    ptv[12:18, 15:25, 15:25] = True
    predictor = DosePredictor(tiny_dose_package, threads=1, mirror_tta=mirror_tta)
    dose = predictor.predict(phantom.hu, phantom.spacing_mm, {"Brainstem": phantom.marker},
                             [(ptv, 70.0)], body_mask=phantom.body)
    assert dose.shape == phantom.hu.shape and dose.dtype == np.float32
    assert not dose[~phantom.body].any()
    assert (dose >= 0).all()
    auto_body = predictor.predict(phantom.hu, phantom.spacing_mm, {}, [(ptv, 70.0)])
    assert auto_body.shape == phantom.hu.shape


def test_dose_predictor_refuses_unknown_oars_and_a_missing_ptv(tiny_dose_package):
    from rtcontour.models.dose.predict import DosePredictor

    predictor = DosePredictor(tiny_dose_package, threads=1)
    hu = np.zeros((8, 8, 8), dtype=np.float32)
    mask = np.ones((8, 8, 8), dtype=bool)
    with pytest.raises(ValueError, match="Heart"):
        predictor.predict(hu, (1, 1, 1), {"Heart": mask}, [(mask, 70.0)])
    with pytest.raises(ValueError, match="at least one"):
        predictor.predict(hu, (1, 1, 1), {}, [])
    with pytest.raises(ValueError, match="shape"):
        predictor.predict(hu, (1, 1, 1), {}, [(mask[:4], 70.0)])


def test_segmentation_lookup_never_picks_a_dose_package(tiny_dose_package, tmp_path):
    from rtcontour.models.dose.predict import DosePredictor

    shutil.copytree(tiny_dose_package, tmp_path / "tiny-dose-9.0.0")
    assert find_latest_package(tmp_path, kind="dose").name == "tiny-dose-9.0.0"
    with pytest.raises(ModelPackageError, match="No segmentation model package"):
        find_latest_package(tmp_path)
    try:
        segmentation = find_latest_package(name="rtcontour-hn-oar")
    except ModelPackageError:
        pytest.skip("no committed segmentation package")
    with pytest.raises(ModelPackageError, match="kind 'dose'"):
        DosePredictor(segmentation)


def test_manifest_of_kind_dose_without_a_dose_section_is_refused(tiny_dose_package, tmp_path):
    folder = tmp_path / "broken-0.0.1"
    shutil.copytree(tiny_dose_package, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("dose")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelPackageError, match="needs a 'dose' section"):
        load_package(folder)
