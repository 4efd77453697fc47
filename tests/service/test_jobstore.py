"""The job store on SQLite and on the local PostgreSQL (fresh schema per test)."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from rtcontour.common.db import make_engine
from rtcontour.common.jobstore import (
    STAGES,
    IllegalTransition,
    JobFilter,
    JobNotFound,
    JobState,
    JobStore,
)
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings


@pytest.fixture
def store(settings: Settings, database_url: str | None) -> JobStore:
    settings = settings.model_copy(update={"database_url": database_url})
    engine = make_engine(settings)
    create_schema(engine)
    yield JobStore(engine)
    engine.dispose()


def _new(store: JobStore, series: str = "1.2.3.4", **kw: object) -> str:
    result = store.create_or_merge_for_series(
        series_instance_uid=series,
        study_instance_uid="1.2.3",
        calling_ae=str(kw.get("calling_ae", "TPS")),
        modality="CT",
        series_description="Head",
        n_instances=40,
    )
    return result.job.id


def test_new_series_creates_received_job(store: JobStore) -> None:
    result = store.create_or_merge_for_series(series_instance_uid="1.2.3.4", calling_ae="TPS")
    assert result.created
    job = store.get(result.job.id)
    assert job.state == JobState.RECEIVED
    assert job.attempts == 0
    assert job.created_at.tzinfo is not None


def test_resent_series_merges_while_active_and_makes_new_job_when_finished(
    store: JobStore,
) -> None:
    first = _new(store)
    again = store.create_or_merge_for_series(series_instance_uid="1.2.3.4")
    assert not again.created and again.job.id == first
    assert store.get(first).generation == 1
    store.mark_queued(first)
    assert store.claim(first, "w1", 60) is not None
    assert store.create_or_merge_for_series(series_instance_uid="1.2.3.4").job.id == first
    store.transition(first, JobState.DONE)
    after = store.create_or_merge_for_series(series_instance_uid="1.2.3.4")
    assert after.created and after.job.id != first


def test_concurrent_intakes_of_one_series_make_one_job(store: JobStore) -> None:
    ids: list[str] = []

    def intake() -> None:
        ids.append(store.create_or_merge_for_series(series_instance_uid="9.9.9").job.id)

    threads = [threading.Thread(target=intake) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1
    assert store.count(JobFilter(series_instance_uid="9.9.9")) == 1


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], JobState.DONE),
        ([JobState.QUEUED], JobState.SEND_FAILED),
        ([JobState.QUEUED, JobState.RUNNING, JobState.DONE], JobState.RUNNING),
        ([JobState.QUEUED, JobState.RUNNING, JobState.FAILED], JobState.QUEUED),
    ],
    ids=["received-to-done", "queued-to-send_failed", "done-to-running", "failed-to-queued"],
)
def test_transition_refuses_illegal_moves(
    store: JobStore, path: list[JobState], illegal: JobState
) -> None:
    job_id = _new(store)
    for state in path:
        store.transition(job_id, state)
    with pytest.raises(IllegalTransition, match="cannot move"):
        store.transition(job_id, illegal)


def test_failed_job_keeps_reason_and_frees_series(store: JobStore) -> None:
    job_id = _new(store)
    store.transition(job_id, JobState.FAILED, reason="Series has 3 slices; at least 10 needed.")
    job = store.get(job_id)
    assert job.failure_reason.startswith("Series has 3 slices")
    assert job.finished_at is not None
    assert store.create_or_merge_for_series(series_instance_uid="1.2.3.4").created


def test_claim_is_exclusive_until_lease_expires(store: JobStore) -> None:
    job_id = _new(store)
    store.mark_queued(job_id)
    claimed = store.claim(job_id, "worker-a", lease_s=0.5)
    assert claimed is not None and claimed.state == JobState.RUNNING and claimed.attempts == 1
    assert store.claim(job_id, "worker-b", lease_s=60) is None
    assert store.recoverable_jobs() == []
    time.sleep(0.7)
    assert store.recoverable_jobs() == [job_id]
    assert not store.heartbeat(job_id, "worker-b", 60)
    reclaimed = store.claim(job_id, "worker-b", lease_s=60)
    assert reclaimed is not None and reclaimed.attempts == 2 and reclaimed.worker == "worker-b"
    assert not store.heartbeat(job_id, "worker-a", 60)
    assert store.heartbeat(job_id, "worker-b", 60)
    store.transition(job_id, JobState.DONE)
    assert store.claim(job_id, "worker-c", lease_s=60) is None


def test_recoverable_jobs_lists_received_and_queued_older_than(store: JobStore) -> None:
    received = _new(store, "1.1")
    queued = _new(store, "1.2")
    store.mark_queued(queued)
    done = _new(store, "1.3")
    store.transition(done, JobState.FAILED, reason="x")
    assert set(store.recoverable_jobs()) == {received, queued}
    assert store.recoverable_jobs(older_than_s=3600) == []


def test_record_stage_model_output_and_sent(store: JobStore) -> None:
    job_id = _new(store)
    for stage, seconds in [("load", 0.5), ("inference", 12.0), ("contours", 1.5), ("send", 0.2)]:
        store.record_stage(job_id, stage, seconds)
    with pytest.raises(ValueError, match="stage"):
        store.record_stage(job_id, "coffee", 1.0)
    store.record_model(job_id, "hn-oar", "1.0.0")
    structures = [{"roi_name": "Brainstem", "volume_cc": 25.5, "colour": [255, 0, 0]}]
    store.record_output(job_id, kind="RTSTRUCT", sop_instance_uid="2.25.1", path="/a/RS.dcm",
                        summary=structures)
    assert not store.was_sent(job_id, "TPS@127.0.0.1:104", "2.25.1")
    store.record_sent(job_id, "TPS@127.0.0.1:104", "2.25.1")
    store.record_sent(job_id, "TPS@127.0.0.1:104", "2.25.1")
    job = store.get(job_id)
    recorded = {"load": 0.5, "inference": 12.0, "contours": 1.5, "send": 0.2}
    assert job.stage_timings == {stage: recorded.get(stage) for stage in STAGES}
    assert (job.model_name, job.model_version) == ("hn-oar", "1.0.0")
    assert store.output(job_id, "RTSTRUCT").summary == structures
    assert job.sent_destinations == ["TPS@127.0.0.1:104|2.25.1"]
    assert store.was_sent(job_id, "TPS@127.0.0.1:104", "2.25.1")


def test_list_filters_paginates_and_counts(store: JobStore) -> None:
    ids = [_new(store, f"1.{i}", calling_ae="TPS_A" if i % 2 else "TPS_B") for i in range(7)]
    store.record_model(ids[0], "hn-oar", "1.0.0")
    store.transition(ids[1], JobState.QUEUED)
    assert store.count() == 7
    assert store.count(JobFilter(calling_ae="TPS_A")) == 3
    assert [j.id for j in store.list(JobFilter(model_name="hn-oar"))] == [ids[0]]
    assert [j.id for j in store.list(JobFilter(state="queued"))] == [ids[1]]
    assert len(store.list(JobFilter(state=[JobState.RECEIVED, JobState.QUEUED]))) == 7
    page1 = store.list(limit=4)
    page2 = store.list(limit=4, offset=4)
    assert len(page1) == 4 and len(page2) == 3
    assert {j.id for j in page1} | {j.id for j in page2} == set(ids)
    now = dt.datetime.now(dt.UTC)
    assert store.count(JobFilter(since=now - dt.timedelta(minutes=5))) == 7
    assert store.count(JobFilter(until=now - dt.timedelta(minutes=5))) == 0
    counts = store.counts_by_state()
    assert counts["received"] == 6 and counts["queued"] == 1 and counts["done"] == 0


def test_unknown_job_raises_job_not_found(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        store.get("nope")
    with pytest.raises(JobNotFound):
        store.record_stage("nope", "load", 1.0)


def test_requeue_finished_gives_fresh_attempts_and_refuses_active_jobs(store: JobStore) -> None:
    job_id = _new(store)
    with pytest.raises(IllegalTransition):
        store.requeue_finished(job_id, reason="retry")
    store.claim(job_id, "w", 60)
    store.transition(job_id, JobState.SEND_FAILED, reason="TPS down")
    job = store.requeue_finished(job_id, reason="retry requested by admin")
    assert (job.state, job.attempts, job.finished_at) == ("queued", 0, None)
    assert store.create_or_merge_for_series(series_instance_uid="1.2.3.4").job.id == job_id
    store.claim(job_id, "w", 60)
    store.transition(job_id, JobState.FAILED, reason="x")
    _new(store)  # a newer job of the same series is active
    with pytest.raises(IllegalTransition, match="another job of its series is active"):
        store.requeue_finished(job_id, reason="retry")


def test_completion_refused_after_a_merge_and_merge_after_completion_makes_new_job(
    store: JobStore,
) -> None:
    job_id = _new(store)
    store.claim(job_id, "w1", 60)
    assert not store.complete_if_unchanged(job_id, "w2", 0)  # not the worker holding it
    store.create_or_merge_for_series(series_instance_uid="1.2.3.4")
    assert not store.complete_if_unchanged(job_id, "w1", 0)  # instances merged meanwhile
    assert store.complete_if_unchanged(job_id, "w1", 1)
    job = store.get(job_id)
    assert job.state == JobState.DONE and job.finished_at is not None
    assert not store.bump_generation(job_id)
    assert store.create_or_merge_for_series(series_instance_uid="1.2.3.4").created
