"""Axis-aligned linear resampling between voxel grids (no torch import).

Convention: voxel 0 of both grids sits at the same point and voxel ``n`` of a grid with
spacing ``s`` lies at ``n * s`` mm along each axis. A volume of ``N`` voxels at spacing
``s_in`` covers ``(N - 1) * s_in`` mm and becomes ``floor((N - 1) * s_in / s_out) + 1``
voxels at ``s_out``.

We use ``scipy.ndimage.affine_transform`` with a diagonal matrix rather than ``zoom`` or
``map_coordinates``: ``zoom`` stretches the grid to align the corners (the output spacing is
then not exactly the requested one), and ``map_coordinates`` needs a float64 coordinate array
three times the output size (800 MB for a 512x512x130 CT), whereas a diagonal affine is
separable and only allocates the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["resampled_shape", "resample_linear", "resample_to_shape"]


def resampled_shape(
    shape: Sequence[int], spacing_mm: Sequence[float], target_spacing_mm: Sequence[float]
) -> tuple[int, int, int]:
    """Shape of a (slices, rows, columns) volume after resampling to ``target_spacing_mm``."""
    return tuple(  # type: ignore[return-value]
        int(np.floor((n - 1) * s / t + 1e-6)) + 1
        for n, s, t in zip(shape, spacing_mm, target_spacing_mm, strict=True)
    )


def resample_to_shape(
    array: np.ndarray,
    scale: Sequence[float],
    output_shape: Sequence[int],
    order: int = 1,
    cval_mode: str = "nearest",
    dtype: type | np.dtype | None = None,
    offset: Sequence[float] | float = 0.0,
) -> np.ndarray:
    """Resample ``array`` so that output voxel ``o`` samples input index ``o * scale + offset``.

    ``scale`` is output spacing / input spacing per axis. Values beyond the input are the
    nearest edge value (``cval_mode="nearest"``).
    """
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.float32)
    output = np.empty(tuple(output_shape), dtype=out_dtype)
    ndimage.affine_transform(
        np.asarray(array, dtype=np.float32) if array.dtype != np.float32 else array,
        matrix=np.asarray(scale, dtype=np.float64),
        offset=offset,
        output_shape=tuple(output_shape),
        output=output,
        order=order,
        mode=cval_mode,
        prefilter=False,
    )
    return output


def resample_linear(
    array: np.ndarray,
    spacing_mm: Sequence[float],
    target_spacing_mm: Sequence[float],
    output_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Trilinearly resample a (slices, rows, columns) array from ``spacing_mm`` to
    ``target_spacing_mm`` (both in mm); returns float32."""
    if array.ndim != 3:
        raise ValueError(f"array must be 3D (slices, rows, columns), got shape {array.shape}")
    shape = (
        tuple(output_shape)
        if output_shape is not None
        else resampled_shape(array.shape, spacing_mm, target_spacing_mm)
    )
    scale = [t / s for s, t in zip(spacing_mm, target_spacing_mm, strict=True)]
    return resample_to_shape(array, scale, shape, order=1)
