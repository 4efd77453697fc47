"""Webhook notifications against a local HTTP receiver: a failed job, a job awaiting review and
a listener refusal are POSTed as JSON without patient identifiers (unless allowed), retried
with backoff off the pipeline, each delivery audited, the failures listed for the dashboard."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from rtcontour.common.audit import AuditEvent
from rtcontour.common.notify import (
    NotificationDispatcher,
    NotificationStore,
    notify_job,
    refusal_notifier,
)
from rtcontour.common.refusals import make_refusal_recorder
from rtcontour.common.routes import parse_routing
from rtcontour.worker.tasks import execute_job
from tests.conftest import write_phantom_series
from tests.service.api_support import ApiHarness, make_harness
from tests.worker.pipeline_support import submit_series, threshold_runtime


class Receiver:
    """A webhook receiver on loopback: records each POSTed JSON, answers the next status of
    ``statuses`` (then 200)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                receiver.received.append(json.loads(self.rfile.read(length)))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    peer = Receiver()
    yield peer
    peer.close()


def _api(tmp_path: Path, receiver: Receiver, **settings: Any) -> ApiHarness:
    routes = tmp_path / "routes.yaml"
    routes.write_text(json.dumps({"routes": [{"name": "hn", "review": "none",
                                              "notify": [receiver.url]}], "default": "hn"}))
    api = make_harness(tmp_path, settings_extra={
        "min_slices": 5, "routes_file": routes, "public_url": "https://rtcontour.clinic.local",
        "notify_backoff_s": 0.05, **settings})
    api.routing = parse_routing(json.loads(routes.read_text()))  # type: ignore[attr-defined]
    return api


def _submit(api: ApiHarness, tmp_path: Path, drop_slice: bool = False) -> str:
    files = write_phantom_series(tmp_path / "ct", patient_id="PID-SECRET")
    if drop_slice:  # a missing slice: the job fails with the loader's reason
        files.sort(key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
        files.pop(10).unlink()
    return submit_series(api, files)




def _audit(api: ApiHarness, event: str) -> list[AuditEvent]:
    with Session(api.engine) as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.event == event)))


def test_failed_job_is_posted_to_the_routes_webhook_without_the_patient(
    tmp_path: Path, receiver: Receiver
) -> None:
    api = _api(tmp_path, receiver)
    job_id = _submit(api, tmp_path, drop_slice=True)
    assert execute_job(job_id, threshold_runtime(api)).state == "failed"
    assert receiver.received == []  # queued only: the pipeline never waits on a webhook
    assert NotificationDispatcher(api.settings, api.engine).deliver_due() == 1
    [payload] = receiver.received
    assert payload["event"] == "job.failed" and payload["job_id"] == job_id
    assert payload["state"] == "failed" and payload["route"] == "hn"
    assert "spacing" in payload["reason"].lower()
    assert payload["job_url"] == f"https://rtcontour.clinic.local/#/jobs/{job_id}"
    assert "PID-SECRET" not in json.dumps(payload) and "patient_id" not in payload
    [entry] = _audit(api, "notify.delivered")
    assert entry.job_id == job_id and entry.detail["url"] == receiver.url
    api.engine.dispose()


def test_patient_identifiers_are_sent_only_when_the_setting_allows(
    tmp_path: Path, receiver: Receiver
) -> None:
    api = _api(tmp_path, receiver, notify_include_patient=True)
    job_id = _submit(api, tmp_path, drop_slice=True)
    execute_job(job_id, threshold_runtime(api))
    NotificationDispatcher(api.settings, api.engine).deliver_due()
    assert receiver.received[0]["patient_id"] == "PID-SECRET"
    api.engine.dispose()


def test_a_job_awaiting_review_is_notified(tmp_path: Path, receiver: Receiver) -> None:
    api = _api(tmp_path, receiver)
    api.routing = parse_routing({"routes": [{"name": "hn", "review": "required"}]})  # type: ignore[attr-defined]
    job_id = _submit(api, tmp_path)
    assert execute_job(job_id, threshold_runtime(api)).state == "awaiting_review"
    NotificationDispatcher(api.settings, api.engine).deliver_due()
    assert [p["event"] for p in receiver.received] == ["job.awaiting_review"]
    api.engine.dispose()


def test_delivery_is_retried_with_backoff_then_given_up_and_listed_as_failed(
    tmp_path: Path, receiver: Receiver
) -> None:
    api = _api(tmp_path, receiver, notify_attempts=3, notify_webhooks=[receiver.url])
    job = api.add_job(state="failed")
    receiver.statuses = [500, 503, 500, 500]
    assert notify_job(api.settings, api.engine, job, "job.failed", "broken", route_urls=[]) == 1
    dispatcher = NotificationDispatcher(api.settings, api.engine, interval_s=0.02).start()
    try:
        deadline = time.monotonic() + 10
        store = NotificationStore(api.engine)
        while time.monotonic() < deadline and store.counts_by_state().get("failed") != 1:
            time.sleep(0.05)
    finally:
        dispatcher.stop()
    assert len(receiver.received) == 3  # notify_attempts, never more
    [row] = NotificationStore(api.engine).list()
    assert row.state == "failed" and row.attempts == 3 and "HTTP 500" in (row.last_error or "")
    [entry] = _audit(api, "notify.failed")
    assert entry.job_id == job.id
    reply = api.client.get("/api/notifications?state=failed", headers=api.headers("admin"))
    assert reply.status_code == 200
    assert [item["job_id"] for item in reply.json()["items"]] == [job.id]
    assert api.client.get("/api/notifications",
                          headers=api.headers("clinician")).status_code == 403
    api.engine.dispose()


def test_a_webhook_that_recovers_gets_the_notification_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    api = _api(tmp_path, receiver, notify_webhooks=[receiver.url])
    job = api.add_job(state="send_failed")
    receiver.statuses = [502]
    notify_job(api.settings, api.engine, job, "job.send_failed", "TPS down", route_urls=[])
    dispatcher = NotificationDispatcher(api.settings, api.engine)
    dispatcher.deliver_due()
    assert NotificationStore(api.engine).list()[0].state == "pending"
    time.sleep(0.1)  # the backoff
    dispatcher.deliver_due()
    dispatcher.deliver_due()
    assert len(receiver.received) == 2
    assert NotificationStore(api.engine).list()[0].state == "delivered"
    api.engine.dispose()


def test_listener_refusals_are_notified_once_per_caller_and_reason(
    tmp_path: Path, receiver: Receiver
) -> None:
    api = _api(tmp_path, receiver, notify_webhooks=[receiver.url])
    record = make_refusal_recorder(api.engine, refusal_notifier(api.settings, api.engine))
    for n in range(3):  # every instance of a refused series
        record({"kind": "instance", "calling_ae": "CT_SCANNER", "address": "127.0.0.1",
                "what": f"instance 1.2.{n}", "why": "not a CT image", "status": 0xA900})
    NotificationDispatcher(api.settings, api.engine).deliver_due()
    [payload] = receiver.received
    assert payload["event"] == "dicom.refused" and payload["calling_ae"] == "CT_SCANNER"
    assert payload["reason"] == "not a CT image"
    api.engine.dispose()


def test_webhook_urls_are_validated_naming_the_route() -> None:
    from rtcontour.common.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="route 'r', field notify"):
        parse_routing({"routes": [{"name": "r", "notify": ["ftp://x"]}]})
