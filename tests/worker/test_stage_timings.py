"""Stage timings that add up (``common.timings``): every stage of a job from the TPS's release
to its RTSTRUCT at the TPS is recorded, they sum to the total, and a clinician's review wait
is kept apart from machine time (an approval no longer overwrites the queue wait). The model
is made resident and warmed at worker start, so a job's model load is ~0."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from rtcontour.common.db import make_engine
from rtcontour.common.jobstore import JobStore
from rtcontour.common.routes import parse_routing
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Destination, Settings
from rtcontour.common.timings import MEASURED_STAGES, job_timings
from rtcontour.worker.pipeline import SegmenterCache
from rtcontour.worker.tasks import WorkerRuntime, execute_job
from tests.conftest import StoreScp, ThresholdModel, write_phantom_series
from tests.service.api_support import ApiHarness, make_harness
from tests.worker.pipeline_support import submit_series, threshold_runtime

MACHINE_STAGES = ("quiet_period", "intake", "queue", "load", "model_load", "preprocess",
                  "inference", "postprocess", "write", "archive", "send")


class WarmableModel(ThresholdModel):
    def __init__(self) -> None:
        super().__init__()
        self.warm_ups = 0

    def warm_up(self) -> float:
        self.warm_ups += 1
        return 0.0


def _harness(tmp_path: Path, tps: StoreScp, review: bool) -> ApiHarness:
    route: dict[str, Any] = {"name": "held" if review else "direct"}
    if review:
        route["review"] = "required"
    routing = parse_routing({"routes": [route], "default": route["name"]})
    harness = make_harness(tmp_path, settings_extra={
        "destinations": [Destination.parse(tps.destination)], "min_slices": 5},
        routing=routing)
    harness.routing = routing  # type: ignore[attr-defined]
    return harness


@pytest.fixture(params=[False, True], ids=["direct", "review"])
def api(request: pytest.FixtureRequest, tmp_path: Path, tps: StoreScp) -> ApiHarness:
    harness = _harness(tmp_path, tps, request.param)
    yield harness
    harness.client.close()
    harness.engine.dispose()


def _submit(api: ApiHarness, tmp_path: Path, quiet_s: float) -> str:
    return submit_series(api, write_phantom_series(tmp_path / "ct", seed=3), quiet_s=quiet_s)




def test_every_stage_is_recorded_they_add_up_and_review_wait_is_kept_apart(
    api: ApiHarness, tmp_path: Path, tps: StoreScp
) -> None:
    model = WarmableModel()
    runtime = threshold_runtime(api, model)
    runtime.warm_up()  # what the worker does at start
    assert model.warm_ups == 1
    job_id = _submit(api, tmp_path, quiet_s=5.0)
    time.sleep(0.3)  # queued
    held = execute_job(job_id, runtime).state == "awaiting_review"
    if held:
        time.sleep(0.6)  # a clinician looking at it
        reply = api.client.post(f"/api/jobs/{job_id}/approve", headers=api.headers("clinician"))
        assert reply.status_code == 202
        time.sleep(0.2)  # queued again
        assert execute_job(job_id, runtime).state == "done"
    deadline = time.monotonic() + 10
    while not tps.received() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(tps.received()) == 1

    job = api.store.get(job_id)
    timings = job_timings(job)
    assert job.released_at is not None and job.delivered_at is not None
    for stage in MACHINE_STAGES:
        assert timings.stages[stage] is not None, stage
        assert timings.stages[stage] >= 0.0, stage
    assert timings.stages["quiet_period"] == 5.0
    assert timings.stages["model_load"] < 0.05  # resident: loaded at start
    # every run's queue wait counts: the approved job's second run does not replace the first's
    assert timings.stages["queue"] >= (0.5 if held else 0.3)
    total = sum(value for value in timings.stages.values() if value is not None)
    assert total + timings.other == pytest.approx(timings.total, abs=2e-3)
    assert 0.0 <= timings.other < 0.5
    if held:
        assert 0.6 <= timings.stages["review_wait"] < 5.0
        assert timings.machine == pytest.approx(timings.total - timings.stages["review_wait"])
        assert timings.machine < 5.0 + timings.stages["queue"] + 3.0
    else:
        assert timings.stages["review_wait"] is None and timings.machine == timings.total
        assert timings.end_to_end == timings.total

    body = api.client.get(f"/api/jobs/{job_id}", headers=api.headers("viewer")).json()
    shown = body["timings"]
    assert list(shown) == list(timings.as_dict())  # the order a job goes through them
    assert {f"{name}_s" for name, _ in MEASURED_STAGES} < set(shown)
    assert shown["total_s"] == timings.total and shown["machine_s"] == timings.machine
    assert "queue_wait_s" not in shown
    stats = api.client.get("/api/stats?hours=1&bucket_minutes=60",
                           headers=api.headers("viewer")).json()
    assert stats["buckets"][-1]["median_latency_s"] == pytest.approx(timings.machine, abs=0.01)


def test_a_job_of_an_earlier_release_still_shows_a_total(tmp_path: Path, tps: StoreScp) -> None:
    harness = _harness(tmp_path, tps, review=False)
    try:
        import datetime as dt

        job = harness.add_job(load_s=1.0, inference_s=2.0, contours_s=0.5, send_s=0.25)
        job = harness.store.get(job.id)
        timings = job_timings(job)
        assert timings.stages["write"] == 0.5 and timings.stages["quiet_period"] is None
        assert timings.total == pytest.approx(
            (job.finished_at - job.created_at).total_seconds(), abs=1e-3)
        assert timings.end_to_end is None and isinstance(job.created_at, dt.datetime)
    finally:
        harness.client.close()
        harness.engine.dispose()


def test_warm_up_loads_each_route_s_model_once_and_a_job_then_finds_it_resident(
    tmp_path: Path,
) -> None:
    loaded: list[str] = []

    def loader(path: Path, overlap: float, mirror: bool) -> WarmableModel:
        loaded.append(path.name)
        return WarmableModel()

    routes = tmp_path / "routes.yaml"
    routes.write_text("routes:\n  - {name: a, model: pkg-a}\n  - {name: b, model: pkg-b}\n"
                      "  - {name: c, action: ignore}\ndefault: a\n", encoding="utf-8")
    settings = Settings(data_dir=tmp_path / "var", routes_file=routes)  # type: ignore[call-arg]
    cache = SegmenterCache(loader=loader, resolver=lambda _s, request: Path(str(request)))
    engine = make_engine(settings)
    create_schema(engine)
    runtime = WorkerRuntime(settings, model_cache=cache, store=JobStore(engine))
    runtime.warm_up()
    assert sorted(loaded) == ["pkg-a", "pkg-b"]
    model = runtime.model("pkg-a")
    assert isinstance(model, WarmableModel) and model.warm_ups == 1 and len(loaded) == 2
