"""Dose prediction with a model package of kind ``dose`` (onnxruntime; no torch import).

``DosePredictor(package).predict(hu, spacing_mm, oar_masks, ptvs, body_mask)`` takes a
canonical CT (slices S->I, rows A->P, columns R->L) in HU with its spacing, the OAR masks by
TG-263 name, the PTVs with their prescriptions, and the body (possible-dose) mask, and
returns the predicted dose in Gy on the CT's grid (0 outside the body).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from rtcontour.models.dose.features import (
    CHANNEL_NAMES,
    MIRROR_CHANNEL_SWAPS,
    OAR_NAMES,
    body_mask_from_hu,
    input_channels,
    make_model_grid,
    to_input_grid,
)
from rtcontour.models.package import ModelPackage, ModelPackageError, load_package

__all__ = ["DosePredictor", "CRANIOCAUDAL_MARGIN_MM", "normalise_to_prescription"]

log = logging.getLogger(__name__)

# The dose is predicted over the PTVs' slices and this far beyond them (the OpenKBP training
# volumes cover at most ~380 mm craniocaudally, so the network never saw a longer body).
CRANIOCAUDAL_MARGIN_MM = 200.0


def normalise_to_prescription(
    dose_gy: np.ndarray, ptvs: Sequence[tuple[np.ndarray, float]], coverage: float = 0.95,
) -> tuple[np.ndarray, float | None]:
    """Scale ``dose_gy`` so that ``coverage`` of the highest-prescription PTV receives its
    prescription (D95 = prescription, the usual plan normalisation); returns the scaled dose
    (a new array) and the factor, or the dose unchanged and None when the PTV's D95 is 0 Gy
    (there is nothing to scale)."""
    mask, prescription = max(ptvs, key=lambda ptv: ptv[1])
    inside = dose_gy[np.asarray(mask, dtype=bool)]
    if inside.size == 0:
        raise ValueError("the highest-prescription PTV mask is empty")
    d_coverage = float(np.percentile(inside, 100.0 * (1.0 - coverage)))
    if d_coverage <= 0.0:
        return dose_gy.copy(), None
    factor = float(prescription) / d_coverage
    return (dose_gy * np.float32(factor)).astype(np.float32), factor


class DosePredictor:
    """Predicts dose with a validated dose package.

    Args:
        package: a :class:`ModelPackage` of kind ``dose`` or its folder.
        threads: onnxruntime intra-op threads (default: all cores).
        mirror_tta: also predict the patient mirrored left/right (Parotid_L/Parotid_R
            channels swapped, as in training's augmentation) and average the two.
        upsampling_order: the model-grid dose returns to the CT grid by a cubic B-spline (3)
            or linearly (1) (:func:`models.dose.features.to_input_grid`).
    """

    def __init__(self, package: ModelPackage | Path | str, threads: int | None = None,
                 mirror_tta: bool = True, upsampling_order: int = 3) -> None:
        if not isinstance(package, ModelPackage):
            package = load_package(package)
        manifest = package.manifest
        if manifest.kind != "dose" or manifest.dose is None:
            raise ModelPackageError(
                f"Model package {package.path} is of kind {manifest.kind!r}; dose prediction "
                "needs a package of kind 'dose'.")
        if tuple(manifest.dose.input_channels) != CHANNEL_NAMES:
            raise ModelPackageError(
                f"Model package {package.path} expects input channels "
                f"{manifest.dose.input_channels}; this rtcontour builds {list(CHANNEL_NAMES)}.")
        if tuple(label.roi_name for label in manifest.labels) != OAR_NAMES:
            raise ModelPackageError(
                f"Model package {package.path} takes OARs {[x.roi_name for x in manifest.labels]}"
                f"; this rtcontour builds {list(OAR_NAMES)}.")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        import onnxruntime as ort

        self.package = package
        self.manifest = manifest
        self.mirror_tta = mirror_tta
        if upsampling_order not in (1, 3):
            raise ValueError(f"upsampling_order must be 1 or 3, got {upsampling_order!r}")
        self.upsampling_order = upsampling_order
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(package.onnx_path), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        log.info("dose predictor %s-%s on onnxruntime[CPU] (mirror TTA %s)", manifest.name,
                 manifest.version, mirror_tta)

    @property
    def oar_names(self) -> tuple[str, ...]:
        """The OARs (TG-263 names) the model takes; others are not used."""
        return OAR_NAMES

    def predict(
        self,
        hu: np.ndarray,
        spacing_mm: Sequence[float],
        oar_masks: Mapping[str, np.ndarray],
        ptvs: Sequence[tuple[np.ndarray, float]],
        body_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """float32 dose in Gy, shape of ``hu``.

        Args:
            hu: (slices, rows, columns) CT in HU, canonical orientation.
            spacing_mm: voxel size (slice, row, column) in mm.
            oar_masks: TG-263 name (one of :attr:`oar_names`) -> bool mask of ``hu``'s shape;
                an OAR that is missing is an empty input channel, as in training.
            ptvs: (bool mask, prescription in Gy) per PTV, at least one.
            body_mask: bool body outline (the OpenKBP possible-dose mask); None: derived
                from the CT (:func:`models.dose.features.body_mask_from_hu`).
        """
        if hu.ndim != 3:
            raise ValueError(f"hu must be 3D (slices, rows, columns), got shape {hu.shape}")
        if len(spacing_mm) != 3 or any(not float(s) > 0 for s in spacing_mm):
            raise ValueError(f"spacing_mm must be three positive numbers, got {spacing_mm!r}")
        spacing = (float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2]))
        unknown = sorted(set(oar_masks) - set(OAR_NAMES))
        if unknown:
            raise ValueError(f"oar_masks names {unknown} are not OARs of this model; it takes "
                             f"{list(OAR_NAMES)}")
        for name, mask in oar_masks.items():
            self._check_mask(f"oar_masks[{name!r}]", mask, hu.shape)
        if not ptvs:
            raise ValueError("ptvs must hold at least one (mask, prescription_gy) PTV: a dose "
                             "prediction needs a target")
        for index, (mask, _) in enumerate(ptvs):
            self._check_mask(f"ptvs[{index}] mask", mask, hu.shape)
        if body_mask is None:
            assert self.manifest.dose is not None  # noqa: S101 - checked in __init__ (typing)
            body_mask = body_mask_from_hu(hu, self.manifest.dose.body_threshold_hu)
        else:
            self._check_mask("body_mask", body_mask, hu.shape)
        body = np.asarray(body_mask, dtype=bool) & self._craniocaudal_slab(ptvs, spacing,
                                                                           hu.shape)
        if not body.any():
            raise ValueError("body_mask holds no voxel near the PTVs: there is no body to "
                             "predict a dose in")
        dose_spec = self.manifest.dose
        assert dose_spec is not None  # noqa: S101 - checked in __init__ (typing)
        grid = make_model_grid(body, spacing, self.manifest.target_spacing_mm,
                               divisor=self.manifest.spatial_divisor,
                               margin_mm=dose_spec.body_margin_mm)
        masks = [oar_masks.get(name) for name in OAR_NAMES]
        channels = input_channels(np.asarray(hu), masks, ptvs, body, grid,
                                  self.manifest.intensity.clip_hu)
        model_dose = self._run(channels)
        if self.mirror_tta:
            order = list(range(channels.shape[0]))
            for left, right in MIRROR_CHANNEL_SWAPS:
                order[left], order[right] = order[right], order[left]
            mirrored = np.ascontiguousarray(np.flip(channels, axis=-1)[order])
            model_dose = 0.5 * (model_dose + np.flip(self._run(mirrored), axis=-1))
        dose = to_input_grid(model_dose, grid, hu.shape, self.upsampling_order)
        np.maximum(dose, 0.0, out=dose)
        dose[~body] = 0.0
        return dose

    def _run(self, channels: np.ndarray) -> np.ndarray:
        """(C, D, H, W) network input -> (D, H, W) model-grid dose in Gy."""
        return np.asarray(self.session.run(None, {self.input_name: channels[None]})[0])[0, 0]

    @staticmethod
    def _check_mask(name: str, mask: np.ndarray, shape: tuple[int, ...]) -> None:
        if not isinstance(mask, np.ndarray) or mask.shape != shape:
            got = getattr(mask, "shape", type(mask).__name__)
            raise ValueError(f"{name} must be an array of the CT's shape {shape}, got {got}")

    @staticmethod
    def _craniocaudal_slab(ptvs: Sequence[tuple[np.ndarray, float]],
                           spacing: tuple[float, float, float],
                           shape: tuple[int, ...]) -> np.ndarray:
        """bool (slices, 1, 1): the PTVs' slices plus :data:`CRANIOCAUDAL_MARGIN_MM`."""
        occupied = np.zeros(shape[0], dtype=bool)
        for mask, _ in ptvs:
            occupied |= mask.any(axis=(1, 2))
        slab = np.zeros((shape[0], 1, 1), dtype=bool)
        if not occupied.any():
            raise ValueError("every PTV mask is empty: a dose prediction needs a target")
        first, last = np.flatnonzero(occupied)[[0, -1]]
        margin = int(math.ceil(CRANIOCAUDAL_MARGIN_MM / spacing[0]))
        low, high = max(0, first - margin), min(shape[0], last + margin + 1)
        if low > 0 or high < shape[0]:
            log.warning("the CT extends more than %.0f mm beyond the PTVs: dose is predicted "
                        "on slices %d to %d only (0 Gy elsewhere)", CRANIOCAUDAL_MARGIN_MM,
                        low, high - 1)
        slab[low:high] = True
        return slab
