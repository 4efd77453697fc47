"""``rtcontour serve``: everything on one node — DICOM listener, HTTP API, a Celery worker.

With no configuration it needs no server: the job store is SQLite and the broker is the
embedded one, both under ``RTCONTOUR_DATA_DIR`` (default ``./var``). The listener and the
API (uvicorn) run in this process; the worker is a child process (``rtcontour worker``)
that is restarted if it dies, and that runs the job store's recovery sweep. SIGTERM or
SIGINT stops the listener (series already complete are handed over), the API and the
worker (warm shutdown for ``--worker-grace`` seconds, then killed: its job is recovered
from the store at the next start).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rtcontour.common.db import make_engine
from rtcontour.common.errors import ConfigurationError
from rtcontour.common.jobstore import JobStore
from rtcontour.common.notify import refusal_notifier
from rtcontour.common.queue import make_enqueue, publisher
from rtcontour.common.refusals import make_refusal_recorder
from rtcontour.common.routes import RoutingTable
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings
from rtcontour.models.registry import load_checked_routing
from rtcontour.service.api.app import create_app
from rtcontour.service.ingest import InstanceReceiver
from rtcontour.service.intake import Intake
from rtcontour.service.listener import start_listener

logger = logging.getLogger(__name__)

RESTART_DELAY_S = 2.0


class WorkerProcess:
    """A ``rtcontour worker`` child, restarted when it exits unexpectedly."""

    def __init__(self, settings: Settings, log_level: str, pid_file: Path) -> None:
        self.settings = settings
        self.log_level = log_level
        self.pid_file = pid_file
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="worker-watch", daemon=True)

    def start(self) -> WorkerProcess:
        self._spawn()
        self._watcher.start()
        return self

    def _spawn(self) -> None:
        command = [
            sys.executable,
            "-m",
            "rtcontour.service.cli",
            "worker",
            f"--loglevel={self.log_level}",
            f"--hostname=rtcontour-serve-{os.getpid()}@{socket.gethostname()}",
        ]
        with self._lock:
            self.process = subprocess.Popen(command, preexec_fn=_die_with_parent)
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.pid_file.write_text(f"{self.process.pid}\n")
        logger.info("worker started (pid %d)", self.process.pid)

    def _watch(self) -> None:
        pool: list[int] = []  # the worker's pool processes, seen last time it was alive
        while not self._stopping.is_set():
            process = self.process
            if process is not None and process.poll() is None:
                pool = _children(process.pid)
            elif process is not None:
                if self._stopping.is_set():
                    return
                logger.warning(
                    "worker pid %d exited with %s; restarting in %.0f s",
                    process.pid,
                    process.returncode,
                    RESTART_DELAY_S,
                )
                # Orphaned pool processes would keep running (and heartbeating) its job.
                for pid in pool:
                    _kill(pid)
                _kill_children(process.pid)
                if self._stopping.wait(RESTART_DELAY_S):
                    return
                self._spawn()
            self._stopping.wait(0.5)

    def stop(self, grace_s: float) -> None:
        self._stopping.set()
        with self._lock:
            process = self.process
        if process is None:
            return
        if process.poll() is None:
            children = _children(process.pid)
            process.send_signal(signal.SIGTERM)  # Celery: warm shutdown
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("worker did not stop within %.0f s; killing it", grace_s)
                process.kill()
                process.wait(5)
            for pid in children:
                _kill(pid)
        _kill_children(process.pid)
        self.pid_file.unlink(missing_ok=True)
        logger.info("worker stopped")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if serve dies (Linux), so no stray worker."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in task.read_text().split()]
        except OSError:
            continue
    return found


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _kill_children(pid: int) -> None:
    # Pool processes of a worker that died are re-parented; find them by their parent id.
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields and int(fields[1]) == pid:
            _kill(int(proc.name))


class ApiServer:
    """uvicorn serving ``create_app(settings)`` in a thread."""

    def __init__(
        self, settings: Settings, engine: Any, enqueue: Any, routing: RoutingTable | None = None,
        receiver: InstanceReceiver | None = None,
    ) -> None:
        import uvicorn

        app = create_app(settings, engine=engine, enqueue=enqueue, routing=routing,
                         receiver=receiver)
        config = uvicorn.Config(
            app,
            host=settings.api_host,
            port=settings.api_port,
            log_level="warning",
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="api", daemon=True)

    def start(self) -> ApiServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rtcontour serve",
        description=(
            "Run rtcontour on this machine: the DICOM listener (RTCONTOUR_DICOM_PORT, default "
            "11112, AE title RTCONTOUR_AE_TITLE), the HTTP API and dashboard "
            "(http://RTCONTOUR_API_HOST:RTCONTOUR_API_PORT/dashboard) and a worker that "
            "contours each CT series received and sends the RTSTRUCT back (to "
            "RTCONTOUR_DESTINATIONS or the destinations of the series' route). "
            "With no settings the job database and the queue live in RTCONTOUR_DATA_DIR "
            "(default ./var), so nothing else needs to run."
        ),
        epilog=(
            "Stop it with Ctrl-C or SIGTERM: series already received completely become jobs, "
            "and a job cut short is run again at the next start. Every setting is an "
            "RTCONTOUR_* environment variable (see the README)."
        ),
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--no-worker", action="store_true", help="listener and API only")
    parser.add_argument(
        "--worker-grace", type=float, default=10.0, help="seconds a worker may finish its job"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = Settings.model_validate({})  # from the environment (RTCONTOUR_*)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings)
    create_schema(engine)
    store = JobStore(engine)

    routing = load_checked_routing(settings)
    enqueue = make_enqueue(publisher(settings))
    _log_locations(settings)

    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        logger.info("signal %d received; shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    stoppers: list[tuple[str, Callable[[], object]]] = []  # started parts, stopped in parallel
    try:
        intake = Intake(settings, store, enqueue, routing=routing)
        listener = start_listener(settings, intake, audit=intake.audit,
                                  refused=make_refusal_recorder(
                                      engine, refusal_notifier(settings, engine)))
        stoppers.append(("listener", lambda: listener.shutdown(timeout_s=10.0)))
        # STOW-RS requests (and C-GET pulls) feed this listener's spool and series tracker.
        api = ApiServer(settings, engine, enqueue, routing,
                        InstanceReceiver.from_listener(listener)).start()
        stoppers.append(("api", api.stop))
        if not args.no_worker:
            worker = WorkerProcess(
                settings, args.log_level, settings.data_dir / "run" / "worker.pid"
            ).start()
            stoppers.append(("worker", lambda: worker.stop(args.worker_grace)))
        host, port = listener.address
        logger.info(
            "rtcontour serving: DICOM %s@%s:%d, API http://%s:%d",
            settings.ae_title,
            host,
            port,
            settings.api_host,
            settings.api_port,
        )
        while not stop.wait(1.0):
            if not api.thread.is_alive():
                raise ConfigurationError(
                    f"the HTTP API stopped (is port {settings.api_port} in use?); see the log"
                )
    except (ConfigurationError, OSError) as exc:
        logger.error("rtcontour serve cannot run: %s", exc)
        exit_code = 1
    else:
        exit_code = 0
    finally:
        started = time.monotonic()
        # In parallel: the worker's warm shutdown takes seconds even when idle.
        threads = [
            threading.Thread(target=stop_part, name=f"stop-{name}") for name, stop_part in stoppers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        engine.dispose()
        logger.info("stopped in %.1f s", time.monotonic() - started)
    return exit_code


def _log_locations(settings: Settings) -> None:
    data_dir = settings.data_dir.resolve()
    database = settings.database_url or f"SQLite {data_dir / 'rtcontour.db'}"
    if "@" in database and "://" in database:
        scheme, rest = database.split("://", 1)
        database = f"{scheme}://***@{rest.split('@', 1)[1]}"
    broker = settings.broker_url or f"embedded broker in {data_dir / 'broker'}"
    if "@" in broker and "://" in broker:
        scheme, rest = broker.split("://", 1)
        broker = f"{scheme}://***@{rest.split('@', 1)[1]}"
    logger.info("data dir %s", data_dir)
    logger.info("incoming and job instances in %s", settings.spool_dir.resolve())
    logger.info("RTSTRUCTs archived in %s", settings.archive_dir.resolve())
    logger.info("job store: %s", database)
    logger.info("queue: %s", broker)
    logger.info(
        "model package: %s",
        settings.model_package or "newest in models/packages (RTCONTOUR_MODEL_PACKAGE unset)",
    )
    if not settings.destinations:
        logger.warning("no RTCONTOUR_DESTINATIONS: RTSTRUCTs are archived but not sent")
    else:
        logger.info("destinations: %s", ", ".join(str(d) for d in settings.destinations))
