"""``GET /api/qa/trends``: how much the clinicians edit rtcontour's structures, over time.

Viewer role: aggregates over structures and weeks, nothing that identifies a patient or a job.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from rtcontour.service.api.deps import Context, ViewerUser
from rtcontour.service.qa_trends import site_qa_trends

router = APIRouter(prefix="/api/qa", tags=["qa"])


class FiguresOut(BaseModel):
    n_sets: int = Field(description="approved structure sets that hold this structure")
    median_dice: float | None = Field(None, description="approved vs rtcontour")
    edited_share: float = Field(description="share with status edited, deleted or added")
    median_added_path_length_mm: float | None = None
    n_not_in_approved_set: int = Field(
        0, description="approved sets without this structure at all: counted here only, in "
        "no median, share or alert")


class WeekOut(FiguresOut):
    week: str = Field(description="Monday of the ISO week (UTC), YYYY-MM-DD")


class TrendOut(FiguresOut):
    structure: str
    model_name: str
    model_version: str
    expected_dice: float | None = Field(
        None, description="the model card's validation Dice of this structure (manifest)")
    weeks: list[WeekOut]


class AlertOut(BaseModel):
    structure: str
    median_dice: float = Field(description="over its most recent approved sets (n_sets)")
    n_sets: int = Field(description="approved sets the alert is based on")
    model_versions: list[str]
    reasons: list[str] = Field(description="model_card, site_baseline and/or floor")
    threshold: float = Field(description="the highest threshold the median fell below")
    expected_dice: float | None = Field(None, description="the model card's, over the window")
    baseline_dice: float | None = Field(None, description="the site's earlier median")
    n_baseline_sets: int = 0
    message: str = Field(description="one sentence: what fell, below what, based on how many")


class AlertPolicyOut(BaseModel):
    window: int = Field(description="RTCONTOUR_QA_ALERT_WINDOW")
    min_sets: int = Field(description="RTCONTOUR_QA_ALERT_MIN_SETS: no alert before this many")
    margin: float = Field(description="RTCONTOUR_QA_ALERT_MARGIN (Dice)")
    floor: float | None = Field(None, description="RTCONTOUR_QA_ALERT_DICE (unset: none)")


class QaTrendsOut(BaseModel):
    alert_policy: AlertPolicyOut
    alert_dice: float | None = Field(None, description="RTCONTOUR_QA_ALERT_DICE (the floor)")
    alert_window: int = Field(description="RTCONTOUR_QA_ALERT_WINDOW")
    trends: list[TrendOut]
    alerts: list[AlertOut]


@router.get(
    "/trends",
    response_model=QaTrendsOut,
    summary="Per structure and model version, by week: approved sets, median Dice, share "
    "edited, median added path length, the model card's Dice; alerts on drift",
)
def trends(_: ViewerUser, ctx: Context) -> Any:
    return site_qa_trends(ctx.store, ctx.settings).as_dict()
