"""The audit log over the API (admin only): filters and pagination, newest first."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import func, select

from rtcontour.common.audit import AuditEvent
from rtcontour.service.api.deps import AdminUser, DbSession

router = APIRouter(prefix="/api/audit", tags=["audit"])


class AuditEventOut(BaseModel):
    id: int
    at: dt.datetime
    event: str
    actor: str
    job_id: str | None = None
    detail: dict[str, Any]


class AuditPageOut(BaseModel):
    items: list[AuditEventOut]
    total: int
    limit: int
    offset: int


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


@router.get("", response_model=AuditPageOut, summary="Audit entries, newest first")
def list_audit(
    _: AdminUser,
    session: DbSession,
    event: Annotated[str | None, Query(max_length=64, description="e.g. rtstruct.download")] = None,
    actor: Annotated[str | None, Query(max_length=64)] = None,
    job_id: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[dt.datetime | None, Query(description="at or after")] = None,
    until: Annotated[dt.datetime | None, Query(description="before")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> AuditPageOut:
    conditions: list[Any] = []
    if event:
        conditions.append(AuditEvent.event == event)
    if actor:
        conditions.append(AuditEvent.actor == actor)
    if job_id:
        conditions.append(AuditEvent.job_id == job_id)
    since_utc, until_utc = _utc(since), _utc(until)
    if since_utc is not None:
        conditions.append(AuditEvent.at >= since_utc)
    if until_utc is not None:
        conditions.append(AuditEvent.at < until_utc)
    total = session.scalar(select(func.count(AuditEvent.id)).where(*conditions)) or 0
    rows = session.scalars(
        select(AuditEvent)
        .where(*conditions)
        .order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
        .limit(limit)
        .offset(offset)
    )
    items = [
        AuditEventOut(
            id=row.id,
            at=row.at if row.at.tzinfo else row.at.replace(tzinfo=dt.UTC),
            event=row.event,
            actor=row.actor,
            job_id=row.job_id,
            detail=row.detail or {},
        )
        for row in rows
    ]
    return AuditPageOut(items=items, total=int(total), limit=limit, offset=offset)
