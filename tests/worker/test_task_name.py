"""The task name on the wire: what the listener and API publish is what the workers register,
and a worker that does not know a name says so loudly instead of dropping the job silently.

``rtcontour.run_job`` is part of the protocol between the edges and the workers of a rolling
upgrade, like a DICOM SOP class: renaming it (or changing its arguments) needs a new,
versioned name (``rtcontour.run_job.v2``), so an old worker meeting a new message rejects it
with an error naming the task, and the job store's recovery sweep queues the job again for a
worker that knows it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from celery.contrib.testing.worker import start_worker

from rtcontour.common.queue import RUN_JOB_TASK, enqueue_job, publisher
from rtcontour.common.settings import Settings
from rtcontour.worker.celery_app import make_celery

# Pinned on purpose: a change here is a protocol change (see the module docstring).
WIRE_NAME = "rtcontour.run_job"


def _queued_messages(settings: Settings) -> list[dict[str, object]]:
    queue = Path(settings.data_dir) / "broker" / "queue"
    return [json.loads(path.read_text()) for path in sorted(queue.iterdir())
            if not path.name.startswith(".")]


def test_published_task_name_is_the_one_workers_register(settings: Settings) -> None:
    assert RUN_JOB_TASK == WIRE_NAME
    assert WIRE_NAME in make_celery(settings).tasks
    enqueue_job(settings, "0123456789abcdef0123456789abcdef")
    (message,) = _queued_messages(settings)
    headers = message["headers"]
    assert isinstance(headers, dict)
    assert headers["task"] == WIRE_NAME
    assert headers["argsrepr"] == "['0123456789abcdef0123456789abcdef']"


def test_worker_rejects_a_task_name_it_does_not_register_with_an_error(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    renamed = f"{WIRE_NAME}.v2"
    app = make_celery(settings)
    publisher(settings).send_task(renamed, args=["0123456789abcdef0123456789abcdef"],
                                  ignore_result=True)
    caplog.set_level(logging.ERROR, logger="celery")
    with start_worker(app, pool="solo", concurrency=1, perform_ping_check=False,
                      loglevel="ERROR", shutdown_timeout=10):
        deadline = time.monotonic() + 30
        while _queued_messages(settings) and time.monotonic() < deadline:
            time.sleep(0.1)
        while time.monotonic() < deadline and not any(
                renamed in record.getMessage() for record in caplog.records):
            time.sleep(0.1)
    errors = [record for record in caplog.records
              if record.levelno >= logging.ERROR and renamed in record.getMessage()]
    assert errors, [record.getMessage() for record in caplog.records]
    assert "unregistered task" in errors[0].getMessage()
    assert _queued_messages(settings) == []  # rejected once, not redelivered in a loop
