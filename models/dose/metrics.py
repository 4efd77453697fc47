"""The OpenKBP challenge's dose and DVH scores (numpy only).

Definitions follow the challenge's own evaluation code (``provided_code/
dose_evaluation_class.py`` of github.com/ababier/open-kbp; Babier et al., Medical Physics
48:5549-5561, 2021):

- dose score of a patient: ``sum(|reference - prediction * possible_dose_mask|) /
  sum(possible_dose_mask)`` over the whole grid (the challenge masks predictions with the
  possible-dose mask; the reference is 0 outside it), averaged over patients;
- DVH metrics of a structure with at least one voxel: for each OAR ``D_0.1_cc`` (the
  ``100 - 100 * n / size`` percentile of its voxel doses, n = the voxels in 0.1 cc,
  ``max(1, round(100 mm^3 / voxel volume))``) and ``mean``; for each PTV ``D_99``, ``D_95``
  and ``D_1`` (the 1st, 5th and 99th percentiles);
- DVH score: the mean absolute difference of all (patient, metric, structure) entries that
  exist for the reference, pooled over patients (``nanmean`` of the difference table).

One guard the challenge lacks: for an OAR smaller than 0.1 cc the challenge's percentile
would be negative (numpy raises); it is clipped to 0, the limit of the challenge's formula as
the OAR shrinks to 0.1 cc (its minimum dose).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["OAR_METRICS", "PTV_METRICS", "dose_score", "dvh_metrics", "dvh_score"]

OAR_METRICS: tuple[str, ...] = ("D_0.1_cc", "mean")
PTV_METRICS: tuple[str, ...] = ("D_99", "D_95", "D_1")


def dose_score(reference_gy: np.ndarray, predicted_gy: np.ndarray,
               possible_dose_mask: np.ndarray) -> float:
    """Mean absolute error (Gy) of ``predicted_gy`` over the possible-dose mask (same grid)."""
    if not reference_gy.shape == predicted_gy.shape == possible_dose_mask.shape:
        raise ValueError(f"reference_gy {reference_gy.shape}, predicted_gy "
                         f"{predicted_gy.shape} and possible_dose_mask "
                         f"{possible_dose_mask.shape} must have the same shape")
    mask = np.asarray(possible_dose_mask, dtype=bool)
    if not mask.any():
        raise ValueError("possible_dose_mask is empty")
    masked = np.asarray(predicted_gy, dtype=np.float64) * mask
    return float(np.sum(np.abs(np.asarray(reference_gy, dtype=np.float64) - masked))
                 / mask.sum())


def dvh_metrics(
    dose_gy: np.ndarray,
    oar_masks: Mapping[str, np.ndarray],
    ptv_masks: Mapping[str, np.ndarray],
    voxel_mm: Iterable[float],
) -> dict[tuple[str, str], float]:
    """(metric, structure) -> value in Gy for every non-empty structure.

    Args:
        dose_gy: dose on the structures' grid.
        oar_masks, ptv_masks: name -> bool mask.
        voxel_mm: the voxel's three edge lengths in mm.
    """
    voxel_volume = float(np.prod(list(voxel_mm)))
    if not voxel_volume > 0:
        raise ValueError(f"voxel_mm must be positive lengths, got {list(voxel_mm)!r}")
    voxels_in_tenth_of_cc = max(1.0, float(np.round(100.0 / voxel_volume)))
    values: dict[tuple[str, str], float] = {}
    for name, mask in oar_masks.items():
        roi_dose = dose_gy[np.asarray(mask, dtype=bool)]
        if roi_dose.size == 0:
            continue
        fraction = max(0.0, 100.0 - voxels_in_tenth_of_cc / roi_dose.size * 100.0)
        values[("D_0.1_cc", name)] = float(np.percentile(roi_dose, fraction))
        values[("mean", name)] = float(roi_dose.mean())
    for name, mask in ptv_masks.items():
        roi_dose = dose_gy[np.asarray(mask, dtype=bool)]
        if roi_dose.size == 0:
            continue
        values[("D_99", name)] = float(np.percentile(roi_dose, 1))
        values[("D_95", name)] = float(np.percentile(roi_dose, 5))
        values[("D_1", name)] = float(np.percentile(roi_dose, 99))
    return values


def dvh_score(
    reference: Iterable[Mapping[tuple[str, str], float]],
    predicted: Iterable[Mapping[tuple[str, str], float]],
) -> float:
    """Mean absolute difference of the DVH metrics, pooled over patients (one mapping per
    patient, from :func:`dvh_metrics`; only entries the reference has count)."""
    differences = []
    for index, (ref, pred) in enumerate(zip(reference, predicted, strict=True)):
        for key, value in ref.items():
            if key not in pred:
                raise ValueError(f"patient {index}: predicted metrics lack {key}")
            differences.append(abs(value - pred[key]))
    if not differences:
        raise ValueError("no DVH metrics to compare")
    return float(np.mean(differences))
