"""``GET /api/refusals`` (admin): what the DICOM listener refused, newest first (when,
calling AE, address, what, why), so a TPS misconfiguration is told from a silent loss."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from rtcontour.common.refusals import RefusalStore
from rtcontour.service.api.deps import AdminUser, Context

router = APIRouter(prefix="/api/refusals", tags=["refusals"])


class RefusalOut(BaseModel):
    at: dt.datetime
    kind: str
    calling_ae: str
    called_ae: str
    address: str
    what: str
    why: str
    series_instance_uid: str | None = None
    status: int | None = None


class RefusalPageOut(BaseModel):
    items: list[RefusalOut]
    counts: dict[str, int]


@router.get("", response_model=RefusalPageOut, summary="What the DICOM listener refused")
def list_refusals(
    _: AdminUser,
    ctx: Context,
    since: Annotated[dt.datetime | None, Query(description="at or after")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> RefusalPageOut:
    store = RefusalStore(ctx.engine)
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    rows = store.list(limit=limit, offset=offset, since=since)
    return RefusalPageOut(items=[RefusalOut(**row.as_dict()) for row in rows],
                          counts=store.counts_by_kind())
