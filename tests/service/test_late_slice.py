"""A late slice: a series failed for a missing slice is completed by that slice sent later
(DCMTK storescu against a running listener and the real intake), while its files are held;
a series failed for anything else is never merged with what is sent again."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from rtcontour.common.db import make_engine, utcnow
from rtcontour.common.jobstore import FailureKind, Job, JobState, JobStore
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings
from rtcontour.service.intake import Intake, SeriesArrival, job_folder
from rtcontour.service.listener import start_listener
from rtcontour.worker.pipeline import SegmenterCache
from rtcontour.worker.sender import Sender
from rtcontour.worker.tasks import WorkerRuntime, execute_job
from tests.conftest import ThresholdModel, wait_until, write_phantom_series
from tests.service.conftest import run_storescu


@pytest.fixture
def store(settings: Settings) -> JobStore:
    engine = make_engine(settings)
    create_schema(engine)
    return JobStore(engine)


def _by_position(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda path: float(
        pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2]))


def test_a_missing_slice_sent_late_completes_its_failed_series_in_a_job_that_succeeds(
    settings: Settings, store: JobStore, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"dicom_host": "127.0.0.1", "quiet_period_s": 0.3,
                                           "min_free_disk_bytes": 0})
    model = ThresholdModel()
    runtime = WorkerRuntime(
        settings, store=store,
        model_cache=SegmenterCache(loader=lambda *_: model, resolver=lambda *_: Path("test")),
        sender=Sender(settings, sleep=lambda _: None))
    enqueued: list[str] = []
    handle = start_listener(settings, Intake(settings, store, enqueued.append))
    slices = _by_position(write_phantom_series(tmp_path / "ct", (16, 32, 32)))
    late = slices.pop(8)  # a slice inside the series: a gap, not a shorter series
    try:
        assert set(run_storescu(handle.address[1], slices, calling_ae="TPS").status_list) == {0}
        wait_until(lambda: len(enqueued) == 1, 15, "the series without its slice as a job")
        assert execute_job(enqueued[0], runtime).state == "failed"
        failed = store.get(enqueued[0])
        assert failed.failure_kind == FailureKind.INCOMPLETE and "missing" in failed.failure_reason

        assert run_storescu(handle.address[1], [late], calling_ae="TPS").status_list == [0]
        wait_until(lambda: len(enqueued) == 2, 15, "the late slice as a job")
    finally:
        handle.shutdown(timeout_s=2.0)
    completed = store.get(enqueued[1])
    assert completed.id != failed.id and completed.n_instances == 16
    assert execute_job(completed.id, runtime).state == "done"
    completed = store.get(completed.id)
    assert completed.notes == [f"Completed with the 15 instances held from job {failed.id}, "
                               "which failed for missing instances."]
    # the failed job keeps its record and its files (its own retention)
    assert store.get(failed.id).state == JobState.FAILED
    assert len(list(job_folder(settings, failed.id).glob("*.dcm"))) == 15


def _arrival(settings: Settings, uids: list[str], series: str) -> SeriesArrival:
    folder = settings.spool_dir / "incoming" / series
    folder.mkdir(parents=True, exist_ok=True)
    for uid in uids:
        (folder / f"{uid}.dcm").write_bytes(f"instance {uid}".encode())
    return SeriesArrival(series, "1.2.3", "TPS", "CT", "Head", folder, len(uids))


@pytest.mark.parametrize(
    ("failure_kind", "purged", "merged"),
    [(FailureKind.INCOMPLETE, False, True), (FailureKind.INPUT, False, False),
     (FailureKind.PROCESSING, False, False), (FailureKind.INCOMPLETE, True, False)],
    ids=["missing-slice", "wrong-input", "processing", "missing-slice-purged"],
)
def test_only_a_held_series_failed_for_missing_instances_is_merged_with_what_is_sent_again(
    settings: Settings, store: JobStore, failure_kind: FailureKind, purged: bool, merged: bool
) -> None:
    series = "1.2.826.0.1.3680043.8.498.77"
    intake = Intake(settings, store, lambda _: None)
    intake.series_complete(_arrival(settings, ["1.1", "1.2"], series))
    (first,) = store.list()
    store.claim(first.id, "w", 60)
    store.transition(first.id, JobState.FAILED, reason="...", failure_kind=failure_kind)
    if purged:  # the retention policy deleted its files
        with store.session() as session, session.begin():
            job = session.get(Job, first.id)
            assert job is not None
            job.purged_at = utcnow()
    intake.series_complete(_arrival(settings, ["1.2", "1.3"], series))
    second = next(job for job in store.list() if job.id != first.id)
    names = sorted(path.name for path in job_folder(settings, second.id).glob("*.dcm"))
    assert names == (["1.1.dcm", "1.2.dcm", "1.3.dcm"] if merged else ["1.2.dcm", "1.3.dcm"])
    # what was just sent wins over the held copy of the same instance
    assert (job_folder(settings, second.id) / "1.2.dcm").read_bytes() == b"instance 1.2"
    assert second.n_instances == len(names)
