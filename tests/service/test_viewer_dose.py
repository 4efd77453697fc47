"""A dose job in the viewer: its source job's CT, the structures its prediction used (the
approved set and the OARs borrowed from rtcontour's contours) and the predicted dose on the
CT's grid."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.service.api_support import ApiHarness, harness_fixture
from tests.service.dose_support import PAROTID_COLOUR, PRESCRIPTION_GY, SHAPE, add_dose_job


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    yield from harness_fixture(tmp_path)


def _get(api: ApiHarness, job_id: str, what: str, role: str = "clinician", **headers: str):  # noqa: ANN202
    return api.client.get(f"/api/jobs/{job_id}/viewer/{what}",
                          headers={**api.headers(role), **headers})


def test_dose_job_shows_the_approved_and_the_borrowed_structures(api: ApiHarness) -> None:
    jobs = add_dose_job(api)
    meta = _get(api, jobs.dose.id, "meta").json()
    assert meta["kind"] == "dose" and meta["shape"] == list(SHAPE)
    sources = {s["roi_name"]: s["source"] for s in meta["structures"]}
    # rtcontour's Body was not used by the prediction: it is not shown.
    assert sources == {"PTV70": "approved", "Parotid Lt": "approved", "Brainstem": "borrowed"}
    parotid = next(s for s in meta["structures"] if s["roi_name"] == "Parotid Lt")
    assert parotid["display_colour"] == list(PAROTID_COLOUR)
    assert meta["dose"]["prescriptions_gy"] == {"PTV70": PRESCRIPTION_GY}
    # The contour job's own view is unchanged: rtcontour's structures only.
    contour = _get(api, jobs.contour.id, "meta").json()
    assert contour["kind"] == "contour" and contour["dose"] is None
    assert {s["source"] for s in contour["structures"]} == {"rtcontour"}


def test_viewer_dose_is_the_prediction_on_the_cts_canonical_grid(api: ApiHarness) -> None:
    jobs = add_dose_job(api)
    meta = _get(api, jobs.dose.id, "meta").json()["dose"]
    response = _get(api, jobs.dose.id, "dose")
    assert response.status_code == 200, response.text
    assert response.headers["content-encoding"] == "gzip"
    cgy = np.frombuffer(response.content, "<u2").reshape(meta["shape"])
    assert meta["units"] == "cGy" and meta["max_gy"] == pytest.approx(jobs.dose_gy.max(), abs=0.05)
    # Every dose voxel sits on a CT voxel centre: compare it with the prediction there.
    origin, step = np.array(meta["origin_index"]), np.array(meta["step"])
    assert np.allclose(origin, np.rint(origin), atol=1e-3)
    assert np.allclose(step, np.rint(step), atol=1e-3) and step[0] == 1
    i, j, k = (np.arange(n) for n in cgy.shape)
    at = np.ix_(*(np.rint(o + s * a).astype(int) for o, s, a in zip(origin, step, (i, j, k),
                                                                      strict=True)))
    assert np.abs(cgy / 100.0 - jobs.dose_gy[at]).max() < 0.05 + 1e-3 * jobs.dose_gy.max()
    # The hottest dose voxel is in the PTV.
    hottest = np.unravel_index(np.argmax(cgy), cgy.shape)
    ct_index = tuple(int(round(o + s * h)) for o, s, h in zip(origin, step, hottest, strict=True))
    assert jobs.ptv[ct_index]
    plain = _get(api, jobs.dose.id, "dose", **{"Accept-Encoding": "identity"})
    assert plain.content == response.content


def test_viewer_dose_needs_a_clinician_and_a_dose_job(api: ApiHarness) -> None:
    jobs = add_dose_job(api)
    assert _get(api, jobs.dose.id, "dose", role="viewer").status_code == 403
    missing = _get(api, jobs.contour.id, "dose")
    assert missing.status_code == 404 and "no RTDOSE" in missing.json()["detail"]


def test_structure_table_gives_the_colour_the_viewer_draws(api: ApiHarness) -> None:
    jobs = add_dose_job(api)
    output = api.store.output(jobs.contour.id, "RTSTRUCT")
    assert output is not None
    api.store.record_output(jobs.contour.id, kind="RTSTRUCT", path=output.path,
                            sop_instance_uid=output.sop_instance_uid,
                            summary=[{"roi_name": "Bone_Mandible", "colour": [230, 230, 230]},
                                     {"roi_name": "Brainstem", "colour": [0, 255, 255]}])
    job = api.client.get(f"/api/jobs/{jobs.contour.id}", headers=api.headers("clinician")).json()
    shown = {s["roi_name"]: s["display_colour"] for s in job["structures"]}
    assert shown["Brainstem"] == [0, 255, 255]
    mandible = shown["Bone_Mandible"]  # near-white would vanish on bone: a saturated colour
    assert max(mandible) - min(mandible) > 100
