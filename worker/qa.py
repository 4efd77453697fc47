"""What the clinicians changed: rtcontour's structure set against the approved one.

:func:`compare_structure_sets` pairs the two sets by TG-263 name
(:func:`common.structure_names.match_structures`) and measures each pair on the CT grid they
share. Masks are bool arrays of shape **(slices, rows, columns)** (axis 0 across axial
slices, as :class:`common.volume.Volume`), spacing in **mm** in that order. Per structure:

- **Dice**: ``2 |A & R| / (|A| + |R|)`` over voxels, as ``rtcontour evaluate``
  (:func:`models.evaluate.dice`).
- **Surfaces** are the voxels of a mask with a face neighbour outside it (the mask less its
  binary erosion by the 6-neighbourhood), as :mod:`models.evaluate`; a surface distance is
  the Euclidean distance in mm (``scipy.ndimage.distance_transform_edt`` with
  ``sampling=spacing_mm``) from a surface voxel of one mask to the nearest surface voxel of
  the other.
- **HD95** (mm): the larger of the two directed 95th percentiles of surface distances
  (auto -> reference, reference -> auto), as :func:`models.evaluate.hd95_mm` and MONAI's
  ``compute_hausdorff_distance(percentile=95)``.
- **Mean surface distance** (mm, symmetric): the mean over the surface voxels of both masks
  of their distance to the other surface.
- **Surface Dice at 2 mm** (Nikolov et al. 2021, "Clinically applicable segmentation of head
  and neck anatomy for radiotherapy", J Med Internet Res 23(7):e26151): the share of both
  surfaces that lies within 2 mm of the other, ``(|S_A within 2 mm of S_R| + |S_R within
  2 mm of S_A|) / (|S_A| + |S_R|)``, surfaces counted in voxels (MONAI's
  ``compute_surface_dice`` without sub-voxels; the paper weighs surface elements by area).
- **Added path length** (Vaassen et al. 2020, "Evaluation of measures for assessing
  time-saving of automatic organ-at-risk segmentation in radiotherapy", Phys Imaging Radiat
  Oncol 13:1-6): on every axial slice, the contour pixels of the reference (its 2-D boundary:
  pixels with an in-plane 4-neighbour outside it) farther than ``tolerance_mm`` in the plane
  from the auto contour of that slice, counted and multiplied by the pixel size; summed over
  slices. It is the length the clinician had to draw: a slice the auto contours lack counts
  with its whole contour, a slice or part the clinician erased counts nothing.

A structure the approved set holds but left empty, while the auto set has voxels, was
**deleted** by the clinicians; one with voxels only in the reference **added**; a pair whose
contours agree within ``tolerance_mm`` on every slice both ways is **unchanged**, else
**edited**. A structure the approved set does not hold at all is **not in the approved set**:
many clinics contour only the organs a plan needs, so its absence says nothing about our
contour (no Dice, no distances); with ``absent_means_deleted`` (a clinic whose approved sets
always carry every auto-contoured organ) it counts as deleted instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from rtcontour.common.structure_names import match_structures

__all__ = [
    "SURFACE_DICE_TOLERANCE_MM",
    "StructureStatus",
    "StructureQa",
    "QaResult",
    "compare_structure_sets",
    "compare_masks",
    "surface_distances_mm",
    "added_path_length_mm",
]

SURFACE_DICE_TOLERANCE_MM = 2.0
# Distances within a micrometre of a tolerance count as within it (spacing x voxels in floats).
_EPSILON_MM = 1e-6
_FACES_3D = ndimage.generate_binary_structure(3, 1)
_FACES_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_FACES_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)

BoolMask = NDArray[np.bool_]


class StructureStatus(StrEnum):
    """What the clinicians did with a structure."""

    UNCHANGED = "unchanged"  # contours agree within the tolerance on every slice, both ways
    EDITED = "edited"
    DELETED = "deleted"  # voxels in the auto set only (the reference's is empty)
    ADDED = "added"  # voxels in the reference only
    NOT_IN_APPROVED_SET = "not_in_approved_set"  # the reference has no such structure at all


@dataclass(frozen=True)
class StructureQa:
    """One structure, auto against reference. Distances in mm; ``None`` where undefined.

    ``roi_name``: rtcontour's name (``None`` for a structure only the reference has);
    ``reference_name``: the approved set's name (``None`` for one it lacks). HD95 and mean
    surface distance are ``None`` unless both masks have voxels (no surface to measure to);
    Dice and surface Dice are 0.0 for a deleted or added structure (none of it agrees) and
    ``None`` when neither mask has voxels (0/0). A structure not in the approved set has no
    figure at all (every one ``None``).
    """

    roi_name: str | None
    reference_name: str | None
    status: StructureStatus
    dice: float | None
    hd95_mm: float | None
    mean_surface_distance_mm: float | None
    surface_dice_2mm: float | None
    added_path_length_mm: float | None  # None: not in the approved set

    def as_dict(self) -> dict[str, Any]:
        """The JSON of one structure in the job's ``qa`` (issue 13), plus ``status``."""
        return {
            "roi_name": self.roi_name,
            "reference_name": self.reference_name,
            "dice": self.dice,
            "hd95_mm": self.hd95_mm,
            "mean_surface_distance_mm": self.mean_surface_distance_mm,
            "surface_dice_2mm": self.surface_dice_2mm,
            "added_path_length_mm": self.added_path_length_mm,
            "status": self.status.value,
        }


@dataclass(frozen=True)
class QaResult:
    """Every structure of an auto vs reference comparison, in pairing order (auto set order,
    then structures only the reference has)."""

    structures: tuple[StructureQa, ...]
    spacing_mm: tuple[float, float, float]
    tolerance_mm: float  # of the added path length and of "unchanged"

    def structure(self, roi_name: str) -> StructureQa | None:
        """The result for rtcontour's structure ``roi_name``, if it was compared."""
        return next((item for item in self.structures if item.roi_name == roi_name), None)

    def with_status(self, status: StructureStatus | str) -> tuple[StructureQa, ...]:
        """The structures of one status."""
        return tuple(item for item in self.structures if item.status == status)

    def as_dict(self) -> dict[str, Any]:
        """``{"structures": [...], "added_path_length_tolerance_mm": ...}``; the caller adds
        ``reference_sop_instance_uid`` and ``received_at`` for the job's ``qa``."""
        return {
            "structures": [item.as_dict() for item in self.structures],
            "added_path_length_tolerance_mm": self.tolerance_mm,
        }


def _checked_spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(value) for value in spacing_mm)
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing_mm must be three positive sizes in mm (slice, row, column), "
                         f"not {tuple(spacing_mm)!r}")
    return values[0], values[1], values[2]


def _checked_tolerance(tolerance_mm: float) -> float:
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be a distance >= 0 in mm, not {tolerance_mm!r}")
    return float(tolerance_mm)


def _check_mask(name: str, mask: np.ndarray, shape: tuple[int, ...] | None) -> None:
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 3:
        raise ValueError(f"mask {name!r} must be a 3-D bool array (slices, rows, columns), not "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} of shape "
                         f"{getattr(mask, 'shape', None)}")
    if shape is not None and mask.shape != shape:
        raise ValueError(f"mask {name!r} has shape {mask.shape}, the others {shape}: the auto "
                         "and reference masks must lie on the same CT grid")


def _union_box(first: BoolMask, second: BoolMask) -> tuple[slice, ...] | None:
    """The bounding box of both masks (every surface and contour lies inside it, so
    distances computed in it are the distances in the whole grid), or None if both empty."""
    boxes = ndimage.find_objects((first | second).astype(np.uint8))
    return boxes[0] if boxes else None


def _surface(mask: BoolMask) -> BoolMask:
    return mask & ~ndimage.binary_erosion(mask, structure=_FACES_3D)


def surface_distances_mm(
    first: BoolMask, second: BoolMask, spacing_mm: Sequence[float]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Distances in mm from each surface voxel of ``first`` to the surface of ``second``,
    and from each of ``second`` to that of ``first`` (1-D arrays, in C order of the voxels).

    Both masks bool, shape (slices, rows, columns), ``spacing_mm`` (slice, row, column); both
    must have voxels (a distance to an empty surface is undefined: ``ValueError``).
    """
    spacing = _checked_spacing(spacing_mm)
    if not first.any() or not second.any():
        raise ValueError("surface distances need voxels in both masks")
    box = _union_box(first, second)
    first_surface, second_surface = _surface(first[box]), _surface(second[box])
    to_second = ndimage.distance_transform_edt(~second_surface, sampling=spacing)
    to_first = ndimage.distance_transform_edt(~first_surface, sampling=spacing)
    return (np.asarray(to_second[first_surface], dtype=np.float64),
            np.asarray(to_first[second_surface], dtype=np.float64))


def _contour_in_plane(mask: BoolMask) -> BoolMask:
    """Per axial slice, the pixels with an in-plane 4-neighbour outside the mask."""
    return mask & ~ndimage.binary_erosion(mask, structure=_FACES_IN_PLANE)


def _path_length_outside_mm(drawn: BoolMask, kept: BoolMask, spacing: tuple[float, float, float],
                            tolerance_mm: float) -> float:
    """Length in mm of the contours of ``drawn`` farther than ``tolerance_mm`` in the plane of
    each slice from the contours of ``kept`` (both already cropped)."""
    drawn_contour, kept_contour = _contour_in_plane(drawn), _contour_in_plane(kept)
    # Vaassen et al. count contour pixels times the pixel size; CT pixels are square, and
    # where they are not the mean side stands for a pixel's length.
    pixel_mm = (spacing[1] + spacing[2]) / 2.0
    pixels = 0
    for index in np.flatnonzero(drawn_contour.any(axis=(1, 2))):
        on_slice = drawn_contour[index]
        if not kept_contour[index].any():
            pixels += int(on_slice.sum())
            continue
        distance = ndimage.distance_transform_edt(~kept_contour[index], sampling=spacing[1:])
        pixels += int((distance[on_slice] > tolerance_mm + _EPSILON_MM).sum())
    return pixels * pixel_mm


def added_path_length_mm(auto: BoolMask, reference: BoolMask, spacing_mm: Sequence[float],
                         tolerance_mm: float = 2.0) -> float:
    """Added path length (Vaassen et al. 2020) in mm: the length of the reference's axial
    contours not within ``tolerance_mm`` (in the slice's plane) of the auto contours of the
    same slice. Masks bool (slices, rows, columns) on one grid, ``spacing_mm`` (slice, row,
    column). 0.0 for an empty reference; the whole contour length for an empty auto mask."""
    spacing = _checked_spacing(spacing_mm)
    box = _union_box(auto, reference)
    if box is None:
        return 0.0
    return _path_length_outside_mm(reference[box], auto[box], spacing,
                                   _checked_tolerance(tolerance_mm))


def compare_masks(
    auto: BoolMask,
    reference: BoolMask,
    spacing_mm: Sequence[float],
    *,
    tolerance_mm: float = 2.0,
    roi_name: str | None = None,
    reference_name: str | None = None,
) -> StructureQa:
    """All figures of one structure: ``auto`` (rtcontour's) against ``reference`` (approved).

    Masks bool, shape (slices, rows, columns) on the same CT grid; ``spacing_mm`` (slice,
    row, column); ``tolerance_mm`` of the added path length and of "unchanged". Surface Dice
    is always at :data:`SURFACE_DICE_TOLERANCE_MM`. The names are carried into the result.
    """
    spacing = _checked_spacing(spacing_mm)
    tolerance = _checked_tolerance(tolerance_mm)
    _check_mask(roi_name or "auto", auto, None)
    _check_mask(reference_name or "reference", reference, auto.shape)
    box = _union_box(auto, reference)
    auto_voxels = 0 if box is None else int(auto[box].sum())
    reference_voxels = 0 if box is None else int(reference[box].sum())
    if box is None or not auto_voxels or not reference_voxels:
        status = (StructureStatus.ADDED if reference_voxels else
                  StructureStatus.DELETED if auto_voxels else StructureStatus.UNCHANGED)
        one_side = bool(auto_voxels or reference_voxels)
        return StructureQa(
            roi_name=roi_name, reference_name=reference_name, status=status,
            dice=0.0 if one_side else None,  # neither has voxels: 0/0
            hd95_mm=None,  # no surface on one side to measure to
            mean_surface_distance_mm=None,
            surface_dice_2mm=0.0 if one_side else None,
            added_path_length_mm=(0.0 if box is None else
                                  _path_length_outside_mm(reference[box], auto[box], spacing,
                                                          tolerance)))
    auto_box, reference_box = auto[box], reference[box]
    overlap = int(np.logical_and(auto_box, reference_box).sum())
    to_reference, to_auto = surface_distances_mm(auto_box, reference_box, spacing)
    both = np.concatenate([to_reference, to_auto])
    within = int((both <= SURFACE_DICE_TOLERANCE_MM + _EPSILON_MM).sum())
    added = _path_length_outside_mm(reference_box, auto_box, spacing, tolerance)
    removed = _path_length_outside_mm(auto_box, reference_box, spacing, tolerance)
    return StructureQa(
        roi_name=roi_name,
        reference_name=reference_name,
        status=(StructureStatus.UNCHANGED if added == 0.0 and removed == 0.0
                else StructureStatus.EDITED),
        dice=2.0 * overlap / (auto_voxels + reference_voxels),
        hd95_mm=float(max(np.percentile(to_reference, 95), np.percentile(to_auto, 95))),
        mean_surface_distance_mm=float(both.mean()),
        surface_dice_2mm=within / both.size,
        added_path_length_mm=added,
    )


def compare_structure_sets(
    auto: Mapping[str, BoolMask],
    reference: Mapping[str, BoolMask],
    spacing_mm: Sequence[float],
    *,
    extra_names: Mapping[str, str] | None = None,
    tolerance_mm: float = 2.0,
    absent_means_deleted: bool = False,
) -> QaResult:
    """rtcontour's structure set ``auto`` against the approved ``reference``.

    ``auto`` and ``reference``: ROI name -> bool mask, shape (slices, rows, columns), all on
    the same CT grid; ``spacing_mm`` (slice, row, column) in mm. Structures are paired by
    TG-263 name (``extra_names``: clinic name -> TG-263 name, before the built-in synonyms).
    A structure of ``auto`` that ``reference`` holds empty is deleted; one ``reference`` lacks
    altogether is not in the approved set (deleted if ``absent_means_deleted``); one only in
    ``reference`` (or empty in ``auto``) is added; a pair empty on both sides says nothing and
    is left out. ``tolerance_mm`` is that of the added path length and of "unchanged".
    Raises ``ValueError`` naming the structure for a mask that is not 3-D bool on that grid.
    """
    spacing = _checked_spacing(spacing_mm)
    tolerance = _checked_tolerance(tolerance_mm)
    shape: tuple[int, ...] | None = None
    for name, mask in (*auto.items(), *reference.items()):
        _check_mask(name, mask, shape)
        shape = mask.shape
    if shape is None:
        return QaResult(structures=(), spacing_mm=spacing, tolerance_mm=tolerance)
    empty = np.zeros(shape, dtype=bool)
    results = []
    for auto_name, reference_name in match_structures(auto, reference, extra_names):
        auto_mask = empty if auto_name is None else auto[auto_name]
        reference_mask = empty if reference_name is None else reference[reference_name]
        if not auto_mask.any() and not reference_mask.any():
            continue
        if reference_name is None and not absent_means_deleted:
            results.append(StructureQa(
                roi_name=auto_name, reference_name=None,
                status=StructureStatus.NOT_IN_APPROVED_SET, dice=None, hd95_mm=None,
                mean_surface_distance_mm=None, surface_dice_2mm=None, added_path_length_mm=None))
            continue
        results.append(compare_masks(auto_mask, reference_mask, spacing,
                                     tolerance_mm=tolerance, roi_name=auto_name,
                                     reference_name=reference_name))
    return QaResult(structures=tuple(results), spacing_mm=spacing, tolerance_mm=tolerance)
