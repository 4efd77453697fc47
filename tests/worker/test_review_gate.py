"""The approval gate: a route with ``review: required`` holds its job in awaiting_review with
nothing sent; a clinician's approval (over the API) sends the reviewed RTSTRUCT, a rejection
never does. Both are audited with user and time."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from rtcontour.common.jobstore import JobState
from rtcontour.common.routes import parse_routing
from rtcontour.common.settings import Destination
from rtcontour.worker.tasks import execute_job
from tests.conftest import StoreScp, write_phantom_series
from tests.service.api_support import ApiHarness, make_harness
from tests.worker.pipeline_support import submit_series, threshold_runtime


@pytest.fixture
def api(tmp_path: Path, tps: StoreScp) -> ApiHarness:
    routing = parse_routing({"routes": [{"name": "held", "review": "required"}],
                             "default": "held"})
    harness = make_harness(tmp_path, settings_extra={
        "destinations": [Destination.parse(tps.destination)], "min_slices": 5},
        routing=routing)
    harness.routing = routing  # type: ignore[attr-defined]
    yield harness
    harness.client.close()
    harness.engine.dispose()


def _submit(api: ApiHarness, tmp_path: Path, seed: int) -> str:
    return submit_series(api, write_phantom_series(tmp_path / f"ct{seed}", seed=seed))




def test_held_job_is_sent_only_once_approved_and_a_rejected_one_never(
    api: ApiHarness, tmp_path: Path, tps: StoreScp
) -> None:
    runtime = threshold_runtime(api)
    approved, rejected = _submit(api, tmp_path, 1), _submit(api, tmp_path, 2)
    for job_id in (approved, rejected):
        assert execute_job(job_id, runtime).state == "awaiting_review"
        job = api.store.get(job_id)
        assert job.state == JobState.AWAITING_REVIEW and job.review_required
        assert api.store.output(job_id, "RTSTRUCT") is not None  # archived, reviewable
    time.sleep(0.5)
    assert tps.received() == []  # nothing left before a clinician looked

    reply = api.client.post(f"/api/jobs/{approved}/approve", headers=api.headers("clinician"))
    assert reply.status_code == 202 and reply.json()["state"] == "queued"
    reply = api.client.post(f"/api/jobs/{rejected}/reject", headers=api.headers("clinician"),
                            json={"reason": "parotids include the submandibular gland"})
    assert reply.status_code == 200 and reply.json()["state"] == "rejected"
    again = api.client.post(f"/api/jobs/{rejected}/approve", headers=api.headers("clinician"))
    assert again.status_code == 409 and "not awaiting review" in again.json()["detail"]
    assert api.client.post(f"/api/jobs/{approved}/approve",
                           headers=api.headers("viewer")).status_code == 403

    assert execute_job(approved, runtime).state == "done"
    deadline = time.monotonic() + 10
    while not tps.received() and time.monotonic() < deadline:
        time.sleep(0.1)
    (received,) = tps.received()
    output = api.store.output(approved, "RTSTRUCT")
    assert pydicom.dcmread(received).SOPInstanceUID == output.sop_instance_uid
    assert execute_job(rejected, runtime).state == "skipped"  # a rejected job never runs

    held, refused = api.store.get(approved), api.store.get(rejected)
    assert (held.review_decision, held.reviewed_by) == ("approved", "clinician-user")
    assert (refused.review_decision, refused.review_reason) == (
        "rejected", "parotids include the submandibular gland")
    assert held.reviewed_at is not None and refused.reviewed_at is not None
    events = api.client.get("/api/audit", params={"event": "job.approved"},
                            headers=api.headers("admin")).json()["items"]
    assert [e["job_id"] for e in events] == [approved]
    events = api.client.get("/api/audit", params={"event": "job.rejected"},
                            headers=api.headers("admin")).json()["items"]
    assert [e["job_id"] for e in events] == [rejected] and events[0]["actor"] == "clinician-user"


def test_an_approved_job_gets_its_attempts_for_sending_even_after_failed_runs(
    api: ApiHarness, tmp_path: Path, tps: StoreScp
) -> None:
    """RTCONTOUR_JOB_ATTEMPTS=1, and the review run itself spent it: approval must still
    send (before, the next claim gave up: 'Gave up after 1 attempts')."""
    api.settings = api.settings.model_copy(update={"job_attempts": 1})
    runtime = threshold_runtime(api)
    job_id = _submit(api, tmp_path, 3)
    assert execute_job(job_id, runtime).state == "awaiting_review"
    api.store.review(job_id, approved=True, user="clinician-user", reason=None)
    assert execute_job(job_id, runtime).state == "done"
    deadline = time.monotonic() + 10
    while not tps.received() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(tps.received()) == 1


def test_one_decision_wins_when_approve_and_reject_come_at_once(
    api: ApiHarness, tmp_path: Path
) -> None:
    import threading

    from rtcontour.common.jobstore import IllegalTransition

    runtime = threshold_runtime(api)
    for seed in range(4, 10):
        job_id = _submit(api, tmp_path, seed)
        assert execute_job(job_id, runtime).state == "awaiting_review"
        start, outcomes = threading.Barrier(2), []

        def decide(approved: bool, job_id: str = job_id, start: threading.Barrier = start,
                   outcomes: list = outcomes) -> None:  # type: ignore[type-arg]
            start.wait()
            try:
                api.store.review(job_id, approved=approved, user="u", reason=None)
                outcomes.append(approved)
            except IllegalTransition:
                outcomes.append(None)

        threads = [threading.Thread(target=decide, args=(flag,)) for flag in (True, False)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        [winner] = [flag for flag in outcomes if flag is not None]
        job = api.store.get(job_id)
        assert (job.state, job.review_decision) == (
            ("queued", "approved") if winner else ("rejected", "rejected"))


def test_a_series_sent_again_after_approval_is_a_job_of_its_own(
    api: ApiHarness, tmp_path: Path
) -> None:
    runtime = threshold_runtime(api)
    job_id = _submit(api, tmp_path, 11)
    assert execute_job(job_id, runtime).state == "awaiting_review"
    api.store.review(job_id, approved=True, user="clinician-user", reason=None)
    approved = api.store.get(job_id)
    resent = api.store.create_or_merge_for_series(
        series_instance_uid=approved.series_instance_uid)
    assert resent.created and resent.job.id != job_id  # reviewed on its own, not merged
    assert api.store.get(job_id).generation == approved.generation


def test_a_held_job_says_where_approve_sends_it_and_its_download_says_unreviewed(
    api: ApiHarness, tmp_path: Path, tps: StoreScp
) -> None:
    """The route has no destinations of its own: Approve sends to RTCONTOUR_DESTINATIONS, and
    the job says so before (send_to) and after (sent_to); a clinician may download the
    RTSTRUCT before approval, named and audited as unreviewed."""
    runtime = threshold_runtime(api)
    job_id = _submit(api, tmp_path, 12)
    assert execute_job(job_id, runtime).state == "awaiting_review"
    clinician = api.headers("clinician")

    stats = api.client.get("/api/stats", headers=api.headers("viewer")).json()
    assert stats["awaiting_review"] == 1
    listed = api.client.get("/api/jobs", params={"state": "awaiting_review"},
                            headers=clinician).json()["items"]
    assert [item["id"] for item in listed] == [job_id] and listed[0]["review_required"]
    job = api.client.get(f"/api/jobs/{job_id}", headers=clinician).json()
    assert job["state"] == "awaiting_review"
    assert (job["send_to"], job["send_to_from"], job["sent_to"]) == (
        [tps.destination], "RTCONTOUR_DESTINATIONS", [])
    assert [output["review"] for output in job["outputs"]] == ["awaiting_review"]

    download = api.client.get(f"/api/jobs/{job_id}/outputs/RTSTRUCT", headers=clinician)
    assert download.status_code == 200
    assert f'filename="RS_{job_id}_UNREVIEWED.dcm"' in download.headers["content-disposition"]
    assert download.headers["x-rtcontour-review"] == "awaiting_review"
    (event,) = api.client.get("/api/audit", params={"event": "rtstruct.download"},
                              headers=api.headers("admin")).json()["items"]
    assert event["detail"]["review"] == "awaiting_review" and event["job_id"] == job_id

    assert api.client.post(f"/api/jobs/{job_id}/approve", headers=clinician).status_code == 202
    assert execute_job(job_id, runtime).state == "done"
    job = api.client.get(f"/api/jobs/{job_id}", headers=clinician).json()
    assert job["sent_to"] == [tps.destination]  # the destinations actually used
    assert [output["review"] for output in job["outputs"]] == ["approved"]
    download = api.client.get(f"/api/jobs/{job_id}/rtstruct", headers=clinician)
    assert f'filename="RS_{job_id}.dcm"' in download.headers["content-disposition"]
    assert api.client.get("/api/stats", headers=api.headers("viewer")).json()[
        "awaiting_review"] == 0


def test_get_api_routes_shows_the_review_gate(api: ApiHarness) -> None:
    body = api.client.get("/api/routes", params={"calling_ae": "TPS"},
                          headers=api.headers("admin")).json()
    assert body["routes"][0]["review"] == "required"
    assert body["decision"]["route"] == "held" and body["decision"]["review"] == "required"
