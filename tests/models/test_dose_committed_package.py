"""The committed dose package predicts a real OpenKBP validation patient's dose."""

from __future__ import annotations

import numpy as np
import pytest

from rtcontour.models.dose.data import list_cases, load_openkbp_patient
from rtcontour.models.dose.evaluate import evaluate_patient
from rtcontour.models.dose.predict import DosePredictor
from rtcontour.models.package import ModelPackageError, find_latest_package, load_package


def test_committed_dose_package_predicts_a_validation_patient(openkbp_dir):
    try:
        folder = find_latest_package(name="rtcontour-hn-dose", kind="dose")
    except ModelPackageError:
        pytest.skip("no committed rtcontour-hn-dose package under models/packages")
    package = load_package(folder)
    assert package.manifest.dose is not None and package.manifest.dose.validation is not None
    patient = load_openkbp_patient(list_cases(openkbp_dir, "validation")[0])
    scores = evaluate_patient(DosePredictor(package, threads=1), patient)
    # predicting the mean dose inside the mask scores ~10 Gy; a trained model is far better
    assert scores["dose_score_gy"] < 6.0, scores["dose_score_gy"]
    ptv70 = [v for (metric, name), v in scores["predicted"].items()
             if metric == "D_95" and name == "PTV70"]
    if ptv70:
        assert 55.0 < ptv70[0] < 75.0
    assert np.isfinite(list(scores["predicted"].values())).all()
