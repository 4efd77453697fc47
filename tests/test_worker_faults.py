"""Issue 6, a queue that loses nothing: worker killed mid-inference, broker restarted, TPS
down for a while, TPS down for good. Each test runs ``rtcontour serve`` as a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.conftest import (
    SLOW_INFERENCE_ENV,
    StoreScp,
    api_job,
    api_jobs,
    free_port,
    referenced_ct_uids,
    serve_env,
    sop_uids,
    storescu,
    wait_for_jobs,
    wait_until,
    write_phantom_series,
)
from tests.worker.conftest import dciodvfy_errors

# With the slow package at overlap 0.9: ~7 s of inference on an idle 2-core machine, long
# enough to act while a job is in the middle of it however fast the machine.
SLOW_SHAPE = (40, 192, 192)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(child) for child in task.read_text().split()]
    return found


def test_worker_killed_mid_inference_job_completes_once(
    tmp_path: Path, tps: StoreScp, serve_factory, slow_test_package: Path
) -> None:
    serve = serve_factory(
        serve_env(
            tmp_path / "var",
            destinations=tps.destination,
            model_package=slow_test_package,
            extra=SLOW_INFERENCE_ENV,
        )
    )
    ct_files = write_phantom_series(tmp_path / "ct", SLOW_SHAPE)
    storescu(serve.dicom_port, ct_files)
    (job,) = wait_for_jobs(serve, 1, states={"running"}, timeout_s=60)
    wait_until(
        lambda: api_job(serve, job["id"])["timings"]["load_s"] is not None, 30, "series loaded"
    )
    time.sleep(0.3)  # inside inference now
    assert api_job(serve, job["id"])["timings"]["inference_s"] is None, "inference too fast"

    worker_pid = int((serve.data_dir / "run" / "worker.pid").read_text())
    victims = [worker_pid, *_children(worker_pid)]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)

    (finished,) = wait_for_jobs(serve, 1, timeout_s=120)
    detail = api_job(serve, finished["id"])
    assert detail["state"] == "done", detail
    assert detail["attempts"] == 2  # the killed attempt, and the one that completed
    assert detail["workers_lost"] == 1  # which spent none of the job's attempts
    time.sleep(1.0)
    received = tps.received()
    assert len(received) == 1, "the TPS must receive the RTSTRUCT exactly once"
    assert referenced_ct_uids(received[0]) == sop_uids(ct_files)
    assert "restarting" in serve.log() and "recovery: re-enqueued" in serve.log()


@pytest.fixture
def private_redis(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A Redis of this test's own (restartable without disturbing anyone), nothing on disk."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    command = [
        "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
        "--appendonly", "no", "--dir", str(tmp_path),
    ]

    class PrivateRedis:
        url = f"redis://127.0.0.1:{port}/0"
        process: subprocess.Popen[bytes] | None = None

        def start(self) -> None:
            self.process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            import redis

            client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
            wait_until(lambda: _ping(client), 10, "private redis up")

        def stop(self) -> None:
            if self.process is not None:
                self.process.kill()  # like a crash: everything in memory is gone
                self.process.wait(10)
                self.process = None

    instance = PrivateRedis()
    instance.start()
    yield instance
    instance.stop()


def _ping(client) -> bool:  # type: ignore[no-untyped-def]
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001
        return False


def test_jobs_lost_in_a_redis_restart_or_sent_while_it_is_down_are_recovered(
    tmp_path: Path, tps: StoreScp, serve_factory, slow_test_package: Path, private_redis
) -> None:
    serve = serve_factory(
        serve_env(
            tmp_path / "var",
            destinations=tps.destination,
            model_package=slow_test_package,
            broker_url=private_redis.url,
            extra=SLOW_INFERENCE_ENV,
        )
    )
    first = write_phantom_series(tmp_path / "a", SLOW_SHAPE, patient_id="RTC-A", seed=1)
    second = write_phantom_series(tmp_path / "b", (16, 64, 64), patient_id="RTC-B", seed=2)
    third = write_phantom_series(tmp_path / "c", (16, 64, 64), patient_id="RTC-C", seed=3)
    storescu(serve.dicom_port, first)
    wait_for_jobs(serve, 1, states={"running"}, timeout_s=60)
    storescu(serve.dicom_port, second)  # queued in Redis behind the running job
    wait_until(lambda: len(api_jobs(serve, state="queued")) == 1, 30, "second job queued")

    private_redis.stop()  # the queued message is gone with it
    storescu(serve.dicom_port, third)  # arrives while the broker is down
    wait_until(lambda: len(api_jobs(serve)) == 3, 30, "third job recorded")
    private_redis.start()  # empty

    jobs = wait_for_jobs(serve, 3, timeout_s=180)
    assert {j["state"] for j in jobs} == {"done"}, jobs
    received = wait_until(lambda: len(tps.received()) >= 3 and tps.received(), 10, "3 RTSTRUCTs")
    assert len(received) == 3
    assert {frozenset(referenced_ct_uids(r)) for r in received} == {
        frozenset(sop_uids(files)) for files in (first, second, third)
    }
    assert "recovery: re-enqueued" in serve.log()


def test_tps_down_then_back_gets_rtstruct_after_retries(
    tmp_path: Path, serve_factory, test_package: Path
) -> None:
    tps = StoreScp(tmp_path / "tps")  # not started yet: the TPS is down
    serve = serve_factory(
        serve_env(
            tmp_path / "var",
            destinations=tps.destination,
            model_package=test_package,
            extra={"RTCONTOUR_SEND_ATTEMPTS": "6", "RTCONTOUR_SEND_BACKOFF_S": "0.5"},
        )
    )
    storescu(serve.dicom_port, write_phantom_series(tmp_path / "ct", (16, 64, 64)))
    wait_until(lambda: "retrying in" in serve.log(), 60, "a failed send attempt")
    tps.start()
    try:
        (job,) = wait_for_jobs(serve, 1, timeout_s=60)
        assert job["state"] == "done"
        assert len(wait_until(tps.received, 10, "the RTSTRUCT")) == 1
    finally:
        tps.stop()


def test_tps_down_for_good_gives_send_failed_and_rtstruct_stays_downloadable(
    tmp_path: Path, serve_factory, test_package: Path
) -> None:
    destination = f"TPS@127.0.0.1:{free_port()}"
    serve = serve_factory(
        serve_env(
            tmp_path / "var",
            destinations=destination,
            model_package=test_package,
            extra={"RTCONTOUR_SEND_ATTEMPTS": "3", "RTCONTOUR_SEND_BACKOFF_S": "0.2"},
        )
    )
    storescu(serve.dicom_port, write_phantom_series(tmp_path / "ct", (16, 64, 64)))
    (job,) = wait_for_jobs(serve, 1, timeout_s=90)
    detail = api_job(serve, job["id"])
    assert detail["state"] == "send_failed", detail
    assert destination in detail["failure_reason"] and "3 attempts" in detail["failure_reason"]
    assert detail["has_rtstruct"]
    download = httpx.get(
        f"{serve.api_url}/api/jobs/{job['id']}/rtstruct", headers=serve.headers(), timeout=10
    )
    assert download.status_code == 200
    path = tmp_path / "RS.dcm"
    path.write_bytes(download.content)
    assert pydicom.dcmread(path).SOPInstanceUID == detail["rtstruct_sop_instance_uid"]
    assert dciodvfy_errors(path) == []
