"""Shadow before switch in a real browser (issue 23): an admin sees a route's active and shadow
package side by side per structure (the shadow's better and worse structures marked), switches
the route to the shadow package with one click (audited) and back again."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session

from rtcontour.common.audit import AuditEvent
from rtcontour.common.routes import parse_routing
from tests.conftest import build_test_package
from tests.service.api_support import ADMIN_TOKEN, ApiHarness, make_harness
from tests.service.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, _free_port

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("torch", reason="the 'train' extra (torch) exports the test packages")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed")

BASE, SITE = "tiny-oar-1.0.0", "tiny-oar-1.0.0+clinic.1"


def _qa(active: dict[str, float], shadow: dict[str, float]) -> dict[str, Any]:
    def items(values: dict[str, float]) -> list[dict[str, Any]]:
        return [{"roi_name": name, "reference_name": name, "dice": dice, "hd95_mm": 10 * (1 - dice),
                 "status": "edited"} for name, dice in values.items()]

    return {"structures": items(active) + [{"roi_name": "Larynx", "status": "not_in_approved_set"}],
            "shadow": {"model_name": "tiny-oar", "model_version": "1.0.0+clinic.1",
                       "structures": items(shadow)}}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ApiHarness, str]]:
    packages = tmp_path / "packages"
    build_test_package(packages, name="tiny-oar", version="1.0.0")
    build_test_package(packages, name="tiny-oar", version="1.0.0+clinic.1", seed=1)
    routing = parse_routing({"routes": [{"name": "head-neck", "model": BASE,
                                         "shadow_model": SITE}], "default": "head-neck"})
    harness = make_harness(tmp_path, settings_extra={"model_packages_dir": packages},
                           routing=routing)
    for parotid, cord in ((0.70, 0.80), (0.72, 0.82), (0.68, 0.78)):
        harness.add_job(state="done", route_name="head-neck", model_name="tiny-oar",
                        model_version="1.0.0",
                        qa=_qa({"Parotid_L": parotid, "SpinalCord": cord},
                               {"Parotid_L": parotid + 0.15, "SpinalCord": cord - 0.05}))
    harness.add_job(state="done", route_name="head-neck", model_name="tiny-oar",
                    model_version="1.0.0", qa=_qa({"Parotid_L": 0.1}, {}) | {"shadow": None})
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(harness.client.app, host="127.0.0.1", port=port, log_level="warning"))
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


def test_admin_compares_active_and_shadow_per_structure_and_switches_and_back(
        served: tuple[ApiHarness, str]) -> None:
    harness, base_url = served
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                             headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{base_url}/dashboard")
            page.fill("#token", ADMIN_TOKEN)
            page.click("#login-form button")
            route = page.locator('#shadow-panel .shadow-route[data-route="head-neck"]')
            sync_api.expect(route).to_be_visible(timeout=15000)
            sync_api.expect(route.locator(".note")).to_contain_text("compared on 3 approved")
            sync_api.expect(route.locator("thead")).to_contain_text(f"Active {BASE}: Dice")
            sync_api.expect(route.locator("thead")).to_contain_text(f"Shadow {SITE}: Dice")
            parotid = route.locator('tr[data-structure="Parotid_L"]')
            sync_api.expect(parotid.locator(".active-dice")).to_have_text("0.700")
            sync_api.expect(parotid.locator(".shadow-dice")).to_have_text("0.850")
            sync_api.expect(parotid.locator(".difference")).to_have_text("+0.150")
            sync_api.expect(parotid).to_have_class("shadow-better")
            sync_api.expect(route.locator('tr[data-structure="SpinalCord"]')).to_have_class(
                "shadow-worse")
            assert route.locator('tr[data-structure="Larynx"]').count() == 0

            route.locator("button.shadow-switch").click()
            sync_api.expect(route.locator("thead")).to_contain_text(f"Active {SITE}: Dice")
            sync_api.expect(route.locator(".note")).to_contain_text("Switched by bootstrap-admin")
            # the same sets, now read the other way round
            sync_api.expect(route.locator('tr[data-structure="Parotid_L"] .difference')
                            ).to_have_text("-0.150")
            route.locator("button.shadow-switch").click()
            sync_api.expect(route.locator("thead")).to_contain_text(f"Active {BASE}: Dice")
        finally:
            browser.close()
    with Session(harness.engine) as session:
        switches = session.scalars(select(AuditEvent).where(
            AuditEvent.event == "route.model_switched").order_by(AuditEvent.id)).all()
    assert [(e.actor, e.detail["to"]) for e in switches] == [
        ("bootstrap-admin", SITE), ("bootstrap-admin", BASE)]
    response = harness.client.get("/api/routes/head-neck/shadow",
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.json()["active"] == BASE and response.json()["shadow"] == SITE
