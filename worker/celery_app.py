"""The Celery application of rtcontour (``make_celery``) and ``rtcontour worker``.

Broker: ``settings.broker_url`` (Redis for scaled-out deployments) or, when unset, the
embedded broker (``worker.embedded_broker``: message files in ``data_dir/broker``, no
server). Tasks are acknowledged late, re-queued when their worker process dies, fetched one
at a time, time-limited, and keep no result. The Redis visibility timeout is longer than the
job time limit, so a long job is never handed to a second worker while it still runs.

The job store, not the broker, is the source of truth: ``rtcontour worker`` runs the
recovery sweep (``worker.tasks.RecoverySweeper``) that re-enqueues jobs whose message was
lost (broker restarted, worker killed).
"""

from __future__ import annotations

import argparse
import logging
import socket
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from service.settings import Settings
from worker import embedded_broker
from worker.tasks import (
    RUN_JOB_TASK,
    RecoverySweeper,
    make_enqueue,
    make_queue_depth,
    register_tasks,
)

logger = logging.getLogger(__name__)

QUEUE = "rtcontour"


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


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings`` with ``rtcontour.run_job`` registered."""
    app = Celery("rtcontour", set_as_current=False)
    app.conf.update(celery_config(settings))
    register_tasks(app, settings)
    return app


_clients: dict[tuple[str | None, str], Celery] = {}  # publishing clients, by broker


def enqueue_job(settings: Settings, job_id: str) -> None:
    """Publish ``rtcontour.run_job`` for ``job_id`` on ``settings``' broker.

    For callers without an app of their own (API, standalone listener); the client is built
    at first use and reused.
    """
    key = (settings.broker_url, str(settings.data_dir.resolve()))
    if key not in _clients:
        _clients[key] = make_celery(settings)
    make_enqueue(_clients[key])(job_id)


def main(argv: list[str] | None = None) -> int:
    """``rtcontour worker``: a Celery worker plus the job store's recovery sweep."""
    parser = argparse.ArgumentParser(prog="rtcontour worker", description=__doc__)
    parser.add_argument("--concurrency", type=int, help="pool processes (default: settings)")
    parser.add_argument("--hostname", default=f"rtcontour@{socket.gethostname()}")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument(
        "--no-recovery", action="store_true", help="do not run the recovery sweep here"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.loglevel.upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    settings = Settings.model_validate({})  # from the environment (RTCONTOUR_*)
    app = make_celery(settings)
    sweeper: list[RecoverySweeper] = []

    if not args.no_recovery:

        @worker_ready.connect(weak=False)
        def _start_sweep(**_: Any) -> None:
            from service.db import create_schema, make_engine
            from service.jobstore import JobStore

            engine = make_engine(settings)
            create_schema(engine)
            sweeper.append(
                RecoverySweeper(
                    settings, JobStore(engine), make_enqueue(app), make_queue_depth(app, QUEUE)
                ).start()
            )

        @worker_shutdown.connect(weak=False)
        def _stop_sweep(**_: Any) -> None:
            for running in sweeper:
                running.stop()

    where = settings.broker_url or f"embedded broker in {settings.data_dir / 'broker'}"
    logger.info("worker %s consuming %s from %s", args.hostname, QUEUE, _redact(where))
    worker_args = [
        "worker",
        f"--hostname={args.hostname}",
        f"--loglevel={args.loglevel}",
        f"--concurrency={args.concurrency or settings.worker_concurrency}",
        f"--queues={QUEUE}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    app.worker_main(worker_args)
    return 0


def _redact(url: str) -> str:
    """A broker URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
