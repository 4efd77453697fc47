"""``GET /api/qa/trends``: how much the clinicians edit rtcontour's structures, over time.

Viewer role: aggregates over structures and weeks, nothing that identifies a patient or a job.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from rtcontour.service.api.deps import Context, ViewerUser
from rtcontour.service.qa_trends import qa_trends

router = APIRouter(prefix="/api/qa", tags=["qa"])


class FiguresOut(BaseModel):
    n_sets: int = Field(description="approved structure sets with this structure")
    median_dice: float | None = Field(None, description="approved vs rtcontour")
    edited_share: float = Field(description="share with status edited, deleted or added")
    median_added_path_length_mm: float | None = None


class WeekOut(FiguresOut):
    week: str = Field(description="Monday of the ISO week (UTC), YYYY-MM-DD")


class TrendOut(FiguresOut):
    structure: str
    model_name: str
    model_version: str
    weeks: list[WeekOut]


class AlertOut(BaseModel):
    structure: str
    median_dice: float = Field(description="over its most recent alert_window approved sets")
    n_sets: int
    model_versions: list[str]
    threshold: float


class QaTrendsOut(BaseModel):
    alert_dice: float = Field(description="RTCONTOUR_QA_ALERT_DICE")
    alert_window: int = Field(description="RTCONTOUR_QA_ALERT_WINDOW")
    trends: list[TrendOut]
    alerts: list[AlertOut]


@router.get(
    "/trends",
    response_model=QaTrendsOut,
    summary="Per structure and model version, by week: approved sets, median Dice, share "
    "edited, median added path length; alerts",
)
def trends(_: ViewerUser, ctx: Context) -> Any:
    settings = ctx.settings
    return qa_trends(
        ctx.store, alert_dice=settings.qa_alert_dice, alert_window=settings.qa_alert_window
    ).as_dict()
