"""The dashboard in a real browser (Playwright driving Debian's headless Chromium).

The app runs under uvicorn on a free port; the test logs in with a token, sees finished and
failed jobs (and a job added later appear without a reload), opens a job's previews, checks
that a hostile series description is shown as text, and saves ``docs/dashboard.png``.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from tests.service.api_support import ADMIN_TOKEN, ApiHarness, add_finished_job, make_harness

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"
# The README's screenshot is refreshed only on request, so a test run leaves the checkout clean:
# RTCONTOUR_UPDATE_SCREENSHOT=1 pytest tests/service/test_dashboard_browser.py
README_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _history(harness: ApiHarness) -> None:
    """A day of finished jobs (varied latencies) for the throughput and latency chart."""
    now = dt.datetime.now(dt.UTC)
    for hour in range(23, 0, -1):
        for n in range((hour * 7) % 4 + 1):
            finished = now - dt.timedelta(hours=hour, minutes=10 * n)
            latency = dt.timedelta(seconds=40 + (hour * 13 + n * 29) % 70)
            state = "failed" if (hour + n) % 9 == 0 else "done"
            harness.add_job(
                state=state,
                calling_ae="TPS_ECLIPSE" if n % 2 else "TPS_RAYSTN",
                series_description=f"Head and neck CT {hour:02d}{n}",
                created_at=finished - latency,
                finished_at=finished,
                model_name="hn-oar",
                model_version="1.0.0",
                failure_reason="the series has 3 slices, fewer than the 10 required"
                if state == "failed"
                else None,
            )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ApiHarness, str]]:
    unreachable = _free_port()  # nothing listens there: the destination shows as unreachable
    harness = make_harness(
        tmp_path, settings_extra={"destinations": f"PACS@127.0.0.1:{unreachable}"}
    )
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(harness.client.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield harness, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    harness.engine.dispose()


def test_dashboard_login_jobs_previews_and_hostile_text(served: tuple[ApiHarness, str]) -> None:
    harness, base_url = served
    _history(harness)
    harness.add_job(
        state="failed",
        calling_ae="TPS_ECLIPSE",
        series_description="Pelvis CT",
        failure_reason="the series is oblique (gantry tilt 12 degrees)",
    )
    job = add_finished_job(
        harness,
        series_description=HOSTILE,
        calling_ae="TPS_RAYSTN",
        created_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=75),
    )
    harness.add_job(state="running", series_description="Thorax CT", calling_ae="TPS_ECLIPSE")
    dialogs: list[str] = []

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(f"{base_url}/dashboard")
            page.fill("#token", "wrong-token")
            page.click("#login-form button")
            sync_api.expect(page.locator("#login-error")).to_contain_text("not valid")
            page.fill("#token", ADMIN_TOKEN)
            page.click("#login-form button")
            sync_api.expect(page.locator("#whoami")).to_have_text("bootstrap-admin (admin)")

            row = page.locator(f'tr[data-job-id="{job.id}"]')
            sync_api.expect(row).to_be_visible()
            description = row.locator("td.description")
            assert description.text_content() == HOSTILE
            assert page.locator("#jobs-table script, #jobs-table img").count() == 0
            sync_api.expect(row).to_contain_text("done")
            sync_api.expect(page.locator("#failures")).to_contain_text("gantry tilt 12 degrees")
            sync_api.expect(page.locator("#queue-depth")).to_have_text("3")
            assert page.locator("#chart svg rect.bar-done").count() > 10
            destination = page.locator("#destinations-table tbody tr")
            sync_api.expect(destination).to_contain_text("PACS@127.0.0.1")
            sync_api.expect(destination.locator("td").nth(1)).to_have_text("no")

            # Live list: a job arriving now appears without a reload.
            late = harness.add_job(state="queued", series_description="Arrived later")
            sync_api.expect(page.locator(f'tr[data-job-id="{late.id}"]')).to_be_visible(
                timeout=10_000
            )
            screenshot = page.screenshot(full_page=False)
            assert screenshot.startswith(b"\x89PNG")
            if os.environ.get("RTCONTOUR_UPDATE_SCREENSHOT") == "1":
                README_SCREENSHOT.write_bytes(screenshot)

            row.locator("a").click()
            sync_api.expect(page.locator("#job-id")).to_have_text(job.id)
            sync_api.expect(page.locator("#job-fields")).to_contain_text(HOSTILE)
            assert page.locator("#job-fields script, #job-fields img").count() == 0
            sync_api.expect(page.locator("#structures-table")).to_contain_text("Marker")
            for plane in ("axial", "coronal", "sagittal"):
                image = page.locator(f'figure[data-plane="{plane}"] img')
                sync_api.expect(image).to_have_attribute(
                    "data-loaded",
                    f"{plane}:" + {"axial": "12", "coronal": "32", "sagittal": "32"}[plane],
                )
                assert image.evaluate("img => img.naturalWidth") > 0
            slider = page.locator('figure[data-plane="axial"] input')
            slider.fill("7")
            sync_api.expect(page.locator('figure[data-plane="axial"] img')).to_have_attribute(
                "data-loaded", "axial:7"
            )
            sync_api.expect(page.locator("#download")).to_be_enabled()
            with page.expect_download() as download:
                page.click("#download")
            assert download.value.suggested_filename == f"RS_{job.id}.dcm"
        finally:
            browser.close()
    assert dialogs == []  # nothing from DICOM ever ran as script
    assert len(screenshot) < 300_000
