"""In-process Prometheus counters of the DICOM listener (exposed by the API's /metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from common.jobstore import JobStore

ASSOCIATIONS = Counter(
    "rtcontour_dicom_associations", "DICOM associations accepted by the listener"
)
ASSOCIATIONS_REJECTED = Counter(
    "rtcontour_dicom_associations_rejected",
    "DICOM associations the listener rejected, by reason",
    ["reason"],
)
REFUSALS = Counter(
    "rtcontour_dicom_refusals",
    "Associations, presentation contexts and instances the DICOM listener refused, by kind",
    ["kind"],
)
INSTANCES_RECEIVED = Counter(
    "rtcontour_dicom_instances_received",
    "C-STORE requests received, by outcome (stored, refused, failed)",
    ["outcome"],
)

# --- API and job store (issue 5) ----------------------------------------------------------
# Stage latencies observed in-process by a worker that exposes its own metrics; the API's
# /metrics reports the same stages from the job store (``JobStoreCollector``), which sees
# every worker's jobs.
STAGE_BUCKETS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
STAGE_SECONDS = Histogram(
    "rtcontour_worker_stage_seconds",
    "Seconds spent in a pipeline stage by this worker process",
    ["stage"],
    buckets=STAGE_BUCKETS_S,
)


class JobStoreCollector(Collector):
    """Collected at scrape time from the job store and the broker (never from a cache).

    ``rtcontour_jobs{state}``: jobs in each state; ``rtcontour_queue_depth``: messages waiting
    in the broker (absent if unknown); ``rtcontour_job_stage_seconds{stage}``: histogram of the
    recorded stage durations of every job (cumulative, as Prometheus expects).
    """

    def __init__(self, store: JobStore, queue_depth: Callable[[], int | None]) -> None:
        self.store = store
        self.queue_depth = queue_depth

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "rtcontour_jobs", "Jobs in the job store by state", labels=["state"]
        )
        for state, count in self.store.counts_by_state().items():
            jobs.add_metric([state], count)
        yield jobs
        depth = self.queue_depth()
        if depth is not None:
            yield GaugeMetricFamily(
                "rtcontour_queue_depth", "Job messages waiting in the broker queue", value=depth
            )
        yield self._stage_histogram()

    def _stage_histogram(self) -> HistogramMetricFamily:
        from sqlalchemy import case, func, select

        from common.jobstore import STAGES, Job

        histogram = HistogramMetricFamily(
            "rtcontour_job_stage_seconds",
            "Recorded pipeline stage durations of all jobs, by stage",
            labels=["stage"],
        )
        columns: list[Any] = []
        for stage in STAGES:
            column = getattr(Job, f"{stage}_s")
            columns += [func.sum(case((column <= bound, 1), else_=0)) for bound in STAGE_BUCKETS_S]
            columns += [func.count(column), func.coalesce(func.sum(column), 0.0)]
        with self.store.session() as session:
            row = session.execute(select(*columns)).one()
        width = len(STAGE_BUCKETS_S) + 2
        for number, stage in enumerate(STAGES):
            values = row[number * width : (number + 1) * width]
            count, total = int(values[-2] or 0), float(values[-1] or 0.0)
            buckets = [
                (str(b), float(v or 0)) for b, v in zip(STAGE_BUCKETS_S, values, strict=False)
            ]
            buckets.append(("+Inf", float(count)))
            histogram.add_metric([stage], buckets, total)
        return histogram
