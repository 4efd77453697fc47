"""Jobs: list with filters and pagination, detail, RTSTRUCT download, retry."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from service import audit
from service.api.deps import ClinicianUser, Context, DbSession, ViewerUser
from service.jobstore import IllegalTransition, Job, JobFilter, JobNotFound, JobState, JobStore

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/jobs", tags=["jobs"])

RETRYABLE_STATES = (JobState.FAILED.value, JobState.SEND_FAILED.value)


class StructureOut(BaseModel):
    roi_name: str
    volume_cc: float | None = None
    colour: list[int] | None = Field(None, description="RGB 0-255")


class StageTimingsOut(BaseModel):
    """Seconds spent in each stage of the pipeline (null: not reached)."""

    load_s: float | None = None
    inference_s: float | None = None
    contours_s: float | None = None
    send_s: float | None = None
    queue_wait_s: float | None = None
    total_s: float | None = None


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
    created_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    purged_at: dt.datetime | None = Field(
        None, description="when the retention policy deleted the job's CT and RTSTRUCT files"
    )


class JobDetailOut(JobSummaryOut):
    study_instance_uid: str | None = None
    rtstruct_sop_instance_uid: str | None = None
    has_rtstruct: bool = False
    attempts: int | None = None
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


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def summary(job: Job) -> JobSummaryOut:
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
        created_at=job.created_at,
        finished_at=job.finished_at,
        purged_at=job.purged_at,
    )


def _structures(job: Job) -> list[StructureOut]:
    out = []
    for item in job.structures or []:
        if not isinstance(item, dict) or "roi_name" not in item:
            continue
        colour = item.get("colour") or item.get("colour_rgb")
        out.append(
            StructureOut(
                roi_name=str(item["roi_name"]),
                volume_cc=item.get("volume_cc"),
                colour=[int(c) for c in colour] if colour else None,
            )
        )
    return out


def rtstruct_file(job: Job) -> Path | None:
    """The archived RTSTRUCT of ``job`` if it exists on disk."""
    path = job.rtstruct_path
    if not path:
        return None
    file = Path(path)
    return file if file.is_file() else None


def detail(job: Job) -> JobDetailOut:
    timings = StageTimingsOut(
        load_s=job.load_s,
        inference_s=job.inference_s,
        contours_s=job.contours_s,
        send_s=job.send_s,
        queue_wait_s=_seconds(job.queued_at, job.started_at),
        total_s=_seconds(job.created_at, job.finished_at),
    )
    return JobDetailOut(
        **summary(job).model_dump(),
        study_instance_uid=job.study_instance_uid,
        rtstruct_sop_instance_uid=job.rtstruct_sop_instance_uid,
        has_rtstruct=rtstruct_file(job) is not None,
        attempts=job.attempts,
        queued_at=job.queued_at,
        started_at=job.started_at,
        timings=timings,
        structures=_structures(job),
    )


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
    _: ViewerUser,
    ctx: Context,
    state: Annotated[list[JobState] | None, Query(description="one or more job states")] = None,
    created_from: Annotated[dt.datetime | None, Query(description="created at or after")] = None,
    created_to: Annotated[dt.datetime | None, Query(description="created before")] = None,
    calling_ae: Annotated[str | None, Query(max_length=16)] = None,
    model: Annotated[str | None, Query(max_length=64, description="model name")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> JobPageOut:
    where = JobFilter(
        state=state or None,
        since=_utc(created_from),
        until=_utc(created_to),
        calling_ae=calling_ae or None,
        model_name=model or None,
    )
    jobs = ctx.store.list(where, limit=limit, offset=offset)
    return JobPageOut(
        items=[summary(j) for j in jobs],
        total=ctx.store.count(where),
        limit=limit,
        offset=offset,
    )


@router.get("/{job_id}", response_model=JobDetailOut, summary="One job with timings and structures")
def get_job(job_id: str, _: ViewerUser, ctx: Context) -> JobDetailOut:
    return detail(load_job(ctx.store, job_id))


@router.get(
    "/{job_id}/rtstruct",
    response_class=FileResponse,
    summary="Download the archived RTSTRUCT",
    responses={
        200: {"content": {"application/dicom": {}}},
        404: {"description": "no RTSTRUCT"},
        410: {"description": "deleted by the retention policy"},
    },
)
def download_rtstruct(
    job_id: str, principal: ClinicianUser, session: DbSession, ctx: Context
) -> FileResponse:
    job = load_job(ctx.store, job_id)
    if job.purged_at is not None:
        raise HTTPException(
            status.HTTP_410_GONE,
            detail=f"job {job_id}'s files were deleted on {job.purged_at:%Y-%m-%d} by the "
            f"retention policy ({ctx.settings.retention_days:g} days after the job ended)",
        )
    file = rtstruct_file(job)
    if file is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"job {job_id} has no RTSTRUCT (state {job.state})"
        )
    audit.record(
        session,
        audit.RTSTRUCT_DOWNLOAD,
        principal.name,
        {
            "sop_instance_uid": job.rtstruct_sop_instance_uid,
            "series_instance_uid": job.series_instance_uid,
        },
        job_id=job.id,
    )
    session.commit()
    logger.info("job %s: RTSTRUCT downloaded by %s", job.id, principal.name)
    return FileResponse(file, media_type="application/dicom", filename=f"RS_{job.id}.dcm")


@router.post(
    "/{job_id}/retry",
    response_model=RetryOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Queue a failed job again",
    responses={409: {"description": "not failed, or its files were deleted by retention"}},
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
