"""Per-structure confidence of a predicted contour, and how well it finds poor contours.

No torch import. The confidence of one structure combines three scores in [0, 1]:

- ``probability``: how sure the network is inside the contour, ``2 * mean(p) - 1`` over the
  kept component on the model grid (``p >= 0.5`` there, so the mean lies in [0.5, 1]);
- ``edge_sharpness``: ``mean(|2p - 1|)`` over the component's edge band on the model grid
  (one voxel inside and one outside its boundary): a sharp boundary has probabilities near 0
  and 1 on either side, a doubtful one values near 0.5;
- ``volume_score``: 1 inside the training range of the organ's volume
  (:data:`models.labels.TRAINING_VOLUME_RANGE_CC`), falling off as ``exp(-|ln(v / edge)| /
  0.35)`` outside (half a decade out: ~0.04).

``confidence`` is their geometric mean; a structure below the review threshold gets the flag
``review``. :func:`auroc` and :func:`youden_threshold` judge and place that threshold from
(confidence, Dice) pairs of an evaluation (``models.evaluate``).

    python -m rtcontour.models.quality volumes     # the training volume ranges in models/labels.py
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "StructureQuality",
    "structure_quality",
    "volume_score",
    "auroc",
    "youden_threshold",
    "main",
]

VOLUME_FALLOFF = 0.35
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class StructureQuality:
    """Confidence of one predicted structure and what it is made of (all in [0, 1] except
    ``volume_cc``). ``flag`` is ``"review"`` below the segmenter's threshold, else ``"ok"``."""

    volume_cc: float
    probability: float
    edge_sharpness: float
    volume_score: float
    confidence: float
    flag: str


def volume_score(volume_cc: float, volume_range_cc: tuple[float, float] | None) -> float:
    """1 inside ``volume_range_cc`` (or without one), ``exp(-|ln(v / edge)| / 0.35)``
    outside."""
    if volume_range_cc is None:
        return 1.0
    low, high = volume_range_cc
    if volume_cc <= 0.0:
        return 0.0
    if volume_cc < low:
        return math.exp(-math.log(low / volume_cc) / VOLUME_FALLOFF)
    if volume_cc > high:
        return math.exp(-math.log(volume_cc / high) / VOLUME_FALLOFF)
    return 1.0


def structure_quality(
    probabilities: np.ndarray,
    component: np.ndarray,
    volume_cc: float,
    volume_range_cc: tuple[float, float] | None,
    review_threshold: float,
) -> StructureQuality:
    """Quality of one structure.

    Args:
        probabilities: float (D, H, W) probabilities on the model grid, a box around the
            structure with at least one voxel of margin.
        component: bool (D, H, W) the kept component (``probabilities >= 0.5``) in that box.
        volume_cc: volume of the final mask on the input grid.
        volume_range_cc: the organ's training range (None: no volume term).
        review_threshold: confidence below which the flag is ``review``.
    """
    if not component.any():
        raise ValueError("component must not be empty")
    probability = float(np.clip(2.0 * probabilities[component].mean() - 1.0, 0.0, 1.0))
    band = (ndimage.binary_dilation(component, _CONNECTIVITY)
            & ~ndimage.binary_erosion(component, _CONNECTIVITY, border_value=1))
    sharpness = float(np.abs(2.0 * probabilities[band] - 1.0).mean()) if band.any() else 1.0
    size = volume_score(volume_cc, volume_range_cc)
    confidence = float((max(probability, 1e-6) * max(sharpness, 1e-6) * size) ** (1.0 / 3.0))
    return StructureQuality(
        volume_cc=volume_cc, probability=probability, edge_sharpness=sharpness,
        volume_score=size, confidence=confidence,
        flag="review" if confidence < review_threshold else "ok",
    )


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` ranking the ``positives`` first (higher score =
    more likely positive; ties count half). None when either class is empty."""
    values = np.asarray(scores, dtype=float)
    labels = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(values)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop + 1]] = (start + stop) / 2.0 + 1.0
        start = stop + 1
    return ranks


def youden_threshold(confidences: Sequence[float], poor: Sequence[bool]) -> tuple[float, float]:
    """Threshold ``t`` (flag when confidence < t) that maximises sensitivity + specificity - 1
    for finding the ``poor`` contours; returns (t, J). Candidates are midpoints between
    neighbouring confidences."""
    values = np.asarray(confidences, dtype=float)
    labels = np.asarray(poor, dtype=bool)
    unique = np.unique(values)
    candidates = np.concatenate([[unique[0] - 1e-9], (unique[:-1] + unique[1:]) / 2.0,
                                 [unique[-1] + 1e-9]])
    best_t, best_j = float(candidates[0]), -1.0
    n_pos, n_neg = max(1, int(labels.sum())), max(1, int((~labels).sum()))
    for threshold in candidates:
        flagged = values < threshold
        j = (flagged & labels).sum() / n_pos + (~flagged & ~labels).sum() / n_neg - 1.0
        if j > best_j:
            best_t, best_j = float(threshold), float(j)
    return best_t, best_j


def training_volumes_cc() -> dict[str, list[float]]:
    """Reference volumes (cc) per structure over the OpenKBP training split (checked
    references only)."""
    from rtcontour.models.data import default_data_dir, list_cases, load_openkbp_raw
    from rtcontour.models.labels import ORGANS

    volumes: dict[str, list[float]] = {organ.roi_name: [] for organ in ORGANS}
    for path in list_cases(default_data_dir(), "train"):
        _, masks, known, spacing = load_openkbp_raw(path, reference_qa=True)
        voxel_cc = float(np.prod(spacing)) / 1000.0
        for channel, organ in enumerate(ORGANS):
            if known[channel] and masks[channel].any():
                volumes[organ.roi_name].append(float(masks[channel].sum()) * voxel_cc)
    return volumes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtcontour.models.quality",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("volumes",))
    parser.parse_args(argv)
    for name, values in training_volumes_cc().items():
        low, high = np.percentile(values, [2.5, 97.5])
        print(f'    "{name}": ({low:.1f}, {high:.1f}),  # n={len(values)}')  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
