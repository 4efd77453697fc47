"""In-process Prometheus counters of the DICOM listener (exposed by the API's /metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from rtcontour.service.qa_trends import QaTrends
from rtcontour.service.qa_trends import qa_trends as compute_qa_trends

if TYPE_CHECKING:
    from rtcontour.common.jobstore import JobStore

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
    What the clinicians changed (``service.qa_trends``), per structure and model version over
    all approved sets: ``rtcontour_qa_approved_sets``, ``rtcontour_qa_median_dice``,
    ``rtcontour_qa_edited_share``, ``rtcontour_qa_median_added_path_length_mm``; and
    ``rtcontour_qa_alert{structure}`` 1 when its recent median Dice drifted (see
    ``service.qa_trends.AlertPolicy``; ``rtcontour_qa_recent_median_dice{structure}`` gives
    the value).
    """

    def __init__(
        self,
        store: JobStore,
        queue_depth: Callable[[], int | None],
        *,
        qa_trends: Callable[[], QaTrends] | None = None,
    ) -> None:
        self.store = store
        self.queue_depth = queue_depth
        # The QA trends and alerts as the site's settings want them (None: default policy,
        # no model card expectations).
        self.qa_trends = qa_trends or (lambda: compute_qa_trends(store))

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "rtcontour_jobs", "Jobs in the job store by state", labels=["state"]
        )
        counts = self.store.counts_by_state()
        for state, count in counts.items():
            jobs.add_metric([state], count)
        yield jobs
        depth = self.queue_depth()
        if depth is not None:
            yield GaugeMetricFamily(
                "rtcontour_queue_depth", "Job messages waiting in the broker queue", value=depth
            )
            # A broker restarted (or a message lost) leaves queued jobs with no message: the
            # recovery sweep re-sends them; until then they are counted here, not as 0.
            yield GaugeMetricFamily(
                "rtcontour_jobs_queued_not_on_broker",
                "Jobs queued in the job store beyond the messages waiting in the broker",
                value=queued_not_on_broker(counts, depth),
            )
        yield self._stage_histogram()
        yield from self._qa_gauges()

    def _qa_gauges(self) -> Iterator[Metric]:
        trends = self.qa_trends()
        labels = ["structure", "model_version"]
        sets = GaugeMetricFamily(
            "rtcontour_qa_approved_sets", "Approved structure sets compared, per structure and "
            "model version", labels=labels)
        dice = GaugeMetricFamily(
            "rtcontour_qa_median_dice", "Median Dice of approved vs rtcontour contours",
            labels=labels)
        edited = GaugeMetricFamily(
            "rtcontour_qa_edited_share", "Share of approved sets in which clinicians edited, "
            "deleted or added the structure", labels=labels)
        path = GaugeMetricFamily(
            "rtcontour_qa_median_added_path_length_mm", "Median contour length clinicians "
            "drew (added path length, mm)", labels=labels)
        for trend in trends.trends:
            key = [trend.structure, trend.model_version]
            sets.add_metric(key, trend.overall.n_sets)
            edited.add_metric(key, trend.overall.edited_share)
            if trend.overall.median_dice is not None:
                dice.add_metric(key, trend.overall.median_dice)
            if trend.overall.median_added_path_length_mm is not None:
                path.add_metric(key, trend.overall.median_added_path_length_mm)
        yield from (sets, dice, edited, path)
        alert = GaugeMetricFamily(
            "rtcontour_qa_alert", "1 if the structure's median Dice over its most recent "
            "approved sets (RTCONTOUR_QA_ALERT_WINDOW, at least RTCONTOUR_QA_ALERT_MIN_SETS) "
            "drifted below the model card's expectation or the site's earlier sets by more "
            "than RTCONTOUR_QA_ALERT_MARGIN, or below RTCONTOUR_QA_ALERT_DICE if set",
            labels=["structure"])
        recent = GaugeMetricFamily(
            "rtcontour_qa_recent_median_dice", "Median Dice over the structure's most recent "
            "approved sets (RTCONTOUR_QA_ALERT_WINDOW)", labels=["structure"])
        alerted = {a.structure: a for a in trends.alerts}
        for structure in sorted({t.structure for t in trends.trends}):
            alert.add_metric([structure], 1.0 if structure in alerted else 0.0)
        for item in trends.alerts:
            recent.add_metric([item.structure], item.median_dice)
        yield from (alert, recent)

    def _stage_histogram(self) -> HistogramMetricFamily:
        from sqlalchemy import case, func, select

        from rtcontour.common.jobstore import STAGES, Job

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


def queued_not_on_broker(counts_by_state: dict[str, int], queue_depth: int | None) -> int | None:
    """Jobs received or queued in the job store for which the broker holds no message (None
    when the broker's depth is unknown)."""
    if queue_depth is None:
        return None
    waiting = counts_by_state.get("received", 0) + counts_by_state.get("queued", 0)
    return max(0, waiting - queue_depth)
