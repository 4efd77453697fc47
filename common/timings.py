"""A job's stage timings that add up: from the C-STORE release to the RTSTRUCT at the TPS.

Each stage is recorded where it happens (seconds, in the job store's ``jobs.<column>``):

=================  ===============================================================  ============
stage              what                                                             recorded by
=================  ===============================================================  ============
quiet_period       the last association carrying the series released -> handed to  listener
                   the intake (``RTCONTOUR_QUIET_PERIOD_S``)
intake             routing, the job created, the instances moved into its folder    intake
queue              queued -> claimed by a worker (every run's wait, summed)         worker
load               the series read and checked (CT; a dose job's structure set)     worker
model_load         the model package loaded (0 when resident in the worker)         worker
preprocess         to canonical orientation, resampled to the model's grid          worker
inference          the network (sliding window); a dose job: the dose prediction    worker
postprocess        probabilities back to the CT grid, clean-up, confidence          worker
write              the RTSTRUCT / RTDOSE built (contours traced)                    worker
archive            the outputs written and fsync'd, recorded as the job's outputs   worker
send               C-STORE to every destination                                     worker
review_wait        held for a clinician's approval (awaiting_review -> decision)    API
other              the remainder: bookkeeping between stages, a failed run's time   (derived)
=================  ===============================================================  ============

``total`` runs from the release (the job's creation for a job without one, e.g. one recovered
after a restart) to the outputs acknowledged by the last destination (``delivered_at``; the
job's end when nothing was sent), and equals the sum of the stages, ``other`` included.
``machine`` is ``total`` less ``review_wait``: what the dashboard's latency chart reports
(for a job not held for review it is the end-to-end figure, release to RTSTRUCT at the TPS).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

__all__ = ["MEASURED_STAGES", "STAGE_COLUMNS", "JobTimings", "job_timings"]

# Stage name -> the jobs column holding its seconds, in the order a job goes through them.
# ("write" is stored in the older column contours_s; "load" is the series, not the model.)
MEASURED_STAGES: tuple[tuple[str, str], ...] = (
    ("quiet_period", "quiet_s"),
    ("intake", "intake_s"),
    ("queue", "queue_s"),
    ("load", "load_s"),
    ("model_load", "model_load_s"),
    ("preprocess", "preprocess_s"),
    ("inference", "inference_s"),
    ("postprocess", "postprocess_s"),
    ("write", "contours_s"),
    ("archive", "archive_s"),
    ("send", "send_s"),
    ("review_wait", "review_wait_s"),
)
STAGE_COLUMNS = dict(MEASURED_STAGES)


@dataclass(frozen=True)
class JobTimings:
    """Seconds per stage (None: not reached or not measured), ``other``, ``machine`` and
    ``total`` (see the module docstring); ``end_to_end`` is ``total`` when the outputs were
    delivered, else None."""

    stages: dict[str, float | None]
    other: float | None
    machine: float | None
    total: float | None
    end_to_end: float | None

    def as_dict(self) -> dict[str, float | None]:
        """``{"<stage>_s": seconds, ...}``: the machine's stages in order, ``other_s``,
        ``review_wait_s``, ``machine_s``, ``total_s``."""
        out: dict[str, float | None] = {f"{name}_s": value for name, value in self.stages.items()
                                        if name != "review_wait"}
        out.update(other_s=self.other, review_wait_s=self.stages["review_wait"],
                   machine_s=self.machine, total_s=self.total)
        return out


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def job_timings(job: Any) -> JobTimings:
    """The stage timings of a job row (``common.jobstore.Job`` or anything with its columns)."""
    stages = {name: _round(getattr(job, column, None)) for name, column in MEASURED_STAGES}
    start = getattr(job, "released_at", None) or job.created_at
    delivered = getattr(job, "delivered_at", None)
    total = _round(_seconds(start, delivered or job.finished_at))
    review = stages["review_wait"] or 0.0
    other = machine = None
    if total is not None:  # from the rounded figures, so the table shown adds up exactly
        other = _round(total - sum(value for value in stages.values() if value is not None))
        machine = _round(total - review)
    return JobTimings(stages=stages, other=other, machine=machine, total=total,
                      end_to_end=_round(_seconds(start, delivered)))


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)
