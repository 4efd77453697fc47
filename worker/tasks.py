"""The Celery task of rtcontour and the job runner behind it (the Celery edge).

``rtcontour.run_job(job_id)`` takes a job id, never data. It is idempotent: it first
*claims* the job in the job store (``JobStore.claim``), so a duplicate message, a message
redelivered after the job finished, or a re-enqueue by the recovery sweep does nothing; the
RTSTRUCT UIDs are deterministic (``worker.rtstruct.rtstruct_uids``) and the sender skips a
destination that already acknowledged the instance. It never waits on another task.

Domain errors become job states here, once:

- ``InvalidSeries`` / ``ModelPackageError`` -> ``failed`` with the reason (no retry); the
  job's ``failure_kind`` says whose fault: ``input`` (``InvalidSeries``; ``incomplete`` for an
  ``IncompleteSeries``: the API refuses to retry either) or ``processing``;
- ``DestinationUnavailable`` (after the sender's own retries) -> ``send_failed``, the
  RTSTRUCT stays archived and downloadable;
- anything else (including the soft time limit) -> back to ``queued`` and re-published
  with backoff, until ``job_attempts`` attempts were made, then ``failed`` with the reason.

A worker killed mid-job leaves the job ``running`` with a lease that stops being renewed;
once it expires the recovery sweep (``recover_jobs``, run at worker start and every
``recovery_interval_s``) re-enqueues it. Such a run does not spend one of ``job_attempts``
(the job did nothing wrong that we know of); it counts in ``Job.workers_lost``, and a job
whose worker was lost ``job_attempts`` times fails with that reason (a series that kills its
worker, by memory say, must not do so forever).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded

from rtcontour.common.audit import make_recorder
from rtcontour.common.db import make_engine
from rtcontour.common.errors import (
    DestinationUnavailable,
    IncompleteSeries,
    InvalidSeries,
    ModelPackageError,
    RtcontourError,
)
from rtcontour.common.jobstore import FailureKind, IllegalTransition, Job, JobState, JobStore
from rtcontour.common.notify import notify_job
from rtcontour.common.queue import RUN_JOB_TASK
from rtcontour.common.routes import load_routing
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings
from rtcontour.common.structure_names import NameMappingFile
from rtcontour.models.dose.predict import DosePredictor
from rtcontour.worker.dose_pipeline import (
    DosePredictorCache,
    LoadStructureSet,
    MeasureEdits,
    PredictDose,
    RtdoseWriter,
)
from rtcontour.worker.pipeline import (
    Archive,
    BuildOutputs,
    JobContext,
    Segment,
    SegmentationModel,
    SegmenterCache,
    Send,
    SendArchived,
    Step,
    default_steps,
    run_steps,
)
from rtcontour.worker.retention import purge_expired
from rtcontour.worker.sender import Sender
from rtcontour.worker.site_training import (
    KeepForTraining,
    MeasureShadow,
    ShadowSegment,
    purge_site_dataset,
    register_finetune_task,
)

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

JOB_SENT_EVENT = "job.sent"
MAX_RESTARTS = 3  # pipeline restarts of one attempt because instances were merged in
RETRY_BACKOFF_S = 5.0
PURGE_INTERVAL_S = 3600.0  # how often the retention policy runs (it is measured in days)
INTAKE_GRACE_S = 300.0  # beyond the quiet period: a received job waits this long for its intake


class LostClaim(Exception):  # noqa: N818 - a signal, not an error
    """The job's lease was taken by another worker: stop without touching its state."""


class SeriesChanged(Exception):  # noqa: N818
    """Instances were merged into the running job: run the pipeline again from loading."""


@dataclass(frozen=True)
class Outcome:
    """What one execution of a job did: its state after, and a retry delay if re-queued."""

    state: str
    retry_in_s: float | None = None


class WorkerRuntime:
    """What a worker process keeps between jobs: the store, the sender, the loaded model.

    Built lazily in each process (after the pool forks), never at import.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: JobStore | None = None,
        model_cache: SegmenterCache | None = None,
        sender: Sender | None = None,
        steps_factory: Callable[[WorkerRuntime], list[Step]] | None = None,
        dose_predictors: DosePredictorCache | None = None,
    ) -> None:
        self.settings = settings
        if store is None:
            engine = make_engine(settings)
            create_schema(engine)
            store = JobStore(engine)
        self.store = store
        self.model_cache = model_cache if model_cache is not None else SegmenterCache()
        self.sender = sender or Sender(settings)
        self._steps_factory = steps_factory
        self.dose_predictors = dose_predictors if dose_predictors is not None else (
            DosePredictorCache())
        # the Celery node that runs this pool process (set by ``rtcontour worker``), and its pid
        node = os.environ.get("RTCONTOUR_WORKER_NODE") or socket.gethostname()
        self.worker_name = f"{node} pid {os.getpid()}"
        self._audit = _make_audit(store)
        self._name_mapping: NameMappingFile | None = None  # built at the first dose job

    def model(self, request: str | None = None) -> SegmentationModel:
        """The model a job's route asked for (None: the default package), loaded once."""
        return self.model_cache.get(self.settings, request)

    def warm_up(self) -> None:
        """Load every contour model the routes may ask for (the default package for a route
        without ``model``) and run each network once, so no job pays for either. A model that
        fails is logged and left to the job that asks for it (which fails with the reason)."""
        try:
            routing = load_routing(self.settings)
        except RtcontourError:
            logger.exception("model warm-up skipped: the routes cannot be read")
            return
        requests = {route.model for route in routing.routes if route.action == "contour"}
        for request in sorted(requests, key=lambda name: name or ""):
            try:
                self.model_cache.warm(self.settings, request)
            except Exception:
                logger.exception("model warm-up of %s failed; the first job loads it",
                                 request or "the default package")

    def structure_names(self) -> dict[str, str] | None:
        """The clinic's structure name mapping (RTCONTOUR_STRUCTURE_NAMES_FILE), if any: read
        once per process, and again when the file changes."""
        path = self.settings.structure_names_file
        if path is None:
            return None
        if self._name_mapping is None or self._name_mapping.path != Path(path):
            self._name_mapping = NameMappingFile(path)
        return self._name_mapping.mapping()

    def qa_absent_means_deleted(self, ctx: JobContext) -> bool:
        """Whether the structure set's route says an organ its approved set lacks was deleted
        (``qa_absent: deleted``) rather than not in the approved set (the default)."""
        name = self.store.get(ctx.job_id).route_name
        if name is None or self.settings.routes_file is None:
            return False
        route = load_routing(self.settings).route(name)
        return route is not None and route.qa_absent == "deleted"

    def dose_predictor(self, request: str | None = None) -> DosePredictor:
        """The dose model a structure set's route asked for (None: the newest dose package)."""
        return self.dose_predictors.get(self.settings, request)

    def steps(self, kind: str | None = "contour") -> list[Step]:
        """The pipeline of a job of ``kind`` ("contour", or "dose" for a structure set)."""
        if self._steps_factory is not None:
            return self._steps_factory(self)
        if kind == "dose":
            return [
                LoadStructureSet(),
                MeasureEdits(self.structure_names, self.qa_absent_means_deleted),
                MeasureShadow(self.structure_names, self.qa_absent_means_deleted),
                KeepForTraining(self.structure_names),
                PredictDose(self.dose_predictor, lambda ctx: ctx.prescriptions_gy,
                            normalise=self.settings.dose_normalise),
                BuildOutputs([RtdoseWriter()]),
                Archive(),
                Send(self.sender, self._record_sent),
            ]
        steps = default_steps(self.model, self.sender, on_sent=self._record_sent)
        # the route's shadow package right after the active one (never sent)
        at = next(i for i, step in enumerate(steps) if isinstance(step, Segment)) + 1
        steps.insert(at, ShadowSegment(self.model))
        return steps

    def _record_sent(self, job_id: str, destination: str, sop_instance_uid: str) -> None:
        if self._audit is not None:
            self._audit(
                JOB_SENT_EVENT,
                {
                    "actor": "worker",
                    "job_id": job_id,
                    "destination": destination,
                    "sop_instance_uid": sop_instance_uid,
                },
            )


def _make_audit(store: JobStore) -> Callable[[str, dict[str, Any]], None]:
    return make_recorder(store.engine, actor="worker")


class _Heartbeat:
    """Renews the job's lease every third of it in a thread; notes when the claim is lost."""

    def __init__(self, store: JobStore, job_id: str, worker: str, lease_s: float) -> None:
        self.store, self.job_id, self.worker, self.lease_s = store, job_id, worker, lease_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.store.heartbeat(self.job_id, self.worker, self.lease_s):
                    self.lost = True
                    logger.warning("job %s: lease lost by %s", self.job_id, self.worker)
                    return
            except Exception:
                logger.exception("job %s: heartbeat failed (will retry)", self.job_id)


def execute_job(job_id: str, runtime: WorkerRuntime) -> Outcome:
    """Claim and run one job; map domain errors to its final state (see module docstring)."""
    settings, store = runtime.settings, runtime.store
    job = store.claim(job_id, runtime.worker_name, settings.job_lease_s)
    if job is None:
        logger.info("job %s: not claimable (finished or running elsewhere); skipped", job_id)
        return Outcome("skipped")
    lost = job.workers_lost or 0
    failed_runs = job.attempts - 1 - lost  # runs before this one that ended in an error
    if lost:
        logger.warning("job %s: %d run(s) so far lost their worker (the job fails at %d)",
                       job_id, lost, settings.job_attempts)
    if lost >= settings.job_attempts or failed_runs >= settings.job_attempts:
        reason = (
            f"Gave up: the worker running it was lost {lost} times (killed, out of memory, "
            "or its host went away); see the worker logs."
            if lost >= settings.job_attempts
            else f"Gave up after {settings.job_attempts} attempts "
                 f"(last: {job.failure_reason or 'unknown'})."
        )
        return _finish(runtime, job_id, JobState.FAILED, reason)
    logger.info("job %s: attempt %d on %s", job_id, failed_runs + 1, runtime.worker_name)
    with _Heartbeat(store, job_id, runtime.worker_name, settings.job_lease_s) as heartbeat:
        try:
            held = _run_pipeline(job_id, job.generation, runtime, heartbeat)
        except LostClaim:
            logger.warning("job %s: another worker took it over; this run stops", job_id)
            return Outcome("lost")
        except IncompleteSeries as exc:  # late instances of the series are merged with it
            return _finish(runtime, job_id, JobState.FAILED, str(exc), FailureKind.INCOMPLETE)
        except InvalidSeries as exc:  # the input is wrong: no retry offered
            return _finish(runtime, job_id, JobState.FAILED, str(exc), FailureKind.INPUT)
        except ModelPackageError as exc:
            return _finish(runtime, job_id, JobState.FAILED, f"Model package problem: {exc}")
        except DestinationUnavailable as exc:
            return _finish(runtime, job_id, JobState.SEND_FAILED, str(exc))
        except SoftTimeLimitExceeded:
            reason = f"The job exceeded its time limit of {settings.job_time_limit_s} s."
            return _retry_or_fail(runtime, job_id, failed_runs + 1, reason)
        except Exception as exc:
            logger.exception("job %s: attempt %d failed", job_id, failed_runs + 1)
            reason = f"Unexpected error: {type(exc).__name__}: {exc}"
            return _retry_or_fail(runtime, job_id, failed_runs + 1, reason)
        if held:
            logger.info("job %s awaits a clinician's review; nothing sent yet", job_id)
            _notify(runtime, job_id, JobState.AWAITING_REVIEW, "awaits a clinician's review")
            return Outcome(JobState.AWAITING_REVIEW.value)
        logger.info("job %s done", job_id)
        return Outcome(JobState.DONE.value)


def _review_steps(job: Job, runtime: WorkerRuntime) -> tuple[list[Step], bool]:
    """(steps, hold): the job's pipeline as its review state wants it. Held for review: every
    step but Send, then awaiting_review; approved (or a retried send_failed job): only Send,
    of the archived outputs."""
    steps = runtime.steps(job.kind)
    sends = [step for step in steps if isinstance(step, Send)]
    if job.resend_only:  # a retried send_failed job: its archived outputs, as they were
        return [SendArchived(), *sends], False
    if not job.review_required:
        return steps, False
    if job.review_decision == "approved":
        return [SendArchived(), *sends], False
    return [step for step in steps if not isinstance(step, Send)], True


def _run_pipeline(
    job_id: str, generation: int, runtime: WorkerRuntime, heartbeat: _Heartbeat
) -> bool:
    """Run the job's pipeline; True if it now awaits review (nothing sent)."""
    store = runtime.store
    for _ in range(MAX_RESTARTS + 1):
        job = store.get(job_id)
        ctx = JobContext(
            job_id=job_id,
            settings=runtime.settings,
            store=store,
            spool_dir=_spool_dir(runtime.settings, job.spool_dir, job_id),
            generation=job.generation,
            model_request=job.model_request,
            route_destinations=job.destinations,
            requested_outputs=job.requested_outputs,
            prescriptions_gy=job.prescriptions_gy,
        )

        def before_step(step: Step, ctx: JobContext = ctx) -> None:
            if heartbeat.lost:
                raise LostClaim(job_id)
            if isinstance(step, Archive) and store.get(job_id).generation != ctx.generation:
                raise SeriesChanged(job_id)

        steps, hold = _review_steps(job, runtime)
        try:
            run_steps(ctx, steps, before_step)
            if heartbeat.lost:
                raise LostClaim(job_id)
            if hold and store.hold_for_review(job_id, runtime.worker_name, ctx.generation):
                return True
            if not hold and store.complete_if_unchanged(job_id, runtime.worker_name,
                                                        ctx.generation):
                return False
            current = store.get(job_id)
            if current.worker != runtime.worker_name or current.state != JobState.RUNNING:
                raise LostClaim(job_id)
            # Merged while sending: the RTSTRUCT (same UID) is rebuilt and sent again.
            store.forget_sent(job_id)
            raise SeriesChanged(job_id)
        except SeriesChanged:
            logger.info("job %s: instances were merged in while running; restarting", job_id)
    raise InvalidSeries(
        f"The series kept changing while it was contoured ({MAX_RESTARTS} restarts); "
        "send it again once complete."
    )


def _spool_dir(settings: Settings, spool_dir: str | None, job_id: str) -> Path:
    return Path(spool_dir) if spool_dir else settings.spool_dir / "jobs" / job_id


def _end_own_run(runtime: WorkerRuntime, job_id: str, state: JobState, reason: str,
                 failure_kind: FailureKind | None = None) -> bool:
    """Move this worker's running job to ``state``; False (logged) if another worker took it
    over meanwhile (its lease expired), so a stale run never overwrites the current one."""
    try:
        runtime.store.transition(job_id, state, reason=reason, worker=runtime.worker_name,
                                 failure_kind=failure_kind)
    except IllegalTransition as error:
        logger.warning("job %s: %s", job_id, error)
        return False
    return True


def _finish(runtime: WorkerRuntime, job_id: str, state: JobState, reason: str,
            failure_kind: FailureKind | None = None) -> Outcome:
    """End this worker's run in ``state``; a failure is of ``failure_kind`` (default: ours,
    processing; send_failed: send)."""
    if not _end_own_run(runtime, job_id, state, reason, failure_kind):
        return Outcome("lost")
    logger.warning("job %s %s: %s", job_id, state.value, reason)
    if state in (JobState.FAILED, JobState.SEND_FAILED):
        _notify(runtime, job_id, state, reason)
    return Outcome(state.value)


def _notify(runtime: WorkerRuntime, job_id: str, state: JobState, reason: str) -> None:
    """Queue the webhooks of this job's end (``common.notify``; delivered by another thread)."""
    try:
        job = runtime.store.get(job_id)
    except Exception:
        logger.exception("job %s: not notified (job unreadable)", job_id)
        return
    notify_job(runtime.settings, runtime.store.engine, job, f"job.{state.value}", reason)


def _retry_or_fail(runtime: WorkerRuntime, job_id: str, attempts: int, reason: str) -> Outcome:
    if attempts >= runtime.settings.job_attempts:
        return _finish(
            runtime, job_id, JobState.FAILED, f"Failed after {attempts} attempts: {reason}"
        )
    if not _end_own_run(runtime, job_id, JobState.QUEUED, f"Attempt {attempts} failed: {reason}"):
        return Outcome("lost")
    delay = RETRY_BACKOFF_S * 2 ** (attempts - 1)
    logger.warning(
        "job %s: attempt %d failed, retry in %.0f s: %s", job_id, attempts, delay, reason
    )
    return Outcome(JobState.QUEUED.value, retry_in_s=delay)


# -- the sweep that makes the broker disposable ---------------------------------------------
def recover_jobs(
    store: JobStore,
    enqueue: Callable[[str], None],
    older_than_s: float,
    waiting_messages: int | None = None,
    received_older_than_s: float | None = None,
) -> int:
    """Re-enqueue jobs whose message may be lost; return how many.

    Running jobs whose lease expired (their worker died) always; queued jobs untouched for
    ``older_than_s`` (received ones: ``received_older_than_s``, see ``JobStore.waiting_jobs``)
    unless the broker still holds at least as many waiting messages as there are such jobs
    (``waiting_messages``; None: unknown, re-enqueue). Duplicates are harmless (the claim
    makes them no-ops); this only keeps them rare.
    """
    waiting = store.waiting_jobs(
        older_than_s=older_than_s, received_older_than_s=received_older_than_s
    )
    if waiting_messages is not None and waiting_messages >= len(waiting):
        waiting = []
    job_ids = waiting + store.orphaned_jobs()
    for job_id in job_ids:
        try:
            enqueue(job_id)
            store.touch(job_id)
        except Exception:
            logger.exception("recovery: job %s could not be enqueued (broker down?)", job_id)
            return 0
    if job_ids:
        logger.info("recovery: re-enqueued %d job(s): %s", len(job_ids), ", ".join(job_ids))
    return len(job_ids)


class RecoverySweeper:
    """Runs ``recover_jobs`` now and every ``settings.recovery_interval_s`` in a thread, and
    the retention policy (``worker.retention.purge_expired``) now and every hour.

    ``queue_depth()`` returns the messages waiting in the broker (None if unknown).
    """

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        enqueue: Callable[[str], None],
        queue_depth: Callable[[], int | None] | None = None,
    ) -> None:
        self.settings, self.store, self.enqueue = settings, store, enqueue
        self.queue_depth = queue_depth or (lambda: None)
        # A job left "received" by a listener killed mid-intake is finished by the restarted
        # listener after its quiet period: run it with what it has only well after that.
        self._intake_grace_s = 2 * settings.quiet_period_s + INTAKE_GRACE_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recovery-sweep", daemon=True)

    def start(self) -> RecoverySweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        older_than_s = 0.0  # at start every received/queued job may have lost its message
        next_purge = time.monotonic()
        while not self._stop.is_set():
            try:
                depth = self.queue_depth()
                recover_jobs(self.store, self.enqueue, older_than_s, waiting_messages=depth,
                             received_older_than_s=max(older_than_s, self._intake_grace_s))
            except Exception:
                logger.exception("recovery sweep failed (will retry)")
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + PURGE_INTERVAL_S
                try:
                    purge_expired(self.settings, self.store)
                    purge_site_dataset(self.settings)
                except Exception:
                    logger.exception("retention sweep failed (will retry)")
            older_than_s = self.settings.recovery_interval_s
            self._stop.wait(self.settings.recovery_interval_s)


# -- Celery registration ----------------------------------------------------------------------
_runtimes: dict[int, WorkerRuntime] = {}  # one per process, keyed by pid (pool children fork)
_runtimes_lock = threading.Lock()  # the warm-up thread and the first task may both ask


def runtime_for(settings: Settings) -> WorkerRuntime:
    """The process's ``WorkerRuntime`` (built on first use in each process)."""
    pid = os.getpid()
    with _runtimes_lock:
        if pid not in _runtimes:
            _runtimes.clear()
            _runtimes[pid] = WorkerRuntime(settings)
        return _runtimes[pid]


def warm_up_in_background(settings: Settings) -> threading.Thread:
    """Build this process's runtime and make its models resident and warm
    (``WorkerRuntime.warm_up``) in a thread; a job arriving meanwhile waits for the model."""

    def warm() -> None:
        try:
            runtime_for(settings).warm_up()
        except Exception:
            logger.exception("worker warm-up failed; jobs load what they need")

    thread = threading.Thread(target=warm, name="model-warm-up", daemon=True)
    thread.start()
    return thread


def register_tasks(app: Celery, settings: Settings) -> None:
    """Define ``rtcontour.run_job`` on ``app`` for ``settings``."""
    soft_limit = max(5, settings.job_time_limit_s - max(5, settings.job_time_limit_s // 20))

    @app.task(
        name=RUN_JOB_TASK,
        shared=False,  # this app's task only: another app's settings must not leak in
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        time_limit=settings.job_time_limit_s,
        soft_time_limit=soft_limit,
    )
    def run_job(self: Any, job_id: str) -> str:
        outcome = execute_job(job_id, runtime_for(settings))
        if outcome.retry_in_s is not None:
            self.app.send_task(
                RUN_JOB_TASK, args=[job_id], countdown=outcome.retry_in_s, ignore_result=True
            )
        return outcome.state

    register_finetune_task(app, settings)
