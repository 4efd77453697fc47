"""Jobs over the API: list with filters and pagination, detail, download, retry."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service.api_support import ADMIN_TOKEN, ApiHarness, harness_fixture, make_harness


@pytest.fixture
def api(tmp_path: Path, database_url: str | None) -> Iterator[ApiHarness]:
    """The API on SQLite and on PostgreSQL (``database_url`` from tests/conftest.py)."""
    yield from harness_fixture(tmp_path, database_url)


def test_health_needs_no_token(api: ApiHarness) -> None:
    response = api.client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_jobs_list_is_paginated_newest_first(api: ApiHarness) -> None:
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ids = [api.add_job(created_at=base + dt.timedelta(minutes=i)).id for i in range(7)]
    page = api.client.get("/api/jobs?limit=3&offset=2", headers=api.headers("viewer")).json()
    assert page["total"] == 7 and page["limit"] == 3 and page["offset"] == 2
    assert [item["id"] for item in page["items"]] == ids[::-1][2:5]


def test_jobs_list_filters_by_state_date_calling_ae_and_model(api: ApiHarness) -> None:
    base = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    done = api.add_job(state="done", calling_ae="TPS_A", model_name="hn", created_at=base)
    failed = api.add_job(
        state="failed", calling_ae="TPS_B", model_name="hn", created_at=base + dt.timedelta(days=2)
    )
    other_model = api.add_job(
        state="done", calling_ae="TPS_B", model_name="pelvis", created_at=base
    )
    h = api.headers("viewer")

    def ids(query: str) -> set[str]:
        response = api.client.get(f"/api/jobs?{query}", headers=h)
        assert response.status_code == 200, response.text
        return {item["id"] for item in response.json()["items"]}

    assert ids("state=failed") == {failed.id}
    assert ids("state=failed&state=done") == {done.id, failed.id, other_model.id}
    assert ids("calling_ae=TPS_B") == {failed.id, other_model.id}
    assert ids("model=hn") == {done.id, failed.id}
    assert ids("created_from=2026-03-02T00:00:00Z") == {failed.id}
    assert ids("created_to=2026-03-02T00:00:00") == {done.id, other_model.id}
    bad = api.client.get("/api/jobs?state=exploded", headers=h)
    assert bad.status_code == 422 and "exploded" in bad.text


def test_job_detail_has_timings_structures_and_model(api: ApiHarness) -> None:
    job = api.add_job(
        model_name="hn-oar",
        model_version="1.2.0",
        load_s=1.5,
        inference_s=20.25,
        contours_s=2.0,
        send_s=0.5,
        structures=[{"roi_name": "Brainstem", "volume_cc": 25.4, "colour": [0, 128, 255]}],
    )
    body = api.client.get(f"/api/jobs/{job.id}", headers=api.headers("viewer")).json()
    assert body["model_name"] == "hn-oar" and body["model_version"] == "1.2.0"
    assert body["timings"]["inference_s"] == 20.25 and body["timings"]["load_s"] == 1.5
    assert body["structures"] == [
        {"roi_name": "Brainstem", "volume_cc": 25.4, "colour": [0, 128, 255],
         "display_colour": [0, 128, 255]}
    ]
    assert api.client.get("/api/jobs/nope", headers=api.headers("viewer")).status_code == 404


def test_failed_job_shows_its_reason(api: ApiHarness) -> None:
    job = api.add_job(state="failed", failure_reason="the series has only 3 slices")
    body = api.client.get(f"/api/jobs/{job.id}", headers=api.headers("viewer")).json()
    assert body["state"] == "failed"
    assert body["failure_reason"] == "the series has only 3 slices"


def test_rtstruct_download_is_application_dicom(api: ApiHarness, tmp_path) -> None:
    rtstruct = tmp_path / "RS.dcm"
    rtstruct.write_bytes(b"\0" * 128 + b"DICM")
    job = api.add_job(rtstruct_path=str(rtstruct), rtstruct_sop_instance_uid="1.2.3.4")
    response = api.client.get(f"/api/jobs/{job.id}/rtstruct", headers=api.headers("clinician"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom"
    assert response.content == rtstruct.read_bytes()
    no_output = api.add_job(state="failed")
    missing = api.client.get(f"/api/jobs/{no_output.id}/rtstruct", headers=api.headers("admin"))
    assert missing.status_code == 404 and "no RTSTRUCT" in missing.json()["detail"]


def test_retry_requeues_a_failed_job_and_enqueues_it(api: ApiHarness) -> None:
    job = api.add_job(state="failed", failure_reason="worker lost", attempts=3)
    response = api.client.post(f"/api/jobs/{job.id}/retry", headers=api.headers("clinician"))
    assert response.status_code == 202, response.text
    assert response.json() == {"id": job.id, "state": "queued"}
    assert api.enqueued == [job.id]
    stored = api.store.get(job.id)
    assert stored.state == "queued" and stored.attempts == 0


@pytest.mark.parametrize("failure_kind", ["input", "incomplete"], ids=["input", "missing-slice"])
def test_a_job_failed_for_its_input_offers_no_retry_and_the_retry_says_to_send_the_series(
    api: ApiHarness, failure_kind: str
) -> None:
    job = api.add_job(state="failed", failure_kind=failure_kind,
                      failure_reason="The slice spacing is uneven (a missing slice?).")
    body = api.client.get(f"/api/jobs/{job.id}", headers=api.headers("viewer")).json()
    assert body["failure_kind"] == failure_kind and body["retryable"] is False
    response = api.client.post(f"/api/jobs/{job.id}/retry", headers=api.headers("clinician"))
    assert response.status_code == 409
    assert "send the whole series again" in response.json()["detail"]
    assert api.enqueued == [] and api.store.get(job.id).state == "failed"


@pytest.mark.parametrize(("state", "failure_kind"), [("failed", "processing"),
                                                      ("send_failed", "send"),
                                                      ("failed", None)],
                         ids=["processing", "send", "earlier-release"])
def test_a_job_failed_on_our_side_or_at_the_destination_is_retryable(
    api: ApiHarness, state: str, failure_kind: str | None
) -> None:
    job = api.add_job(state=state, failure_kind=failure_kind, failure_reason="worker lost")
    body = api.client.get(f"/api/jobs/{job.id}", headers=api.headers("viewer")).json()
    assert body["failure_kind"] == failure_kind and body["retryable"] is True
    response = api.client.post(f"/api/jobs/{job.id}/retry", headers=api.headers("clinician"))
    assert response.status_code == 202, response.text
    assert api.store.get(job.id).failure_kind is None  # queued again: no failure now


def test_retry_of_a_done_job_is_a_conflict(api: ApiHarness) -> None:
    job = api.add_job(state="done")
    response = api.client.post(f"/api/jobs/{job.id}/retry", headers=api.headers("admin"))
    assert response.status_code == 409
    assert api.enqueued == []


def test_retry_publishes_to_the_real_broker_and_queue_depth_counts_it(
    tmp_path: Path, redis_db_url: str
) -> None:
    from rtcontour.common.settings import Settings
    from rtcontour.service.api.app import create_app

    harness = make_harness(tmp_path)
    settings = Settings(
        data_dir=harness.settings.data_dir, admin_token=ADMIN_TOKEN, broker_url=redis_db_url
    )
    client = TestClient(create_app(settings, engine=harness.engine))  # default enqueue, depth
    try:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert client.get("/api/stats", headers=headers).json()["queue_depth"] == 0
        job = harness.add_job(state="send_failed", failure_reason="destination refused")
        assert client.post(f"/api/jobs/{job.id}/retry", headers=headers).status_code == 202
        assert client.get("/api/stats", headers=headers).json()["queue_depth"] == 1
    finally:
        client.close()
        harness.engine.dispose()


def _patients(api: ApiHarness) -> tuple[str, str, str]:
    """Three jobs of two patients (identity columns as the intake fills them)."""
    jane = api.add_job(patient_name="DOE^JANE", patient_id="PAT-001", accession_number="ACC1",
                       study_date="20260302", study_description="H&N planning",
                       series_description="CT 2.5mm")
    jane_again = api.add_job(patient_name="DOE^JANE", patient_id="PAT-001",
                             accession_number="ACC2", study_date="20260309",
                             series_description="CT 2.5mm")
    john = api.add_job(patient_name="ROE^JOHN", patient_id="PAT-1", series_description="CT 2.5mm")
    return jane.id, jane_again.id, john.id


def test_clinicians_see_who_the_patient_is_and_viewers_do_not(api: ApiHarness) -> None:
    jane, _, _ = _patients(api)
    for role in ("clinician", "admin"):
        listed = api.client.get("/api/jobs", headers=api.headers(role)).json()["items"]
        row = next(item for item in listed if item["id"] == jane)
        assert (row["patient_name"], row["patient_id"], row["accession_number"]) == (
            "DOE^JANE", "PAT-001", "ACC1")
        assert row["study_date"] == "20260302" and row["study_description"] == "H&N planning"
        body = api.client.get(f"/api/jobs/{jane}", headers=api.headers(role)).json()
        assert body["patient_id"] == "PAT-001"
    listed = api.client.get("/api/jobs", headers=api.headers("viewer")).json()["items"]
    body = api.client.get(f"/api/jobs/{jane}", headers=api.headers("viewer")).json()
    for item in [*listed, body]:
        for key in ("patient_name", "patient_id", "accession_number", "study_date",
                    "study_description"):
            assert item.get(key) is None, key
    assert "PAT-001" not in str(listed) + str(body) and "DOE" not in str(listed) + str(body)


@pytest.mark.parametrize(
    ("query", "expected"),
    [("PAT-001", {0, 1}), ("PAT-1", {2}), ("PAT", set()), ("doe", {0, 1}), ("john", {2}),
     ("e^j", {0, 1, 2}), ("%", set())],
    ids=["id-exact", "id-not-prefix", "id-part-is-not-a-match", "name-any-case", "first-name",
         "name-part", "like-wildcard-literal"],
)
def test_jobs_are_searchable_by_patient_id_or_name(
    api: ApiHarness, query: str, expected: set[int]
) -> None:
    ids = _patients(api)
    api.add_job(series_description="no patient recorded")  # an old job: identity NULL
    response = api.client.get("/api/jobs", params={"patient": query},
                              headers=api.headers("clinician"))
    assert response.status_code == 200, response.text
    assert {item["id"] for item in response.json()["items"]} == {ids[i] for i in expected}
    assert response.json()["total"] == len(expected)


def test_a_viewer_may_not_search_by_patient(api: ApiHarness) -> None:
    _patients(api)
    response = api.client.get("/api/jobs?patient=PAT-001", headers=api.headers("viewer"))
    assert response.status_code == 403 and "clinician" in response.json()["detail"]


def test_reading_who_the_patient_is_is_audited_without_naming_the_patient(
    api: ApiHarness, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from rtcontour.common.audit import AuditEvent

    jane, jane_again, _ = _patients(api)
    caplog.set_level("DEBUG")
    h = api.headers("clinician")
    for _ in range(3):  # the dashboard polls two lists: one entry for each, not six
        api.client.get("/api/jobs?patient=PAT-001", headers=h)
        api.client.get(f"/api/jobs/{jane}", headers=h)
    api.client.get("/api/jobs", headers=api.headers("viewer"))  # viewers see none: nothing
    with Session(api.engine) as session:
        events = list(session.scalars(
            select(AuditEvent).where(AuditEvent.event == "patient.viewed")
            .order_by(AuditEvent.id)))
    assert [(e.actor, e.detail["job_ids"], e.detail["searched"]) for e in events] == [
        ("clinician-user", ",".join(sorted([jane, jane_again])), True),
        ("clinician-user", jane, False),
    ]
    assert events[1].job_id == jane
    ours = [r.getMessage() for r in caplog.records if r.name.split(".")[0] in
            ("common", "service", "worker")]  # httpx logs the test's own URLs
    recorded = str([(e.detail, e.job_id) for e in events]) + str(ours)
    assert "PAT-001" not in recorded and "DOE" not in recorded and "JANE" not in recorded
