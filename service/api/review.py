"""The approval gate: a clinician approves (then it is sent) or rejects (never sent) a job
its route holds for review (``review: required``). Both audited with user and time."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field

from rtcontour.common import audit
from rtcontour.common.jobstore import IllegalTransition
from rtcontour.service.api.deps import ClinicianUser, Context, DbSession
from rtcontour.service.api.jobs import load_job

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/jobs", tags=["review"])


class ReviewOut(BaseModel):
    id: str
    state: str


class RejectIn(BaseModel):
    reason: str = Field(min_length=3, max_length=500, description="why, for the job's record")


@router.post(
    "/{job_id}/approve",
    response_model=ReviewOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Approve a job held for review: its outputs are sent",
    responses={409: {"description": "not awaiting review"}},
)
def approve_job(job_id: str, principal: ClinicianUser, session: DbSession,
                ctx: Context) -> ReviewOut:
    load_job(ctx.store, job_id)
    try:
        job = ctx.store.review(job_id, approved=True, user=principal.name, reason=None)
    except IllegalTransition as error:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(error)) from None
    audit.record(session, audit.JOB_APPROVED, principal.name,
                 {"series_instance_uid": job.series_instance_uid}, job_id=job.id)
    session.commit()
    ctx.enqueue(job.id)
    logger.info("job %s: approved by %s; queued to be sent", job.id, principal.name)
    return ReviewOut(id=job.id, state=job.state)


@router.post(
    "/{job_id}/reject",
    response_model=ReviewOut,
    summary="Reject a job held for review: nothing is sent",
    responses={409: {"description": "not awaiting review"}},
)
def reject_job(job_id: str, body: RejectIn, principal: ClinicianUser, session: DbSession,
               ctx: Context) -> ReviewOut:
    load_job(ctx.store, job_id)
    try:
        job = ctx.store.review(job_id, approved=False, user=principal.name,
                               reason=body.reason.strip())
    except IllegalTransition as error:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(error)) from None
    audit.record(session, audit.JOB_REJECTED, principal.name,
                 {"series_instance_uid": job.series_instance_uid, "reason": job.review_reason},
                 job_id=job.id)
    session.commit()
    logger.info("job %s: rejected by %s; nothing is sent", job.id, principal.name)
    return ReviewOut(id=job.id, state=job.state)
