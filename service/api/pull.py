"""``POST /api/pull`` (clinician, admin): pull a CT series from the PACS and contour it as if
the TPS had pushed it (``service.pull``); ``GET /api/pulls`` and ``/api/pulls/{id}``: how
each pull went and the job it became.

The C-FIND and the choice of series happen in the request (a query matching nothing, or
several CT series no route decides between, is answered at once with a sentence); the
retrieve (C-MOVE, or C-GET) runs in the background and the answer is 202 with the pull.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from rtcontour.common.pulls import Pull, PullStore
from rtcontour.service.api.deps import ClinicianUser, Context
from rtcontour.service.pull import (
    Ambiguous,
    InvalidQuery,
    NothingMatches,
    PacsUnavailable,
    Puller,
    PullError,
    PullNotConfigured,
    PullQuery,
)

router = APIRouter(tags=["pull"])


class PullIn(BaseModel):
    """What to pull: a patient ID and/or an accession number, or a study or series UID."""

    patient_id: str | None = Field(None, max_length=64)
    accession_number: str | None = Field(None, max_length=16)
    study_instance_uid: str | None = Field(None, max_length=64)
    series_instance_uid: str | None = Field(None, max_length=64)


class PullOut(BaseModel):
    id: str
    state: str = Field(description="retrieving, retrieved (the job follows the listener's "
                       "quiet period) or failed (reason)")
    requested_by: str
    created_at: dt.datetime
    pacs: str
    retrieve: str = Field(description="move (C-MOVE to rtcontour's AE title) or get (C-GET)")
    study_instance_uid: str
    series_instance_uid: str
    series_description: str
    expected_instances: int | None = None
    retrieved_instances: int | None = None
    failed_instances: int | None = None
    reason: str | None = None
    finished_at: dt.datetime | None = None
    job_id: str | None = Field(None, description="the job the series became")


def _out(pull: Pull) -> PullOut:
    return PullOut(
        id=pull.id, state=pull.state, requested_by=pull.requested_by,
        created_at=pull.created_at, pacs=pull.pacs, retrieve=pull.retrieve,
        study_instance_uid=pull.study_instance_uid,
        series_instance_uid=pull.series_instance_uid,
        series_description=pull.series_description,
        expected_instances=pull.expected_instances,
        retrieved_instances=pull.retrieved_instances,
        failed_instances=pull.failed_instances, reason=pull.reason,
        finished_at=pull.finished_at, job_id=pull.job_id)


# PullError -> HTTP status, once for this edge.
_STATUS: tuple[tuple[type[PullError], int], ...] = (
    (InvalidQuery, status.HTTP_400_BAD_REQUEST),  # a sentence, not FastAPI's 422 list
    (PullNotConfigured, status.HTTP_503_SERVICE_UNAVAILABLE),
    (NothingMatches, status.HTTP_404_NOT_FOUND),
    (Ambiguous, status.HTTP_409_CONFLICT),
    (PacsUnavailable, status.HTTP_502_BAD_GATEWAY),
)


def _http_error(error: PullError) -> HTTPException:
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return HTTPException(code, detail=str(error))
    return HTTPException(status.HTTP_502_BAD_GATEWAY, detail=str(error))


@router.post("/api/pull", response_model=PullOut, status_code=status.HTTP_202_ACCEPTED,
             summary="Pull a CT series from the PACS and contour it",
             responses={400: {"description": "the query says nothing to pull, or holds a "
                                             "malformed UID"},
                        404: {"description": "nothing (or no CT series a route contours) "
                                             "matches"},
                        409: {"description": "several CT series match: pull one by its UID"},
                        502: {"description": "the PACS could not be reached or failed"},
                        503: {"description": "no PACS configured (RTCONTOUR_PACS)"}})
async def pull_series(body: PullIn, principal: ClinicianUser, ctx: Context) -> PullOut:
    try:
        query = PullQuery(**body.model_dump())
        puller = Puller(ctx.settings, ctx.engine, ctx.routing, receiver=ctx.receiver)
        pull = await run_in_threadpool(puller.pull, query, principal.name, wait=False)
    except PullError as error:
        raise _http_error(error) from None
    return _out(pull)


@router.get("/api/pulls", response_model=list[PullOut], summary="Recent pulls, newest first")
def list_pulls(_: ClinicianUser, ctx: Context,
               limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[PullOut]:
    return [_out(pull) for pull in PullStore(ctx.engine).list(limit=limit)]


@router.get("/api/pulls/{pull_id}", response_model=PullOut, summary="One pull")
def get_pull(pull_id: str, _: ClinicianUser, ctx: Context) -> PullOut:
    pull = PullStore(ctx.engine).get(pull_id)
    if pull is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no pull {pull_id[:64]!r}")
    return _out(pull)
