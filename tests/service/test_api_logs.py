"""``rtcontour api`` as a process: its access log never holds what identifies a patient."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT, free_port


def test_api_access_log_leaves_out_the_patient_search(tmp_path: Path) -> None:
    port, token = free_port(), "t" * 40
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTCONTOUR_")}
    env.update(RTCONTOUR_DATA_DIR=str(tmp_path / "var"), RTCONTOUR_ADMIN_TOKEN=token,
               PYTHONUNBUFFERED="1")
    log = tmp_path / "api.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "rtcontour.service.cli", "api", "--host", "127.0.0.1", "--port",
         str(port)],
        env=env, cwd=REPO_ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.2)
        answer = httpx.get(f"{url}/api/jobs", params={"patient": "DOE^JANE"},
                           headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert answer.status_code == 200
        deadline = time.monotonic() + 10
        while "GET /api/jobs" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(20)
    text = log.read_text()
    assert "GET /api/jobs?... HTTP/1.1" in text, text  # the request is logged, its query not
    assert "DOE" not in text and "JANE" not in text
