"""The retention policy on SQLite and PostgreSQL: what is deleted, what stays, and what the
API and the job store say about a purged job afterwards."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from rtcontour.common.audit import JOB_FILES_PURGED, AuditEvent
from rtcontour.common.db import make_engine
from rtcontour.common.jobstore import IllegalTransition, Job, JobState
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings
from rtcontour.worker.retention import purge_expired
from tests.service.api_support import ApiHarness, add_finished_job, harness_fixture

DAY = dt.timedelta(days=1)


@pytest.fixture
def api(tmp_path: Path, database_url: str | None) -> Iterator[ApiHarness]:
    yield from harness_fixture(tmp_path, database_url)


def _folders(api: ApiHarness, job: Job) -> tuple[Path, Path]:
    return Path(job.spool_dir or ""), api.settings.archive_dir / job.id


def _finished_ago(api: ApiHarness, job: Job, days: float, state: str | None = None) -> None:
    with Session(api.engine) as session, session.begin():
        row = session.get(Job, job.id)
        assert row is not None
        row.finished_at = dt.datetime.now(dt.UTC) - days * DAY
        if state is not None:
            row.state = state


def test_files_of_old_finished_jobs_are_deleted_and_the_rest_kept(api: ApiHarness) -> None:
    old_done, old_failed, old_rejected, old_unsent, recent = (
        add_finished_job(api) for _ in range(5))
    _finished_ago(api, old_done, 31)
    _finished_ago(api, old_failed, 45, state=JobState.FAILED.value)
    _finished_ago(api, old_rejected, 40, state=JobState.REJECTED.value)  # never sent, ever
    _finished_ago(api, old_unsent, 60, state=JobState.SEND_FAILED.value)
    _finished_ago(api, recent, 29)
    spool, archive = _folders(api, old_done)
    expected_bytes = sum(f.stat().st_size for d in (spool, archive) for f in d.rglob("*"))

    report = purge_expired(api.settings, api.store)

    assert report.jobs == 3 and report.bytes_freed >= expected_bytes > 0
    for job in (old_done, old_failed, old_rejected):
        assert not any(folder.exists() for folder in _folders(api, job))
        assert api.store.get(job.id).purged_at is not None
    for job in (old_unsent, recent):  # awaiting delivery / within the retention period
        assert all(folder.is_dir() for folder in _folders(api, job))
        assert api.store.get(job.id).purged_at is None
    with Session(api.engine) as session:
        audited = session.scalars(
            select(AuditEvent.job_id).where(AuditEvent.event == JOB_FILES_PURGED)
        ).all()
    assert sorted(audited) == sorted([old_done.id, old_failed.id, old_rejected.id])
    # a second sweep finds nothing more to do
    assert purge_expired(api.settings, api.store).jobs == 0


def test_purged_job_answers_410_for_its_rtstruct_and_cannot_be_retried(api: ApiHarness) -> None:
    done, failed = add_finished_job(api), add_finished_job(api)
    _finished_ago(api, done, 40)
    _finished_ago(api, failed, 40, state=JobState.FAILED.value)
    purge_expired(api.settings, api.store)

    response = api.client.get(f"/api/jobs/{done.id}/rtstruct", headers=api.headers("clinician"))
    assert response.status_code == 410
    assert "retention policy (30 days" in response.json()["detail"]
    listed = api.client.get(f"/api/jobs/{done.id}", headers=api.headers("viewer")).json()
    assert listed["purged_at"] is not None and listed["has_rtstruct"] is False

    response = api.client.post(f"/api/jobs/{failed.id}/retry", headers=api.headers("clinician"))
    assert response.status_code == 409
    assert "send the series again" in response.json()["detail"]
    with pytest.raises(IllegalTransition, match="retention"):
        api.store.requeue_finished(failed.id, reason="test")
    assert api.enqueued == []


def test_retention_zero_keeps_everything(api: ApiHarness) -> None:
    job = add_finished_job(api)
    _finished_ago(api, job, 3650)
    keep = api.settings.model_copy(update={"retention_days": 0.0})
    assert purge_expired(keep, api.store).jobs == 0
    assert all(folder.is_dir() for folder in _folders(api, job))


def test_a_spool_dir_outside_the_data_folders_is_never_deleted(
    api: ApiHarness, tmp_path: Path
) -> None:
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.dcm").write_bytes(b"x")
    job = add_finished_job(api)
    api.store.set_spool_dir(job.id, str(outside), 1)
    _finished_ago(api, job, 100)
    assert purge_expired(api.settings, api.store).jobs == 1
    assert (outside / "keep.dcm").is_file()
    assert not (api.settings.archive_dir / job.id).exists()


def test_an_existing_database_gains_the_new_column(
    settings: Settings, database_url: str | None
) -> None:
    # a database created by the release before retention existed: no jobs.purged_at
    settings = settings.model_copy(update={"database_url": database_url})
    engine = make_engine(settings)
    create_schema(engine)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO jobs (id, series_instance_uid, study_instance_uid, "
                                "calling_ae, modality, series_description, n_instances, state, "
                                "sent_destinations, attempts, generation, created_at, updated_at)"
                                " VALUES ('old1', '1.2.3', '', 'TPS', 'CT', '', 3, 'done', '[]',"
                                " 1, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        connection.execute(text("ALTER TABLE jobs DROP COLUMN purged_at"))
    assert "purged_at" not in {c["name"] for c in inspect(engine).get_columns("jobs")}

    create_schema(engine)  # what every process does at start

    assert "purged_at" in {c["name"] for c in inspect(engine).get_columns("jobs")}
    with Session(engine) as session:
        job = session.get(Job, "old1")
        assert job is not None and job.state == "done" and job.purged_at is None
    engine.dispose()


def test_the_workers_sweep_applies_the_policy_when_it_starts(api: ApiHarness) -> None:
    from rtcontour.worker.tasks import RecoverySweeper

    job = add_finished_job(api)
    _finished_ago(api, job, 31)
    sweeper = RecoverySweeper(api.settings, api.store, api.enqueued.append).start()
    try:
        deadline = time.monotonic() + 20
        while api.store.get(job.id).purged_at is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        sweeper.stop()
    assert api.store.get(job.id).purged_at is not None
    assert not any(folder.exists() for folder in _folders(api, job))


def test_a_sweep_interrupted_after_marking_is_finished_by_a_later_one(api: ApiHarness) -> None:
    job = add_finished_job(api)
    _finished_ago(api, job, 40)
    # a sweep marked the job, then its worker died before deleting anything
    now = dt.datetime.now(dt.UTC)
    assert [marked.id for marked in api.store.mark_expired_for_purge(now - 30 * DAY)] == [job.id]

    # right after the mark, the deletion may still be under way in another worker's sweep
    assert purge_expired(api.settings, api.store).jobs == 0
    assert all(folder.is_dir() for folder in _folders(api, job))

    report = purge_expired(api.settings, api.store, now=now + dt.timedelta(hours=1))

    assert report.jobs == 1 and report.bytes_freed > 0
    assert not any(folder.exists() for folder in _folders(api, job))
    with Session(api.engine) as session:
        details = session.scalars(
            select(AuditEvent.detail).where(AuditEvent.event == JOB_FILES_PURGED)
        ).all()
    assert len(details) == 1 and details[0]["resumed"] is True
    assert purge_expired(api.settings, api.store, now=now + dt.timedelta(hours=2)).jobs == 0
