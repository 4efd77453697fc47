"""The Celery app and task configuration: late acks, one at a time, time limits, names."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings
from worker.celery_app import celery_config, enqueue_job, make_celery
from worker.tasks import RUN_JOB_TASK


@pytest.mark.parametrize(
    "broker_url", [None, "redis://127.0.0.1:6379/0"], ids=["embedded", "redis"]
)
def test_task_is_late_acked_requeued_on_worker_loss_and_time_limited(
    settings: Settings, broker_url: str | None
) -> None:
    settings = settings.model_copy(update={"broker_url": broker_url, "job_time_limit_s": 600})
    app = make_celery(settings)
    task = app.tasks[RUN_JOB_TASK]
    assert task.name == "rtcontour.run_job"
    assert task.acks_late and task.reject_on_worker_lost and task.ignore_result
    assert task.time_limit == 600 and 0 < task.soft_time_limit < 600
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost


def test_redis_visibility_timeout_outlasts_the_job_time_limit(settings: Settings) -> None:
    settings = settings.model_copy(
        update={"broker_url": "redis://127.0.0.1:6379/0", "job_time_limit_s": 1800}
    )
    options = celery_config(settings)["broker_transport_options"]
    assert options["visibility_timeout"] > 1800


def test_embedded_broker_keeps_messages_in_data_dir(settings: Settings) -> None:
    config = celery_config(settings)
    assert config["broker_url"].startswith("rtcfs://")
    assert config["worker_enable_remote_control"] is False
    enqueue_job(settings, "0123456789abcdef0123456789abcdef")
    queue = Path(settings.data_dir) / "broker" / "queue"
    (message,) = [p for p in queue.iterdir() if not p.name.startswith(".")]
    assert message.name.endswith(".rtcontour.msg")
    assert "0123456789abcdef0123456789abcdef" in message.read_text()
