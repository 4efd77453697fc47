"""``GET /api/stats``: what the dashboard charts: throughput, latency, queue, failures."""

from __future__ import annotations

import datetime as dt
import statistics
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import select

from rtcontour.common.jobstore import Job, JobState
from rtcontour.common.timings import job_timings
from rtcontour.service.api.deps import Context, ViewerUser
from rtcontour.service.metrics import queued_not_on_broker

router = APIRouter(prefix="/api/stats", tags=["stats"])

FAILED_STATES = (JobState.FAILED.value, JobState.SEND_FAILED.value)


class BucketOut(BaseModel):
    start: dt.datetime
    done: int
    failed: int
    median_latency_s: float | None = Field(
        None, description="end to end: the TPS's C-STORE release -> the outputs acknowledged "
        "by the destinations, a clinician's review wait left out (common.timings machine_s)")
    max_latency_s: float | None = None


class StatsOut(BaseModel):
    now: dt.datetime
    jobs_by_state: dict[str, int]
    queue_depth: int | None = None
    queued_not_on_broker: int | None = Field(
        None, description="jobs queued in the job store with no message on the broker (a "
        "broker restart): the recovery sweep sends them again"
    )
    bucket_minutes: int
    buckets: list[BucketOut]
    awaiting_review: int = Field(
        0, description="jobs held for a clinician's approval (list them with "
        "GET /api/jobs?state=awaiting_review)")


@router.get("", response_model=StatsOut, summary="Throughput and latency over time")
def stats(
    _: ViewerUser,
    ctx: Context,
    hours: Annotated[int, Query(ge=1, le=24 * 14)] = 24,
    bucket_minutes: Annotated[int, Query(ge=1, le=24 * 60)] = 60,
) -> StatsOut:
    now = dt.datetime.now(dt.UTC)
    width = dt.timedelta(minutes=bucket_minutes)
    n_buckets = max(1, min(500, int(dt.timedelta(hours=hours) / width)))
    first = now - n_buckets * width
    finished: list[list[float]] = [[] for _ in range(n_buckets)]
    failed = [0] * n_buckets
    with ctx.store.session() as session:
        rows = session.execute(
            select(Job.state, Job.created_at, Job.finished_at, Job.released_at,
                   Job.delivered_at, Job.review_wait_s).where(Job.finished_at >= first)
        )
        for row in rows:
            if row.finished_at is None:
                continue
            slot = min(n_buckets - 1, int((row.finished_at - first) / width))
            if row.state in FAILED_STATES:
                failed[slot] += 1
            elif row.state == JobState.DONE.value:
                machine_s = job_timings(row).machine
                if machine_s is not None:
                    finished[slot].append(machine_s)
    buckets = [
        BucketOut(
            start=first + i * width,
            done=len(latencies),
            failed=failed[i],
            median_latency_s=round(statistics.median(latencies), 2) if latencies else None,
            max_latency_s=round(max(latencies), 2) if latencies else None,
        )
        for i, latencies in enumerate(finished)
    ]
    counts = ctx.store.counts_by_state()
    depth = ctx.queue_depth()
    return StatsOut(
        now=now,
        jobs_by_state=counts,
        queue_depth=depth,
        queued_not_on_broker=queued_not_on_broker(counts, depth),
        bucket_minutes=bucket_minutes,
        buckets=buckets,
        awaiting_review=counts.get(JobState.AWAITING_REVIEW.value, 0),
    )
