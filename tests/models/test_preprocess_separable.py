"""``Segmenter.preprocess`` filters and samples axis by axis, in-plane first: the same image
as the 3-D Gaussian anti-aliasing followed by trilinear resampling it replaced (float
rounding), at a fraction of the cost on a 512 x 512 CT."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from rtcontour.models.inference import Segmenter
from rtcontour.models.resampling import resample_to_shape, resampled_shape


def _three_d(segmenter: Segmenter, hu: np.ndarray, spacing_mm: tuple[float, ...]) -> np.ndarray:
    target = segmenter.manifest.target_spacing_mm
    factors = [t / s for s, t in zip(spacing_mm, target, strict=True)]
    source = hu.astype(np.float32)
    if any(f > 1.5 for f in factors):
        sigma = [math.sqrt(max(f * f - 1.0, 0.0)) / 2.0 for f in factors]
        source = ndimage.gaussian_filter(source, sigma=sigma, truncate=3.0)
    image = resample_to_shape(source, factors, resampled_shape(hu.shape, spacing_mm, target))
    intensity = segmenter.manifest.intensity
    np.clip(image, intensity.clip_hu[0], intensity.clip_hu[1], out=image)
    return (image - intensity.mean) / intensity.std


@pytest.mark.parametrize("spacing_mm", [(2.5, 0.977, 0.977), (3.0, 4.0, 4.0), (1.0, 2.0, 3.1)],
                         ids=["ct-512", "model-grid", "mixed"])
def test_preprocess_equals_3d_filter_then_trilinear(tiny_package: Path, spacing_mm) -> None:
    segmenter = Segmenter(tiny_package, provider="onnxruntime")
    hu = np.random.default_rng(1).normal(0, 400, (23, 70, 61)).astype(np.float32)
    expected = _three_d(segmenter, hu, spacing_mm)
    image = segmenter.preprocess(hu, spacing_mm)
    assert image.shape == expected.shape and image.dtype == np.float32
    np.testing.assert_allclose(image, expected, atol=1e-5)
    assert not np.shares_memory(image, hu)
