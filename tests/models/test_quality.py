from __future__ import annotations

import numpy as np
import pytest

from rtcontour.models.evaluate import confidence_report
from rtcontour.models.quality import auroc, structure_quality, volume_score, youden_threshold


def test_auroc_of_a_perfect_a_reversed_and_a_tied_ranking():
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5
    assert auroc([0.3, 0.4], [True, True]) is None


def test_youden_threshold_separates_poor_from_good_confidences():
    threshold, j = youden_threshold([0.2, 0.3, 0.35, 0.7, 0.8, 0.9], [True, True, True, False,
                                                                     False, False])
    assert 0.35 < threshold < 0.7 and j == pytest.approx(1.0)


def test_volume_score_is_one_inside_the_training_range_and_falls_off_outside():
    assert volume_score(20.0, (10.0, 40.0)) == 1.0
    assert volume_score(5.0, (10.0, 40.0)) == pytest.approx(np.exp(-np.log(2) / 0.35))
    assert volume_score(80.0, (10.0, 40.0)) == pytest.approx(volume_score(5.0, (10.0, 40.0)))
    assert volume_score(5.0, None) == 1.0 and volume_score(0.0, (1.0, 2.0)) == 0.0


def test_structure_quality_flags_a_structure_below_the_threshold():
    probs = np.full((8, 8, 8), 0.02, dtype=np.float32)
    probs[2:6, 2:6, 2:6] = 0.98
    component = probs >= 0.5
    sure = structure_quality(probs, component, 20.0, (10.0, 40.0), review_threshold=0.5)
    assert sure.flag == "ok" and sure.confidence > 0.9
    small = structure_quality(probs, component, 0.5, (10.0, 40.0), review_threshold=0.5)
    assert small.flag == "review" and small.volume_score < 0.01
    with pytest.raises(ValueError, match="empty"):
        structure_quality(probs, np.zeros_like(component), 1.0, None, 0.5)


def test_confidence_report_counts_poor_missed_and_flagged_contours():
    def record(dice, confidence):
        return {"reference_checked": True, "dice": dice, "confidence": confidence,
                "probability": confidence, "edge_sharpness": confidence, "volume_score": 1.0}

    structures = [record(0.3, 0.2), record(0.5, 0.4), record(0.8, 0.7), record(0.9, 0.9),
                  {"reference_checked": True, "dice": 0.0, "confidence": None}]
    report = confidence_report(structures, review_threshold=0.5)
    assert report["auroc"] == 1.0 and report["n_poor"] == 2 and report["n_missed"] == 1
    assert report["n_flagged"] == 2 and report["sensitivity"] == report["specificity"] == 1.0
    assert 0.4 < report["youden_threshold"] < 0.7
