"""What the clinicians changed: known differences give the expected figures; the figures agree
with brute force, with MONAI (when installed) and, on an OpenKBP patient, with
``rtcontour evaluate``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from rtcontour.worker.qa import (
    SURFACE_DICE_TOLERANCE_MM,
    QaResult,
    StructureStatus,
    added_path_length_mm,
    compare_masks,
    compare_structure_sets,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SHAPE = (16, 40, 40)
SPACING = (3.0, 1.0, 1.0)  # slice, row, column in mm


def box(slices: tuple[int, int], rows: tuple[int, int], columns: tuple[int, int],
        shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A bool box over the half-open index ranges."""
    mask = np.zeros(shape, dtype=bool)
    mask[slices[0]:slices[1], rows[0]:rows[1], columns[0]:columns[1]] = True
    return mask


# 8 slices x 20 rows x 10 columns; its faces across the columns are 160 of 736 surface voxels.
AUTO_BOX = box((4, 12), (10, 30), (10, 20))


def shifted(mask: np.ndarray, columns: int) -> np.ndarray:
    return np.roll(mask, columns, axis=2)


@pytest.mark.parametrize("voxels", [1, 5], ids=["1mm", "5mm"])
def test_a_box_shifted_along_the_columns_gives_the_expected_figures(voxels):
    result = compare_masks(AUTO_BOX, shifted(AUTO_BOX, voxels), SPACING)

    assert result.dice == pytest.approx((10 - voxels) / 10)  # overlap 8x20x(10-N) of 8x20x10
    # Every surface voxel lies at most N mm from the other surface, a fifth exactly N mm.
    assert result.hd95_mm == pytest.approx(voxels * SPACING[2])
    assert result.mean_surface_distance_mm is not None
    assert 0 < result.mean_surface_distance_mm < voxels
    assert result.status is (StructureStatus.EDITED if voxels == 5
                             else StructureStatus.UNCHANGED)  # 1 mm is within tolerance
    if voxels == 1:
        assert result.surface_dice_2mm == 1.0
        assert result.added_path_length_mm == 0.0  # within the 2 mm tolerance everywhere
    else:
        assert result.surface_dice_2mm is not None and 0.5 < result.surface_dice_2mm < 1.0
        # Per slice, 38 of the reference rectangle's 56 contour pixels lie farther than 2 mm
        # from the auto rectangle: the far column (18), 14 of the near column's 18 (those
        # over 2 mm from the auto's top and bottom rows) and 3 + 3 of the top and bottom
        # rows (5 overlap, 2 within 2 mm): 38 pixels of 1 mm on each of 8 slices.
        assert result.added_path_length_mm == pytest.approx(38 * 8 * 1.0)


def test_a_one_pixel_shift_adds_path_without_tolerance():
    reference = shifted(AUTO_BOX, 1)
    assert added_path_length_mm(AUTO_BOX, reference, SPACING, tolerance_mm=2.0) == 0.0
    # Both side columns (18 pixels each: the near one now inside the auto box) and one pixel
    # of each of the top and bottom rows are off the auto contour, on each of 8 slices.
    assert added_path_length_mm(AUTO_BOX, reference, SPACING, tolerance_mm=0.0) == (
        pytest.approx((18 + 18 + 1 + 1) * 8))
    assert compare_masks(AUTO_BOX, reference, SPACING,
                         tolerance_mm=0.0).status is StructureStatus.EDITED


def test_a_slice_the_clinician_drew_adds_its_whole_perimeter():
    spacing = (2.5, 0.8, 0.8)
    reference = AUTO_BOX.copy()
    reference[12] = box((12, 13), (12, 27), (11, 19))[12]  # 15 x 8 pixels on a new slice
    result = compare_masks(AUTO_BOX, reference, spacing)
    # The contour through the boundary pixels of a 15 x 8 rectangle: 2 (15 + 8) - 4 pixels.
    assert result.added_path_length_mm == pytest.approx((2 * (15 + 8) - 4) * 0.8)
    assert result.status is StructureStatus.EDITED
    assert result.hd95_mm == pytest.approx(2.5)  # the new slice lies one slice off the box
    # A slice the clinician erased costs no drawing, but the structure was edited.
    erased = compare_masks(reference, AUTO_BOX, spacing)
    assert erased.added_path_length_mm == 0.0
    assert erased.status is StructureStatus.EDITED


CLINIC_NAMES = {"Brainstem": "Brain Stem", "SpinalCord": "Cord", "Parotid_L": "Parotid Lt",
                "Parotid_R": "Parotid Rt", "Esophagus": "Oesophagus", "Larynx": "Larynx",
                "Bone_Mandible": "Mandible"}


def seven_structures() -> dict[str, np.ndarray]:
    return {name: box((2 + index, 8 + index), (5 + 4 * index, 12 + 4 * index), (8, 30))
            for index, name in enumerate(CLINIC_NAMES)}


def test_identical_sets_with_clinic_names_are_unchanged():
    auto = seven_structures()
    reference = {CLINIC_NAMES[name]: mask.copy() for name, mask in auto.items()}
    result = compare_structure_sets(auto, reference, SPACING)
    assert [(item.roi_name, item.reference_name) for item in result.structures] == list(
        CLINIC_NAMES.items())
    for item in result.structures:
        assert item.status is StructureStatus.UNCHANGED
        assert (item.dice, item.hd95_mm, item.mean_surface_distance_mm, item.surface_dice_2mm,
                item.added_path_length_mm) == (1.0, 0.0, 0.0, 1.0, 0.0)


def test_a_deleted_and_an_added_structure_are_reported_so():
    auto = seven_structures()
    reference = {CLINIC_NAMES[name]: mask.copy() for name, mask in auto.items()
                 if name != "Larynx"}  # the clinic does not contour the larynx
    reference["Parotid Rt"][:] = False  # the clinicians emptied the right parotid
    auto["Esophagus"] = np.zeros(SHAPE, dtype=bool)  # rtcontour found no oesophagus
    reference["Lips"] = box((3, 5), (2, 6), (2, 8))  # a structure rtcontour does not draw
    result = compare_structure_sets(auto, reference, SPACING)

    larynx = result.structure("Larynx")
    assert larynx is not None and larynx.reference_name is None
    assert larynx.status is StructureStatus.NOT_IN_APPROVED_SET
    assert (larynx.dice, larynx.hd95_mm, larynx.mean_surface_distance_mm,
            larynx.surface_dice_2mm, larynx.added_path_length_mm) == (None,) * 5
    assert larynx.as_dict()["status"] == "not_in_approved_set"
    # A clinic whose approved sets carry every organ says that absent means deleted.
    strict = compare_structure_sets(auto, reference, SPACING, absent_means_deleted=True)
    larynx = strict.structure("Larynx")
    assert larynx is not None and larynx.status is StructureStatus.DELETED
    assert (larynx.dice, larynx.hd95_mm, larynx.mean_surface_distance_mm,
            larynx.surface_dice_2mm, larynx.added_path_length_mm) == (0.0, None, None, 0.0, 0.0)
    right_parotid = result.structure("Parotid_R")
    assert right_parotid is not None and right_parotid.status is StructureStatus.DELETED
    assert right_parotid.reference_name == "Parotid Rt"

    esophagus = result.structure("Esophagus")
    assert esophagus is not None and esophagus.status is StructureStatus.ADDED
    # Drawn whole: 6 slices of a 7 x 22 rectangle, 2 (7 + 22) - 4 contour pixels of 1 mm.
    assert esophagus.added_path_length_mm == pytest.approx(6 * (2 * (7 + 22) - 4))
    assert esophagus.hd95_mm is None and esophagus.dice == 0.0
    lips = result.structures[-1]
    assert (lips.roi_name, lips.reference_name, lips.status) == (
        None, "Lips", StructureStatus.ADDED)
    assert lips.added_path_length_mm == pytest.approx(2 * (2 * (4 + 6) - 4))
    assert [item.roi_name for item in result.with_status("unchanged")] == [
        "Brainstem", "SpinalCord", "Parotid_L", "Bone_Mandible"]


def test_structures_empty_on_both_sides_are_left_out_and_empty_sets_give_nothing():
    empty = np.zeros(SHAPE, dtype=bool)
    result = compare_structure_sets({"Larynx": empty}, {"Larynx": empty}, SPACING)
    assert result.structures == ()
    assert compare_structure_sets({}, {}, SPACING).structures == ()
    alone = compare_masks(empty, empty, SPACING)
    assert (alone.dice, alone.surface_dice_2mm, alone.added_path_length_mm) == (None, None, 0.0)


def test_a_clinic_mapping_pairs_names_the_built_in_table_does_not_know():
    auto = {"Parotid_L": AUTO_BOX}
    reference = {"Parotide G": AUTO_BOX.copy()}
    assert [item.status for item in compare_structure_sets(auto, reference, SPACING).structures
            ] == [StructureStatus.NOT_IN_APPROVED_SET, StructureStatus.ADDED]
    result = compare_structure_sets(auto, reference, SPACING,
                                    extra_names={"Parotide G": "Parotid_L"})
    assert [(item.roi_name, item.reference_name, item.status) for item in result.structures] == [
        ("Parotid_L", "Parotide G", StructureStatus.UNCHANGED)]


def test_as_dict_gives_the_json_contract_of_the_jobs_qa():
    result = compare_structure_sets({"Parotid_L": AUTO_BOX},
                                    {"Parotid Lt": shifted(AUTO_BOX, 2)}, SPACING)
    document = json.loads(json.dumps(result.as_dict()))
    assert document["added_path_length_tolerance_mm"] == 2.0
    (structure,) = document["structures"]
    assert list(structure) == ["roi_name", "reference_name", "dice", "hd95_mm",
                               "mean_surface_distance_mm", "surface_dice_2mm",
                               "added_path_length_mm", "status"]
    assert structure["roi_name"] == "Parotid_L" and structure["reference_name"] == "Parotid Lt"
    assert structure["dice"] == pytest.approx(0.8) and structure["status"] == "unchanged"
    assert isinstance(result, QaResult)


@pytest.mark.parametrize(("auto", "reference", "spacing", "message"), [
    ({"Larynx": np.zeros(SHAPE, dtype=np.uint8)}, {}, SPACING, "'Larynx' must be a 3-D bool"),
    ({"Larynx": AUTO_BOX}, {"Larynx": AUTO_BOX[:, :, :20]}, SPACING, "same CT grid"),
    ({"Larynx": AUTO_BOX[0]}, {}, SPACING, "3-D bool"),
    ({"Larynx": AUTO_BOX}, {}, (3.0, 1.0), "spacing_mm"),
    ({"Larynx": AUTO_BOX}, {}, (3.0, 0.0, 1.0), "spacing_mm"),
], ids=["not-bool", "other-grid", "2-d", "two-spacings", "zero-spacing"])
def test_masks_off_the_grid_and_bad_spacings_are_refused_naming_them(auto, reference, spacing,
                                                                      message):
    with pytest.raises(ValueError, match=message):
        compare_structure_sets(auto, reference, spacing)


def ellipsoid(centre: tuple[float, float, float], radii_mm: tuple[float, float, float],
              spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return sum(((grid[axis] - centre[axis]) * spacing[axis] / radii_mm[axis]) ** 2
               for axis in range(3)) <= 1.0


def _faces_outside(mask: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Voxels of ``mask`` with a neighbour outside it along one of ``axes`` (by shifting a
    padded copy: no erosion)."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in range(3))
    outside = np.zeros_like(mask)
    for axis in axes:
        for step in (-1, 1):
            outside |= ~np.roll(padded, step, axis=axis)[inner]
    return mask & outside


def brute_force(auto: np.ndarray, reference: np.ndarray, spacing: tuple[float, float, float],
                tolerance_mm: float) -> dict[str, float]:
    """The same figures by nearest neighbours between voxel centres in mm (k-d tree)."""
    scale = np.asarray(spacing)
    auto_points = np.argwhere(_faces_outside(auto, (0, 1, 2))) * scale
    reference_points = np.argwhere(_faces_outside(reference, (0, 1, 2))) * scale
    to_reference = cKDTree(reference_points).query(auto_points)[0]
    to_auto = cKDTree(auto_points).query(reference_points)[0]
    both = np.concatenate([to_reference, to_auto])
    auto_contour = _faces_outside(auto, (1, 2))
    reference_contour = _faces_outside(reference, (1, 2))
    outside = 0
    for index in range(auto.shape[0]):
        drawn = np.argwhere(reference_contour[index]) * scale[1:]
        if not len(drawn):
            continue
        kept = np.argwhere(auto_contour[index]) * scale[1:]
        distances = (cKDTree(kept).query(drawn)[0] if len(kept)
                     else np.full(len(drawn), np.inf))
        outside += int((distances > tolerance_mm).sum())
    return {
        "hd95_mm": max(np.percentile(to_reference, 95), np.percentile(to_auto, 95)),
        "mean_surface_distance_mm": both.mean(),
        "surface_dice_2mm": float((both <= SURFACE_DICE_TOLERANCE_MM).mean()),
        "added_path_length_mm": outside * scale[1],
    }


@pytest.mark.parametrize("tolerance_mm", [0.0, 2.0, 3.5], ids=["0mm", "2mm", "3.5mm"])
def test_figures_agree_with_brute_force_nearest_neighbours(tolerance_mm):
    spacing = (2.5, 0.9765625, 0.9765625)
    shape = (24, 64, 64)
    auto = ellipsoid((11.0, 30.0, 31.0), (22.0, 18.0, 14.0), spacing, shape)
    reference = ellipsoid((12.3, 33.1, 29.4), (19.0, 20.0, 15.5), spacing, shape)
    reference[5:8, 20:26, 20:40] = True  # a part drawn on three slices
    ours = compare_masks(auto, reference, spacing, tolerance_mm=tolerance_mm)
    expected = brute_force(auto, reference, spacing, tolerance_mm)
    for name, value in expected.items():
        assert getattr(ours, name) == pytest.approx(value, rel=1e-9, abs=1e-9), name


def test_hd95_mean_distance_and_surface_dice_agree_with_monai():
    monai_metrics = pytest.importorskip(
        "monai.metrics", reason="MONAI is not installed (extra 'bench'): no cross-check")
    torch = pytest.importorskip("torch")
    spacing = (3.0, 1.171875, 1.171875)
    shape = (20, 48, 48)
    auto = ellipsoid((9.0, 22.0, 25.0), (21.0, 16.0, 12.0), spacing, shape)
    reference = ellipsoid((10.2, 24.5, 23.0), (18.0, 19.0, 13.0), spacing, shape)
    ours = compare_masks(auto, reference, spacing)

    def tensor(mask: np.ndarray):
        return torch.from_numpy(mask[None, None].astype(np.float32))

    hd95 = monai_metrics.compute_hausdorff_distance(
        tensor(auto), tensor(reference), include_background=True, percentile=95,
        spacing=spacing)
    mean_distance = monai_metrics.compute_average_surface_distance(
        tensor(auto), tensor(reference), include_background=True, symmetric=True,
        spacing=spacing)
    surface_dice = monai_metrics.compute_surface_dice(
        tensor(auto), tensor(reference), class_thresholds=[SURFACE_DICE_TOLERANCE_MM],
        include_background=True, spacing=spacing)
    assert ours.hd95_mm == pytest.approx(float(hd95), rel=1e-5)
    assert ours.mean_surface_distance_mm == pytest.approx(float(mean_distance), rel=1e-5)
    assert ours.surface_dice_2mm == pytest.approx(float(surface_dice), rel=1e-5)


def test_openkbp_clinical_contours_against_rtcontour_give_the_dice_of_evaluate():
    from rtcontour.models.data import default_data_dir, list_cases, load_openkbp_raw
    from rtcontour.models.evaluate import dice, hd95_mm
    from rtcontour.models.inference import Segmenter
    from rtcontour.models.labels import ORGANS

    data_dir = default_data_dir()
    if not (data_dir / "validation").is_dir():
        pytest.skip(f"OpenKBP data not found at {data_dir} (../shared/data/openkbp)")
    package = REPO_ROOT / "models" / "packages" / "rtcontour-hn-oar-1.2.0"
    path = list_cases(data_dir, "validation")[0]
    hu, masks, known, spacing = load_openkbp_raw(path, reference_qa=False)
    predicted = Segmenter(package).predict(hu.astype(np.float32), spacing)
    # The clinical set under its OpenKBP names ("LeftParotid", "Mandible", ...).
    clinical = {organ.openkbp_name: masks[channel] for channel, organ in enumerate(ORGANS)
                if known[channel]}

    result = compare_structure_sets(predicted, clinical, spacing)

    compared = 0
    for channel, organ in enumerate(ORGANS):
        item = result.structure(organ.roi_name)
        if not known[channel]:
            assert item is None or item.status is StructureStatus.NOT_IN_APPROVED_SET
            continue
        assert item is not None and item.reference_name == organ.openkbp_name
        assert item.dice == pytest.approx(dice(predicted[organ.roi_name], masks[channel]),
                                          abs=1e-6)
        expected_hd95 = hd95_mm(predicted[organ.roi_name], masks[channel], spacing)
        if expected_hd95 is None:
            assert item.hd95_mm is None
        else:
            assert item.hd95_mm == pytest.approx(expected_hd95, abs=1e-6)
        assert item.added_path_length_mm >= 0 and not math.isnan(item.added_path_length_mm)
        compared += 1
    assert compared >= 5, f"{path.stem}: only {compared} clinical structures"
