"""``GET /api/notifications`` (admin): the webhook deliveries (``common.notify``), newest
first, with their state (pending, delivered, failed), attempts and last error, so that a
webhook that stopped answering is noticed."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from rtcontour.common.notify import NotificationStore
from rtcontour.service.api.deps import AdminUser, Context

router = APIRouter(prefix="/api/notifications", tags=["notifications"])


class NotificationOut(BaseModel):
    id: int
    created_at: dt.datetime
    event: str
    job_id: str | None = None
    url: str  # without a password
    state: str
    attempts: int
    next_attempt_at: dt.datetime | None = None
    last_error: str | None = None
    delivered_at: dt.datetime | None = None


class NotificationPageOut(BaseModel):
    items: list[NotificationOut]
    counts: dict[str, int]


@router.get("", response_model=NotificationPageOut, summary="Webhook deliveries")
def list_notifications(
    _: AdminUser,
    ctx: Context,
    state: Annotated[Literal["pending", "delivered", "failed"] | None,
                     Query(description="only those in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> NotificationPageOut:
    store = NotificationStore(ctx.engine)
    rows = store.list(state=state, limit=limit)
    return NotificationPageOut(items=[NotificationOut(**row.as_dict()) for row in rows],
                               counts=store.counts_by_state())
