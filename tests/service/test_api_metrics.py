"""/metrics (Prometheus text), /api/stats (dashboard charts), /api/destinations (C-ECHO)."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from rtcontour.common.settings import Destination, Settings
from rtcontour.service import metrics
from rtcontour.service.api.app import c_echo, create_app
from tests.service.api_support import ApiHarness, add_finished_job, harness_fixture, make_harness


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    yield from harness_fixture(tmp_path)


def _families(text: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_report_jobs_by_state_stage_histograms_queue_and_dicom_counters(
    api: ApiHarness,
) -> None:
    add_finished_job(api)
    api.add_job(state="failed", failure_reason="x")
    api.add_job(state="queued")
    metrics.ASSOCIATIONS.inc()
    metrics.INSTANCES_RECEIVED.labels(outcome="stored").inc(3)
    response = api.client.get("/metrics", headers=api.headers("admin"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _families(response.text)
    jobs = samples["rtcontour_jobs"]
    assert jobs[(("state", "done"),)] == 1 and jobs[(("state", "failed"),)] == 1
    assert jobs[(("state", "queued"),)] == 1 and jobs[(("state", "running"),)] == 0
    assert samples["rtcontour_queue_depth"][()] == 3
    inference = samples["rtcontour_job_stage_seconds_bucket"]
    assert inference[(("le", "10.0"), ("stage", "inference"))] == 0
    assert inference[(("le", "20.0"), ("stage", "inference"))] == 1  # the job's 12.5 s
    assert samples["rtcontour_job_stage_seconds_count"][(("stage", "inference"),)] == 1
    assert samples["rtcontour_job_stage_seconds_sum"][(("stage", "load"),)] == pytest.approx(0.4)
    assert samples["rtcontour_dicom_associations_total"][()] >= 1
    assert samples["rtcontour_dicom_instances_received_total"][(("outcome", "stored"),)] >= 3


def test_metrics_token_reads_metrics_only(tmp_path: Path) -> None:
    harness = make_harness(tmp_path)
    settings = Settings(
        data_dir=harness.settings.data_dir, admin_token="a" * 32, metrics_token="m" * 32
    )
    client = type(harness.client)(
        create_app(settings, engine=harness.engine, queue_depth=lambda: None)
    )
    scraper = {"Authorization": "Bearer " + "m" * 32}
    response = client.get("/metrics", headers=scraper)
    assert response.status_code == 200 and "rtcontour_jobs" in response.text
    assert "rtcontour_queue_depth" not in response.text  # unknown depth is left out, not 0
    assert client.get("/api/jobs", headers=scraper).status_code == 401
    assert client.get("/metrics", headers=harness.headers("clinician")).status_code == 403
    assert client.get("/metrics").status_code == 401
    harness.engine.dispose()


def test_stats_buckets_throughput_and_latency(api: ApiHarness) -> None:
    now = dt.datetime.now(dt.UTC)
    for minutes in (10, 20):
        api.add_job(
            state="done",
            created_at=now - dt.timedelta(minutes=minutes + 2),
            finished_at=now - dt.timedelta(minutes=minutes),
        )
    api.add_job(state="failed", finished_at=now - dt.timedelta(minutes=5))
    api.add_job(
        state="done", created_at=now - dt.timedelta(days=3), finished_at=now - dt.timedelta(days=3)
    )
    body = api.client.get(
        "/api/stats?hours=2&bucket_minutes=60", headers=api.headers("viewer")
    ).json()
    assert len(body["buckets"]) == 2
    last = body["buckets"][-1]
    assert last["done"] == 2 and last["failed"] == 1
    assert last["median_latency_s"] == pytest.approx(120, abs=1)
    assert body["queue_depth"] == 3 and body["jobs_by_state"]["done"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_destinations_are_checked_with_a_real_c_echo(tmp_path: Path) -> None:
    scp = AE(ae_title="TPS")
    scp.add_supported_context(Verification)
    port = _free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)]
    )
    try:
        closed = _free_port()
        settings = Settings(
            data_dir=tmp_path / "var",
            admin_token="a" * 32,
            destinations=f"TPS@127.0.0.1:{port},PACS@127.0.0.1:{closed}",
        )
        from fastapi.testclient import TestClient

        client = TestClient(create_app(settings, echo=lambda d: c_echo(d, settings, timeout_s=2.0)))
        rows = client.get(
            "/api/destinations", headers={"Authorization": "Bearer " + "a" * 32}
        ).json()
        assert [(r["destination"], r["reachable"]) for r in rows] == [
            (f"TPS@127.0.0.1:{port}", True),
            (f"PACS@127.0.0.1:{closed}", False),
        ]
        assert rows[0]["status"] == "C-ECHO succeeded"
        assert rows[1]["elapsed_ms"] < 5000
    finally:
        server.shutdown()
    assert c_echo(Destination("TPS", "127.0.0.1", _free_port()), settings, timeout_s=1.0) == (
        False, "unreachable")


def test_jobs_queued_beyond_the_brokers_messages_are_shown_not_hidden(tmp_path: Path) -> None:
    api = make_harness(tmp_path, queue_depth=lambda: 1)  # a broker restarted: 1 message left
    try:
        for _ in range(3):
            api.add_job(state="queued")
        stats = api.client.get("/api/stats", headers=api.headers("viewer")).json()
        assert stats["queue_depth"] == 1 and stats["queued_not_on_broker"] == 2
        text = api.client.get("/metrics", headers=api.headers("admin")).text
        assert _families(text)["rtcontour_jobs_queued_not_on_broker"][()] == 2
    finally:
        api.client.close()
        api.engine.dispose()
