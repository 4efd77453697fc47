"""Learning from the clinic end to end (issue 23), through the real DICOM path and the API.

``rtcontour serve`` with one route: the active package, a shadow package, keep_for_training.
storescu sends two patients' CTs (only the active package's RTSTRUCT reaches the TPS) and then
the structure sets their clinicians approved (drawn with rt-utils under a clinic's names): QA
compares both packages with them, the sets are kept (GET /api/site-dataset), the shadow view
pairs them; POST /api/finetune queues a tiny run that a worker starts and that writes
NAME-VERSION+clinic.1 with its report; an admin switches the route (a third CT is contoured by
the former shadow package) and back, and removes a patient's kept set (audited)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import yaml

from tests.conftest import (
    StoreScp,
    api_job,
    build_test_package,
    serve_env,
    storescu,
    wait_for_jobs,
    wait_until,
    write_phantom_series,
)

rt_utils = pytest.importorskip("rt_utils", reason="rt-utils is not installed (extra 'dev')")
pytest.importorskip("torch", reason="the 'train' extra (torch) fine-tunes")

SHAPE = (24, 64, 64)
ACTIVE, SHADOW = "tiny-oar-1.0.0", "tiny-oar-1.0.1"


def approved_set(ct_dir: Path, out: Path) -> Path:
    """The clinicians' structure set: the seven organs as boxes, under a clinic's names."""
    builder = rt_utils.RTStructBuilder.create_new(dicom_series_path=str(ct_dir))
    boxes = {
        "Brain Stem": (slice(36, 44), slice(28, 36), slice(14, 20)),
        "Cord": (slice(44, 50), slice(30, 34), slice(2, 22)),
        "Parotid Lt": (slice(20, 30), slice(42, 52), slice(6, 14)),
        "Parotid Rt": (slice(20, 30), slice(12, 22), slice(6, 14)),
        "Oesophagus": (slice(40, 46), slice(30, 36), slice(1, 8)),
        "Larynx": (slice(30, 36), slice(28, 36), slice(3, 8)),
        "Mandible": (slice(10, 18), slice(16, 48), slice(10, 14)),
    }
    for name, box in boxes.items():
        mask = np.zeros((64, 64, SHAPE[0]), dtype=bool)
        mask[box] = True
        builder.add_roi(mask=mask, name=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    builder.save(str(out))
    return out


def test_kept_sets_shadow_finetune_and_switch_through_dicom_and_the_api(
    tmp_path: Path, tps: StoreScp, serve_factory
) -> None:
    packages = tmp_path / "packages"
    build_test_package(packages, name="tiny-oar", version="1.0.0")
    build_test_package(packages, name="tiny-oar", version="1.0.1", seed=1)
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"routes": [{
        "name": "head-neck", "model": ACTIVE, "shadow_model": SHADOW,
        "keep_for_training": True}], "default": "head-neck"}))
    env = serve_env(tmp_path / "var", destinations=tps.destination, extra={
        "RTCONTOUR_MODEL_PACKAGES_DIR": str(packages), "RTCONTOUR_ROUTES_FILE": str(routes)})
    serve = serve_factory(env)
    api = httpx.Client(base_url=serve.api_url, headers=serve.headers(), timeout=30)

    contour_jobs = {}
    for number, patient in enumerate(("PAT-A", "PAT-B")):
        ct_files = write_phantom_series(tmp_path / patient, SHAPE, patient_id=patient,
                                        seed=number)
        storescu(serve.dicom_port, ct_files)
        jobs = wait_for_jobs(serve, len(contour_jobs) + 1, timeout_s=240)
        (job,) = [j for j in jobs if j["id"] not in contour_jobs.values()]
        assert job["state"] == "done", api_job(serve, job["id"])
        contour_jobs[patient] = job["id"]
    wait_until(lambda: len(tps.received()) >= 2, 30, "two RTSTRUCTs at the TPS")
    # the shadow package's contours are never sent
    assert len(tps.received()) == 2
    for patient, job_id in contour_jobs.items():
        assert api_job(serve, job_id)["model_version"] == "1.0.0"
        approved = approved_set(tmp_path / patient, tmp_path / "approved" / f"{patient}.dcm")
        storescu(serve.dicom_port, [approved])
    jobs = wait_for_jobs(serve, 4, timeout_s=240)
    assert all(job["state"] == "done" for job in jobs), jobs

    qa = api_job(serve, contour_jobs["PAT-A"])["qa"]
    assert qa["shadow"]["model_version"] == "1.0.1"
    assert {item["reference_name"] for item in qa["shadow"]["structures"]} >= {
        "Parotid Lt", "Cord"}
    kept = api.get("/api/site-dataset").json()
    assert kept["sets"] == 2 and kept["patients"] == 2
    assert kept["per_structure"]["Parotid_L"] == 2 and kept["per_structure"]["SpinalCord"] == 2
    assert kept["kept"][0]["structures"]["Parotid_L"] == "Parotid Lt"
    assert "PAT-A" not in json.dumps(kept)
    shadow = api.get("/api/routes/head-neck/shadow").json()
    assert (shadow["active_package"], shadow["shadow_package"]) == (ACTIVE, SHADOW)
    assert shadow["approved_sets"] == 2
    assert {row["roi_name"] for row in shadow["structures"]} >= {"Parotid_L", "SpinalCord"}

    refused = api.post("/api/finetune", json={"package": ACTIVE, "site": "clinic",
                                              "steps": 2, "openkbp_limit": 0})
    assert refused.status_code == 202
    run = api.post("/api/finetune", json={"package": ACTIVE, "site": "clinic", "steps": 2,
                                          "min_sets": 2, "threads": 1, "openkbp_limit": 0})
    assert run.status_code == 202, run.text
    run_id = run.json()["run_id"]

    def finished(run: str) -> dict | None:
        values = api.get(f"/api/finetune/{run}").json()
        return values if values["state"] in ("done", "refused", "failed") else None

    status = wait_until(lambda: finished(run_id), 240, "the fine-tuning run")
    assert status["state"] == "done", status
    assert status["values"]["package"] == "tiny-oar-1.0.0+clinic.1"
    assert (packages / "tiny-oar-1.0.0+clinic.1" / "MODEL_CARD.md").is_file()
    report = status["values"]["report"]
    assert report["n_train_sets"] == 1 and report["n_held_back_sets"] == 1
    first = finished(refused.json()["run_id"])
    assert first is not None and first["state"] == "refused"
    assert "not enough kept structure sets" in first["values"]["reason"]

    switched = api.post("/api/routes/head-neck/switch").json()
    assert (switched["model"], switched["shadow_model"]) == (SHADOW, ACTIVE)
    known = {job["id"] for job in jobs}
    ct_files = write_phantom_series(tmp_path / "PAT-C", SHAPE, patient_id="PAT-C", seed=5)
    storescu(serve.dicom_port, ct_files)
    (third,) = [j for j in wait_for_jobs(serve, 5, timeout_s=240) if j["id"] not in known]
    assert api_job(serve, third["id"])["model_version"] == "1.0.1"
    back = api.post("/api/routes/head-neck/switch").json()
    assert (back["model"], back["shadow_model"]) == (ACTIVE, SHADOW)

    removed = api.delete("/api/site-dataset/patients", params={"patient_id": "PAT-A"})
    assert removed.status_code == 200 and len(removed.json()["removed"]) == 1
    kept = api.get("/api/site-dataset").json()
    assert kept["sets"] == 1
    assert api.delete(f"/api/site-dataset/patients/{kept['kept'][0]['patient_key']}"
                      ).status_code == 200
    assert api.get("/api/site-dataset").json()["sets"] == 0
    events = [row["event"] for row in api.get("/api/audit", params={"limit": 200}).json()["items"]]
    assert {"site_dataset.kept", "finetune.queued", "route.model_switched",
            "site_dataset.patient_removed"} <= set(events)
    rtstructs = [pydicom.dcmread(p) for p in tps.received()]
    assert len(rtstructs) == 3
