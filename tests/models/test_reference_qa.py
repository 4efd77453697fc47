"""Implausible reference contours are set aside, named, and never counted as background."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from rtcontour.models.data import list_cases, load_openkbp_raw, load_split, preprocess_case
from rtcontour.models.evaluate import evaluate_package, format_table
from rtcontour.models.labels import ORGANS
from rtcontour.models.reference_qa import reference_problem, reference_problems

ROI_NAMES = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx",
             "Mandible", "PTV56", "PTV63", "PTV70"]
SPACING = (4.0, 4.0, 3.0)  # OpenKBP voxel_mm order: rows, columns, slices
CORD = ORGANS.index(next(o for o in ORGANS if o.roi_name == "SpinalCord"))


def _cord(shape: tuple[int, int, int], half_width: int, slices: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    centre_row, centre_col = shape[1] // 2, shape[2] // 2
    mask[slices, centre_row - half_width:centre_row + half_width + 1,
         centre_col - half_width:centre_col + half_width + 1] = True
    return mask


def write_openkbp_case(path: Path, cord_half_width: int, with_larynx: bool = False) -> None:
    """A small OpenKBP-format patient: a cord of (2h+1)^2 voxels per slice, optional larynx."""
    shape = (24, 40, 40)  # canonical (slices, rows, columns)
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[:, 8:32, 8:32] = 40
    bits = np.zeros(shape, dtype=np.uint16)
    bits |= _cord(shape, cord_half_width, slice(2, 22)).astype(np.uint16) << 1
    present = ["SpinalCord"]
    if with_larynx:
        larynx = np.zeros(shape, dtype=bool)
        larynx[8:14, 12:19, 16:23] = True  # 49 voxels of 16 mm^2: 784 mm^2 per slice
        bits |= larynx.astype(np.uint16) << 5
        present.append("Larynx")
    np.savez_compressed(
        path, ct_hu=hu.transpose(1, 2, 0), label_bits=bits.transpose(1, 2, 0),
        voxel_mm=np.asarray(SPACING, dtype=np.float32), roi_names=np.asarray(ROI_NAMES),
        rois_present=np.asarray(present),
    )


def test_a_cord_sized_contour_passes_whatever_its_length():
    spacing = (3.0, 4.0, 4.0)
    assert reference_problem("SpinalCord", _cord((60, 40, 40), 1, slice(0, 60)), spacing) is None
    assert reference_problem("SpinalCord", _cord((60, 40, 40), 1, slice(30, 33)), spacing) is None


def test_a_neck_sized_spinal_cord_and_an_empty_listed_contour_fail_with_their_reason():
    spacing = (3.0, 4.0, 4.0)
    neck = reference_problem("SpinalCord", _cord((60, 40, 40), 10, slice(0, 60)), spacing)
    assert neck is not None and "53.05x the typical 133 mm^2" in neck
    assert reference_problem("SpinalCord", np.zeros((60, 40, 40), bool), spacing) == (
        "listed as contoured but empty")
    masks = np.zeros((7, 60, 40, 40), dtype=bool)
    masks[CORD] = _cord((60, 40, 40), 10, slice(0, 60))
    known = np.zeros(7, dtype=bool)
    known[CORD] = True
    assert set(reference_problems(masks, known, spacing)) == {CORD}
    known[CORD] = False  # a structure not contoured at all is not checked
    assert reference_problems(masks, known, spacing) == {}


def test_loading_sets_a_failed_reference_aside_as_unknown_and_logs_the_case(tmp_path, caplog):
    path = tmp_path / "pt_9.npz"
    write_openkbp_case(path, cord_half_width=8)
    with caplog.at_level(logging.WARNING, logger="rtcontour.models.data"):
        _, masks, known, _ = load_openkbp_raw(path)
    assert not known[CORD] and not masks[CORD].any()
    assert "pt_9: reference SpinalCord set aside as not contoured" in caplog.text
    _, masks, known, _ = load_openkbp_raw(path, reference_qa=False)
    assert known[CORD] and masks[CORD].sum() == 20 * 17 * 17
    # training data: the set-aside structure is unknown (no gradient), not background
    case = preprocess_case(path)
    assert not case.known[CORD] and not ((case.labels >> CORD) & 1).any()


def test_evaluation_reports_checked_and_all_references_and_names_the_set_aside(
    tmp_path, tiny_package
):
    split = tmp_path / "validation"
    split.mkdir()
    write_openkbp_case(split / "pt_1.npz", cord_half_width=1, with_larynx=True)
    write_openkbp_case(split / "pt_2.npz", cord_half_width=8)
    results = evaluate_package(tiny_package, tmp_path, overlap=0.25)
    assert [(r["case"], r["structure"]) for r in results["references_set_aside"]] == [
        ("pt_2", "SpinalCord")]
    assert results["per_structure"]["SpinalCord"]["n_cases"] == 1
    assert results["per_structure_all_references"]["SpinalCord"]["n_cases"] == 2
    assert results["per_structure"]["Larynx"]["n_cases"] == 1
    table = format_table(results)
    assert "pt_2 SpinalCord" in table and "all references" in table


def test_openkbp_mislabelled_spinal_cords_are_caught_and_little_else(openkbp_dir):
    set_aside, references = [], 0
    for path in list_cases(openkbp_dir, "validation"):
        hu, masks, known, spacing = load_openkbp_raw(path, reference_qa=False)
        references += int(known.sum())
        set_aside += [(path.stem, ORGANS[c].roi_name)
                      for c in reference_problems(masks, known, spacing, hu)]
    # pt_215 and pt_216 label the posterior neck (vertebra and muscles) "SpinalCord"; pt_221's
    # Brainstem is half in bone and its SpinalCord a quarter (median 206 HU)
    assert {("pt_215", "SpinalCord"), ("pt_216", "SpinalCord"),
            ("pt_221", "Brainstem"), ("pt_221", "SpinalCord")} <= set(set_aside)
    assert len(set_aside) <= 0.04 * references, set_aside


def test_a_fragment_of_a_larynx_fails_and_the_training_cache_keeps_checked_and_raw_apart(
    tmp_path,
):
    spacing = (3.0, 4.0, 4.0)
    larynx = np.zeros((30, 40, 40), dtype=bool)
    larynx[10:14, 20:22, 20:22] = True  # 64 mm^2 per slice, a tenth of a larynx
    assert "0.10x the typical 655 mm^2" in reference_problem("Larynx", larynx, spacing)

    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    write_openkbp_case(split / "pt_3.npz", cord_half_width=8)
    (checked,) = load_split(tmp_path / "data", "train", tmp_path / "cache", workers=1)
    (raw,) = load_split(tmp_path / "data", "train", tmp_path / "cache", workers=1,
                        reference_qa=False)
    assert not checked.known[CORD] and raw.known[CORD]
    assert ((raw.labels >> CORD) & 1).any()
    assert len(list((tmp_path / "cache").rglob("pt_3.npz"))) == 2


def test_checkpoints_from_before_the_check_resume_without_it():
    from rtcontour.models.train import TrainConfig

    old = TrainConfig().to_dict()
    del old["reference_qa"]
    assert TrainConfig.from_dict(old).reference_qa is False
    assert TrainConfig.from_dict(TrainConfig().to_dict()).reference_qa is True


def test_a_soft_tissue_organ_drawn_on_bone_fails_the_intensity_check():
    spacing = (3.0, 4.0, 4.0)
    cord = _cord((60, 40, 40), 2, slice(0, 60))
    hu = np.full((60, 40, 40), 30, dtype=np.int16)
    assert reference_problem("SpinalCord", cord, spacing, hu) is None
    hu[:30] = 700  # half the cord's slices in vertebra
    reason = reference_problem("SpinalCord", cord, spacing, hu)
    assert reason is not None and "50% of its voxels are above 300 HU" in reason
    # bone is the mandible's business
    mandible = np.zeros((60, 40, 40), dtype=bool)
    mandible[10:20, 15:22, 15:22] = True  # 784 mm^2 a slice, a typical mandible
    assert reference_problem("Bone_Mandible", mandible, spacing, np.full_like(hu, 900)) is None


def test_openkbp_brainstem_on_the_wrong_anatomy_is_caught(openkbp_dir):
    path = openkbp_dir / "validation" / "pt_221.npz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    hu, masks, known, spacing = load_openkbp_raw(path, reference_qa=False)
    problems = reference_problems(masks, known, spacing, hu)
    brainstem = next(i for i, o in enumerate(ORGANS) if o.roi_name == "Brainstem")
    assert brainstem in problems and "above 300 HU" in problems[brainstem]
