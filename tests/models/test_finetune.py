"""The site data set and ``rtcontour finetune`` on synthetic kept sets with a tiny package
(issue 23): the package's ONNX weights become the torch network, held-back patients are fixed,
the guards refuse, a new version is written beside the base and never over a package."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")
onnxruntime = pytest.importorskip("onnxruntime")

from rtcontour.models.finetune import (  # noqa: E402
    FinetuneRefused,
    config_from_manifest,
    finetune,
    held_back_patients,
    network_from_package,
    next_version,
)
from rtcontour.models.labels import ORGANS  # noqa: E402
from rtcontour.models.package import find_latest_package, load_package  # noqa: E402
from rtcontour.models.site_data import SiteDataset, patient_key  # noqa: E402
from tests.conftest import build_test_package  # noqa: E402

SHAPE = (20, 40, 40)  # (slices, rows, columns) at 2.5 x 2 x 2 mm
SPACING = (2.5, 2.0, 2.0)
GRID = (3.0, 4.0, 4.0)


def synthetic_set(seed: int, drop: tuple[str, ...] = ()) -> tuple[np.ndarray, dict]:
    """A CT (HU) with a bright box per organ, and the organs' masks (``drop`` left out)."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(0.0, 30.0, SHAPE).astype(np.float32)
    masks = {}
    for channel, organ in enumerate(ORGANS):
        mask = np.zeros(SHAPE, dtype=bool)
        row, column = 6 + 4 * channel, 8 + (channel % 3) * 8
        mask[4:14, row:row + 4, column:column + 6] = True
        hu[mask] += 60.0 * (channel + 1)
        if organ.roi_name not in drop:
            masks[organ.roi_name] = mask
    return hu, masks


def fill(dataset: SiteDataset, patients: int, sets_per_patient: int = 1) -> None:
    for patient in range(patients):
        for number in range(sets_per_patient):
            hu, masks = synthetic_set(patient * 10 + number,
                                      drop=("Larynx",) if patient == 0 else ())
            dataset.keep(f"set{patient}x{number}", hu=hu, spacing_mm=SPACING,
                         organ_masks=masks, organ_names={k: k.upper() for k in masks},
                         patient_id=f"PAT{patient}", target_spacing_mm=GRID,
                         contour_job_id=f"job{patient}")


@pytest.fixture(scope="module")
def base_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_package(tmp_path_factory.mktemp("packages"), name="tiny-oar",
                              version="1.0.0", patch_size=(16, 32, 32), base_channels=4)


def test_kept_set_holds_soft_targets_on_the_model_grid_and_unknown_organs(tmp_path: Path):
    dataset = SiteDataset(tmp_path / "site")
    hu, masks = synthetic_set(0, drop=("Larynx", "Esophagus"))
    kept = dataset.keep("abc", hu=hu, spacing_mm=SPACING, organ_masks=masks,
                        organ_names={"Parotid_L": "Parotid Lt"}, patient_id="PAT-1",
                        target_spacing_mm=GRID, route="hn")
    assert kept.spacing_mm == GRID and kept.shape == (16, 20, 20)
    assert set(kept.unknown) == {"Larynx", "Esophagus"}
    assert kept.structures["Parotid_L"] == "Parotid Lt"
    case = dataset.load(kept, (-200.0, 300.0))
    assert case.soft is not None and case.soft.dtype == np.uint8
    larynx = [o.roi_name for o in ORGANS].index("Larynx")
    assert not case.known[larynx] and case.known.sum() == 5
    # the soft target keeps the organ's volume (occupancy, not thresholded samples)
    cord = [o.roi_name for o in ORGANS].index("SpinalCord")
    volume_mm3 = case.soft[cord].astype(float).sum() / 255 * np.prod(GRID)
    assert volume_mm3 == pytest.approx(masks["SpinalCord"].sum() * np.prod(SPACING), rel=0.02)
    meta = (tmp_path / "site" / "abc" / "meta.json").read_text()
    assert "PAT-1" not in meta and patient_key("PAT-1") in meta


def test_site_dataset_counts_deletes_a_patient_and_purges_by_its_own_retention(tmp_path):
    dataset = SiteDataset(tmp_path / "site")
    fill(dataset, 3)
    counts = dataset.counts()
    assert counts["sets"] == 3 and counts["patients"] == 3
    assert counts["per_structure"]["Larynx"] == 2 and counts["per_structure"]["Brainstem"] == 3
    assert dataset.delete_patient("PAT1") == ["set1x0"]
    assert dataset.delete_patient(patient_key("PAT2")) == ["set2x0"]
    assert [kept.set_id for kept in dataset.sets()] == ["set0x0"]
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=40)
    assert dataset.purge_older_than(0, now=later) == []  # 0: kept until removed
    assert dataset.purge_older_than(30, now=later) == ["set0x0"]


def test_network_from_package_reproduces_the_onnx_logits(base_package: Path):
    package = load_package(base_package)
    config = config_from_manifest(package)
    net = network_from_package(package, config).eval()
    image = np.random.default_rng(1).standard_normal((1, 1, 16, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ours = net(torch.from_numpy(image)).numpy()
    session = onnxruntime.InferenceSession(str(package.onnx_path),
                                           providers=["CPUExecutionProvider"])
    (theirs,) = session.run(None, {"image": image})
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_held_back_patients_are_fixed_by_patient():
    keys = [patient_key(f"P{i}") for i in range(30)]
    held = held_back_patients(keys, 0.2)
    assert 1 <= len(held) < 30
    assert held == held_back_patients(list(reversed(keys)) + keys[:3], 0.2)
    assert len(held) <= 6  # at most ceil(20 % of 30)
    # a patient trained on is never held back later, however many patients are added
    more = held_back_patients(keys + [patient_key(f"Q{i}") for i in range(20)], 0.2)
    assert not (more & (set(keys) - held))
    assert len(held_back_patients(keys[:2], 0.2)) == 1


def test_finetune_writes_a_new_version_beside_the_base_and_never_overwrites(
        base_package: Path, tmp_path: Path):
    packages = tmp_path / "packages"
    packages.mkdir()
    base = packages / base_package.name
    shutil.copytree(base_package, base)
    dataset = SiteDataset(tmp_path / "site")
    fill(dataset, 5)
    with pytest.raises(FinetuneRefused, match="Larynx 4 of 5"):
        finetune(base, "clinic", dataset, packages, steps=2, min_sets=5, openkbp_limit=0)
    result = finetune(base, "clinic", dataset, packages, steps=3, min_sets=4, threads=1,
                      openkbp_limit=0, device="cpu")
    assert result.package.name == "tiny-oar-1.0.0+clinic.1"
    manifest = load_package(result.package).manifest
    report = manifest.finetune
    assert report is not None and report.base_package == "tiny-oar-1.0.0"
    assert report.steps == 3 and report.n_train_sets + report.n_held_back_sets == 5
    assert report.site_metrics and all(m.n_cases >= 1 for m in report.site_metrics.values())
    assert "skipped" in report.openkbp_note
    card = (result.package / "MODEL_CARD.md").read_text()
    assert "Fine-tuned on clinic's approved structure sets" in card
    assert ("NOT RECOMMENDED" in card) == (not report.recommended)
    for name in report.worse_structures:
        assert f'<span style="color:red">**{name}**</span>' in card
    assert json.loads((result.package / "finetune.json").read_text())["site"] == "clinic"
    # the site's version is never "the newest package" a route without a model would take
    assert find_latest_package(packages) == base
    assert next_version(packages, "tiny-oar", "1.0.0", "clinic") == "1.0.0+clinic.2"
    again = finetune(base, "clinic", dataset, packages, steps=1, min_sets=4, threads=1,
                     openkbp_limit=0, device="cpu")
    assert again.package.name == "tiny-oar-1.0.0+clinic.2"
    assert load_package(result.package).manifest.sha256 == manifest.sha256


def test_finetune_refuses_without_patients_to_hold_back(base_package: Path, tmp_path: Path):
    dataset = SiteDataset(tmp_path / "site")
    fill(dataset, 1, sets_per_patient=3)
    with pytest.raises(FinetuneRefused, match="hold back"):
        finetune(base_package, "clinic", dataset, tmp_path, steps=1, min_sets=1,
                 exclude=["Larynx"], openkbp_limit=0)
