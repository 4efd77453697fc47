"""What the clinicians changed, over time: the contour jobs' ``qa`` summed up per structure
and model version, by week, and alerts for structures whose recent Dice drifted down.

Each contour job with ``qa`` is one approved structure set. Per structure (rtcontour's TG-263
name; the approved set's name for a structure only it has) and model version: the number of
approved sets that hold it, the median Dice (approved vs rtcontour), the share edited (status
edited, deleted or added) and the median added path length (mm), overall and per ISO week
(Monday, UTC) of the set's arrival. A structure the approved set does not hold ("not in the
approved set", ``worker.qa``) says nothing about our contour: it is only counted
(``n_not_in_approved_set``), never in a median, a share or an alert.

An alert (``AlertPolicy``) looks at a structure's most recent ``window`` approved sets that
hold it (any model version) once there are at least ``min_sets`` of them, and fires when their
median Dice is
- more than ``margin`` below what the model card expects of that structure (the package
  manifest's validation Dice of each set's model version, averaged over the window), or
- more than ``margin`` below the median of the site's own earlier sets (at least ``min_sets``
  sets before the window, the latest ``window`` of them), or
- below ``floor``, an absolute Dice, when one is set.
Each alert says which, with the figures and how many sets it is based on.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from rtcontour.common.jobstore import Job, JobStore
from rtcontour.common.settings import Settings
from rtcontour.models.package import MANIFEST_NAME, default_packages_root

logger = logging.getLogger(__name__)

NOT_IN_APPROVED_SET = "not_in_approved_set"  # worker.qa.StructureStatus.NOT_IN_APPROVED_SET

# (model name, model version) -> {TG-263 structure: validation Dice}; empty when unknown.
Expectations = Callable[[str, str], Mapping[str, float]]


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
    """Figures over a group of records; medians ``None`` when no record has the value.
    Records of structures not in the approved set are counted apart and in nothing else."""

    n_sets: int
    median_dice: float | None
    edited_share: float
    median_added_path_length_mm: float | None
    n_not_in_approved_set: int = 0

    @classmethod
    def of(cls, records: list[StructureRecord]) -> Figures:
        held = [r for r in records if r.status != NOT_IN_APPROVED_SET]
        dice = [r.dice for r in held if r.dice is not None]
        path = [r.added_path_length_mm for r in held if r.added_path_length_mm is not None]
        edited = sum(1 for r in held if r.status != "unchanged")
        return cls(
            n_sets=len({r.job_id for r in held}),
            median_dice=round(statistics.median(dice), 4) if dice else None,
            edited_share=round(edited / len(held), 4) if held else 0.0,
            median_added_path_length_mm=round(statistics.median(path), 2) if path else None,
            n_not_in_approved_set=len({r.job_id for r in records
                                       if r.status == NOT_IN_APPROVED_SET}),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_sets": self.n_sets,
            "median_dice": self.median_dice,
            "edited_share": self.edited_share,
            "median_added_path_length_mm": self.median_added_path_length_mm,
            "n_not_in_approved_set": self.n_not_in_approved_set,
        }


@dataclass(frozen=True)
class StructureTrend:
    structure: str
    model_name: str
    model_version: str
    overall: Figures
    weeks: tuple[tuple[dt.date, Figures], ...]  # (Monday of the ISO week, figures), in order
    expected_dice: float | None = None  # the model card's validation Dice of the structure


@dataclass(frozen=True)
class AlertPolicy:
    """When a structure's recent Dice is worth a person's attention (see the module doc)."""

    window: int = 10
    min_sets: int = 5
    margin: float = 0.1
    floor: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AlertPolicy:
        return cls(window=settings.qa_alert_window, min_sets=settings.qa_alert_min_sets,
                   margin=settings.qa_alert_margin, floor=settings.qa_alert_dice)

    def as_dict(self) -> dict[str, Any]:
        return {"window": self.window, "min_sets": self.min_sets, "margin": self.margin,
                "floor": self.floor}


@dataclass(frozen=True)
class QaAlert:
    structure: str
    median_dice: float
    n_sets: int  # approved sets it is based on (the window: at most ``window``)
    model_versions: tuple[str, ...]  # of the sets in the window
    reasons: tuple[str, ...]  # "model_card", "site_baseline", "floor"
    threshold: float  # the highest of the thresholds it fell below
    message: str  # one sentence a person can act on
    expected_dice: float | None = None  # the model card's, averaged over the window
    baseline_dice: float | None = None  # the site's earlier median
    n_baseline_sets: int = 0


@dataclass(frozen=True)
class QaTrends:
    trends: tuple[StructureTrend, ...]
    alerts: tuple[QaAlert, ...]
    policy: AlertPolicy

    def as_dict(self) -> dict[str, Any]:
        return {
            "alert_policy": self.policy.as_dict(),
            "alert_dice": self.policy.floor,
            "alert_window": self.policy.window,
            "trends": [
                {
                    "structure": t.structure,
                    "model_name": t.model_name,
                    "model_version": t.model_version,
                    "expected_dice": t.expected_dice,
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
                    "reasons": list(a.reasons),
                    "threshold": a.threshold,
                    "expected_dice": a.expected_dice,
                    "baseline_dice": a.baseline_dice,
                    "n_baseline_sets": a.n_baseline_sets,
                    "message": a.message,
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


def _no_expectations(model_name: str, model_version: str) -> Mapping[str, float]:
    return {}


def _alert(structure: str, items: list[StructureRecord], policy: AlertPolicy,
           expectations: Expectations) -> QaAlert | None:
    """The alert of one structure's records (oldest first), or None."""
    held = [r for r in items if r.status != NOT_IN_APPROVED_SET and r.dice is not None]
    recent = held[-policy.window:]
    if len(recent) < policy.min_sets:
        return None
    median = statistics.median(r.dice for r in recent if r.dice is not None)
    n = len(recent)
    expected_values = [expectations(r.model_name, r.model_version).get(structure)
                       for r in recent]
    known = [value for value in expected_values if value is not None]
    expected = round(statistics.fmean(known), 4) if known else None
    earlier = held[:-policy.window][-policy.window:] if len(held) > policy.window else []
    baseline = (round(statistics.median(r.dice for r in earlier if r.dice is not None), 4)
                if len(earlier) >= policy.min_sets else None)
    found: list[tuple[str, float, str]] = []
    if expected is not None and median < expected - policy.margin:
        found.append(("model_card", expected - policy.margin,
                      f"more than {policy.margin:.2f} below the {expected:.2f} the model card "
                      f"expects of {structure}"))
    if baseline is not None and median < baseline - policy.margin:
        found.append(("site_baseline", baseline - policy.margin,
                      f"more than {policy.margin:.2f} below the {baseline:.2f} of this site's "
                      f"{len(earlier)} earlier approved sets"))
    if policy.floor is not None and median < policy.floor:
        found.append(("floor", policy.floor, f"below the floor of {policy.floor:.2f}"))
    if not found:
        return None
    message = (f"{structure}: median Dice {median:.2f} over its last {n} approved sets is "
               + "; and ".join(text for _, _, text in found) + ".")
    return QaAlert(
        structure=structure, median_dice=round(median, 4), n_sets=n,
        model_versions=tuple(dict.fromkeys(r.model_version for r in recent)),
        reasons=tuple(kind for kind, _, _ in found),
        threshold=round(max(limit for _, limit, _ in found), 4), message=message,
        expected_dice=expected, baseline_dice=baseline,
        n_baseline_sets=len(earlier) if baseline is not None else 0)


def compute_trends(
    records: Iterable[StructureRecord],
    *,
    policy: AlertPolicy | None = None,
    expectations: Expectations | None = None,
) -> QaTrends:
    """Trends and alerts of ``records`` (any order); ``expectations`` gives each model
    version's validation Dice per structure (default: none known)."""
    policy = policy or AlertPolicy()
    expect = expectations or _no_expectations
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
            expected_dice=expect(model_name, version).get(structure),
        ))
    alerts = [alert for structure, items in sorted(by_structure.items())
              if (alert := _alert(structure, items, policy, expect)) is not None]
    return QaTrends(tuple(trends), tuple(alerts), policy)


def manifest_expectations(settings: Settings) -> Expectations:
    """What each installed model package's card expects, per structure: the validation Dice
    of ``<packages dir>/<name>-<version>/manifest.json`` (read once per version; a package
    that is not installed, or has no figures, expects nothing)."""
    root = settings.model_packages_dir or default_packages_root()
    cache: dict[tuple[str, str], dict[str, float]] = {}

    def expectations(model_name: str, model_version: str) -> Mapping[str, float]:
        key = (model_name, model_version)
        if key not in cache:
            cache[key] = _validation_dice(root / f"{model_name}-{model_version}" / MANIFEST_NAME)
        return cache[key]

    return expectations


def _validation_dice(path: Path) -> dict[str, float]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        logger.warning("QA: the model card %s cannot be read; no expectation from it", path)
        return {}
    metrics = manifest.get("validation_metrics") if isinstance(manifest, dict) else None
    return {str(name): float(item["dice"]) for name, item in (metrics or {}).items()
            if isinstance(item, dict) and isinstance(item.get("dice"), int | float)}


def qa_trends(store: JobStore, *, policy: AlertPolicy | None = None,
              expectations: Expectations | None = None) -> QaTrends:
    """``compute_trends`` over every approved structure set in ``store``."""
    return compute_trends(load_records(store), policy=policy, expectations=expectations)


def site_qa_trends(store: JobStore, settings: Settings) -> QaTrends:
    """The trends and alerts as ``settings`` want them, against the installed model cards."""
    return qa_trends(store, policy=AlertPolicy.from_settings(settings),
                     expectations=manifest_expectations(settings))
