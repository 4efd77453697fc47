"""``rtcontour worker`` names itself: the Celery node name with its host expanded, in the
start-up line and in every job line of its pool processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from rtcontour.common.db import make_engine
from rtcontour.common.jobstore import JobStore
from rtcontour.common.queue import enqueue_job
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings
from rtcontour.service.intake import Intake, SeriesArrival
from rtcontour.worker.celery_app import WORKER_NODE_ENV
from tests.conftest import REPO_ROOT, serve_env, write_phantom_series


def _submit_refused_series(settings: Settings, store: JobStore, tmp_path: Path) -> str:
    """A job whose series (12 slices, under ``min_slices``) fails at once, without a model."""
    paths = write_phantom_series(tmp_path / "written", shape=(12, 32, 32))
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    arrival_dir = settings.spool_dir / "incoming" / ds.SeriesInstanceUID
    arrival_dir.mkdir(parents=True)
    for path in paths:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        shutil.move(path, arrival_dir / f"{uid}.dcm")
    enqueued: list[str] = []
    Intake(settings, store, enqueued.append).series_complete(
        SeriesArrival(ds.SeriesInstanceUID, ds.StudyInstanceUID, "TPS", "CT", "Head",
                      arrival_dir, len(paths))
    )
    enqueue_job(settings, enqueued[0])
    return enqueued[0]


def test_worker_log_names_its_node_with_the_host_expanded_and_job_lines_name_the_worker(
    tmp_path: Path,
) -> None:
    env = serve_env(tmp_path / "var", extra={"RTCONTOUR_MIN_SLICES": "50"})
    env.pop(WORKER_NODE_ENV, None)
    settings = Settings(data_dir=tmp_path / "var", min_slices=50)
    engine = make_engine(settings)
    create_schema(engine)
    store = JobStore(engine)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "rtcontour.service.cli", "worker", "--hostname", "w1@%h",
             "--concurrency", "1", "--no-recovery"],
            env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        job_id = _submit_refused_series(settings, store, tmp_path)
        deadline = time.monotonic() + 90
        while store.get(job_id).state != "failed" and time.monotonic() < deadline:
            assert worker.poll() is None, log_path.read_text(errors="replace")
            time.sleep(0.5)
        output = log_path.read_text(errors="replace")
        assert store.get(job_id).state == "failed", output
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=90)  # warm shutdown; slow only on a loaded machine
    node = f"w1@{socket.gethostname()}"
    assert f"worker {node} consuming" in output
    assert "%h" not in output
    assert f"job {job_id}: attempt 1 on {node} pid " in output, output
