"""``GET /api/routes`` (admin): the routing rules, and which route a series would take.

Without query parameters it lists the routes. With attributes of a series (``calling_ae``,
``series_description``, ...; any match key) or a ``job_id`` (the attributes are read from
that job's first instance), it also returns the decision and, for every route tried, why it
matched or not: the physicist's rule tester, the same logic the intake runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel, Field

from rtcontour.common.jobstore import JobNotFound
from rtcontour.common.routes import (
    MATCH_ATTRIBUTES,
    first_instance,
    match_keywords,
    series_attributes,
)
from rtcontour.common.settings import job_folder
from rtcontour.service.api.deps import AdminUser, Context, DbSession
from rtcontour.service.api.jobs import audit_patient_view

router = APIRouter(prefix="/api/routes", tags=["routes"])


class RouteOut(BaseModel):
    name: str
    match: dict[str, str]
    action: str
    model: str | None = None
    destinations: list[str] | None = None
    review: str = Field("none", description="required: results wait for a clinician's "
                        "approval (awaiting_review) before they are sent")
    dose_model: str | None = None
    prescriptions: dict[str, float] | None = None
    qa_absent: str = Field("not_in_approved_set", description="structure sets: what an organ "
                           "the approved set lacks means to QA (not_in_approved_set or deleted)")


class TrialOut(BaseModel):
    route: str
    matched: bool
    why: str


class DecisionOut(BaseModel):
    route: str | None
    action: str
    reason: str
    model: str | None = None
    destinations: list[str] | None = None
    review: str | None = Field(None, description="the route's review (required or none)")
    trials: list[TrialOut]
    attributes: dict[str, str]


class RoutingOut(BaseModel):
    source: str | None
    default: str
    routes: list[RouteOut]
    decision: DecisionOut | None = None


@router.get("", response_model=RoutingOut, summary="The routing rules; test a series against them")
def get_routes(
    request: Request,
    principal: AdminUser,
    ctx: Context,
    session: DbSession,
    job_id: Annotated[str | None, Query(max_length=32, description="explain this job")] = None,
) -> RoutingOut:
    table = ctx.routing
    out = RoutingOut(
        source=table.source,
        default=table.default,
        routes=[RouteOut(**route.model_dump()) for route in table.routes],
    )
    given = {key: value for key, value in request.query_params.items() if key != "job_id"}
    keywords = match_keywords(table)
    unknown = sorted(set(given) - set(MATCH_ATTRIBUTES) - set(keywords))
    if unknown:
        raise HTTPException(
            422,
            detail=f"unknown series attribute(s) {', '.join(unknown)}: use one of "
            f"{', '.join([*MATCH_ATTRIBUTES, *keywords])} or job_id",
        )
    if job_id is None and not given:
        return out
    attributes: dict[str, Any] = series_attributes(None, keywords=keywords)
    if job_id is not None:
        try:
            job = ctx.store.get(job_id)
        except JobNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} does not exist") from None
        folder = Path(job.spool_dir) if job.spool_dir else job_folder(ctx.settings, job.id)
        attributes = series_attributes(first_instance(folder), calling_ae=job.calling_ae,
                                       keywords=keywords)
        # The attributes may name the patient (a route matching PatientID, the study
        # description): shown to an admin, audited like the job page.
        audit_patient_view(session, principal.name, [job], searched=False)
    attributes.update(given)
    decision = ctx.routing.decide(attributes)
    out.decision = DecisionOut(**{
        **decision.as_dict(),
        "review": decision.route.review if decision.route is not None else None,
    }, attributes=attributes)
    return out
