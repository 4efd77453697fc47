"""The consuming Celery application of rtcontour (``make_celery``) and ``rtcontour worker``.

Its configuration is the publishers' (``common.queue.celery_config``: broker, late
acknowledgement, time limits); this module adds the tasks (``worker.tasks.register_tasks``).

The job store, not the broker, is the source of truth: ``rtcontour worker`` runs the
recovery sweep (``worker.tasks.RecoverySweeper``) that re-enqueues jobs whose message was
lost (broker restarted, worker killed).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutdown
from celery.utils.nodenames import default_nodename, host_format

from rtcontour.common.db import make_engine
from rtcontour.common.jobstore import JobStore
from rtcontour.common.notify import NotificationDispatcher
from rtcontour.common.queue import QUEUE, celery_config, make_enqueue, make_queue_depth
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings
from rtcontour.models.registry import load_checked_routing
from rtcontour.worker.tasks import RecoverySweeper, register_tasks, warm_up_in_background

logger = logging.getLogger(__name__)

# The Celery node name ("w1@host"), for the pool processes to name themselves in job logs and
# claims (``WorkerRuntime.worker_name``); set by ``rtcontour worker``, not a setting.
WORKER_NODE_ENV = "RTCONTOUR_WORKER_NODE"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings`` with ``rtcontour.run_job`` registered."""
    app = Celery("rtcontour", set_as_current=False)
    app.conf.update(celery_config(settings))
    register_tasks(app, settings)
    return app


def main(argv: list[str] | None = None) -> int:
    """``rtcontour worker``: a Celery worker plus the job store's recovery sweep."""
    parser = argparse.ArgumentParser(
        prog="rtcontour worker",
        description=(
            "Run a worker: it takes jobs from the queue (RTCONTOUR_BROKER_URL), contours each "
            "CT series and sends the RTSTRUCT to its destinations. Run as many as you like, on "
            "any machine that sees the same RTCONTOUR_DATA_DIR and RTCONTOUR_DATABASE_URL as "
            "the listener."
        ),
        epilog=(
            "Each worker also checks the job database every RTCONTOUR_RECOVERY_INTERVAL_S "
            "seconds and queues again the jobs whose worker or queue message was lost."
        ),
    )
    parser.add_argument(
        "--concurrency", type=int,
        help="jobs this worker runs at once (default RTCONTOUR_WORKER_CONCURRENCY)",
    )
    parser.add_argument(
        "--hostname", default=f"rtcontour@{socket.gethostname()}",
        help="this worker's name in the logs (default %(default)s; %%h stands for the host)",
    )
    parser.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument(
        "--no-recovery", action="store_true",
        help="do not look for lost jobs from this worker (leave it to the other workers)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.loglevel.upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    settings = Settings.model_validate({})  # from the environment (RTCONTOUR_*)
    load_checked_routing(settings)  # a bad routes file or a missing model stops the start
    engine = make_engine(settings)
    create_schema(engine)  # likewise a database that is missing or cannot be reached
    engine.dispose()
    app = make_celery(settings)
    sweeper: list[RecoverySweeper] = []
    notifiers: list[NotificationDispatcher] = []  # webhooks, delivered beside the sweep

    if not args.no_recovery:

        @worker_ready.connect(weak=False)
        def _start_sweep(**_: Any) -> None:
            engine = make_engine(settings)
            create_schema(engine)
            sweeper.append(
                RecoverySweeper(
                    settings, JobStore(engine), make_enqueue(app), make_queue_depth(app, QUEUE)
                ).start()
            )
            notifiers.append(NotificationDispatcher(settings, engine).start())

        @worker_shutdown.connect(weak=False)
        def _stop_sweep(**_: Any) -> None:
            for running in sweeper:
                running.stop()
            for notifier in notifiers:
                notifier.stop()

    @worker_process_init.connect(weak=False)
    def _warm_models(**_: Any) -> None:
        # In each pool process, after the fork: the model resident and warmed before its first
        # job (in a thread: Celery gives a starting process only a few seconds to report).
        warm_up_in_background(settings)

    node = host_format(default_nodename(args.hostname))  # %h, %n, %d as Celery expands them
    os.environ[WORKER_NODE_ENV] = node  # inherited by the pool processes
    where = settings.broker_url or f"embedded broker in {settings.data_dir / 'broker'}"
    logger.info("worker %s consuming %s from %s", node, QUEUE, _redact(where))
    worker_args = [
        "worker",
        f"--hostname={node}",
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
