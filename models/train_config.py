"""What defines a training run of the OAR residual U-Net, without torch.

:class:`TrainConfig` (stored in every checkpoint) and :class:`SpatialAugmentation` (the
parameters of the random rotation and scale it turns on) are plain values, so that the
command line (:mod:`models.train_cli`) and anything else that only reads a run's settings
work without the 'train' extra. The training itself is :mod:`models.train`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rtcontour.models.data import HU_CLIP, TARGET_SPACING_MM

__all__ = ["TrainConfig", "SpatialAugmentation"]


@dataclass(frozen=True)
class SpatialAugmentation:
    """Random rotation and scale of a patch.

    Args:
        probability: chance per sample of being transformed (else plain centre crop).
        rotation_deg: maximum rotation about the slice axis (axial plane), degrees.
        tilt_deg: maximum rotation about each in-plane axis (out of the axial plane), degrees.
        scale_range: (min, max) isotropic scale of the anatomy in the patch.
    """

    probability: float = 0.5
    rotation_deg: float = 15.0
    tilt_deg: float = 6.0
    scale_range: tuple[float, float] = (0.85, 1.2)

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability!r}")
        if not 0.0 <= self.rotation_deg <= 90.0 or not 0.0 <= self.tilt_deg <= 45.0:
            raise ValueError(f"rotation_deg must be in [0, 90] and tilt_deg in [0, 45], got "
                             f"{self.rotation_deg!r} and {self.tilt_deg!r}")
        low, high = self.scale_range
        if not 0.0 < low <= high:
            raise ValueError(f"scale_range must be 0 < min <= max, got {self.scale_range!r}")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint)."""

    run: str = "hn-oar-1"
    arch: str = "unet"
    base_channels: int = 16
    levels: int = 5
    max_channels: int = 96
    patch_size: tuple[int, int, int] = (64, 96, 96)
    batch_size: int = 2
    steps: int = 2400
    lr: float = 2e-3
    weight_decay: float = 3e-5
    warmup_steps: int = 50
    # Global step at which the current LR schedule (warm-up, then poly decay to ``steps``)
    # began: 0 for a run's first schedule, later for a warm restart (``--restart-schedule``).
    schedule_start: int = 0
    foreground_fraction: float = 0.67
    # Sampling weight per channel when choosing the structure to centre a patch on.
    structure_weights: tuple[float, ...] = (1.0, 1.5, 1.0, 1.0, 3.0, 3.0, 1.0)
    # BCE weight of positive voxels per channel: the rare thin structures (Esophagus, Larynx)
    # otherwise sink into the saturated-sigmoid region before Dice can lift them.
    pos_weight: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 8.0, 8.0, 1.0)
    val_every: int = 300
    val_cases: int = 6
    val_overlap: float = 0.25
    checkpoint_minutes: float = 3.0
    seed: int = 20260
    bf16: bool = True
    threads: int = 2
    target_spacing_mm: tuple[float, float, float] = TARGET_SPACING_MM
    hu_clip: tuple[float, float] = HU_CLIP
    data_dir: str = ""
    train_limit: int = 0
    # Reference contours failing models.reference_qa count as not contoured. Checkpoints made
    # before the check existed lack the field and trained without it (see from_dict).
    reference_qa: bool = True
    # Recipe options (issue 15). Off by default: the recipe of the checkpoints made before.
    # Probability per sample of a random rotation/scale (0 = no spatial augmentation).
    spatial_aug_p: float = 0.0
    rotation_deg: float = 15.0
    tilt_deg: float = 6.0
    scale_range: tuple[float, float] = (0.85, 1.2)
    # Gaussian noise, blur, simulated low resolution and gamma (models.augment).
    intensity_aug: bool = False
    # Decay of the exponential moving average of the weights (0 = none); with one, validation,
    # best.pt selection and export use the average.
    ema_decay: float = 0.0
    # Auxiliary 1x1x1 heads on the decoder levels below full resolution (training only).
    deep_supervision: int = 0
    # Train on each structure's partial-volume occupancy of the training voxels (issue 20)
    # instead of masks thresholded at 0.5, which shrink thin structures (cord by ~17 %).
    soft_targets: bool = False
    command: list[str] = field(default_factory=list)

    def spatial_augmentation(self) -> SpatialAugmentation | None:
        if self.spatial_aug_p <= 0.0:
            return None
        return SpatialAugmentation(self.spatial_aug_p, self.rotation_deg, self.tilt_deg,
                                   self.scale_range)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                continue
            kwargs[key] = tuple(value) if isinstance(value, list) and key != "command" else value
        kwargs.setdefault("reference_qa", False)
        return cls(**kwargs)
