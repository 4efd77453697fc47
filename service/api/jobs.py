"""Jobs: list with filters and pagination, detail, outputs (any kind) and their download, retry.

Who the patient is (name, ID, accession, study date and description) is part of a job only for
clinicians and admins; a viewer gets the same job with those fields null, and may not search by
patient (403). Every answer that shows them is audited (``patient.viewed``, naming the user and
the job ids, never the patient); logs name job ids and UIDs only.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field, model_serializer
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from rtcontour.common import audit
from rtcontour.common.audit import AuditEvent
from rtcontour.common.auth import Principal, Role
from rtcontour.common.jobstore import (
    INPUT_FAILURES,
    OUTPUT_FILE_PREFIXES,
    IllegalTransition,
    Job,
    JobFilter,
    JobNotFound,
    JobOutput,
    JobState,
    JobStore,
)
from rtcontour.common.timings import job_timings
from rtcontour.service.api.deps import AppContext, ClinicianUser, Context, DbSession, ViewerUser
from rtcontour.service.previews import display_colour

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/jobs", tags=["jobs"])

RETRYABLE_STATES = (JobState.FAILED.value, JobState.SEND_FAILED.value)

PATIENT_VIEWED = "patient.viewed"  # audit event: a user was shown who the patients of jobs are
# The same user shown the same jobs again (the dashboard polls every 3 s) within this many
# seconds is one audit entry, not one per poll.
PATIENT_AUDIT_QUIET_S = 600.0


@dataclass(frozen=True)
class PatientJobFilter(JobFilter):
    """``JobFilter`` plus ``patient``: the patient ID exactly, or a case-insensitive part of
    the patient name (DICOM PN, e.g. ``DOE^JANE``)."""

    patient: str | None = None

    def apply(self, query: Any) -> Any:
        query = super().apply(query)
        if self.patient:
            # LIKE wildcards in the search text are matched literally.
            text = self.patient.lower().replace("\\", "\\\\").replace("%", "\\%")
            text = text.replace("_", "\\_")
            query = query.where(
                or_(
                    Job.patient_id == self.patient,
                    func.lower(Job.patient_name).like(f"%{text}%", escape="\\"),
                )
            )
        return query


def sees_patient(principal: Principal) -> bool:
    """Clinicians and admins see who the patient is; viewers do not."""
    return principal.role.allows(Role.clinician)


def audit_patient_view(session: Session, user: str, jobs: list[Job], *, searched: bool) -> None:
    """Record that ``user`` was shown the patients of ``jobs`` (ids only, never the patient);
    the same showing as one of the user's entries of the last ``PATIENT_AUDIT_QUIET_S`` is
    not recorded again (the dashboard polls its lists every few seconds)."""
    shown = sorted(job.id for job in jobs
                   if job.patient_id or job.patient_name or job.accession_number
                   or job.study_date or job.study_description)
    if not shown:
        return
    job_ids = ",".join(shown)
    now = dt.datetime.now(dt.UTC)
    recent = session.scalars(
        select(AuditEvent)
        .where(AuditEvent.event == PATIENT_VIEWED, AuditEvent.actor == user[:64],
               AuditEvent.at >= now - dt.timedelta(seconds=PATIENT_AUDIT_QUIET_S))
        .order_by(AuditEvent.id.desc())
        .limit(50)
    )
    if any(event.detail.get("job_ids") == job_ids
           and bool(event.detail.get("searched")) == searched for event in recent):
        return
    audit.record(
        session,
        PATIENT_VIEWED,
        user,
        {"job_ids": job_ids, "n_jobs": len(shown), "searched": searched},
        job_id=shown[0] if len(shown) == 1 else None,
    )
    session.commit()


class StructureOut(BaseModel):
    roi_name: str
    volume_cc: float | None = Field(
        None, description="voxels of the mask x voxel volume (inside the pixel-edge contours)"
    )
    colour: list[int] | None = Field(None, description="RGB 0-255")
    display_colour: list[int] | None = Field(
        None, description="RGB as the viewer draws it (grey, white and dark colours replaced)"
    )
    found: bool | None = Field(None, description="false: not in the scan (no contour)")
    confidence: float | None = Field(None, description="0-1, from the model's probabilities")
    flag: str | None = Field(None, description='"review": check this structure first')

    @model_serializer(mode="wrap")
    def _omit_unknown(self, handler: Any) -> dict[str, Any]:
        # found/confidence/flag are absent (not null) for jobs of models that gave none.
        data: dict[str, Any] = handler(self)
        for key in ("found", "confidence", "flag"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class OutputOut(BaseModel):
    """One DICOM object the job produced (RTSTRUCT, RTDOSE, ...)."""

    kind: str
    sop_instance_uid: str
    available: bool = Field(description="the archived file exists and can be downloaded")
    created_at: dt.datetime | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    review: str | None = Field(
        default=None, description="the job's review gate: awaiting_review (not yet approved by a "
        "clinician: downloaded as RS_<id>_UNREVIEWED.dcm), approved, rejected; null: its "
        "route wants no review")


class StageTimingsOut(BaseModel):
    """Seconds per stage, in the order a job goes through them (null: not reached, or not
    measured by the release that ran it); the stages and ``other_s`` add up to ``total_s``
    (``common.timings``). Machine time and a clinician's review are kept apart."""

    quiet_period_s: float | None = Field(
        None, description="the TPS released the series -> the listener handed it over")
    intake_s: float | None = Field(None, description="routing, job created, files moved")
    queue_s: float | None = Field(None, description="waiting for a worker (every run)")
    load_s: float | None = Field(None, description="the series read and checked")
    model_load_s: float | None = Field(None, description="the model loaded (0: resident)")
    preprocess_s: float | None = Field(None, description="to the model's grid")
    inference_s: float | None = Field(None, description="the network (a dose job: the "
                                      "dose prediction)")
    postprocess_s: float | None = Field(
        None, description="back to the CT grid, clean-up, confidence")
    write_s: float | None = Field(None, description="RTSTRUCT / RTDOSE built")
    archive_s: float | None = Field(None, description="outputs written to the archive")
    send_s: float | None = Field(None, description="C-STORE to the destinations")
    other_s: float | None = Field(
        None, description="the rest of total_s: bookkeeping between stages, failed runs")
    review_wait_s: float | None = Field(
        None, description="held for a clinician's review (human time, not machine time)")
    machine_s: float | None = Field(None, description="total_s without review_wait_s")
    total_s: float | None = Field(
        None, description="C-STORE release (else the job's creation) -> outputs acknowledged "
        "by the destinations (else the job's end)")


class JobSummaryOut(BaseModel):
    id: str
    state: str
    series_instance_uid: str
    calling_ae: str | None = None
    modality: str | None = None
    series_description: str | None = None
    n_instances: int | None = None
    model_name: str | None = None
    model_version: str | None = None
    failure_reason: str | None = None
    failure_kind: str | None = Field(
        None, description="why it failed: input (the series itself is wrong: send it again), "
        "incomplete (input missing slices: send them, or the whole series, again; they are "
        "merged with this job's), processing (rtcontour's side) or send (the destinations)")
    retryable: bool = Field(
        False, description="POST /retry may queue it again (failed or send_failed, not for its "
        "input, files not purged)")
    kind: str = Field("contour", description="contour (CT in, RTSTRUCT out) or dose "
                      "(approved structure set in, predicted RTDOSE out)")
    route_name: str | None = Field(None, description="the routing rule that took the series")
    ignored_reason: str | None = Field(
        None, description="why the series was not contoured (state ignored)"
    )
    output_kinds: list[str] = Field(default_factory=list, description="e.g. [\"RTSTRUCT\"]")
    created_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    purged_at: dt.datetime | None = Field(
        None, description="when the retention policy deleted the job's CT and RTSTRUCT files"
    )
    patient_name: str | None = Field(None, description="DICOM PN (clinician and admin only)")
    patient_id: str | None = Field(None, description="clinician and admin only")
    accession_number: str | None = Field(None, description="clinician and admin only")
    study_date: str | None = Field(None, description="DICOM DA, YYYYMMDD (clinician, admin)")
    study_description: str | None = Field(None, description="clinician and admin only")
    review_required: bool | None = Field(
        None, description="its route holds the results for a clinician's approval"
    )
    review_decision: str | None = Field(None, description="approved or rejected")
    reviewed_by: str | None = None
    reviewed_at: dt.datetime | None = None
    review_reason: str | None = Field(None, description="why it was rejected")
    received_via: str = Field("dicom", description="dicom (C-STORE to the listener), dicomweb "
                              "(STOW-RS) or pull (retrieved from the PACS on a user's request)")
    requested_by: str | None = Field(
        None, description="the API user who sent it by STOW-RS or pulled it from the PACS")


class JobDetailOut(JobSummaryOut):
    study_instance_uid: str | None = None
    rtstruct_sop_instance_uid: str | None = None
    has_rtstruct: bool = False
    model_request: str | None = None
    destinations: list[str] | None = Field(
        None, description="the route's destinations (null: RTCONTOUR_DESTINATIONS)"
    )
    send_to: list[str] = Field(
        default_factory=list, description="where the job's outputs go, and for a job awaiting "
        "review where Approve sends them: the route's destinations, else RTCONTOUR_DESTINATIONS"
    )
    send_to_from: str | None = Field(
        None, description='"route" or "RTCONTOUR_DESTINATIONS": where send_to comes from'
    )
    sent_to: list[str] = Field(
        default_factory=list, description="destinations that acknowledged an output of this "
        "job (the destinations actually used)"
    )
    outputs: list[OutputOut] = Field(default_factory=list)
    source_job_id: str | None = Field(
        None, description="a dose job: the contour job whose CT its structure set references"
    )
    dose_metrics: list[dict[str, Any]] | None = Field(
        None, description="a dose job: per PTV and OAR, DVH metrics in Gy (OpenKBP definitions:"
        " D_99, D_95, D_1 for PTVs, D_0.1cc and mean for OARs) and a cumulative DVH"
    )
    dose_normalisation: str | None = Field(
        None, description="a dose job whose prediction was scaled to a prescription "
        "(RTCONTOUR_DOSE_NORMALISE): how; null when the dose is the model's as predicted")
    qa: dict[str, Any] | None = Field(
        None, description="a contour job: what the clinicians changed in its structures"
    )
    notes: list[str] = Field(default_factory=list, description="how the job went (not errors)")
    attempts: int | None = Field(None, description="runs so far, those of lost workers included")
    workers_lost: int = Field(
        0, description="runs whose worker vanished (killed, out of memory); they spend no attempt"
    )
    queued_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    timings: StageTimingsOut
    structures: list[StructureOut]


class JobPageOut(BaseModel):
    items: list[JobSummaryOut]
    total: int
    limit: int
    offset: int


class RetryOut(BaseModel):
    id: str
    state: str


def _identity(job: Job, with_patient: bool) -> dict[str, Any]:
    if not with_patient:
        return {}
    return {
        "patient_name": job.patient_name,
        "patient_id": job.patient_id,
        "accession_number": job.accession_number,
        "study_date": job.study_date,
        "study_description": job.study_description,
    }


def retryable(job: Job) -> bool:
    """A retry can help: failed or send_failed, for a reason other than its input, files kept."""
    return (job.state in RETRYABLE_STATES and job.failure_kind not in INPUT_FAILURES
            and job.purged_at is None)


def summary(
    job: Job, outputs: list[JobOutput] | None = None, *, with_patient: bool = False
) -> JobSummaryOut:
    """The job as listed; who the patient is only ``with_patient`` (clinician, admin)."""
    return JobSummaryOut(
        id=job.id,
        state=job.state,
        series_instance_uid=job.series_instance_uid,
        calling_ae=job.calling_ae,
        modality=job.modality,
        series_description=job.series_description,
        n_instances=job.n_instances,
        model_name=job.model_name,
        model_version=job.model_version,
        failure_reason=job.failure_reason,
        failure_kind=job.failure_kind,
        retryable=retryable(job),
        kind=job.kind or "contour",
        route_name=job.route_name,
        ignored_reason=job.ignored_reason,
        output_kinds=[output.kind for output in outputs or []],
        created_at=job.created_at,
        finished_at=job.finished_at,
        purged_at=job.purged_at,
        review_required=job.review_required,
        review_decision=job.review_decision,
        reviewed_by=job.reviewed_by,
        reviewed_at=job.reviewed_at,
        review_reason=job.review_reason,
        received_via=job.received_via or "dicom",
        requested_by=job.requested_by,
        **_identity(job, with_patient),
    )


def _structures(rtstruct: JobOutput | None) -> list[StructureOut]:
    out = []
    for item in (rtstruct.summary if rtstruct is not None else None) or []:
        if not isinstance(item, dict) or "roi_name" not in item:
            continue
        colour = item.get("colour") or item.get("colour_rgb")
        out.append(
            StructureOut(
                roi_name=str(item["roi_name"]),
                volume_cc=item.get("volume_cc"),
                colour=[int(c) for c in colour] if colour else None,
                display_colour=list(display_colour(str(item["roi_name"]), colour))
                if colour else None,
                found=item.get("found"),
                confidence=item.get("confidence"),
                flag=item.get("flag"),
            )
        )
    return out


def output_file(output: JobOutput | None) -> Path | None:
    """The archived file of ``output`` if it exists on disk."""
    if output is None or not output.path:
        return None
    file = Path(output.path)
    return file if file.is_file() else None


def rtstruct_file(store: JobStore, job: Job) -> Path | None:
    """The archived RTSTRUCT of ``job`` if it exists on disk."""
    return output_file(store.output(job.id, "RTSTRUCT"))


def _output_out(output: JobOutput) -> OutputOut:
    return OutputOut(
        kind=output.kind,
        sop_instance_uid=output.sop_instance_uid,
        available=output_file(output) is not None,
        created_at=output.created_at,
        summary=[item for item in output.summary or [] if isinstance(item, dict)],
    )


def detail(job: Job, outputs: list[JobOutput], *, with_patient: bool = False) -> JobDetailOut:
    timings = StageTimingsOut(**job_timings(job).as_dict())
    rtstruct = next((output for output in outputs if output.kind == "RTSTRUCT"), None)
    rtdose = next((output for output in outputs if output.kind == "RTDOSE"), None)
    return JobDetailOut(
        **summary(job, outputs, with_patient=with_patient).model_dump(),
        study_instance_uid=job.study_instance_uid,
        rtstruct_sop_instance_uid=rtstruct.sop_instance_uid if rtstruct is not None else None,
        has_rtstruct=output_file(rtstruct) is not None,
        model_request=job.model_request,
        destinations=job.destinations,
        outputs=[_output_out(output) for output in outputs],
        source_job_id=job.source_job_id,
        dose_metrics=rtdose.summary if rtdose is not None else None,
        dose_normalisation=next((str(item["normalisation"]) for item in
                                 (rtdose.summary if rtdose is not None else None) or []
                                 if isinstance(item, dict) and item.get("normalisation")), None),
        qa=job.qa,
        notes=job.notes or [],
        attempts=job.attempts,
        workers_lost=job.workers_lost or 0,
        queued_at=job.queued_at,
        started_at=job.started_at,
        timings=timings,
        structures=_structures(rtstruct),
    )


def review_state(job: Job) -> str | None:
    """The job's review gate: None (its route wants none), "approved", "rejected" or
    "awaiting_review" (also while it still runs towards the hold)."""
    if not job.review_required:
        return None
    return job.review_decision or JobState.AWAITING_REVIEW.value


def _with_routing(out: JobDetailOut, job: Job, ctx: AppContext) -> JobDetailOut:
    """``out`` with where its outputs go (and went) and each output's review state."""
    from_route = job.destinations is not None
    send_to = (list(job.destinations or []) if from_route
               else [str(destination) for destination in ctx.settings.destinations])
    sent_to = list(dict.fromkeys(entry.split("|", 1)[0]
                                 for entry in job.sent_destinations or []))
    review = review_state(job)
    return out.model_copy(update={
        "send_to": send_to,
        "send_to_from": "route" if from_route else "RTCONTOUR_DESTINATIONS",
        "sent_to": sent_to,
        "outputs": [output.model_copy(update={"review": review}) for output in out.outputs],
    })


def load_job(store: JobStore, job_id: str) -> Job:
    """The job, or 404."""
    try:
        return store.get(job_id)
    except JobNotFound:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"job {job_id} does not exist"
        ) from None


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """Query datetimes without a zone are taken as UTC (the job store stores UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


@router.get("", response_model=JobPageOut, summary="List jobs, newest first")
def list_jobs(
    principal: ViewerUser,
    session: DbSession,
    ctx: Context,
    state: Annotated[list[JobState] | None, Query(description="one or more job states")] = None,
    created_from: Annotated[dt.datetime | None, Query(description="created at or after")] = None,
    created_to: Annotated[dt.datetime | None, Query(description="created before")] = None,
    calling_ae: Annotated[str | None, Query(max_length=16)] = None,
    model: Annotated[str | None, Query(max_length=64, description="model name")] = None,
    patient: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            description="patient ID (exact) or part of the patient name (any case); clinician "
            "and admin only",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> JobPageOut:
    with_patient = sees_patient(principal)
    if patient is not None and not with_patient:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail="searching by patient needs the clinician role"
        )
    where = PatientJobFilter(
        state=state or None,
        since=_utc(created_from),
        until=_utc(created_to),
        calling_ae=calling_ae or None,
        model_name=model or None,
        patient=(patient or "").strip() or None,
    )
    jobs = ctx.store.list(where, limit=limit, offset=offset)
    outputs = ctx.store.outputs_of(job.id for job in jobs)
    if with_patient:
        audit_patient_view(session, principal.name, jobs, searched=patient is not None)
    return JobPageOut(
        items=[summary(j, outputs[j.id], with_patient=with_patient) for j in jobs],
        total=ctx.store.count(where),
        limit=limit,
        offset=offset,
    )


@router.get("/{job_id}", response_model=JobDetailOut, summary="One job with timings and structures")
def get_job(job_id: str, principal: ViewerUser, session: DbSession, ctx: Context) -> JobDetailOut:
    job = load_job(ctx.store, job_id)
    with_patient = sees_patient(principal)
    if with_patient:
        audit_patient_view(session, principal.name, [job], searched=False)
    return _with_routing(detail(job, ctx.store.outputs(job.id), with_patient=with_patient),
                         job, ctx)


@router.get("/{job_id}/outputs", response_model=list[OutputOut], summary="The job's outputs")
def list_outputs(job_id: str, _: ViewerUser, ctx: Context) -> list[OutputOut]:
    job = load_job(ctx.store, job_id)
    review = review_state(job)
    return [_output_out(output).model_copy(update={"review": review})
            for output in ctx.store.outputs(job.id)]


_DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/dicom": {}}},
    404: {"description": "no output of that kind"},
    410: {"description": "deleted by the retention policy"},
}


@router.get(
    "/{job_id}/outputs/{kind}",
    response_class=FileResponse,
    summary="Download one archived output (RTSTRUCT, RTDOSE, ...)",
    responses=_DOWNLOAD_RESPONSES,
)
def download_output(
    job_id: str, kind: str, principal: ClinicianUser, session: DbSession, ctx: Context
) -> FileResponse:
    return _download(job_id, kind.upper(), principal.name, session, ctx)


@router.get(
    "/{job_id}/rtstruct",
    response_class=FileResponse,
    summary="Download the archived RTSTRUCT (alias of /outputs/RTSTRUCT)",
    responses=_DOWNLOAD_RESPONSES,
)
def download_rtstruct(
    job_id: str, principal: ClinicianUser, session: DbSession, ctx: Context
) -> FileResponse:
    return _download(job_id, "RTSTRUCT", principal.name, session, ctx)


def _download(
    job_id: str, kind: str, user: str, session: Session, ctx: AppContext
) -> FileResponse:
    job = load_job(ctx.store, job_id)
    if job.purged_at is not None:
        raise HTTPException(
            status.HTTP_410_GONE,
            detail=f"job {job_id}'s files were deleted on {job.purged_at:%Y-%m-%d} by the "
            f"retention policy ({ctx.settings.retention_days:g} days after the job ended)",
        )
    output = ctx.store.output(job.id, kind)
    file = output_file(output)
    if output is None or file is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"job {job_id} has no {kind} (state {job.state})"
        )
    review = review_state(job)
    audit.record(
        session,
        audit.download_event(kind),
        user,
        {
            "sop_instance_uid": output.sop_instance_uid,
            "series_instance_uid": job.series_instance_uid,
            **({"review": review} if review is not None else {}),
        },
        job_id=job.id,
    )
    session.commit()
    logger.info("job %s: %s downloaded by %s (review: %s)", job.id, kind, user, review or "none")
    prefix = OUTPUT_FILE_PREFIXES.get(kind, kind)
    # A clinician may download before approval (to review it in their own tools); the file
    # name says it is not approved, so it is not mistaken for the approved one.
    mark = {JobState.AWAITING_REVIEW.value: "_UNREVIEWED", "rejected": "_REJECTED"}.get(
        review or "", "")
    headers = {"X-Rtcontour-Review": review} if review is not None else None
    return FileResponse(file, media_type="application/dicom",
                        filename=f"{prefix}_{job.id}{mark}.dcm", headers=headers)


@router.post(
    "/{job_id}/retry",
    response_model=RetryOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Queue a failed job again",
    responses={409: {"description": "not failed, failed for its input (the series must be "
                          "sent again), or its files were deleted by retention"}},
)
def retry_job(job_id: str, principal: ClinicianUser, session: DbSession, ctx: Context) -> RetryOut:
    job = load_job(ctx.store, job_id)
    if job.state not in RETRYABLE_STATES:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job {job_id} is {job.state}; only failed or send_failed jobs can be retried",
        )
    try:
        job = ctx.store.requeue_finished(job_id, reason=f"retry requested by {principal.name}")
    except IllegalTransition as error:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(error)) from None
    audit.record(
        session,
        audit.JOB_RETRIED,
        principal.name,
        {"series_instance_uid": job.series_instance_uid},
        job_id=job.id,
    )
    session.commit()
    ctx.enqueue(job.id)
    logger.info("job %s: retry requested by %s", job.id, principal.name)
    return RetryOut(id=job.id, state=job.state)
