"""Structure definitions shared by training, export and inference (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ORGANS", "OrganSpec", "OPENKBP_TO_TG263", "LR_SWAP_PAIRS"]


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
