"""Plausibility check of reference contours before they train or judge a model.

A reference contour that is not the organ its name says poisons both training and evaluation:
in OpenKBP's validation split the "SpinalCord" of pt_215 and pt_216 is the whole posterior
neck (17 and 25 times the cord's cross-section), so a perfect cord scores Dice 0.07 there.

The check compares a contour's mean cross-section (volume / number of slices it occupies, in
mm^2, so independent of how far craniocaudally it was drawn) with the organ's typical value,
the median over the OpenKBP training split
(``python -m rtcontour.models.reference_qa_report --split train`` prints it). More than
``FACTOR`` times larger or smaller is implausible: the training split's 5th to 95th
percentiles lie within 0.5x to 2.7x of the median for every organ. A structure listed as
contoured but with no voxel fails too, and so does a soft-tissue organ with more than
``BONE_FRACTION`` of its voxels above ``BONE_HU`` (the area check misses a contour drawn on the
wrong anatomy: validation pt_221's "Brainstem" has 49 % of its voxels above 300 HU and its
"SpinalCord" 26 %, where no other soft-tissue reference of the 202 patients exceeds 10 %). A
failed reference is treated as not contoured (unknown), never as background.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from rtcontour.models.labels import ORGANS

__all__ = ["BONE_FRACTION", "BONE_HU", "FACTOR", "QA_VERSION", "TYPICAL_AREA_MM2",
           "mean_cross_section_mm2", "reference_problem", "reference_problems"]

log = logging.getLogger(__name__)

FACTOR = 4.0
# Bump with any change of FACTOR, TYPICAL_AREA_MM2, BONE_* or the rules: it names the training
# cache.
QA_VERSION = 2
# Soft-tissue organs: at most this fraction of the voxels above BONE_HU (bone) is plausible.
BONE_HU = 300.0
BONE_FRACTION = 0.2
SOFT_TISSUE = frozenset({"Brainstem", "SpinalCord", "Parotid_L", "Parotid_R", "Esophagus",
                         "Larynx"})

# Median mean cross-section (mm^2) per structure over the OpenKBP training split (169 patients).
TYPICAL_AREA_MM2: dict[str, float] = {
    "Brainstem": 448.0,
    "SpinalCord": 133.0,
    "Parotid_L": 495.0,
    "Parotid_R": 499.0,
    "Esophagus": 162.0,
    "Larynx": 655.0,
    "Bone_Mandible": 841.0,
}


def mean_cross_section_mm2(mask: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Area per occupied slice (mm^2) of a (slices, rows, columns) bool mask; 0 if empty."""
    slices = int(np.count_nonzero(mask.any(axis=(1, 2))))
    if slices == 0:
        return 0.0
    return float(np.count_nonzero(mask)) * float(spacing_mm[1]) * float(spacing_mm[2]) / slices


def reference_problem(roi_name: str, mask: np.ndarray, spacing_mm: Sequence[float],
                      hu: np.ndarray | None = None) -> str | None:
    """Why the reference contour ``mask`` of ``roi_name`` is implausible, or ``None``
    (``hu``: the CT on the mask's grid, for the intensity check)."""
    area = mean_cross_section_mm2(mask, spacing_mm)
    if area == 0.0:
        return "listed as contoured but empty"
    typical = TYPICAL_AREA_MM2[roi_name]
    ratio = area / typical
    if ratio > FACTOR or ratio < 1.0 / FACTOR:
        return (f"mean cross-section {area:.0f} mm^2 is {ratio:.2f}x the typical "
                f"{typical:.0f} mm^2 (allowed {1 / FACTOR:.2f}x to {FACTOR:.0f}x)")
    if hu is not None and roi_name in SOFT_TISSUE:
        bone = float(np.count_nonzero(hu[mask] > BONE_HU)) / float(np.count_nonzero(mask))
        if bone > BONE_FRACTION:
            return (f"{bone:.0%} of its voxels are above {BONE_HU:.0f} HU (bone); a soft-tissue "
                    f"organ has at most {BONE_FRACTION:.0%}")
    return None


def reference_problems(
    masks: np.ndarray, known: np.ndarray, spacing_mm: Sequence[float],
    hu: np.ndarray | None = None,
) -> dict[int, str]:
    """Channel -> reason for every known structure of one patient whose reference fails
    (``hu``: the CT, for the intensity check)."""
    problems: dict[int, str] = {}
    for channel, organ in enumerate(ORGANS):
        if known[channel]:
            reason = reference_problem(organ.roi_name, masks[channel], spacing_mm, hu)
            if reason is not None:
                problems[channel] = reason
    return problems
