"""The job runner and pipeline in-process: a stand-in model, a real job store, a real storescp."""

from __future__ import annotations

import datetime as dt
import shutil
import time
from pathlib import Path

import pydicom
import pytest

from rtcontour.common.db import make_engine
from rtcontour.common.jobstore import JobState, JobStore, utcnow
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings
from rtcontour.common.volume import load_series
from rtcontour.service.intake import Intake, SeriesArrival
from rtcontour.worker.pipeline import SegmenterCache
from rtcontour.worker.sender import Sender
from rtcontour.worker.tasks import WorkerRuntime, execute_job, recover_jobs
from tests.conftest import StoreScp, ThresholdModel, wait_until, write_phantom_series


def _runtime(settings: Settings, model: ThresholdModel, sleeps: list[float]) -> WorkerRuntime:
    engine = make_engine(settings)
    create_schema(engine)
    return WorkerRuntime(
        settings,
        store=JobStore(engine),
        model_cache=SegmenterCache(loader=lambda *_: model, resolver=lambda *_: Path("test")),
        sender=Sender(settings, sleep=sleeps.append),
    )


def _submit(settings: Settings, store: JobStore, tmp_path: Path, **series: object) -> str:
    incoming = tmp_path / "incoming" / "series"
    paths = write_phantom_series(incoming, **series)  # type: ignore[arg-type]
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    # files as the listener names them: <SOPInstanceUID>.dcm
    arrival_dir = settings.spool_dir / "incoming" / ds.SeriesInstanceUID
    arrival_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        shutil.move(path, arrival_dir / f"{uid}.dcm")
    enqueued: list[str] = []
    Intake(settings, store, enqueued.append).series_complete(
        SeriesArrival(
            ds.SeriesInstanceUID,
            ds.StudyInstanceUID,
            "TPS",
            "CT",
            "Head",
            arrival_dir,
            len(paths),
        )
    )
    return enqueued[0]


@pytest.fixture
def model() -> ThresholdModel:
    return ThresholdModel()


def test_job_runs_to_done_and_sends_rtstruct_referencing_every_ct(
    settings: Settings, tmp_path: Path, tps: StoreScp, model: ThresholdModel
) -> None:
    settings = settings.model_copy(update={"destinations": [_dest(tps)]})
    runtime = _runtime(settings, model, [])
    job_id = _submit(settings, runtime.store, tmp_path)

    assert execute_job(job_id, runtime).state == "done"

    job = runtime.store.get(job_id)
    assert job.state == JobState.DONE and job.attempts == 1
    assert all(job.stage_timings[s] is not None for s in ("load", "inference", "contours", "send"))
    assert (job.model_name, job.model_version) == ("threshold-test", "0.0.1")
    output = runtime.store.output(job_id, "RTSTRUCT")
    assert {s["roi_name"] for s in output.summary} == {"Bone", "Marker"}
    assert all(s["volume_cc"] > 0 for s in output.summary)
    archived = Path(output.path)
    assert archived == settings.archive_dir / job_id / f"RS_{output.sop_instance_uid}.dcm"
    received = _wait_files(tps, 1)
    rs = pydicom.dcmread(received[0])
    assert rs.SOPInstanceUID == output.sop_instance_uid
    series = load_series(sorted(Path(job.spool_dir).glob("*.dcm")))
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in rs.ReferencedFrameOfReferenceSequence[0]
        .RTReferencedStudySequence[0]
        .RTReferencedSeriesSequence[0]
        .ContourImageSequence
    }
    assert referenced == set(series.volume.sop_instance_uids)


def test_rerun_of_finished_job_is_a_no_op_and_resend_skips_delivered_destination(
    settings: Settings, tmp_path: Path, tps: StoreScp, model: ThresholdModel
) -> None:
    settings = settings.model_copy(update={"destinations": [_dest(tps)]})
    runtime = _runtime(settings, model, [])
    job_id = _submit(settings, runtime.store, tmp_path)
    execute_job(job_id, runtime)
    assert execute_job(job_id, runtime).state == "skipped"  # duplicate message
    assert model.calls == 1
    # Its worker died after sending but before recording done: the re-run sends nothing twice.
    store = runtime.store
    first_uid = store.output(job_id, "RTSTRUCT").sop_instance_uid
    store._update(job_id, state="running", lease_expires_at=None, finished_at=None)
    assert execute_job(job_id, runtime).state == "done"
    assert model.calls == 2
    again = store.get(job_id)
    assert store.output(job_id, "RTSTRUCT").sop_instance_uid == first_uid  # deterministic
    assert again.sent_destinations == [f"{tps.destination}|{first_uid}"]
    _wait_files(tps, 1)
    time.sleep(0.5)
    assert len(tps.received()) == 1


def test_invalid_series_fails_with_reason_without_retry(
    settings: Settings, tmp_path: Path, model: ThresholdModel
) -> None:
    settings = settings.model_copy(update={"min_slices": 30})
    runtime = _runtime(settings, model, [])
    job_id = _submit(settings, runtime.store, tmp_path, shape=(12, 32, 32))
    assert execute_job(job_id, runtime).state == "failed"
    job = runtime.store.get(job_id)
    assert job.attempts == 1 and "slice" in job.failure_reason.lower()
    assert job.failure_kind == "incomplete"  # too few slices: late slices complete it
    assert model.calls == 0


def test_destination_down_retries_with_backoff_then_send_failed_file_kept(
    settings: Settings, tmp_path: Path, model: ThresholdModel
) -> None:
    from tests.conftest import free_port

    down = f"TPS@127.0.0.1:{free_port()}"
    settings = settings.model_copy(
        update={"destinations": [_parse(down)], "send_attempts": 3, "send_backoff_s": 0.5}
    )
    sleeps: list[float] = []
    runtime = _runtime(settings, model, sleeps)
    job_id = _submit(settings, runtime.store, tmp_path)
    assert execute_job(job_id, runtime).state == "send_failed"
    job = runtime.store.get(job_id)
    assert sleeps == [0.5, 1.0]
    assert down in job.failure_reason and "3 attempts" in job.failure_reason
    assert job.failure_kind == "send"
    assert Path(runtime.store.output(job_id, "RTSTRUCT").path).is_file()
    assert job.sent_destinations == []


def test_retried_send_failed_job_sends_its_archived_rtstruct_without_contouring_again(
    settings: Settings, tmp_path: Path, model: ThresholdModel
) -> None:
    from tests.conftest import free_port

    port = free_port()
    settings = settings.model_copy(update={
        "destinations": [_parse(f"TPS@127.0.0.1:{port}")], "send_attempts": 1})
    runtime = _runtime(settings, model, [])
    job_id = _submit(settings, runtime.store, tmp_path)
    assert execute_job(job_id, runtime).state == "send_failed"
    archived = runtime.store.output(job_id, "RTSTRUCT")
    assert model.calls == 1
    tps = StoreScp(tmp_path / "tps", port=port).start()  # the TPS is back
    try:
        job = runtime.store.requeue_finished(job_id, reason="retry requested by admin")
        assert job.resend_only
        resent = runtime.store.create_or_merge_for_series(  # the series sent meanwhile
            series_instance_uid=job.series_instance_uid)
        assert resent.created  # its own job: nothing merges into a resend
        assert execute_job(job_id, runtime).state == "done"
        (received,) = wait_until(tps.received, 10, "the RTSTRUCT at the TPS")
    finally:
        tps.stop()
    assert model.calls == 1  # not contoured again: the archived file went
    assert pydicom.dcmread(received).SOPInstanceUID == archived.sop_instance_uid
    assert runtime.store.get(job_id).attempts == 1


def test_unexpected_error_requeues_until_attempts_exhausted(
    settings: Settings, tmp_path: Path
) -> None:
    class Broken(ThresholdModel):
        def predict(self, hu, spacing_mm):  # type: ignore[no-untyped-def]
            raise RuntimeError("onnxruntime exploded")

    settings = settings.model_copy(update={"job_attempts": 2})
    runtime = _runtime(settings, Broken(), [])
    job_id = _submit(settings, runtime.store, tmp_path)
    first = execute_job(job_id, runtime)
    assert first.state == "queued" and first.retry_in_s is not None
    assert "onnxruntime exploded" in runtime.store.get(job_id).failure_reason
    assert execute_job(job_id, runtime).state == "failed"
    job = runtime.store.get(job_id)
    assert job.attempts == 2 and job.failure_reason.startswith("Failed after 2 attempts")


def test_instances_merged_while_running_restart_the_pipeline(
    settings: Settings, tmp_path: Path
) -> None:
    store_holder: list[JobStore] = []
    job_holder: list[str] = []

    class MergingModel(ThresholdModel):
        """Simulates a re-send arriving during inference (the intake bumps the generation)."""

        def predict(self, hu, spacing_mm):  # type: ignore[no-untyped-def]
            if self.calls == 0:
                job = store_holder[0].get(job_holder[0])
                store_holder[0].create_or_merge_for_series(
                    series_instance_uid=job.series_instance_uid
                )
            return super().predict(hu, spacing_mm)

    model = MergingModel()
    runtime = _runtime(settings, model, [])
    store_holder.append(runtime.store)
    job_id = _submit(settings, runtime.store, tmp_path)
    job_holder.append(job_id)
    assert execute_job(job_id, runtime).state == "done"
    assert model.calls == 2
    assert runtime.store.get(job_id).generation == 1


def test_recovery_reenqueues_jobs_whose_worker_died(
    settings: Settings, tmp_path: Path, model: ThresholdModel
) -> None:
    settings = settings.model_copy(update={"job_lease_s": 2.0})
    runtime = _runtime(settings, model, [])
    job_id = _submit(settings, runtime.store, tmp_path)
    # A worker claims the job and dies (no heartbeat any more).
    assert runtime.store.claim(job_id, "dead-worker", lease_s=0.5) is not None
    enqueued: list[str] = []
    assert recover_jobs(runtime.store, enqueued.append, older_than_s=60) == 0
    time.sleep(0.7)
    assert recover_jobs(runtime.store, enqueued.append, older_than_s=60) == 1
    assert enqueued == [job_id]
    assert execute_job(job_id, runtime).state == "done"
    job = runtime.store.get(job_id)
    assert job.attempts == 2 and job.workers_lost == 1  # the lost run spent no attempt


def test_a_lost_worker_does_not_spend_an_attempt_but_losing_it_every_time_fails_the_job(
    settings: Settings, tmp_path: Path, model: ThresholdModel
) -> None:
    settings = settings.model_copy(update={"job_attempts": 2})
    runtime = _runtime(settings, model, [])
    job_id = _submit(settings, runtime.store, tmp_path)
    # One run ends in an error (an attempt spent), then a worker is lost once: one left.
    assert runtime.store.claim(job_id, "w1", lease_s=60) is not None
    runtime.store.transition(job_id, JobState.QUEUED, reason="Attempt 1 failed: boom")
    assert runtime.store.claim(job_id, "dead-worker", lease_s=0.0) is not None
    assert execute_job(job_id, runtime).state == "done"

    lost_every_time = _submit(settings, runtime.store, tmp_path / "second")
    for _ in range(2):
        assert runtime.store.claim(lost_every_time, "dead-worker", lease_s=0.0) is not None
    job = runtime.store.get(lost_every_time)
    assert job.workers_lost == 1
    outcome = execute_job(lost_every_time, runtime)
    job = runtime.store.get(lost_every_time)
    assert outcome.state == "failed" and job.workers_lost == 2
    assert job.failure_reason.startswith("Gave up: the worker running it was lost 2 times")


def _dest(peer: StoreScp):  # type: ignore[no-untyped-def]
    return _parse(peer.destination)


def _parse(text: str):  # type: ignore[no-untyped-def]
    from rtcontour.common.settings import Destination

    return Destination.parse(text)


def _wait_files(peer: StoreScp, n: int, timeout_s: float = 10) -> list[Path]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        files = peer.received()
        if len(files) >= n:
            return files
        time.sleep(0.1)
    raise AssertionError(f"storescp received {len(peer.received())} files, expected {n}")


def test_instances_merged_while_sending_rebuild_and_resend(
    settings: Settings, tmp_path: Path, tps: StoreScp, model: ThresholdModel
) -> None:
    from rtcontour.worker.sender import Sender as RealSender

    settings = settings.model_copy(update={"destinations": [_dest(tps)]})
    holder: dict[str, object] = {}

    class MergingSender(RealSender):
        """The series is re-sent by the TPS while the first RTSTRUCT goes out."""

        def send_file(self, path, destination):  # type: ignore[no-untyped-def]
            super().send_file(path, destination)
            if not holder.get("merged"):
                holder["merged"] = True
                store = holder["store"]
                job = store.get(holder["job_id"])  # type: ignore[attr-defined]
                store.create_or_merge_for_series(  # type: ignore[attr-defined]
                    series_instance_uid=job.series_instance_uid
                )

    engine = make_engine(settings)
    create_schema(engine)
    runtime = WorkerRuntime(
        settings,
        store=JobStore(engine),
        model_cache=SegmenterCache(loader=lambda *_: model, resolver=lambda *_: Path("test")),
        sender=MergingSender(settings),
    )
    job_id = _submit(settings, runtime.store, tmp_path)
    holder.update(store=runtime.store, job_id=job_id)
    assert execute_job(job_id, runtime).state == "done"
    assert model.calls == 2
    assert len(runtime.store.get(job_id).sent_destinations) == 1
    wait = time.monotonic() + 10
    while len(tps.received()) < 1 and time.monotonic() < wait:
        time.sleep(0.1)
    time.sleep(0.5)
    # storescp names files by SOP Instance UID: the second delivery replaced the first
    assert len(tps.received()) == 1


def test_a_run_whose_job_was_taken_over_cannot_overwrite_the_new_runs_state(
    settings: Settings, tmp_path: Path, model: ThresholdModel
) -> None:
    """Worker A stalls past its lease, B takes the job over; A's late DestinationUnavailable
    must not end B's job as send_failed (B then delivered, with its records cleared)."""
    down = StoreScp(tmp_path / "down")  # never started: every association is refused
    settings = settings.model_copy(update={
        "destinations": [_parse(down.destination)], "send_attempts": 1, "send_backoff_s": 0.1})
    stalled = _runtime(settings, model, [])
    job_id = _submit(settings, stalled.store, tmp_path)

    def takeover() -> None:  # A's lease ran out (say its database link stalled); B claims
        stalled.store._update(job_id, lease_expires_at=utcnow() - dt.timedelta(seconds=1))
        assert stalled.store.claim(job_id, "worker B", lease_s=60) is not None

    original_send = stalled.sender.send_file
    stalled.sender.send_file = (  # type: ignore[method-assign]
        lambda path, destination: (takeover(), original_send(path, destination))[1])
    outcome = execute_job(job_id, stalled)
    job = stalled.store.get(job_id)
    assert outcome.state == "lost"
    assert (job.state, job.worker) == ("running", "worker B")
