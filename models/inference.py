"""Sliding-window inference of a model package (onnxruntime or OpenVINO; no torch import).

``Segmenter.predict`` takes a canonical float32 HU array (slices S->I, rows A->P, columns
R->L) with its spacing in mm, resamples it to the package's spacing, predicts per-structure
probabilities with Gaussian-blended overlapping windows (optionally mirror TTA), resamples the
probabilities back linearly to the input grid, thresholds at 0.5 and post-processes each
structure (largest connected component, holes filled per axial slice). A structure smaller
than its minimum plausible volume (:data:`models.labels.MIN_PLAUSIBLE_VOLUME_CC`) is a
fragment, not an organ cut by the edge of the scan, and comes back empty.

The return to the input grid works per structure inside a box: the largest component of
``p >= 0.5`` on the model grid (single-component structures; all of them otherwise) plus one
model voxel, the only region whose input-grid samples can reach 0.5 after linear
interpolation. Component filtering and hole filling run in that box too; only the final mask
is written into a full-size array. ``Segmenter.segment`` adds a confidence per structure
(:mod:`models.quality`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy import ndimage, special

from rtcontour.models.labels import MIN_PLAUSIBLE_VOLUME_CC, TRAINING_VOLUME_RANGE_CC
from rtcontour.models.package import ModelPackage, load_package
from rtcontour.models.quality import StructureQuality, structure_quality
from rtcontour.models.resampling import resample_to_shape, resampled_shape

__all__ = ["Segmenter", "Segmentation", "StructureQuality", "gaussian_importance",
           "symmetric_window_starts", "postprocess_mask", "DEFAULT_CPU_BACKEND",
           "REVIEW_THRESHOLD"]

log = logging.getLogger(__name__)

# Measured on the 2-core AVX-512 build machine (bench/bench_inference.py): OpenVINO runs the
# same ONNX graph faster than onnxruntime's CPU provider, so it is the default CPU path.
DEFAULT_CPU_BACKEND = "openvino"
PROVIDERS = ("auto", "cuda", "cpu", "onnxruntime", "openvino")
# Confidence below which a structure is flagged for review: Youden's threshold (0.952) of
# confidence against Dice < 0.6 for package 1.2.0 on the 33 OpenKBP validation patients
# (AUROC 0.69; flags 29 % of contours, 62 % of the poor ones; docs/ABLATIONS.md).
REVIEW_THRESHOLD = 0.95
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Segmentation:
    """Result of :meth:`Segmenter.segment`.

    ``masks``: roi_name -> bool mask of the input's shape, every label of the package (empty
    where the structure is not in the scan). ``quality``: roi_name -> confidence and flag, for
    the non-empty masks only. ``dropped``: roi_name -> why a predicted structure was removed
    (a fragment below the organ's minimum plausible volume).
    """

    masks: dict[str, np.ndarray]
    quality: dict[str, StructureQuality] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    # Seconds per step: "preprocess" (to the model's grid), "inference" (the network),
    # "postprocess" (back to the input grid, clean-up, confidence).
    timings: dict[str, float] = field(default_factory=dict)


class _Runner(Protocol):
    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class _OrtRunner:
    def __init__(self, onnx_path: Path, providers: list[str], threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.name = f"onnxruntime[{self.session.get_providers()[0]}]"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: batch})[0])


class _OpenVinoRunner:
    def __init__(self, onnx_path: Path, input_shape: Sequence[int], threads: int,
                 precision: str) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(onnx_path))
        model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(list(input_shape))})
        self.compiled = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY",
                # bf16 (used when the CPU has it) matches training, which ran under bf16
                # autocast; f32 matches onnxruntime to float tolerance
                "INFERENCE_PRECISION_HINT": precision,
            },
        )
        self.request = self.compiled.create_infer_request()
        self.name = f"openvino[CPU,{precision}]"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer({0: batch})
        return np.array(self.request.get_output_tensor(0).data, copy=True)


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Separable Gaussian weight map (float32, max 1, floor 1e-3) centred in the patch."""
    weight = np.ones(tuple(patch_size), dtype=np.float32)
    for axis, size in enumerate(patch_size):
        coords = np.arange(size, dtype=np.float32) - (size - 1) / 2.0
        profile = np.exp(-0.5 * (coords / (sigma_scale * size)) ** 2)
        shape = [1] * len(patch_size)
        shape[axis] = size
        weight = weight * profile.reshape(shape)
    weight /= weight.max()
    return np.maximum(weight, 1e-3).astype(np.float32)


def symmetric_window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window starts covering ``size`` with windows of ``patch``, mirror-symmetric so that
    mirror TTA sees the same tiling of a mirrored volume."""
    if size <= patch:
        return [0]
    span = size - patch
    step = max(1, int(round(patch * (1.0 - overlap))))
    count = math.ceil(span / step) + 1
    first_half = [int(math.floor(i * span / (count - 1) + 0.5)) for i in range(count // 2)]
    starts = set(first_half) | {span - s for s in first_half}
    if count % 2:  # one middle window (exactly centred when span is even)
        starts.add(span // 2)
    return sorted(starts)


def _sample_axis(array: np.ndarray, axis: int, scale: float, size: int) -> np.ndarray:
    """Linear interpolation along ``axis``: output ``o`` samples index ``o * scale`` (edges as
    ``mode="nearest"``, like ``resample_to_shape`` with ``order=1``); float32."""
    n = array.shape[axis]
    if size == n and scale == 1.0:
        return array
    position = np.clip(np.arange(size, dtype=np.float64) * scale, 0.0, n - 1)
    low = np.floor(position).astype(np.intp)
    high = np.minimum(low + 1, n - 1)
    shape = [1] * array.ndim
    shape[axis] = size
    weight = (position - low).astype(np.float32).reshape(shape)
    lower = np.take(array, low, axis=axis)
    lower *= 1.0 - weight
    lower += np.take(array, high, axis=axis) * weight
    return lower


def postprocess_mask(mask: np.ndarray, single_component: bool,
                     min_component_voxels: int = 0) -> np.ndarray:
    """Keep the largest 26-connected component (if ``single_component``; else every
    component of at least ``min_component_voxels``) and fill holes in each axial slice
    (axis 0). Works on the mask's bounding box to bound memory."""
    if not mask.any():
        return mask
    box = ndimage.find_objects(mask.view(np.uint8))[0]
    crop = mask[box]
    if single_component or min_component_voxels > 1:
        labelled, count = ndimage.label(crop, structure=_CONNECTIVITY)
        if count > 1 or min_component_voxels > 1:
            sizes = np.bincount(labelled.ravel())
            sizes[0] = 0
            if single_component:
                crop = labelled == int(np.argmax(sizes))
            else:
                crop = (sizes >= min_component_voxels)[labelled] & (labelled > 0)
    filled = np.empty_like(crop)
    for index in range(crop.shape[0]):
        filled[index] = ndimage.binary_fill_holes(crop[index])
    result = np.zeros_like(mask)
    result[box] = filled
    return result


class Segmenter:
    """Sliding-window segmentation with a validated model package.

    Args:
        package: a :class:`ModelPackage` or the package folder.
        overlap: fraction of the patch shared by neighbouring windows, in [0, 0.9].
        mirror_tta: also predict the volume mirrored along the package's ``mirror_axes``
            (left/right) and average, swapping the paired channels (Parotid_L/Parotid_R) back.
        provider: ``auto`` (CUDA via onnxruntime if available, else the faster CPU backend
            :data:`DEFAULT_CPU_BACKEND`), ``cuda`` (a warning when it is missing),
            ``cpu``/``onnxruntime`` (onnxruntime CPU) or ``openvino``.
        batch_size: windows per network call.
        threads: CPU threads (default: all cores).
        openvino_precision: ``bf16`` (default; OpenVINO uses f32 on CPUs without bf16) or
            ``f32``.
        review_threshold: confidence below which :meth:`segment` flags a structure.
        min_volume_cc: roi_name -> minimum plausible volume in cc; smaller predictions are
            dropped as fragments (default :data:`models.labels.MIN_PLAUSIBLE_VOLUME_CC`; ``{}``
            keeps everything).
    """

    def __init__(
        self,
        package: ModelPackage | Path | str,
        overlap: float = 0.5,
        mirror_tta: bool = False,
        provider: str = "auto",
        batch_size: int = 2,
        threads: int | None = None,
        openvino_precision: str = "bf16",
        review_threshold: float = REVIEW_THRESHOLD,
        min_volume_cc: Mapping[str, float] | None = None,
    ) -> None:
        if not isinstance(package, ModelPackage):
            package = load_package(package)
        if not 0.0 <= overlap <= 0.9:
            raise ValueError(f"overlap must be in [0, 0.9], got {overlap!r}")
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.package = package
        self.manifest = package.manifest
        self.overlap = overlap
        self.mirror_tta = mirror_tta
        self.batch_size = batch_size
        if openvino_precision not in ("bf16", "f32"):
            raise ValueError(
                f"openvino_precision must be 'bf16' or 'f32', got {openvino_precision!r}")
        self.openvino_precision = openvino_precision
        if not 0.0 <= review_threshold <= 1.0:
            raise ValueError(f"review_threshold must be in [0, 1], got {review_threshold!r}")
        self.review_threshold = review_threshold
        self.min_volume_cc = dict(MIN_PLAUSIBLE_VOLUME_CC if min_volume_cc is None
                                  else min_volume_cc)
        self.patch = tuple(self.manifest.patch_size)
        self.threads = threads or os.cpu_count() or 1
        self.runner = self._make_runner(provider)
        log.info("segmenter %s-%s on %s (overlap %.2f, mirror TTA %s, batch %d)",
                 self.manifest.name, self.manifest.version, self.runner.name, overlap,
                 mirror_tta, batch_size)

    @property
    def backend(self) -> str:
        return self.runner.name

    def _make_runner(self, provider: str) -> _Runner:
        import onnxruntime as ort

        onnx_path = self.package.onnx_path
        available = ort.get_available_providers()
        if provider in ("auto", "cuda"):
            if "CUDAExecutionProvider" in available:
                return _OrtRunner(onnx_path, ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                  self.threads)
            if provider == "cuda":  # asked for the GPU; "auto" on a CPU machine is no fallback
                log.warning("CUDAExecutionProvider is not available (providers: %s); falling "
                            "back to CPU inference with onnxruntime", ", ".join(available))
            provider = "cpu" if provider == "cuda" else DEFAULT_CPU_BACKEND
        if provider == "openvino":
            return _OpenVinoRunner(onnx_path, (self.batch_size, 1, *self.patch), self.threads,
                                   self.openvino_precision)
        return _OrtRunner(onnx_path, ["CPUExecutionProvider"], self.threads)

    # --- network on the model grid ----------------------------------------------------------

    def _windows(self, shape: Sequence[int]) -> Iterator[tuple[slice, slice, slice]]:
        starts = [symmetric_window_starts(s, p, self.overlap)
                  for s, p in zip(shape, self.patch, strict=True)]
        for a in starts[0]:
            for b in starts[1]:
                for c in starts[2]:
                    yield (slice(a, a + self.patch[0]), slice(b, b + self.patch[1]),
                           slice(c, c + self.patch[2]))

    def _run_batch(self, batch: np.ndarray) -> np.ndarray:
        count = batch.shape[0]
        if count < self.batch_size:  # fixed-shape backends get a full batch
            filler = np.zeros((self.batch_size - count,) + batch.shape[1:], dtype=batch.dtype)
            batch = np.concatenate([batch, filler])
        logits = self.runner(batch)[:count]
        probs = special.expit(logits.astype(np.float32))
        if self.mirror_tta:
            mirrored = self.runner(np.ascontiguousarray(np.flip(batch, axis=-1)))[:count]
            mirrored_probs = special.expit(mirrored.astype(np.float32))
            mirrored_probs = np.flip(mirrored_probs, axis=-1)
            order = list(range(probs.shape[1]))
            for left, right in self.manifest.mirror_channel_swaps:
                order[left], order[right] = order[right], order[left]
            probs = 0.5 * (probs + mirrored_probs[:, order])
        return probs

    def predict_probabilities(self, image: np.ndarray) -> np.ndarray:
        """Probabilities (C, D, H, W) float32 for a normalised (D, H, W) image on the model
        grid."""
        shape = image.shape
        padded_shape = [max(s, p) for s, p in zip(shape, self.patch, strict=True)]
        pads = [(0, ps - s) for ps, s in zip(padded_shape, shape, strict=True)]
        padded = np.pad(image.astype(np.float32, copy=False), pads, constant_values=-1.0)
        n_labels = len(self.manifest.labels)
        accum = np.zeros((n_labels, *padded.shape), dtype=np.float32)
        norm = np.zeros(padded.shape, dtype=np.float32)
        weight = gaussian_importance(self.patch)
        windows = list(self._windows(padded.shape))
        for first in range(0, len(windows), self.batch_size):
            chunk = windows[first:first + self.batch_size]
            batch = np.stack([padded[w] for w in chunk])[:, None]
            probs = self._run_batch(batch)
            for window, window_probs in zip(chunk, probs, strict=True):
                accum[(slice(None), *window)] += window_probs * weight
                norm[window] += weight
        accum /= norm
        return accum[(slice(None), *(slice(0, s) for s in shape))]

    def warm_up(self) -> float:
        """Run the network once on one batch of blank windows, so the backend's first-call
        costs (OpenVINO compiles its kernels then) are paid before the first CT; returns the
        seconds it took."""
        started = time.perf_counter()
        self._run_batch(np.full((self.batch_size, 1, *self.patch), -1.0, dtype=np.float32))
        return time.perf_counter() - started

    # --- full pipeline on the input grid ----------------------------------------------------

    def preprocess(self, hu: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
        """HU (input grid) -> normalised float32 image on the model grid."""
        target = self.manifest.target_spacing_mm
        factors = [t / s for s, t in zip(spacing_mm, target, strict=True)]
        shape = resampled_shape(hu.shape, spacing_mm, target)
        # anti-alias before decimating: training CTs had ~4 mm partial-volume voxels
        smooth = any(f > 1.5 for f in factors)
        image = np.asarray(hu, dtype=np.float32)
        # Filtering and linear sampling along one axis commute with both along another, so
        # (3-D Gaussian, then trilinear) equals filter-then-sample axis by axis, in-plane
        # first: each later filter runs on a 4x smaller volume (same values to float rounding).
        for axis in sorted(range(3), key=lambda a: shape[a] / hu.shape[a]):
            if smooth:
                sigma = math.sqrt(max(factors[axis] ** 2 - 1.0, 0.0)) / 2.0
                if sigma > 0:
                    image = ndimage.gaussian_filter1d(image, sigma, axis=axis, truncate=3.0)
            image = _sample_axis(image, axis, factors[axis], shape[axis])
        if image is hu:
            image = image.copy()
        intensity = self.manifest.intensity
        np.clip(image, intensity.clip_hu[0], intensity.clip_hu[1], out=image)
        image -= intensity.mean
        image /= intensity.std
        return image

    def predict(self, hu: np.ndarray, spacing_mm: Sequence[float]) -> dict[str, np.ndarray]:
        """roi_name -> bool mask of ``hu``'s shape (see :meth:`segment`).

        Args:
            hu: (slices, rows, columns) CT in HU, canonical orientation (S->I, A->P, R->L).
            spacing_mm: voxel size (slice, row, column) in mm.
        """
        return self.segment(hu, spacing_mm).masks

    def segment(self, hu: np.ndarray, spacing_mm: Sequence[float]) -> Segmentation:
        """Masks of ``hu``'s shape with a confidence and flag per predicted structure.

        Args:
            hu: (slices, rows, columns) CT in HU, canonical orientation (S->I, A->P, R->L).
            spacing_mm: voxel size (slice, row, column) in mm.
        """
        if hu.ndim != 3:
            raise ValueError(f"hu must be 3D (slices, rows, columns), got shape {hu.shape}")
        if len(spacing_mm) != 3 or any(not s > 0 for s in spacing_mm):
            raise ValueError(f"spacing_mm must be three positive numbers, got {spacing_mm!r}")
        spacing = tuple(float(s) for s in spacing_mm)
        started = time.perf_counter()
        image = self.preprocess(hu, spacing)
        preprocessed = time.perf_counter()
        probs = self.predict_probabilities(image)
        del image
        predicted = time.perf_counter()
        result = self.segmentation_from_probabilities(probs, spacing, hu.shape)
        result.timings.update(preprocess=preprocessed - started,
                              inference=predicted - preprocessed,
                              postprocess=time.perf_counter() - predicted)
        return result

    def segmentation_from_probabilities(
        self, probs: np.ndarray, spacing_mm: Sequence[float], shape: Sequence[int]
    ) -> Segmentation:
        """Masks on the input grid from model-grid probabilities (C, D, H, W).

        Args:
            probs: per-label probabilities on the model grid (as from
                :meth:`predict_probabilities`).
            spacing_mm: input grid voxel size (slice, row, column) in mm.
            shape: input grid shape (slices, rows, columns).
        """
        voxel_cc = float(np.prod(spacing_mm)) / 1000.0
        masks: dict[str, np.ndarray] = {}
        quality: dict[str, StructureQuality] = {}
        dropped: dict[str, str] = {}
        for label in self.manifest.labels:
            mask = np.zeros(tuple(shape), dtype=bool)
            masks[label.roi_name] = mask
            found = self._structure_in_box(probs[label.index], spacing_mm, shape,
                                           label.single_component)
            if found is None:
                continue
            box, sub_mask, model_box, component = found
            volume_cc = float(np.count_nonzero(sub_mask)) * voxel_cc
            minimum = self.min_volume_cc.get(label.roi_name, 0.0)
            if volume_cc < minimum:
                dropped[label.roi_name] = (f"{volume_cc:.2f} cc is below the minimum plausible "
                                           f"{minimum:g} cc: a fragment")
                log.info("%s dropped: %s", label.roi_name, dropped[label.roi_name])
                continue
            mask[box] = sub_mask
            quality[label.roi_name] = structure_quality(
                probs[label.index][model_box], component, volume_cc,
                TRAINING_VOLUME_RANGE_CC.get(label.roi_name), self.review_threshold)
        return Segmentation(masks, quality, dropped)

    def _structure_in_box(
        self, probs: np.ndarray, spacing_mm: Sequence[float], shape: Sequence[int],
        single_component: bool,
    ) -> tuple[tuple[slice, ...], np.ndarray, tuple[slice, ...], np.ndarray] | None:
        """One structure on the input grid, inside its box.

        Returns (input-grid box, post-processed bool mask of that box, model-grid box with a
        voxel of margin, the kept model-grid component in that box), or None when nothing
        reaches 0.5 (or the post-processed mask is empty).
        """
        above = probs >= 0.5
        if not above.any():
            return None
        labelled, count = ndimage.label(above, structure=_CONNECTIVITY)
        if single_component and count > 1:
            sizes = np.bincount(labelled.ravel())
            sizes[0] = 0
            keep = int(np.argmax(sizes))
        else:
            keep = 0  # every component
        objects = ndimage.find_objects(labelled)
        if keep:
            box = objects[keep - 1]
        else:
            box = tuple(slice(min(o[a].start for o in objects if o is not None),
                              max(o[a].stop for o in objects if o is not None))
                        for a in range(3))
        model_box = tuple(slice(max(0, b.start - 1), min(n, b.stop + 1))
                          for b, n in zip(box, probs.shape, strict=True))
        region = labelled[model_box]
        component = region == keep if keep else region > 0
        sub_box = self._input_box(box, spacing_mm, shape)
        if sub_box is None:
            return None
        starts = [b.start for b in sub_box]
        sub_shape = [b.stop - b.start for b in sub_box]
        scale = [s / t for s, t in zip(spacing_mm, self.manifest.target_spacing_mm, strict=True)]
        offset = [start * f for start, f in zip(starts, scale, strict=True)]
        resampled = resample_to_shape(probs, scale, sub_shape, order=1, offset=offset)
        sub_mask = postprocess_mask(resampled >= 0.5, single_component)
        if not sub_mask.any():
            return None
        return sub_box, sub_mask, model_box, component

    def _input_box(self, box: Sequence[slice], spacing_mm: Sequence[float],
                   shape: Sequence[int]) -> tuple[slice, ...] | None:
        """Input-grid box whose samples can reach 0.5: a point more than one model voxel
        outside the model-grid ``box`` of ``probs >= 0.5`` interpolates only values below."""
        target = self.manifest.target_spacing_mm
        slices = []
        for axis, (s, t, size) in enumerate(zip(spacing_mm, target, shape, strict=True)):
            low = (box[axis].start - 1) * t / s
            high = box[axis].stop * t / s  # last voxel index (stop - 1) plus one
            start, stop = max(0, math.ceil(low)), min(size, math.floor(high) + 1)
            if stop <= start:
                return None
            slices.append(slice(start, stop))
        return tuple(slices)

    def _probabilities_to_mask(
        self, probs: np.ndarray, spacing_mm: Sequence[float], shape: Sequence[int]
    ) -> np.ndarray:
        """Linear resampling of one probability map to the input grid, thresholded at 0.5
        (no component filtering), computed only inside the box of :meth:`_input_box`."""
        mask = np.zeros(tuple(shape), dtype=bool)
        above = probs >= 0.5
        if not above.any():
            return mask
        box = ndimage.find_objects(above.view(np.uint8))[0]
        sub_box = self._input_box(box, spacing_mm, shape)
        if sub_box is None:
            return mask
        scale = [s / t for s, t in zip(spacing_mm, self.manifest.target_spacing_mm, strict=True)]
        offset = [b.start * f for b, f in zip(sub_box, scale, strict=True)]
        sub_shape = [b.stop - b.start for b in sub_box]
        mask[sub_box] = resample_to_shape(probs, scale, sub_shape, order=1, offset=offset) >= 0.5
        return mask
