"""The job store: one row per contouring job, the source of truth for the queue.

The broker only rings the doorbell; everything needed to (re)run a job lives here, so a lost
message (broker restarted, worker killed) is repaired by ``JobStore.recoverable_jobs`` and a
re-enqueue, and a duplicate message is harmless because ``JobStore.claim`` lets one worker
run a job at a time.

States and the moves between them (anything else raises ``IllegalTransition``)::

    received -> queued -> running -> done | failed | send_failed
    received -> ignored                   (no route contours the series; nothing is sent)
    running -> awaiting_review            (the route wants a clinician's approval first)
    awaiting_review -> queued | rejected  (approved: sent by the next run; rejected: never)
    running  -> queued                    (retry after an error or a lost worker)
    received | queued -> failed           (refused before it ran)
    send_failed -> queued                 (re-send requested)
    failed | send_failed -> queued        (``requeue_finished``: a user's retry, fresh attempts)

A series re-sent while its job is received/queued/running merges into that job (see
``create_or_merge_for_series``); at most one active job per series is enforced by a unique
column (``active_series_uid``), so two listeners racing cannot create two.
"""

from __future__ import annotations

import builtins
import datetime as dt
import enum
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    case,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from rtcontour.common.db import Base, UtcDateTime, make_engine, utcnow
from rtcontour.common.errors import RtcontourError

__all__ = [
    "ACTIVE_STATES",
    "OUTPUT_FILE_PREFIXES",
    "FINISHED_STATES",
    "INPUT_FAILURES",
    "RETRY_REFUSED_INPUT",
    "STAGES",
    "FailureKind",
    "IllegalTransition",
    "Job",
    "JobFilter",
    "JobNotFound",
    "JobOutput",
    "JobState",
    "JobStore",
    "MergeResult",
    "make_engine",
]


class JobState(enum.StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SEND_FAILED = "send_failed"
    AWAITING_REVIEW = "awaiting_review"  # its route holds results until a clinician approves
    REJECTED = "rejected"  # a clinician rejected the results: never sent
    IGNORED = "ignored"  # no route contours it: kept visible with the reason, nothing sent


ACTIVE_STATES = frozenset({JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING})
FINISHED_STATES = frozenset(
    {JobState.DONE, JobState.FAILED, JobState.SEND_FAILED, JobState.IGNORED, JobState.REJECTED}
)

_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.RECEIVED: frozenset(
        {JobState.QUEUED, JobState.RUNNING, JobState.FAILED, JobState.IGNORED}
    ),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED}),
    JobState.RUNNING: frozenset(
        {JobState.DONE, JobState.FAILED, JobState.SEND_FAILED, JobState.QUEUED,
         JobState.AWAITING_REVIEW}
    ),
    JobState.AWAITING_REVIEW: frozenset({JobState.QUEUED, JobState.REJECTED}),
    JobState.REJECTED: frozenset(),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.SEND_FAILED: frozenset({JobState.QUEUED}),
    JobState.IGNORED: frozenset(),
}

# Why a job failed for its input cannot be retried (the same instances fail the same way).
RETRY_REFUSED_INPUT = (
    "job {job_id} cannot be retried: it failed because the series itself is wrong (see its "
    "reason), so running it again fails again; send the whole series again from the planning "
    "system"
)

# Stages the worker times (each in ``jobs.<stage>_s``; see ``common.timings`` for all of them).
STAGES = ("load", "model_load", "preprocess", "inference", "postprocess", "contours", "archive",
          "send")

# File name prefixes of archived and downloaded outputs by kind (DICOM's customary RS_/RD_),
# else the kind itself.
OUTPUT_FILE_PREFIXES = {"RTSTRUCT": "RS", "RTDOSE": "RD", "SEG": "SEG"}


class FailureKind(enum.StrEnum):
    """Why a job failed (``Job.failure_kind``): whether retrying it can help."""

    INPUT = "input"  # the series itself is wrong: send it again (never retried)
    INCOMPLETE = "incomplete"  # input missing instances: a late instance completes it
    PROCESSING = "processing"  # our side (model package, unexpected error): retry may help
    SEND = "send"  # the destinations: retry sends the archived outputs


# Failures of the input: a retry runs the same instances again and fails again.
INPUT_FAILURES = frozenset({FailureKind.INPUT.value, FailureKind.INCOMPLETE.value})


class IllegalTransition(RtcontourError):  # noqa: N818 - domain name, like InvalidSeries
    """A job state change the state machine does not allow (e.g. done -> running)."""


class JobNotFound(RtcontourError):  # noqa: N818
    """No job has the given id."""


class Job(Base):
    """One contouring job of one CT series (see docs/ARCHITECTURE.md, job store contract)."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    # Equal to series_instance_uid while the job is active, NULL once finished: unique, so a
    # series has at most one active job whatever races between listeners.
    active_series_uid: Mapped[str | None] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="", index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=JobState.RECEIVED.value, index=True)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    # Why a failed or send_failed job failed (``FailureKind``; NULL: not failed, or a job of
    # an earlier release): "input" (the series itself is wrong: a retry fails again, the
    # series must be sent again), "incomplete" (input lacking instances: a missing slice or
    # too few slices; the series' late instances are merged with it, see service.intake),
    # "processing" (our side: model package, errors, lost workers) or "send".
    failure_kind: Mapped[str | None] = mapped_column(String(16))
    model_name: Mapped[str | None] = mapped_column(String(64), index=True)
    model_version: Mapped[str | None] = mapped_column(String(32))
    # What the routing rules (``common.routes``) decided at intake: the route that took the
    # series (None: no route matched), the model it asked for ("name" or "name-version"; None:
    # the newest package) and its destinations ("AE@host:port"; None: RTCONTOUR_DESTINATIONS).
    route_name: Mapped[str | None] = mapped_column(String(64), index=True)
    model_request: Mapped[str | None] = mapped_column(String(96))
    destinations: Mapped[list[str] | None] = mapped_column(JSON)
    # The output kinds its route asked for ("RTSTRUCT", "SEG"; None: the RTSTRUCT alone).
    requested_outputs: Mapped[list[str] | None] = mapped_column(JSON)
    # Why a series was not contoured (state ignored), e.g. "route pelvis: ignore".
    ignored_reason: Mapped[str | None] = mapped_column(Text)
    # What the job does: "contour" (a CT series in, an RTSTRUCT out; NULL in databases of
    # earlier releases means the same) or "dose" (a structure set in, a predicted RTDOSE out).
    kind: Mapped[str | None] = mapped_column(String(16), default="contour", index=True)
    # A dose job: the job holding the CT its structure set references (found by the worker),
    # and its route's prescriptions by PTV name (Gy), overriding those read from the names.
    source_job_id: Mapped[str | None] = mapped_column(String(32))
    prescriptions_gy: Mapped[dict[str, float] | None] = mapped_column(JSON)
    # A contour job: what the clinicians changed in its contours, measured when their approved
    # structure set arrived (see worker.qa; JSON contract in docs/ARCHITECTURE.md).
    qa: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Sentences about how the job went that are not failures (e.g. "no dose predicted: the
    # structure set has no PTV"), shown with the job.
    notes: Mapped[list[str] | None] = mapped_column(JSON)
    # Who the patient is (from the first instance), for the roles allowed to see it; never
    # logged. Searchable by the API.
    patient_name: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))  # DICOM DA, YYYYMMDD
    study_description: Mapped[str | None] = mapped_column(String(64))
    # How the series came (NULL: a C-STORE to the listener; "dicomweb": STOW-RS to
    # /dicomweb/studies; "pull": retrieved from the PACS on a user's request) and, for the two
    # HTTP ways, the API user who sent or pulled it (a user name, never a patient).
    received_via: Mapped[str | None] = mapped_column(String(16))
    requested_by: Mapped[str | None] = mapped_column(String(64))
    # The approval gate (route ``review: required``): held in awaiting_review until a
    # clinician approves (then sent) or rejects (never sent); who and when are recorded.
    review_required: Mapped[bool | None] = mapped_column(Boolean)
    review_decision: Mapped[str | None] = mapped_column(String(16))  # approved | rejected
    reviewed_by: Mapped[str | None] = mapped_column(String(64))
    reviewed_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    review_reason: Mapped[str | None] = mapped_column(Text)
    # A retried send_failed job: its next run sends the archived outputs, never rebuilds them.
    resend_only: Mapped[bool | None] = mapped_column(Boolean)
    # "AE@host:port|SOPInstanceUID" entries already delivered (idempotent re-sends).
    sent_destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Runs of ``attempts`` whose worker vanished (killed, out of memory, host lost): they do
    # not spend the job's attempts, but are bounded on their own (``worker.tasks``).
    workers_lost: Mapped[int | None] = mapped_column(Integer, default=0)
    # Bumped whenever instances are merged in; a running job restarts if it changed.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    queued_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    load_s: Mapped[float | None] = mapped_column(Float)
    inference_s: Mapped[float | None] = mapped_column(Float)
    contours_s: Mapped[float | None] = mapped_column(Float)
    send_s: Mapped[float | None] = mapped_column(Float)
    # The other stages of ``common.timings`` (seconds; NULL: not reached, or a job of an
    # earlier release), when the TPS released the series and when the last destination
    # acknowledged the outputs (the end-to-end figure runs between the two).
    quiet_s: Mapped[float | None] = mapped_column(Float)
    intake_s: Mapped[float | None] = mapped_column(Float)
    queue_s: Mapped[float | None] = mapped_column(Float)
    model_load_s: Mapped[float | None] = mapped_column(Float)
    preprocess_s: Mapped[float | None] = mapped_column(Float)
    postprocess_s: Mapped[float | None] = mapped_column(Float)
    archive_s: Mapped[float | None] = mapped_column(Float)
    review_wait_s: Mapped[float | None] = mapped_column(Float)
    released_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    held_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)  # awaiting_review since
    spool_dir: Mapped[str | None] = mapped_column(Text)
    # Which worker runs the job and until when its claim holds without a heartbeat.
    worker: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    # When the retention policy deleted the job's CT instances and archived outputs (the row
    # and the audit trail stay); a purged job cannot be retried.
    purged_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)

    @property
    def job_state(self) -> JobState:
        return JobState(self.state)

    @property
    def stage_timings(self) -> dict[str, float | None]:
        return {stage: getattr(self, f"{stage}_s") for stage in STAGES}

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, series={self.series_instance_uid!r}, state={self.state!r})"


class JobOutput(Base):
    """One DICOM object a job produced (an RTSTRUCT, later RTDOSE, SEG, ...): a row per kind.

    ``summary`` is the kind's own description of its content (for an RTSTRUCT: one
    ``{roi_name, volume_cc, colour}`` per structure).
    """

    __tablename__ = "job_outputs"
    __table_args__ = (UniqueConstraint("job_id", "kind", name="uq_job_outputs_job_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    summary: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"JobOutput(job_id={self.job_id!r}, kind={self.kind!r})"


@dataclass(frozen=True)
class MergeResult:
    """What ``create_or_merge_for_series`` did: the job and whether it is new."""

    job: Job
    created: bool


@dataclass(frozen=True)
class JobFilter:
    """Criteria for ``JobStore.list`` and ``count``; each one given must hold."""

    state: JobState | str | Iterable[JobState | str] | None = None
    since: dt.datetime | None = None  # created at or after
    until: dt.datetime | None = None  # created before
    calling_ae: str | None = None
    model_name: str | None = None
    series_instance_uid: str | None = None

    def __post_init__(self) -> None:
        # One state or many become a tuple of JobState (an unknown state fails here, and a
        # generator is read once, not once per query).
        if self.state is not None:
            states = [self.state] if isinstance(self.state, str) else self.state
            object.__setattr__(self, "state", tuple(JobState(s) for s in states))

    def apply(self, query: Any) -> Any:
        """``query`` (a select over Job) narrowed to the jobs matching this filter."""
        if self.state is not None:
            states = builtins.list(self.state)  # type: ignore[arg-type]
            query = query.where(Job.state.in_([JobState(s).value for s in states]))
        if self.since is not None:
            query = query.where(Job.created_at >= self.since)
        if self.until is not None:
            query = query.where(Job.created_at < self.until)
        for column, value in ((Job.calling_ae, self.calling_ae),
                              (Job.model_name, self.model_name),
                              (Job.series_instance_uid, self.series_instance_uid)):
            if value is not None:
                query = query.where(column == value)
        return query


class JobStore:
    """Typed access to the ``jobs`` table; every method is one short transaction.

    Returned ``Job`` objects are detached snapshots (safe to read after the call).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def session(self) -> Session:
        """A new session on the store's engine (for callers that join other tables)."""
        return self._sessions()

    # -- creation ------------------------------------------------------------------------
    def create_or_merge_for_series(
        self,
        *,
        series_instance_uid: str,
        study_instance_uid: str = "",
        calling_ae: str = "",
        modality: str = "",
        series_description: str = "",
        n_instances: int = 0,
        route_name: str | None = None,
        model_request: str | None = None,
        destinations: builtins.list[str] | None = None,
        requested_outputs: builtins.list[str] | None = None,
        kind: str = "contour",
        prescriptions_gy: dict[str, float] | None = None,
    ) -> MergeResult:
        """Return the active job of the series (merged: generation bumped) or a new one.

        ``n_instances`` of a merged job is left for ``set_instance_count`` (the caller knows
        how many distinct instances the job folder holds after the merge).
        """
        for _ in range(5):
            with self._sessions.begin() as session:
                job_id = session.scalar(
                    select(Job.id).where(Job.active_series_uid == series_instance_uid)
                )
                if job_id is not None and self._bump(session, job_id):
                    job = session.get(Job, job_id, populate_existing=True)
                    if job is not None:
                        return MergeResult(job, created=False)
                if job_id is not None:
                    continue  # it finished between the two statements: look again
            try:
                with self._sessions.begin() as session:
                    now = utcnow()
                    job = Job(
                        id=uuid.uuid4().hex,
                        series_instance_uid=series_instance_uid,
                        active_series_uid=series_instance_uid,
                        study_instance_uid=study_instance_uid,
                        calling_ae=calling_ae,
                        modality=modality,
                        series_description=series_description[:64],
                        n_instances=n_instances,
                        route_name=route_name,
                        model_request=model_request,
                        destinations=destinations,
                        requested_outputs=requested_outputs,
                        kind=kind,
                        prescriptions_gy=prescriptions_gy,
                        state=JobState.RECEIVED.value,
                        attempts=0,
                        generation=0,
                        sent_destinations=[],
                        created_at=now,
                        updated_at=now,
                    )
                    session.add(job)
                return MergeResult(job, created=True)
            except IntegrityError:
                continue  # another intake created the active job first: merge into it
        raise RtcontourError(f"could not create or merge a job for series {series_instance_uid}")

    @staticmethod
    def _bump(session: Session, job_id: str) -> bool:
        # Conditional on the job still being active, so a merge and a completion
        # (``complete_if_unchanged``) cannot both succeed, on SQLite as on PostgreSQL.
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.active_series_uid.is_not(None))
            .values(generation=Job.generation + 1, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def bump_generation(self, job_id: str) -> bool:
        """Mark an active job's instances as changed again (the intake calls it after moving
        merged files); False if the job is no longer active."""
        with self._sessions.begin() as session:
            return self._bump(session, job_id)

    def complete_if_unchanged(self, job_id: str, worker: str, generation: int) -> bool:
        """running -> done, only if ``worker`` holds the job and no instances were merged in
        since ``generation`` was read; False otherwise (run it again, or it was taken over)."""
        now = utcnow()
        return self._end_run(job_id, worker, generation, state=JobState.DONE.value,
                             finished_at=now)

    def _end_run(self, job_id: str, worker: str, generation: int, **values: Any) -> bool:
        """The conditional update that ends ``worker``'s run of an unchanged job (see
        ``complete_if_unchanged``): the series' active slot and the lease are released."""
        with self._sessions.begin() as session:
            result = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.state == JobState.RUNNING.value,
                    Job.worker == worker,
                    Job.generation == generation,
                )
                .values(updated_at=utcnow(), active_series_uid=None, lease_expires_at=None,
                        failure_reason=None, failure_kind=None, **values)
                .execution_options(synchronize_session=False)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def set_spool_dir(self, job_id: str, spool_dir: str, n_instances: int) -> None:
        self._update(job_id, spool_dir=spool_dir, n_instances=n_instances)

    # -- reading -------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        with self._sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            return job

    def list(
        self, where: JobFilter | None = None, *, limit: int = 50, offset: int = 0
    ) -> builtins.list[Job]:
        """Jobs matching ``where`` (every job without it), newest first."""
        query = (where or JobFilter()).apply(select(Job))
        query = query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
        with self._sessions() as session:
            return builtins.list(session.scalars(query))

    def count(self, where: JobFilter | None = None) -> int:
        """How many jobs ``list(where)`` would return without pagination."""
        query = (where or JobFilter()).apply(select(func.count(Job.id)))
        with self._sessions() as session:
            return int(session.scalar(query) or 0)

    def counts_by_state(self) -> dict[str, int]:
        """Number of jobs in each state (every state present, zero if none)."""
        with self._sessions() as session:
            rows = session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state))
            counts = {state.value: 0 for state in JobState}
            counts.update({state: int(n) for state, n in rows})
            return counts

    # -- state machine -------------------------------------------------------------------
    def transition(
        self,
        job_id: str,
        to_state: JobState | str,
        *,
        reason: str | None = None,
        expected_from: Sequence[JobState] | None = None,
        worker: str | None = None,
        failure_kind: FailureKind | None = None,
    ) -> Job:
        """Move a job to ``to_state`` or raise ``IllegalTransition`` naming both states.

        ``failure_kind``: why a job moved to failed (default processing) or send_failed
        (always send) failed; cleared by every other state.

        ``worker``: the outcome of that worker's run; refused (``IllegalTransition``) unless
        the job is still running under that worker (another took it over after its lease).
        """
        target = JobState(to_state)
        with self._sessions.begin() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            current = JobState(job.state)
            if worker is not None and (current is not JobState.RUNNING or job.worker != worker):
                raise IllegalTransition(
                    f"job {job_id} is {current.value} under {job.worker or 'no worker'}, not "
                    f"running under {worker}: this run's outcome ({target.value}) is dropped"
                )
            if expected_from is not None and current not in expected_from:
                raise IllegalTransition(
                    f"job {job_id} is {current.value}, expected one of "
                    f"{sorted(s.value for s in expected_from)} before {target.value}"
                )
            if target not in _ALLOWED[current]:
                raise IllegalTransition(
                    f"job {job_id} cannot move from {current.value} to {target.value}"
                )
            now = utcnow()
            job.state = target.value
            job.updated_at = now
            if target is JobState.QUEUED:
                job.queued_at = now
                job.worker = None
                job.lease_expires_at = None
                job.active_series_uid = job.series_instance_uid
                if reason is not None:
                    job.failure_reason = reason  # why it was re-queued (shown until it ends)
            if target is JobState.RUNNING:
                job.started_at = now
            if target in FINISHED_STATES:
                job.finished_at = now
                job.active_series_uid = None
                job.lease_expires_at = None
                failed = target in (JobState.FAILED, JobState.SEND_FAILED)
                job.failure_reason = reason if failed else None
                job.failure_kind = (
                    FailureKind.SEND.value if target is JobState.SEND_FAILED
                    else (failure_kind or FailureKind.PROCESSING).value if failed else None)
                if target is JobState.IGNORED:
                    job.ignored_reason = reason
            else:
                job.failure_kind = None
            return job

    def mark_queued(self, job_id: str) -> Job | None:
        """received -> queued; None (no change) if the job is already further along."""
        try:
            return self.transition(job_id, JobState.QUEUED, expected_from=[JobState.RECEIVED])
        except IllegalTransition:
            return None

    def claim(self, job_id: str, worker: str, lease_s: float) -> Job | None:
        """Atomically take a job to run: received/queued, or running with an expired lease.

        Returns the claimed job (state running, attempts incremented; ``workers_lost`` too when
        it takes over from a worker whose lease expired) or None when the job is finished or
        another worker holds a live claim (a duplicate message: do nothing).
        """
        now = utcnow()
        orphaned = (Job.state == JobState.RUNNING.value) & (
            or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)
        )
        waiting = [JobState.RECEIVED.value, JobState.QUEUED.value]
        claimable = or_(Job.state.in_(waiting), orphaned)
        lost_so_far = func.coalesce(Job.workers_lost, 0)
        with self._sessions.begin() as session:
            # The wait since it was queued adds to the job's queue time (every run's wait: an
            # approved job's second run must not replace the first's).
            row = session.execute(
                select(Job.state, Job.queued_at, Job.queue_s).where(Job.id == job_id)
            ).one_or_none()
            queue_s = row.queue_s if row is not None else None
            if row is not None and row.state in waiting and row.queued_at is not None:
                queue_s = (queue_s or 0.0) + max(0.0, (now - row.queued_at).total_seconds())
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, claimable)
                .values(
                    state=JobState.RUNNING.value,
                    attempts=Job.attempts + 1,
                    # SET reads the row as it was: "running" here means a lost worker's run.
                    workers_lost=case(
                        (Job.state == JobState.RUNNING.value, lost_so_far + 1), else_=lost_so_far
                    ),
                    started_at=now,
                    updated_at=now,
                    worker=worker,
                    lease_expires_at=now + dt.timedelta(seconds=lease_s),
                    queue_s=queue_s,
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
        return self.get(job_id)

    def heartbeat(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Extend the claim of ``worker`` on a running job; False if it lost the claim."""
        now = utcnow()
        with self._sessions.begin() as session:
            result = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.state == JobState.RUNNING.value,
                    Job.worker == worker,
                )
                .values(lease_expires_at=now + dt.timedelta(seconds=lease_s))
                .execution_options(synchronize_session=False)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def recoverable_jobs(
        self, *, older_than_s: float = 0.0, received_older_than_s: float | None = None
    ) -> builtins.list[str]:
        """Ids of jobs whose message may have been lost: queued (or received) for longer than
        ``older_than_s`` (``waiting_jobs``), and running jobs whose worker's lease expired
        (``orphaned_jobs``), oldest first."""
        waiting = self.waiting_jobs(
            older_than_s=older_than_s, received_older_than_s=received_older_than_s
        )
        return waiting + self.orphaned_jobs()

    def waiting_jobs(
        self, *, older_than_s: float = 0.0, received_older_than_s: float | None = None
    ) -> builtins.list[str]:
        """Ids of queued jobs not touched for ``older_than_s`` seconds, and of received ones
        not touched for ``received_older_than_s`` (default the same).

        A job still ``received`` is one whose intake stopped half-way (the listener died while
        moving its files); the listener's journal finishes that intake after a restart, so a
        caller gives it longer before running the job with what its folder holds.
        """
        now = utcnow()
        queued_cutoff = now - dt.timedelta(seconds=older_than_s)
        received_cutoff = now - dt.timedelta(
            seconds=older_than_s if received_older_than_s is None else received_older_than_s
        )
        query = select(Job.id).where(
            or_(
                (Job.state == JobState.QUEUED.value) & (Job.updated_at <= queued_cutoff),
                (Job.state == JobState.RECEIVED.value) & (Job.updated_at <= received_cutoff),
            )
        )
        with self._sessions() as session:
            return builtins.list(session.scalars(query.order_by(Job.created_at)))

    def orphaned_jobs(self) -> builtins.list[str]:
        """Ids of running jobs whose worker stopped renewing its lease (it died)."""
        now = utcnow()
        query = select(Job.id).where(
            Job.state == JobState.RUNNING.value,
            or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now),
        )
        with self._sessions() as session:
            return builtins.list(session.scalars(query.order_by(Job.created_at)))

    def touch(self, job_id: str) -> None:
        """Mark a job as just (re-)enqueued, so the recovery sweep leaves it alone a while."""
        self._update(job_id, updated_at=utcnow())

    # -- results ------------------------------------------------------------------------
    def record_stage(self, job_id: str, stage: str, seconds: float) -> None:
        """Store the duration of one of the worker's ``STAGES`` in seconds."""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        self._update(job_id, **{f"{stage}_s": float(seconds)})

    def record_arrival(
        self, job_id: str, *, released_at: dt.datetime | None, quiet_s: float | None,
        intake_s: float,
    ) -> None:
        """When the TPS released the series, how long the quiet period held it after that,
        and how long the intake took (``common.timings``)."""
        self._update(job_id, released_at=released_at, quiet_s=quiet_s, intake_s=float(intake_s))

    def record_delivered(self, job_id: str) -> None:
        """The job's outputs were acknowledged by every destination (now)."""
        self._update(job_id, delivered_at=utcnow())

    def record_model(self, job_id: str, name: str, version: str) -> None:
        self._update(job_id, model_name=name, model_version=version)

    def record_source(self, job_id: str, source_job_id: str) -> None:
        """A dose job's CT comes from ``source_job_id``'s folder."""
        self._update(job_id, source_job_id=source_job_id)

    def record_identity(
        self,
        job_id: str,
        *,
        patient_name: str | None,
        patient_id: str | None,
        accession_number: str | None,
        study_date: str | None,
        study_description: str | None,
        review_required: bool = False,
    ) -> None:
        """Who the patient is (shown to the roles allowed to see it) and whether the job's
        route holds it for review."""
        self._update(job_id, patient_name=patient_name, patient_id=patient_id,
                     accession_number=accession_number, study_date=study_date,
                     study_description=study_description, review_required=review_required)

    def record_origin(self, job_id: str, *, received_via: str, requested_by: str) -> None:
        """The series came by ``received_via`` ("dicomweb", "pull") at ``requested_by``'s
        request (an API user name)."""
        self._update(job_id, received_via=received_via, requested_by=requested_by[:64])

    def hold_for_review(self, job_id: str, worker: str, generation: int) -> bool:
        """running -> awaiting_review, like ``complete_if_unchanged`` (only if ``worker`` holds
        the job and nothing was merged in); the series' active slot is released."""
        return self._end_run(job_id, worker, generation, state=JobState.AWAITING_REVIEW.value,
                             held_at=utcnow())

    def review(self, job_id: str, *, approved: bool, user: str, reason: str | None) -> Job:
        """A clinician's decision on a job awaiting review: approved -> queued (the next run
        sends its archived outputs), rejected -> rejected (never sent). ``IllegalTransition``
        if it is not awaiting review (also when another decision came first).

        One conditional update, so two decisions at once cannot both land (SQLite's driver
        takes no row lock). An approved job does not take back its series' active slot: a
        series sent again meanwhile is a job of its own, reviewed on its own, never merged
        into one already approved. Approval gives the sending run the job's full attempts
        (the runs before it were the review run and its retries).
        """
        now = utcnow()
        held_at = self.get(job_id).held_at  # JobNotFound if there is none
        values: dict[str, Any] = {
            "review_decision": "approved" if approved else "rejected",
            "reviewed_by": user, "reviewed_at": now, "review_reason": reason, "updated_at": now,
            # Human time, kept apart from the machine's stages (common.timings).
            "review_wait_s": (now - held_at).total_seconds() if held_at is not None else None,
        }
        if approved:
            values.update(state=JobState.QUEUED.value, queued_at=now, worker=None,
                          attempts=func.coalesce(Job.workers_lost, 0))
        else:
            values.update(state=JobState.REJECTED.value, finished_at=now)
        with self._sessions.begin() as session:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.AWAITING_REVIEW.value)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            job = self.get(job_id)  # JobNotFound if there is none
            raise IllegalTransition(f"job {job_id} is {job.state}, not awaiting review")
        return self.get(job_id)

    def held_incomplete(self, series_instance_uid: str, *, besides: str) -> Job | None:
        """The series' latest job other than ``besides`` if it failed for missing instances
        (failure kind incomplete) and its files are still held (not purged); else None."""
        with self._sessions() as session:
            latest = session.scalars(
                select(Job).where(Job.series_instance_uid == series_instance_uid,
                                  Job.id != besides)
                .order_by(Job.created_at.desc(), Job.id).limit(1)).first()
        if (latest is None or latest.state != JobState.FAILED.value
                or latest.failure_kind != FailureKind.INCOMPLETE.value
                or latest.purged_at is not None or not latest.spool_dir):
            return None
        return latest

    def add_note(self, job_id: str, note: str) -> None:
        """Append a sentence to the job's notes (kept once)."""
        with self._sessions.begin() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            if note not in (job.notes or []):
                job.notes = [*(job.notes or []), note]

    def record_qa(self, job_id: str, qa: dict[str, Any]) -> None:
        """Store what the clinicians changed in the contour job's structures."""
        self._update(job_id, qa=qa)

    def ct_holder(self, series_instance_uid: str) -> tuple[Job | None, str | None]:
        """The newest contour job whose CT instances of ``series_instance_uid`` are still held
        (done first, then any other state), or None with the reason a person can act on."""
        with self._sessions() as session:
            jobs = builtins.list(session.scalars(
                select(Job).where(Job.series_instance_uid == series_instance_uid,
                                  or_(Job.kind.is_(None), Job.kind == "contour"))
                .order_by(Job.created_at.desc())
            ))
        if not jobs:
            return None, (f"rtcontour does not hold the CT series {series_instance_uid} this "
                          "structure set references (never received): send the CT first")
        held = [job for job in jobs if job.purged_at is None]
        if not held:
            return None, (f"the CT series {series_instance_uid} this structure set references "
                          "was deleted by the retention policy: send the CT again")
        done = [job for job in held if job.state == JobState.DONE.value]
        return (done or held)[0], None

    def record_output(
        self,
        job_id: str,
        *,
        kind: str,
        sop_instance_uid: str,
        path: str,
        summary: builtins.list[dict[str, Any]] | None = None,
    ) -> JobOutput:
        """Store (or replace) the job's output of ``kind``: where it was archived, what it holds."""
        with self._sessions.begin() as session:
            if session.get(Job, job_id) is None:
                raise JobNotFound(f"no job {job_id!r}")
            output = session.scalar(
                select(JobOutput).where(JobOutput.job_id == job_id, JobOutput.kind == kind)
            )
            if output is None:
                output = JobOutput(job_id=job_id, kind=kind, created_at=utcnow())
                session.add(output)
            output.sop_instance_uid = sop_instance_uid
            output.path = path
            output.summary = summary or []
            return output

    def outputs(self, job_id: str) -> builtins.list[JobOutput]:
        """The job's outputs, in the order they were first recorded."""
        with self._sessions() as session:
            return builtins.list(session.scalars(
                select(JobOutput).where(JobOutput.job_id == job_id).order_by(JobOutput.id)
            ))

    def output(self, job_id: str, kind: str) -> JobOutput | None:
        """The job's output of ``kind`` (e.g. "RTSTRUCT"), or None if it has none."""
        with self._sessions() as session:
            return session.scalar(
                select(JobOutput).where(JobOutput.job_id == job_id, JobOutput.kind == kind)
            )

    def outputs_of(self, job_ids: Iterable[str]) -> dict[str, builtins.list[JobOutput]]:
        """job id -> its outputs, for a page of jobs in one query."""
        ids = builtins.list(job_ids)
        found: dict[str, builtins.list[JobOutput]] = {job_id: [] for job_id in ids}
        if not ids:
            return found
        with self._sessions() as session:
            for output in session.scalars(
                select(JobOutput).where(JobOutput.job_id.in_(ids)).order_by(JobOutput.id)
            ):
                found[output.job_id].append(output)
        return found

    def record_sent(self, job_id: str, destination: str, sop_instance_uid: str) -> None:
        """Remember that ``destination`` acknowledged this SOP Instance for this job."""
        key = f"{destination}|{sop_instance_uid}"
        with self._sessions.begin() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            if key not in (job.sent_destinations or []):
                job.sent_destinations = [*(job.sent_destinations or []), key]

    def forget_sent(self, job_id: str) -> None:
        """Clear the delivery records (the job's output changed and must be sent again)."""
        self._update(job_id, sent_destinations=[])

    def was_sent(self, job_id: str, destination: str, sop_instance_uid: str) -> bool:
        return f"{destination}|{sop_instance_uid}" in (self.get(job_id).sent_destinations or [])

    def _update(self, job_id: str, **values: Any) -> None:
        with self._sessions.begin() as session:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise JobNotFound(f"no job {job_id!r}")

    # -- retention ---------------------------------------------------------------------------
    def mark_expired_for_purge(
        self, finished_before: dt.datetime, *, limit: int = 100
    ) -> builtins.list[Job]:
        """Mark done/failed/ignored/rejected jobs finished before ``finished_before`` as purged;
        return them.

        The caller deletes their files afterwards: marking first means a user's retry can no
        longer start a job whose files are being deleted (a deletion cut short is finished by
        the next sweep, see ``purged_among``). ``send_failed`` jobs are kept (their RTSTRUCT
        still awaits delivery).
        """
        expired = (
            Job.state.in_([JobState.DONE.value, JobState.FAILED.value, JobState.IGNORED.value,
                           JobState.REJECTED.value]),
            Job.finished_at < finished_before,
            Job.purged_at.is_(None),
        )
        with self._sessions() as session:
            ids = builtins.list(
                session.scalars(select(Job.id).where(*expired).order_by(Job.finished_at).limit(limit))
            )
        marked = []
        for job_id in ids:
            with self._sessions.begin() as session:
                result = session.execute(
                    update(Job)
                    .where(Job.id == job_id, *expired)
                    .values(purged_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                marked.append(self.get(job_id))
        return marked

    def purged_among(
        self, job_ids: Iterable[str], *, marked_before: dt.datetime, chunk: int = 500
    ) -> builtins.list[Job]:
        """The jobs of ``job_ids`` marked purged before ``marked_before`` (queried ``chunk``
        ids at a time to stay under the databases' bound-parameter limits)."""
        ids = sorted(job_ids)
        found: builtins.list[Job] = []
        with self._sessions() as session:
            for start in range(0, len(ids), chunk):
                found += session.scalars(
                    select(Job).where(Job.id.in_(ids[start:start + chunk]),
                                      Job.purged_at < marked_before)
                )
        return found

    # -- API (issue 5): manual retry of a finished job ----------------------------------
    def requeue_finished(self, job_id: str, *, reason: str) -> Job:
        """failed | send_failed -> queued on a user's request, with a fresh set of attempts.

        A ``send_failed`` job whose outputs are all archived is queued to send them as they are
        (``resend_only``: never rebuilt, so a TPS never gets a second, different structure set
        for the same CT; a dose job needs no CT) and, like an approved job, does not take back
        its series' active slot. Anything else runs its whole pipeline again and takes it.
        Raises ``IllegalTransition`` if the job is not failed/send_failed, or (a whole re-run)
        if another job of the same series is active.
        """
        retryable = {JobState.FAILED.value, JobState.SEND_FAILED.value}
        try:
            with self._sessions.begin() as session:
                job = session.get(Job, job_id, with_for_update=True)
                if job is None:
                    raise JobNotFound(f"no job {job_id!r}")
                if job.state not in retryable:
                    raise IllegalTransition(f"job {job_id} is {job.state}; it cannot be retried")
                if job.purged_at is not None:
                    raise IllegalTransition(
                        f"job {job_id} cannot be retried: its CT instances were deleted by the "
                        "retention policy; send the series again"
                    )
                if job.failure_kind in INPUT_FAILURES:
                    raise IllegalTransition(RETRY_REFUSED_INPUT.format(job_id=job_id))
                outputs = session.scalars(
                    select(JobOutput).where(JobOutput.job_id == job_id)).all()
                resend_only = (job.state == JobState.SEND_FAILED.value and bool(outputs)
                               and all(Path(output.path).is_file() for output in outputs))
                now = utcnow()
                job.state = JobState.QUEUED.value
                job.queued_at = job.updated_at = now
                job.finished_at = job.worker = job.lease_expires_at = None
                job.attempts = job.workers_lost = 0
                job.failure_reason = reason
                job.failure_kind = None
                job.resend_only = resend_only
                if not resend_only:
                    job.active_series_uid = job.series_instance_uid
                return job
        except IntegrityError:
            raise IllegalTransition(
                f"job {job_id} cannot be retried: another job of its series is active"
            ) from None
