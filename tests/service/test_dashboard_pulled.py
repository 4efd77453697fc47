"""The dashboard marks a job pulled from the PACS ("pulled by <user>") in the job list and on
its page, and a STOW-RS job's sender on its page (Debian chromium through Playwright)."""

from __future__ import annotations

import pytest

from tests.service.api_support import ADMIN_TOKEN, ApiHarness, add_finished_job
from tests.service.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, served  # noqa: F401

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed")


def test_pulled_and_stowed_jobs_say_who_asked(
    served: tuple[ApiHarness, str],  # noqa: F811
) -> None:
    harness, base_url = served
    pulled = add_finished_job(harness, calling_ae="ORTHANC", received_via="pull",
                              requested_by="dr-pull")
    pushed = harness.add_job(state="running", calling_ae="TPS_ECLIPSE")
    stowed = harness.add_job(state="running", calling_ae="web-router", received_via="dicomweb",
                             requested_by="web-router")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                             headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{base_url}/dashboard")
            page.fill("#token", ADMIN_TOKEN)
            page.click("#login-form button")
            row = page.locator(f'tr[data-job-id="{pulled.id}"]')
            sync_api.expect(row).to_contain_text("pulled by dr-pull")
            sync_api.expect(page.locator(f'tr[data-job-id="{pushed.id}"]')).not_to_contain_text(
                "pulled by")
            page.goto(f"{base_url}/dashboard#/jobs/{pulled.id}")
            sync_api.expect(page.locator("#job-fields")).to_contain_text("pulled by dr-pull")
            page.goto(f"{base_url}/dashboard#/jobs/{stowed.id}")
            sync_api.expect(page.locator("#job-fields")).to_contain_text(
                "DICOMweb from web-router")
        finally:
            browser.close()
