"""The committed package segments a real OpenKBP validation patient."""

from __future__ import annotations

import numpy as np
import pytest

from rtcontour.models.data import list_cases, load_openkbp_raw
from rtcontour.models.evaluate import dice
from rtcontour.models.inference import Segmenter
from rtcontour.models.package import ModelPackageError, find_latest_package, load_package


def test_committed_package_segments_a_validation_patient(openkbp_dir):
    try:
        folder = find_latest_package(name="rtcontour-hn-oar")
    except ModelPackageError:
        pytest.skip("no committed rtcontour-hn-oar package under models/packages")
    package = load_package(folder)
    hu, masks, known, spacing = load_openkbp_raw(list_cases(openkbp_dir, "validation")[0])
    predicted = Segmenter(package, overlap=0.25).predict(hu.astype(np.float32), spacing)
    scores = {name: dice(predicted[name], masks[c])
              for c, name in enumerate(package.roi_names) if known[c]}
    # chance level for these small organs is Dice ~0.01; a trained model is far above it
    assert np.mean(list(scores.values())) > 0.4, scores
    for name in ("Brainstem", "Bone_Mandible", "Parotid_L", "Parotid_R"):
        if name in scores:
            assert scores[name] > 0.3, scores
