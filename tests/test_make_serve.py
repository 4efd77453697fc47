"""``make serve`` on a set-up checkout answers C-ECHO and /health within 30 s, and SIGTERM to
``rtcontour serve`` stops everything it started (listener, API, worker and its pool)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, serve_env

START_BUDGET_S = 30.0


def _group_members(pgid: int) -> list[int]:
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(proc.name))
    return members


def _echo(port: int) -> bool:
    result = subprocess.run(
        ["echoscu", "-to", "2", "-aet", "TPS", "-aec", "RTCONTOUR", "127.0.0.1", str(port)],
        capture_output=True,
        timeout=10,
    )
    return result.returncode == 0


def _health(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_make_serve_answers_echo_and_health_within_30_s_and_sigterm_stops_all(
    tmp_path: Path,
) -> None:
    if shutil.which("echoscu") is None or shutil.which("make") is None:
        pytest.skip("needs make and DCMTK echoscu")
    up_to_date = subprocess.run(["make", "-q", ".stamps/venv"], cwd=REPO_ROOT).returncode == 0
    if not up_to_date:
        pytest.skip("checkout not set up: run 'make install' first (make serve would install)")
    env = serve_env(tmp_path / "var")
    dicom_port, api_port = int(env["RTCONTOUR_DICOM_PORT"]), int(env["RTCONTOUR_API_PORT"])
    log = (tmp_path / "make-serve.log").open("wb")
    started = time.monotonic()
    make = subprocess.Popen(
        ["make", "serve"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        ready_s = None
        while time.monotonic() - started < START_BUDGET_S:
            if make.poll() is not None:
                break
            if _health(api_port) and _echo(dicom_port):
                ready_s = time.monotonic() - started
                break
            time.sleep(0.25)
        output = (tmp_path / "make-serve.log").read_text(errors="replace")
        assert ready_s is not None, f"not answering within {START_BUDGET_S} s:\n{output[-5000:]}"
        print(f"make serve answered C-ECHO and /health after {ready_s:.1f} s")

        worker_pid_file = tmp_path / "var" / "run" / "worker.pid"
        deadline = time.monotonic() + 20
        while not worker_pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker_pid_file.exists(), "serve did not start a worker"
        deadline = time.monotonic() + 20  # make, serve, worker and its pool process
        while len(_group_members(make.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        members = _group_members(make.pid)
        serve_pids = [
            pid for pid in members
            if b" serve" in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            and pid != make.pid
        ]
        assert serve_pids, f"no rtcontour serve process among {members}"
        assert len(members) >= 4, f"worker pool not started: {members}"

        os.kill(serve_pids[0], signal.SIGTERM)  # serve alone: it must stop its children
        stop_started = time.monotonic()
        make.wait(timeout=30)
        while _group_members(make.pid) and time.monotonic() - stop_started < 10:
            time.sleep(0.1)
        assert _group_members(make.pid) == [], "processes left after SIGTERM"
        assert make.returncode == 0
        print(f"stopped in {time.monotonic() - stop_started:.1f} s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)
        log.close()
