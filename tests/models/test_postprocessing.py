"""Post-processing on the input grid: boxed path parity, fragments, confidence."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("torch", reason="torch is not installed (extra 'train')")

from rtcontour.models.inference import Segmentation, Segmenter, postprocess_mask  # noqa: E402
from rtcontour.models.resampling import resample_to_shape  # noqa: E402


def _probability_maps(shape=(30, 40, 40), seed=0) -> np.ndarray:
    """Seven smooth blobs (one of them with a detached fragment, one absent) in [0, 1]."""
    rng = np.random.default_rng(seed)
    probs = np.zeros((7, *shape), dtype=np.float32)
    for channel in range(7):
        if channel == 6:
            continue  # nothing reaches 0.5
        field = np.zeros(shape, dtype=np.float32)
        centre = rng.integers([6, 8, 8], [shape[0] - 6, shape[1] - 8, shape[2] - 8])
        field[tuple(slice(c - 3, c + 4) for c in centre)] = 1.0
        if channel == 2:
            field[2:4, 2:4, 2:4] = 1.0  # fragment far from the organ
        field = ndimage.gaussian_filter(field, 1.5)
        probs[channel] = np.clip(field / field.max() + rng.normal(0, 0.02, shape), 0, 1)
    probs[6] = 0.3
    return probs


def _reference(segmenter: Segmenter, probs: np.ndarray, spacing, shape) -> dict:
    """The former path: every full probability map resampled, thresholded, post-processed."""
    target = segmenter.manifest.target_spacing_mm
    scale = [s / t for s, t in zip(spacing, target, strict=True)]
    return {label.roi_name: postprocess_mask(
        resample_to_shape(probs[label.index], scale, shape, order=1) >= 0.5,
        label.single_component) for label in segmenter.manifest.labels}


@pytest.mark.parametrize("seed", [0, 1, 2], ids=["seed0", "seed1", "seed2"])
def test_boxed_masks_equal_full_resampling_masks(tiny_package, seed):
    segmenter = Segmenter(tiny_package, provider="onnxruntime", min_volume_cc={})
    probs = _probability_maps(seed=seed)
    spacing, shape = (2.0, 0.9, 1.1), (44, 170, 140)
    result = segmenter.segmentation_from_probabilities(probs, spacing, shape)
    expected = _reference(segmenter, probs, spacing, shape)
    for name, mask in expected.items():
        got = result.masks[name]
        assert got.shape == tuple(shape) and got.dtype == bool
        differing = np.count_nonzero(got != mask)
        assert differing <= 0.001 * max(1, np.count_nonzero(mask | got)), name
    assert not result.masks["Bone_Mandible"].any()
    assert set(result.quality) == {n for n, m in result.masks.items() if m.any()}


def test_fragment_below_the_minimum_volume_is_dropped(tiny_package):
    probs = np.zeros((7, 20, 24, 24), dtype=np.float32)
    probs[0, 5:7, 5:7, 5:7] = 0.9  # Brainstem: 8 model voxels of 3x4x4 mm = 0.38 cc
    probs[1, 4:14, 8:16, 8:16] = 0.9  # SpinalCord: 30 cc
    segmenter = Segmenter(tiny_package, provider="onnxruntime")
    result = segmenter.segmentation_from_probabilities(probs, (3.0, 4.0, 4.0), (20, 24, 24))
    assert not result.masks["Brainstem"].any() and "fragment" in result.dropped["Brainstem"]
    assert result.masks["SpinalCord"].any() and "SpinalCord" not in result.dropped
    kept = Segmenter(tiny_package, provider="onnxruntime", min_volume_cc={})
    assert kept.segmentation_from_probabilities(probs, (3.0, 4.0, 4.0),
                                                (20, 24, 24)).masks["Brainstem"].any()


def test_confidence_is_lower_for_a_blurred_doubtful_structure(tiny_package):
    sharp = np.zeros((7, 20, 32, 32), dtype=np.float32)
    sharp[:, 6:14, 8:20, 8:20] = 0.99
    sharp = np.where(sharp > 0, sharp, 0.01).astype(np.float32)
    doubtful = (0.5 + 0.12 * (ndimage.gaussian_filter(sharp, (0, 3, 3, 3)) - 0.5) /
                0.5).astype(np.float32)
    doubtful = np.where(ndimage.gaussian_filter(sharp, (0, 3, 3, 3)) >= 0.5, np.maximum(
        doubtful, 0.5), np.minimum(doubtful, 0.49)).astype(np.float32)
    segmenter = Segmenter(tiny_package, provider="onnxruntime", review_threshold=0.5)
    grid = (3.0, 4.0, 4.0)
    a = segmenter.segmentation_from_probabilities(sharp, grid, sharp.shape[1:])
    b = segmenter.segmentation_from_probabilities(doubtful, grid, sharp.shape[1:])
    q_sharp, q_doubt = a.quality["SpinalCord"], b.quality["SpinalCord"]
    assert 0.0 <= q_doubt.confidence < q_sharp.confidence <= 1.0
    assert q_sharp.edge_sharpness > 0.9 and q_doubt.edge_sharpness < 0.3
    assert q_sharp.flag == "ok" and q_doubt.flag == "review"


def test_segment_returns_predict_masks_with_quality(tiny_package):
    segmenter = Segmenter(tiny_package, provider="onnxruntime")
    hu = np.random.default_rng(0).normal(0, 300, (23, 50, 47)).astype(np.float32)
    result = segmenter.segment(hu, (2.5, 1.5, 1.5))
    assert isinstance(result, Segmentation)
    masks = segmenter.predict(hu, (2.5, 1.5, 1.5))
    assert list(masks) == list(result.masks)
    for name, mask in masks.items():
        np.testing.assert_array_equal(mask, result.masks[name])
    for quality in result.quality.values():
        assert 0.0 <= quality.confidence <= 1.0 and quality.flag in ("ok", "review")
