"""Structure definitions shared by training, export and inference (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ORGANS", "OrganSpec", "OPENKBP_TO_TG263", "LR_SWAP_PAIRS",
           "TRAINING_VOLUME_RANGE_CC", "MIN_PLAUSIBLE_VOLUME_CC"]


@dataclass(frozen=True)
class OrganSpec:
    """One output channel: TG-263 name, OpenKBP name, display colour, topology."""

    roi_name: str
    openkbp_name: str
    colour_rgb: tuple[int, int, int]
    single_component: bool


# Output channel order is part of the model package contract; never reorder.
ORGANS: tuple[OrganSpec, ...] = (
    OrganSpec("Brainstem", "Brainstem", (255, 165, 0), True),
    OrganSpec("SpinalCord", "SpinalCord", (255, 255, 0), True),
    OrganSpec("Parotid_L", "LeftParotid", (0, 200, 255), True),
    OrganSpec("Parotid_R", "RightParotid", (0, 90, 255), True),
    OrganSpec("Esophagus", "Esophagus", (180, 110, 60), True),
    OrganSpec("Larynx", "Larynx", (0, 220, 120), True),
    OrganSpec("Bone_Mandible", "Mandible", (230, 230, 230), True),
)

OPENKBP_TO_TG263: dict[str, str] = {organ.openkbp_name: organ.roi_name for organ in ORGANS}

# Channel index pairs exchanged by a patient left/right mirror (axis 2 of the canonical array).
LR_SWAP_PAIRS: tuple[tuple[int, int], ...] = ((2, 3),)

# Reference volumes in cc of the OpenKBP training split (169 patients, references passing
# models.reference_qa), 2.5th and 97.5th percentile: ``python -m rtcontour.models.quality volumes``.
# A contour outside this range is not wrong (a scan may cut an organ) but is worth a look.
TRAINING_VOLUME_RANGE_CC: dict[str, tuple[float, float]] = {
    "Brainstem": (8.7, 41.6),
    "SpinalCord": (12.0, 45.2),
    "Parotid_L": (11.0, 47.7),
    "Parotid_R": (11.9, 47.1),
    "Esophagus": (4.6, 22.5),
    "Larynx": (3.3, 58.3),
    "Bone_Mandible": (36.7, 89.5),
}

# Below this volume in cc a predicted structure is a fragment, not an organ cut by the edge of
# the scan, and is dropped (about a tenth of the smallest training volumes above; a 3 mm
# slab of a parotid is ~1 cc).
MIN_PLAUSIBLE_VOLUME_CC: dict[str, float] = {
    "Brainstem": 1.0,
    "SpinalCord": 1.0,
    "Parotid_L": 1.0,
    "Parotid_R": 1.0,
    "Esophagus": 0.5,
    "Larynx": 0.5,
    "Bone_Mandible": 2.0,
}
