"""What the clinicians changed, over time: trends per structure and model version by week,
alerts on a falling recent median Dice, over the API and as Prometheus metrics."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtcontour.service.qa_trends import compute_trends, records_from_qa
from tests.service.api_support import ApiHarness, harness_fixture

MONDAY = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    yield from harness_fixture(tmp_path, settings_extra={"qa_alert_dice": 0.8,
                                                          "qa_alert_window": 3})


def _qa(received: dt.datetime, version: str, parotid_dice: float, *,
        brainstem_status: str = "unchanged") -> dict[str, object]:
    return {
        "reference_sop_instance_uid": "1.2.3", "received_at": received.isoformat(),
        "model_name": "hn-oar", "model_version": version,
        "structures": [
            {"roi_name": "Parotid_L", "reference_name": "Parotid Lt", "dice": parotid_dice,
             "added_path_length_mm": 100.0 * (1 - parotid_dice), "status": "edited"},
            {"roi_name": "Brainstem", "reference_name": "Brain Stem", "dice": 0.95,
             "added_path_length_mm": 0.0, "status": brainstem_status},
            {"roi_name": None, "reference_name": "Cochlea_L", "dice": 0.0,
             "added_path_length_mm": 40.0, "status": "added"},
        ],
    }


def _history(api: ApiHarness) -> None:
    """Week 1 (model 1.0.0): parotid Dice 0.9, 0.86; week 2 (model 1.1.0): 0.7, 0.6, 0.75."""
    sets = [(MONDAY, "1.0.0", 0.9), (MONDAY + dt.timedelta(days=2), "1.0.0", 0.86),
            (MONDAY + dt.timedelta(days=7), "1.1.0", 0.7),
            (MONDAY + dt.timedelta(days=8), "1.1.0", 0.6),
            (MONDAY + dt.timedelta(days=9), "1.1.0", 0.75)]
    for n, (when, version, dice) in enumerate(sets):
        job = api.add_job(model_name="hn-oar", model_version=version)
        api.store.record_qa(job.id, _qa(when, version, dice,
                                        brainstem_status="edited" if n == 0 else "unchanged"))
    api.add_job()  # a job without qa counts for nothing


def test_trends_per_structure_model_version_and_week() -> None:
    records = []
    for n, (day, version, dice) in enumerate([(0, "1.0.0", 0.9), (1, "1.0.0", 0.8),
                                              (7, "1.0.0", 0.6)]):
        records += records_from_qa(f"job{n}", _qa(MONDAY + dt.timedelta(days=day), version, dice),
                                   None, None, MONDAY)
    trends = compute_trends(records, alert_dice=0.5, alert_window=10)
    parotid = next(t for t in trends.trends if t.structure == "Parotid_L")
    assert (parotid.model_name, parotid.model_version) == ("hn-oar", "1.0.0")
    assert parotid.overall.n_sets == 3 and parotid.overall.median_dice == 0.8
    assert parotid.overall.edited_share == 1.0
    assert parotid.overall.median_added_path_length_mm == pytest.approx(20.0)
    assert [(week.isoformat(), f.n_sets, f.median_dice) for week, f in parotid.weeks] == [
        ("2026-03-02", 2, 0.85), ("2026-03-09", 1, 0.6)]
    brainstem = next(t for t in trends.trends if t.structure == "Brainstem")
    assert brainstem.overall.edited_share == 0.0 and brainstem.overall.median_dice == 0.95
    added = next(t for t in trends.trends if t.structure == "Cochlea_L")  # the clinicians' own
    assert added.overall.edited_share == 1.0 and added.overall.median_dice == 0.0
    assert [a.structure for a in trends.alerts] == ["Cochlea_L"]


def test_api_trends_and_an_alert_on_the_recent_window(api: ApiHarness) -> None:
    _history(api)
    response = api.client.get("/api/qa/trends", headers=api.headers("viewer"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["alert_dice"] == 0.8 and body["alert_window"] == 3
    by_key = {(t["structure"], t["model_version"]): t for t in body["trends"]}
    old, new = by_key[("Parotid_L", "1.0.0")], by_key[("Parotid_L", "1.1.0")]
    assert (old["n_sets"], old["median_dice"]) == (2, 0.88)
    assert (new["n_sets"], new["median_dice"], new["edited_share"]) == (3, 0.7, 1.0)
    assert [w["week"] for w in new["weeks"]] == ["2026-03-09"]
    assert by_key[("Brainstem", "1.0.0")]["edited_share"] == 0.5
    alerts = {a["structure"]: a for a in body["alerts"]}
    # Parotid's last three sets (0.7, 0.6, 0.75): median 0.7 < 0.8; Brainstem 0.95 is fine.
    assert alerts["Parotid_L"]["median_dice"] == 0.7 and alerts["Parotid_L"]["n_sets"] == 3
    assert alerts["Parotid_L"]["model_versions"] == ["1.1.0"]
    assert "Brainstem" not in alerts
    assert "patient" not in response.text


def test_qa_metrics_over_prometheus(api: ApiHarness) -> None:
    _history(api)
    text = api.client.get("/metrics", headers=api.headers("admin")).text
    assert 'rtcontour_qa_median_dice{model_version="1.1.0",structure="Parotid_L"} 0.7' in text
    assert 'rtcontour_qa_approved_sets{model_version="1.0.0",structure="Parotid_L"} 2.0' in text
    assert 'rtcontour_qa_edited_share{model_version="1.0.0",structure="Brainstem"} 0.5' in text
    assert 'rtcontour_qa_alert{structure="Parotid_L"} 1.0' in text
    assert 'rtcontour_qa_alert{structure="Brainstem"} 0.0' in text
    assert 'rtcontour_qa_recent_median_dice{structure="Parotid_L"} 0.7' in text
    assert "rtcontour_qa_median_added_path_length_mm" in text
