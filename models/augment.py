"""Batch augmentation for training, in torch (runs on the training device).

Tensors are (batch, channels, slices, rows, columns) in the canonical orientation (see
docs/ARCHITECTURE.md); voxel spacing (slice, row, column) in mm. Random parameters come from
a ``numpy.random.Generator`` (the sampler's, whose state the checkpoints keep) and noise from
torch's generator of the tensor's device, so a resumed run draws the same augmentations.

Spatial: a rotation (about the slice axis in the axial plane, plus two small tilts out of it)
and an isotropic scale, in millimetres (the voxels are anisotropic), sampled with
``F.affine_grid``/``F.grid_sample`` from a crop larger than the patch (:func:`crop_size`) so
that no padding enters the patch. The image is interpolated trilinearly; each label channel
trilinearly and thresholded at 0.5 (nearest neighbour would shift thin structures by half a
voxel). Left/right mirroring (with the Parotid_L/Parotid_R swap) stays in the sampler, before
this: a rotation never mirrors, so sides stay named correctly.

Intensity (image only, after the spatial step): Gaussian noise, Gaussian blur, simulated low
resolution and gamma, each per sample with its own probability (nnU-Net's defaults, scaled
to our [-1, 1] intensity range).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

# a value of TrainConfig, so defined without torch; re-exported for the augmentation API
from rtcontour.models.train_config import SpatialAugmentation

__all__ = [
    "SpatialAugmentation",
    "IntensityAugmentation",
    "rotation_matrix",
    "crop_size",
    "spatial_augment",
    "intensity_augment",
    "centre_crop",
]


@dataclass(frozen=True)
class IntensityAugmentation:
    """Per-sample probabilities and ranges of the image-only augmentations (image in [-1, 1])."""

    noise_probability: float = 0.15
    noise_std: tuple[float, float] = (0.0, 0.1)
    blur_probability: float = 0.2
    blur_sigma_voxels: tuple[float, float] = (0.5, 1.0)
    low_resolution_probability: float = 0.15
    low_resolution_zoom: tuple[float, float] = (0.5, 1.0)
    gamma_probability: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)


def rotation_matrix(axial_rad: float, tilt_row_rad: float, tilt_column_rad: float) -> np.ndarray:
    """3x3 rotation in (slice, row, column) mm coordinates: about the slice axis (mixing rows
    and columns) by ``axial_rad``, then about the row axis (slices/columns) and the column
    axis (slices/rows) by the tilts."""

    def plane(i: int, j: int, angle: float) -> np.ndarray:
        matrix = np.eye(3)
        c, s = math.cos(angle), math.sin(angle)
        matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
        return matrix

    return plane(1, 2, axial_rad) @ plane(0, 2, tilt_row_rad) @ plane(0, 1, tilt_column_rad)


def crop_size(
    patch_size: Sequence[int], spacing_mm: Sequence[float], augmentation: SpatialAugmentation
) -> tuple[int, int, int]:
    """Smallest crop (slices, rows, columns) from which every transform of ``augmentation``
    fills a ``patch_size`` patch without sampling outside it (worst case over a grid of the
    angle ranges and the smallest scale, plus one voxel for interpolation). ``crop - patch``
    is even on each axis, so the patch sits exactly in the crop's centre."""
    half_mm = np.array([p * s / 2.0 for p, s in zip(patch_size, spacing_mm, strict=True)])
    angles = [np.deg2rad(np.linspace(-limit, limit, 7))
              for limit in (augmentation.rotation_deg, augmentation.tilt_deg,
                            augmentation.tilt_deg)]
    need = half_mm.copy()
    for a, b, c in itertools.product(*angles):
        inverse = rotation_matrix(a, b, c).T / augmentation.scale_range[0]
        need = np.maximum(need, np.abs(inverse) @ half_mm)
    sizes = []
    for p, s, n in zip(patch_size, spacing_mm, need, strict=True):
        size = max(int(p), math.ceil(2.0 * n / s - 1e-6) + 1)
        size += (size - int(p)) % 2
        sizes.append(size)
    return sizes[0], sizes[1], sizes[2]


def centre_crop(tensor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The centred ``size`` window of the last three axes (``shape - size`` must be even)."""
    starts = [(have - want) // 2 for have, want in zip(tensor.shape[-3:], size, strict=True)]
    return tensor[..., starts[0]:starts[0] + size[0], starts[1]:starts[1] + size[1],
                  starts[2]:starts[2] + size[2]]


def _theta(matrix_mm: np.ndarray, patch_size: Sequence[int], crop: Sequence[int],
           spacing_mm: Sequence[float]) -> np.ndarray:
    """``affine_grid`` theta (3x4, x/y/z = column/row/slice order, align_corners=False) that
    samples the crop at ``matrix_mm @ x`` for each output point ``x`` (mm from the centre)."""
    out_half = np.array([p * s / 2.0 for p, s in zip(patch_size, spacing_mm, strict=True)])
    in_half = np.array([c * s / 2.0 for c, s in zip(crop, spacing_mm, strict=True)])
    normalised = np.diag(1.0 / in_half) @ matrix_mm @ np.diag(out_half)
    reverse = np.eye(3)[::-1]  # (slice, row, column) -> (x=column, y=row, z=slice)
    theta = np.zeros((3, 4))
    theta[:, :3] = reverse @ normalised @ reverse
    return theta


def spatial_augment(
    image: torch.Tensor,
    target: torch.Tensor,
    patch_size: Sequence[int],
    spacing_mm: Sequence[float],
    augmentation: SpatialAugmentation,
    rng: np.random.Generator,
    soft: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate and scale crops about their centres and cut the patch.

    Args:
        image: (B, 1, *crop) float crops (see :func:`crop_size`).
        target: (B, C, *crop) float {0, 1} labels of the same crops, or with ``soft`` their
            occupancy in [0, 1], which is resampled and kept soft (not thresholded).
        patch_size: output (slices, rows, columns).
        spacing_mm: voxel size (slice, row, column) in mm.
        augmentation: ranges and probability.
        rng: source of the random parameters.

    Returns:
        (B, 1, *patch_size) image and (B, C, *patch_size) float {0, 1} target; samples not
        chosen (probability) are the exact centre crop.
    """
    crop = tuple(image.shape[-3:])
    images, targets = [], []
    for index in range(image.shape[0]):
        if rng.random() >= augmentation.probability:
            images.append(centre_crop(image[index:index + 1], patch_size))
            targets.append(centre_crop(target[index:index + 1], patch_size))
            continue
        axial, tilt_a, tilt_b = (
            rng.uniform(-limit, limit)
            for limit in np.deg2rad([augmentation.rotation_deg, augmentation.tilt_deg,
                                     augmentation.tilt_deg])
        )
        scale = rng.uniform(*augmentation.scale_range)
        # sampling input at R^T x / s shows the anatomy rotated by R and enlarged by s
        matrix = rotation_matrix(axial, tilt_a, tilt_b).T / scale
        theta = torch.as_tensor(_theta(matrix, patch_size, crop, spacing_mm),
                                dtype=torch.float32, device=image.device)[None]
        grid = F.affine_grid(theta, [1, 1, *patch_size], align_corners=False)
        images.append(F.grid_sample(image[index:index + 1].float(), grid, mode="bilinear",
                                    padding_mode="border", align_corners=False))
        sampled = F.grid_sample(target[index:index + 1].float(), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=False)
        targets.append(sampled.to(target.dtype) if soft else (sampled >= 0.5).to(target.dtype))
    return torch.cat(images), torch.cat(targets)


def _gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, int(math.ceil(2.0 * sigma)))
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    return kernel / kernel.sum()


def _blur(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (1, 1, D, H, W) tensor (edges replicated)."""
    kernel = _gaussian_kernel(sigma, volume.device)
    radius = kernel.numel() // 2
    out = volume
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out


def intensity_augment(
    image: torch.Tensor, augmentation: IntensityAugmentation, rng: np.random.Generator
) -> torch.Tensor:
    """Noise, blur, low resolution and gamma on a (B, 1, D, H, W) float image batch."""
    out = []
    for index in range(image.shape[0]):
        volume = image[index:index + 1].float()
        if rng.random() < augmentation.noise_probability:
            noise_std = float(rng.uniform(*augmentation.noise_std))
            volume = volume + noise_std * torch.randn(volume.shape, device=volume.device)
        if rng.random() < augmentation.blur_probability:
            volume = _blur(volume, float(rng.uniform(*augmentation.blur_sigma_voxels)))
        if rng.random() < augmentation.low_resolution_probability:
            zoom = float(rng.uniform(*augmentation.low_resolution_zoom))
            size = [max(1, round(s * zoom)) for s in volume.shape[2:]]
            low = F.interpolate(volume, size=size, mode="nearest")
            volume = F.interpolate(low, size=list(volume.shape[2:]), mode="trilinear",
                                   align_corners=False)
        if rng.random() < augmentation.gamma_probability:
            gamma = float(rng.uniform(*augmentation.gamma_range))
            mean, std = volume.mean(), volume.std()
            low_value, high_value = volume.min(), volume.max()
            span = (high_value - low_value).clamp(min=1e-6)
            volume = ((volume - low_value) / span).clamp(min=0.0) ** gamma * span + low_value
            # keep the patch's mean and spread: gamma changes contrast, not the HU level
            volume = (volume - volume.mean()) / volume.std().clamp(min=1e-6) * std + mean
        out.append(volume)
    return torch.cat(out).to(image.dtype)
