"""``rtcontour listener`` as a process: graceful SIGTERM, and what a SIGKILL leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from service.dicom_status import Status
from tests.conftest import REPO_ROOT, free_port
from tests.service.conftest import requires_dcmtk, run_storescu

pytestmark = requires_dcmtk


class ListenerProcess:
    def __init__(self, data_dir: Path, log: Path, quiet_period_s: float) -> None:
        self.port = free_port()
        self.log_path = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("RTCONTOUR_")}
        env.update(
            RTCONTOUR_DATA_DIR=str(data_dir),
            RTCONTOUR_QUIET_PERIOD_S=str(quiet_period_s),
            RTCONTOUR_MIN_FREE_DISK_BYTES="0",
            PYTHONUNBUFFERED="1",
        )
        command = [sys.executable, "-m", "service.cli", "listener", "--log-only",
                   "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT
        )
        self.wait_for_log("listening on")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"{text!r} not logged:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def start_listener_process(tmp_path: Path) -> Iterator[object]:
    started: list[ListenerProcess] = []

    def start(quiet_period_s: float = 60.0) -> ListenerProcess:
        process = ListenerProcess(tmp_path / "var", tmp_path / f"l{len(started)}.log",
                                  quiet_period_s)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def test_sigterm_hands_over_complete_series_and_exits_cleanly(start_listener_process, ct_series):
    listener = start_listener_process(quiet_period_s=60.0)
    files = ct_series(n_slices=3)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert run_storescu(listener.port, files).status_list == [Status.SUCCESS] * 3
    started = time.monotonic()
    listener.process.send_signal(signal.SIGTERM)
    assert listener.process.wait(15) == 0
    assert time.monotonic() - started < 10
    log = listener.log()
    assert f"series_instance_uid='{series_uid}'" in log and "n_instances=3" in log, log
    assert "Phantom" not in log and "RTC-PHANTOM" not in log  # no patient name or ID logged


def test_killed_listener_leaves_whole_instances_and_no_arrival_until_resent(
    start_listener_process, ct_series, tmp_path
):
    listener = start_listener_process(quiet_period_s=60.0)
    files = ct_series(n_slices=4)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert run_storescu(listener.port, files).status_list == [Status.SUCCESS] * 4
    listener.process.send_signal(signal.SIGKILL)
    listener.process.wait(10)
    folder = tmp_path / "var" / "spool" / "incoming" / series_uid
    assert sorted(p.suffix for p in folder.iterdir()) == [".dcm"] * 4
    for stored in folder.iterdir():
        assert pydicom.dcmread(stored).pixel_array.shape == (16, 16)  # every file is whole

    restarted = start_listener_process(quiet_period_s=0.3)
    time.sleep(1.0)
    assert "series arrived" not in restarted.log()  # the interrupted series makes no job
    assert run_storescu(restarted.port, files[:1]).status_list == [Status.SUCCESS]
    restarted.wait_for_log("series arrived")
    assert "n_instances=4" in restarted.log()
