"""Input channels and the model grid of the dose model (numpy and scipy only, no torch).

Training (:mod:`models.dose.data`) and inference (:mod:`models.dose.predict`) both call
:func:`make_model_grid` and :func:`input_channels`, so the network sees identical inputs.

All arrays are (slices, rows, columns) in the canonical orientation (docs/ARCHITECTURE.md):
slices superior->inferior, rows anterior->posterior, columns patient right->left.

The model grid is the bounding box of the body (the OpenKBP possible-dose mask in training,
the body outline at inference) plus a margin, resampled to :data:`DOSE_SPACING_MM` with voxel
0 on the box's first input voxel (the :mod:`models.resampling` convention), and padded at the
far side of each axis to a multiple of the network's divisor. Dose is smooth, so a coarse grid
serves: on the OpenKBP validation patients, taking the planned dose to 5 x 8 x 8 mm and back
(linearly) costs 0.73 Gy of dose score, against 0.55 Gy at 4 x 6 x 6 mm, for 2.5 times less
computation. Channels that describe occupancy (CT, structures) are Gaussian-prefiltered before
decimation (as in area averaging); the training target is point-sampled from the dose with its
outside extended by the nearest inside value, so that linear interpolation back to the CT grid
reproduces it without the blur a prefilter would add, nor the fall to zero at the skin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from rtcontour.models.labels import LR_SWAP_PAIRS, ORGANS
from rtcontour.models.resampling import resample_separable, resample_to_shape, resampled_shape

__all__ = [
    "DOSE_SPACING_MM",
    "DOSE_HU_CLIP",
    "PTV_SCALE_GY",
    "OAR_NAMES",
    "CHANNEL_NAMES",
    "N_CHANNELS",
    "DIVISOR",
    "MARGIN_MM",
    "MIRROR_CHANNEL_SWAPS",
    "ModelGrid",
    "make_model_grid",
    "prefiltered_resample",
    "ptv_prescription_map",
    "input_channels",
    "point_sampled_dose",
    "to_input_grid",
    "body_mask_from_hu",
]

DOSE_SPACING_MM: tuple[float, float, float] = (5.0, 8.0, 8.0)
# Air to cortical bone: dose depends on density everywhere, not only on soft tissue.
DOSE_HU_CLIP: tuple[float, float] = (-1000.0, 1500.0)
# The PTV channel carries prescription / 70 Gy (OpenKBP's highest prescription).
PTV_SCALE_GY = 70.0
OAR_NAMES: tuple[str, ...] = tuple(organ.roi_name for organ in ORGANS)
CHANNEL_NAMES: tuple[str, ...] = ("CT", *OAR_NAMES, "PTV", "Body")
N_CHANNELS = len(CHANNEL_NAMES)
DIVISOR = 8
MARGIN_MM = 10.0
# Input channels exchanged by a left/right mirror (the OAR pairs, offset by the CT channel).
MIRROR_CHANNEL_SWAPS: tuple[tuple[int, int], ...] = tuple(
    (1 + left, 1 + right) for left, right in LR_SWAP_PAIRS
)


@dataclass(frozen=True)
class ModelGrid:
    """Where the model grid lies on an input grid.

    ``box``: the crop of the input grid (slices, rows, columns) that the model grid covers;
    ``input_spacing_mm`` and ``spacing_mm``: voxel sizes (slice, row, column) of the input and
    model grids; ``shape``: the model grid of the crop; ``padded_shape``: ``shape`` rounded up
    to a multiple of ``divisor`` (what the network gets).
    """

    box: tuple[slice, slice, slice]
    input_spacing_mm: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    shape: tuple[int, int, int]
    padded_shape: tuple[int, int, int]

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.box)  # type: ignore[return-value]

    @property
    def scale(self) -> tuple[float, float, float]:
        """Model spacing / input spacing per axis."""
        return tuple(  # type: ignore[return-value]
            t / s for s, t in zip(self.input_spacing_mm, self.spacing_mm, strict=True))


def _spacing(spacing_mm: Sequence[float], name: str = "spacing_mm") -> tuple[float, float, float]:
    if len(spacing_mm) != 3 or any(not float(s) > 0 for s in spacing_mm):
        raise ValueError(f"{name} must be three positive numbers in mm, got {spacing_mm!r}")
    return (float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2]))


def make_model_grid(
    body_mask: np.ndarray,
    spacing_mm: Sequence[float],
    target_spacing_mm: Sequence[float] = DOSE_SPACING_MM,
    divisor: int = DIVISOR,
    margin_mm: float = MARGIN_MM,
) -> ModelGrid:
    """The model grid over the bounding box of ``body_mask`` (bool, input grid) plus
    ``margin_mm`` on each side."""
    spacing = _spacing(spacing_mm)
    target = _spacing(target_spacing_mm, "target_spacing_mm")
    if body_mask.ndim != 3:
        raise ValueError(f"body_mask must be 3D (slices, rows, columns), got {body_mask.shape}")
    if not body_mask.any():
        raise ValueError("body_mask is empty: there is no body to predict a dose in")
    found = ndimage.find_objects(np.asarray(body_mask, dtype=np.uint8))[0]
    box = []
    for axis, found_slice in enumerate(found):
        margin = int(math.ceil(margin_mm / spacing[axis]))
        box.append(slice(max(0, found_slice.start - margin),
                         min(body_mask.shape[axis], found_slice.stop + margin)))
    crop_shape = tuple(s.stop - s.start for s in box)
    shape = resampled_shape(crop_shape, spacing, target)
    padded = tuple(int(math.ceil(n / divisor)) * divisor for n in shape)
    return ModelGrid(
        box=(box[0], box[1], box[2]),
        input_spacing_mm=spacing,
        spacing_mm=target,
        shape=shape,
        padded_shape=padded,  # type: ignore[arg-type]
    )


def prefiltered_resample(array: np.ndarray, grid: ModelGrid, cropped: bool = False,
                         sparse: bool = True) -> np.ndarray:
    """Resample the crop of ``array`` (input grid; already ``grid.box`` if ``cropped``) to the
    model grid, Gaussian-prefiltered where the grid is coarser (sigma = sqrt(f^2 - 1) / 2
    input voxels for a factor f); float32 of ``grid.shape``. ``sparse``: filter only the box
    of non-zero values (for masks and maps that are mostly 0)."""
    source = array if cropped else array[grid.box]
    sigma = [math.sqrt(max(f * f - 1.0, 0.0)) / 2.0 for f in grid.scale]
    if sparse and any(s > 0 for s in sigma):
        # Filtered over its non-zero box plus the kernel's reach only: the same result
        # (zeros beyond), at a fraction of the cost on a full-resolution planning CT.
        crop = np.zeros(source.shape, dtype=np.float32)
        found = ndimage.find_objects((source != 0).astype(np.uint8))
        if not found or found[0] is None:
            return resample_to_shape(crop, grid.scale, grid.shape, order=1)
        box = tuple(slice(max(0, b.start - reach), min(n, b.stop + reach))
                    for b, n, reach in zip(found[0], source.shape,
                                           (int(math.ceil(3.0 * s)) + 2 for s in sigma),
                                           strict=True))
        crop[box] = ndimage.gaussian_filter(source[box].astype(np.float32), sigma=sigma,
                                            truncate=3.0, mode="nearest")
        return resample_to_shape(crop, grid.scale, grid.shape, order=1)
    crop = np.asarray(source, dtype=np.float32)
    if any(s > 0 for s in sigma):
        crop = ndimage.gaussian_filter(crop, sigma=sigma, truncate=3.0, mode="nearest")
    return resample_to_shape(crop, grid.scale, grid.shape, order=1)


def ptv_prescription_map(
    ptvs: Sequence[tuple[np.ndarray, float]], shape: Sequence[int]
) -> np.ndarray:
    """float32 prescription in Gy per voxel: the highest prescription of the PTVs that hold
    the voxel, 0 outside every PTV."""
    dose = np.zeros(tuple(shape), dtype=np.float32)
    for index, (mask, prescription_gy) in enumerate(ptvs):
        if mask.shape != tuple(shape):
            raise ValueError(f"ptvs[{index}] mask has shape {mask.shape}, expected {tuple(shape)}")
        if not 0.0 < float(prescription_gy) <= 150.0:
            raise ValueError(f"ptvs[{index}] prescription must be in (0, 150] Gy, "
                             f"got {prescription_gy!r}")
        np.maximum(dose, np.where(mask, np.float32(prescription_gy), np.float32(0.0)), out=dose)
    return dose


def input_channels(
    hu: np.ndarray,
    oar_masks: Sequence[np.ndarray | None],
    ptvs: Sequence[tuple[np.ndarray, float]],
    body_mask: np.ndarray,
    grid: ModelGrid,
    hu_clip: Sequence[float] = DOSE_HU_CLIP,
) -> np.ndarray:
    """float32 (N_CHANNELS, *grid.padded_shape) network input.

    Args:
        hu: (slices, rows, columns) CT in HU on the input grid.
        oar_masks: one bool mask per :data:`OAR_NAMES` entry, in that order, or None where
            the structure is not contoured (an empty channel, as in training).
        ptvs: (bool mask, prescription in Gy) per PTV.
        body_mask: bool, the body (possible-dose mask).
        grid: from :func:`make_model_grid`.

    Channels: CT clipped to ``hu_clip`` and scaled to [-1, 1]; the OAR occupancies; the PTV
    prescription / :data:`PTV_SCALE_GY`; the body occupancy. Padding is air (CT -1, others 0).
    """
    if len(oar_masks) != len(OAR_NAMES):
        raise ValueError(f"oar_masks must hold {len(OAR_NAMES)} entries ({OAR_NAMES}), "
                         f"got {len(oar_masks)}")
    shape = hu.shape
    for name, mask in (("body_mask", body_mask), *zip(OAR_NAMES, oar_masks, strict=True)):
        if mask is not None and mask.shape != shape:
            raise ValueError(f"{name} has shape {mask.shape}, expected the CT's {shape}")
    low, high = float(hu_clip[0]), float(hu_clip[1])
    out = np.zeros((N_CHANNELS, *grid.padded_shape), dtype=np.float32)
    inner = tuple(slice(0, n) for n in grid.shape)
    ct = prefiltered_resample(np.clip(hu[grid.box], low, high).astype(np.float32), grid,
                              cropped=True, sparse=False)
    out[0] = -1.0
    out[0][inner] = (ct - (low + high) / 2.0) / ((high - low) / 2.0)
    for channel, mask in enumerate(oar_masks, start=1):
        if mask is not None and mask.any():
            out[channel][inner] = prefiltered_resample(mask, grid)
    if ptvs:
        prescription = ptv_prescription_map(ptvs, shape) / np.float32(PTV_SCALE_GY)
        out[1 + len(OAR_NAMES)][inner] = prefiltered_resample(prescription, grid)
    out[2 + len(OAR_NAMES)][inner] = prefiltered_resample(body_mask, grid)
    return out


def point_sampled_dose(dose_gy: np.ndarray, possible_dose_mask: np.ndarray,
                       grid: ModelGrid) -> np.ndarray:
    """Training target: ``dose_gy`` (input grid) outside the mask replaced by the nearest
    value inside, then linearly sampled (no prefilter) at the model grid's points; float32
    of ``grid.shape``."""
    crop = np.asarray(dose_gy[grid.box], dtype=np.float32)
    inside = np.asarray(possible_dose_mask[grid.box], dtype=bool)
    if inside.any() and not inside.all():
        nearest = ndimage.distance_transform_edt(~inside, return_distances=False,
                                                 return_indices=True)
        crop = crop[tuple(nearest)]
    return resample_to_shape(crop, grid.scale, grid.shape, order=1)


def to_input_grid(dose_model: np.ndarray, grid: ModelGrid,
                  input_shape: Sequence[int], order: int = 3) -> np.ndarray:
    """Model-grid dose (``grid.shape`` or ``grid.padded_shape``) resampled onto the input grid
    (float32 of ``input_shape``; 0 outside ``grid.box``) by a cubic B-spline (``order`` 3,
    separable: :func:`models.resampling.resample_separable`; its overshoot below 0 Gy is cut)
    or linearly (``order`` 1). Cubic: the reference dose itself through the 5 x 8 x 8 mm grid
    and back scores 0.39 / 0.50 Gy (dose / DVH score) against 0.72 / 1.29 Gy linearly."""
    model = np.asarray(dose_model, dtype=np.float32)[tuple(slice(0, n) for n in grid.shape)]
    inverse = [1.0 / f for f in grid.scale]
    out = np.zeros(tuple(input_shape), dtype=np.float32)
    if order == 1:
        out[grid.box] = resample_to_shape(model, inverse, grid.crop_shape, order=1)
    else:
        out[grid.box] = np.maximum(resample_separable(model, inverse, grid.crop_shape, order),
                                   0.0)
    return out


def body_mask_from_hu(hu: np.ndarray, threshold_hu: float = -400.0) -> np.ndarray:
    """The body outline of a CT (bool, same shape): voxels above ``threshold_hu``, holes
    filled per axial slice, the largest 3D connected component (couch and noise dropped)."""
    above = hu > threshold_hu
    if not above.any():
        return above
    labelled, count = ndimage.label(above)
    if count > 1:
        sizes = np.bincount(labelled.ravel())
        sizes[0] = 0
        above = labelled == int(np.argmax(sizes))
    filled = np.empty_like(above)
    for index in range(above.shape[0]):
        filled[index] = ndimage.binary_fill_holes(above[index])
    return filled
