"""What the clinicians changed, over time: the contour jobs' ``qa`` summed up per structure
and model version, by week, and alerts for structures whose recent Dice fell.

Each contour job with ``qa`` is one approved structure set. Per structure (rtcontour's TG-263
name; the approved set's name for a structure only it has) and model version: the number of
approved sets, the median Dice (approved vs rtcontour), the share edited (status other than
unchanged: edited, deleted or added) and the median added path length (mm), overall and per
ISO week (Monday, UTC) of the set's arrival. An alert names a structure whose median Dice over
its most recent ``alert_window`` approved sets (any model version) is below ``alert_dice``.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from rtcontour.common.jobstore import Job, JobStore


@dataclass(frozen=True)
class StructureRecord:
    """One structure of one approved structure set."""

    structure: str
    model_name: str
    model_version: str
    received_at: dt.datetime
    job_id: str
    status: str
    dice: float | None
    added_path_length_mm: float | None


@dataclass(frozen=True)
class Figures:
    """Figures over a group of records; medians ``None`` when no record has the value."""

    n_sets: int
    median_dice: float | None
    edited_share: float
    median_added_path_length_mm: float | None

    @classmethod
    def of(cls, records: list[StructureRecord]) -> Figures:
        dice = [r.dice for r in records if r.dice is not None]
        path = [r.added_path_length_mm for r in records if r.added_path_length_mm is not None]
        edited = sum(1 for r in records if r.status != "unchanged")
        return cls(
            n_sets=len({r.job_id for r in records}),
            median_dice=round(statistics.median(dice), 4) if dice else None,
            edited_share=round(edited / len(records), 4) if records else 0.0,
            median_added_path_length_mm=round(statistics.median(path), 2) if path else None,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_sets": self.n_sets,
            "median_dice": self.median_dice,
            "edited_share": self.edited_share,
            "median_added_path_length_mm": self.median_added_path_length_mm,
        }


@dataclass(frozen=True)
class StructureTrend:
    structure: str
    model_name: str
    model_version: str
    overall: Figures
    weeks: tuple[tuple[dt.date, Figures], ...]  # (Monday of the ISO week, figures), in order


@dataclass(frozen=True)
class QaAlert:
    structure: str
    median_dice: float
    n_sets: int  # in the window (at most ``alert_window``)
    model_versions: tuple[str, ...]  # of the sets in the window


@dataclass(frozen=True)
class QaTrends:
    trends: tuple[StructureTrend, ...]
    alerts: tuple[QaAlert, ...]
    alert_dice: float
    alert_window: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "alert_dice": self.alert_dice,
            "alert_window": self.alert_window,
            "trends": [
                {
                    "structure": t.structure,
                    "model_name": t.model_name,
                    "model_version": t.model_version,
                    **t.overall.as_dict(),
                    "weeks": [{"week": week.isoformat(), **f.as_dict()} for week, f in t.weeks],
                }
                for t in self.trends
            ],
            "alerts": [
                {
                    "structure": a.structure,
                    "median_dice": a.median_dice,
                    "n_sets": a.n_sets,
                    "model_versions": list(a.model_versions),
                    "threshold": self.alert_dice,
                }
                for a in self.alerts
            ],
        }


def _when(value: Any, fallback: dt.datetime) -> dt.datetime:
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return fallback
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    return fallback


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def records_from_qa(
    job_id: str, qa: dict[str, Any], model_name: str | None, model_version: str | None,
    created_at: dt.datetime,
) -> list[StructureRecord]:
    """The structures of one job's ``qa`` (malformed items skipped)."""
    received = _when(qa.get("received_at"), created_at)
    name = str(qa.get("model_name") or model_name or "unknown")
    version = str(qa.get("model_version") or model_version or "unknown")
    out = []
    for item in qa.get("structures") or []:
        if not isinstance(item, dict):
            continue
        structure = item.get("roi_name") or item.get("reference_name")
        if not structure:
            continue
        out.append(StructureRecord(
            structure=str(structure), model_name=name, model_version=version,
            received_at=received, job_id=job_id, status=str(item.get("status") or "edited"),
            dice=_number(item.get("dice")),
            added_path_length_mm=_number(item.get("added_path_length_mm")),
        ))
    return out


def load_records(store: JobStore) -> list[StructureRecord]:
    """Every structure of every contour job with ``qa``, oldest set first."""
    query = select(Job.id, Job.qa, Job.model_name, Job.model_version, Job.created_at).where(
        Job.qa.is_not(None)
    )
    records: list[StructureRecord] = []
    with store.session() as session:
        for job_id, qa, model_name, model_version, created_at in session.execute(query):
            if isinstance(qa, dict):
                records += records_from_qa(job_id, qa, model_name, model_version,
                                           created_at or dt.datetime.now(dt.UTC))
    records.sort(key=lambda r: (r.received_at, r.job_id))
    return records


def _monday(when: dt.datetime) -> dt.date:
    day = when.astimezone(dt.UTC).date()
    return day - dt.timedelta(days=day.weekday())


def compute_trends(
    records: Iterable[StructureRecord], *, alert_dice: float, alert_window: int
) -> QaTrends:
    """Trends and alerts of ``records`` (any order)."""
    ordered = sorted(records, key=lambda r: (r.received_at, r.job_id))
    groups: dict[tuple[str, str, str], list[StructureRecord]] = defaultdict(list)
    by_structure: dict[str, list[StructureRecord]] = defaultdict(list)
    for record in ordered:
        groups[(record.structure, record.model_name, record.model_version)].append(record)
        by_structure[record.structure].append(record)
    trends = []
    for (structure, model_name, version), group in sorted(groups.items()):
        weeks: dict[dt.date, list[StructureRecord]] = defaultdict(list)
        for record in group:
            weeks[_monday(record.received_at)].append(record)
        trends.append(StructureTrend(
            structure, model_name, version, Figures.of(group),
            tuple((week, Figures.of(items)) for week, items in sorted(weeks.items())),
        ))
    alerts = []
    for structure, items in sorted(by_structure.items()):
        recent = [r for r in items if r.dice is not None][-alert_window:]
        if not recent:
            continue
        median = statistics.median(r.dice for r in recent if r.dice is not None)
        if median < alert_dice:
            versions = tuple(dict.fromkeys(r.model_version for r in recent))
            alerts.append(QaAlert(structure, round(median, 4), len(recent), versions))
    return QaTrends(tuple(trends), tuple(alerts), alert_dice, alert_window)


def qa_trends(store: JobStore, *, alert_dice: float, alert_window: int) -> QaTrends:
    """``compute_trends`` over every approved structure set in ``store``."""
    return compute_trends(load_records(store), alert_dice=alert_dice, alert_window=alert_window)
