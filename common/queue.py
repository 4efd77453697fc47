"""The publish-only queue client: task names, Celery configuration, enqueue, queue depth.

The listener and the API hand jobs to the worker through this module and never import the
worker's tasks (Celery's "app separate from tasks"): ``publisher(settings)`` is a Celery app
with no task registered that only sends ``rtcontour.run_job`` by name. The worker builds
its consuming app from the same ``celery_config`` (``worker.celery_app.make_celery``).

Broker: ``settings.broker_url`` (Redis for scaled-out deployments) or, when unset, the
embedded broker (``common.embedded_broker``: message files in ``data_dir/broker``, no
server). Tasks are acknowledged late, re-queued when their worker process dies, fetched one
at a time, time-limited, and keep no result. The Redis visibility timeout is longer than the
job time limit, so a long job is never handed to a second worker while it still runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery

from rtcontour.common import embedded_broker
from rtcontour.common.settings import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "QUEUE",
    "RUN_JOB_TASK",
    "celery_config",
    "enqueue_job",
    "make_enqueue",
    "make_queue_depth",
    "publisher",
    "queue_depth",
]

QUEUE = "rtcontour"
# The name on the wire between the edges and the workers: a rename or new arguments need a
# new, versioned name ("rtcontour.run_job.v2") so an old worker in a rolling upgrade
# rejects the message with an error (tests/worker/test_task_name.py).
RUN_JOB_TASK = "rtcontour.run_job"


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (see the module docstring)."""
    config: dict[str, Any] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": QUEUE,
        "task_routes": {RUN_JOB_TASK: {"queue": QUEUE}},
        "task_time_limit": settings.job_time_limit_s,
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # A running job keeps running when the broker connection drops: its claim in the job
        # store, not the message, guards against a second run.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "enable_utc": True,
    }
    if settings.broker_url:
        config["broker_url"] = settings.broker_url
        # Longer than any job may run, so an unacknowledged job is not redelivered while alive.
        config["broker_transport_options"] = {
            "visibility_timeout": int(settings.job_time_limit_s * 2 + 60),
        }
    else:
        embedded_broker.register()
        config["broker_url"] = embedded_broker.broker_url()
        config["broker_transport_options"] = embedded_broker.transport_options(
            settings.data_dir / "broker"
        )
        # Broadcasts (remote control, gossip) need fanout; the embedded broker is one node.
        config["worker_enable_remote_control"] = False
    return config


def publisher(settings: Settings) -> Celery:
    """A Celery app for ``settings`` that publishes by task name and registers no task."""
    app = Celery("rtcontour", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def make_enqueue(app: Celery) -> Callable[[str], None]:
    """``enqueue(job_id)``: publish ``rtcontour.run_job`` for the job (no result kept)."""

    def enqueue(job_id: str) -> None:
        app.send_task(RUN_JOB_TASK, args=[job_id], ignore_result=True)

    return enqueue


def make_queue_depth(app: Celery, queue: str = QUEUE) -> Callable[[], int | None]:
    """``depth()``: messages waiting in ``queue`` on the app's broker (None if unknown).

    Works for Redis and the embedded broker alike (kombu's passive queue declare); a queue
    that does not exist yet (Redis drops empty lists) counts 0.
    """

    def depth() -> int | None:
        from kombu.exceptions import ChannelError

        try:
            with app.connection_for_read() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
                try:
                    declared = connection.default_channel.queue_declare(queue=queue, passive=True)
                except ChannelError:
                    return 0
                return int(declared.message_count)
        except Exception as error:  # the dashboard shows "unknown" rather than failing
            logger.warning("queue depth unavailable from the broker: %s", error)
            return None

    return depth


_publishers: dict[tuple[str | None, str], Celery] = {}  # by broker, built at first use


def _publisher_for(settings: Settings) -> Celery:
    key = (settings.broker_url, str(settings.data_dir.resolve()))
    if key not in _publishers:
        _publishers[key] = publisher(settings)
    return _publishers[key]


def enqueue_job(settings: Settings, job_id: str) -> None:
    """Publish ``rtcontour.run_job`` for ``job_id`` on ``settings``' broker (client reused)."""
    make_enqueue(_publisher_for(settings))(job_id)


def queue_depth(settings: Settings) -> Callable[[], int | None]:
    """``depth()`` of ``settings``' broker queue; the client is built at the first call."""

    def depth() -> int | None:
        return make_queue_depth(_publisher_for(settings))()

    return depth
