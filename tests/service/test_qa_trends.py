"""What the clinicians changed, over time: trends per structure and model version by week,
alerts on a recent median Dice that drifted (against the model card, the site's earlier sets,
or a floor, once enough approved sets hold the structure), over the API and as Prometheus
metrics. An organ the approved set does not hold is in no trend and no alert."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtcontour.service.qa_trends import AlertPolicy, compute_trends, records_from_qa
from tests.service.api_support import ApiHarness, harness_fixture

MONDAY = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    yield from harness_fixture(tmp_path, settings_extra={"qa_alert_dice": 0.8,
                                                          "qa_alert_window": 3,
                                                          "qa_alert_min_sets": 3})


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
    trends = compute_trends(records, policy=AlertPolicy(window=10, min_sets=3, floor=0.5))
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
    (alert,) = trends.alerts
    assert (alert.structure, alert.reasons, alert.n_sets) == ("Cochlea_L", ("floor",), 3)


def test_api_trends_and_an_alert_on_the_recent_window(api: ApiHarness) -> None:
    _history(api)
    response = api.client.get("/api/qa/trends", headers=api.headers("viewer"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["alert_dice"] == 0.8 and body["alert_window"] == 3
    assert body["alert_policy"] == {"window": 3, "min_sets": 3, "margin": 0.1, "floor": 0.8}
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
    assert alerts["Parotid_L"]["reasons"] == ["floor"]
    assert alerts["Parotid_L"]["message"] == (
        "Parotid_L: median Dice 0.70 over its last 3 approved sets is below the floor of 0.80.")
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


# The committed model's card (models/packages/rtcontour-hn-oar-1.2.0/manifest.json): its
# validation Dice per structure, e.g. Bone_Mandible 0.848, Brainstem 0.740, Larynx 0.638.
CARD = ("rtcontour-hn-oar", "1.2.0")
ABSENT = ("Brainstem", "Esophagus", "Larynx")


def _approved_set(received: dt.datetime, dice: dict[str, float],
                  absent: tuple[str, ...] = ()) -> dict[str, object]:
    """One approved set's qa as the worker writes it: the organs it lacks altogether are
    "not_in_approved_set", with no figures."""
    structures: list[dict[str, object]] = [
        {"roi_name": name, "reference_name": name, "dice": value, "hd95_mm": 3.0,
         "added_path_length_mm": 10.0, "status": "edited"} for name, value in dice.items()]
    structures += [{"roi_name": name, "reference_name": None, "dice": None, "hd95_mm": None,
                    "added_path_length_mm": None, "status": "not_in_approved_set"}
                   for name in absent]
    return {"reference_sop_instance_uid": "1.2.3", "received_at": received.isoformat(),
            "model_name": CARD[0], "model_version": CARD[1], "structures": structures}


@pytest.fixture
def site(tmp_path: Path) -> Iterator[ApiHarness]:
    """The defaults a site gets: 5 sets at least, margin 0.1 against the card, no floor."""
    yield from harness_fixture(tmp_path)


def _add_sets(api: ApiHarness, sets: list[dict[str, object]]) -> None:
    for qa in sets:
        job = api.add_job(model_name=CARD[0], model_version=CARD[1])
        api.store.record_qa(job.id, qa)


def test_an_approved_set_lacking_three_organs_raises_no_alert_they_are_not_in_the_set(
    site: ApiHarness,
) -> None:
    # The clinic contours no Brainstem, Esophagus or Larynx; its mandible is edited (0.70).
    _add_sets(site, [_approved_set(MONDAY, {"Bone_Mandible": 0.70, "Parotid_L": 0.75,
                                            "Parotid_R": 0.73, "SpinalCord": 0.66},
                                   absent=ABSENT)])
    body = site.client.get("/api/qa/trends", headers=site.headers("viewer")).json()
    assert body["alerts"] == []
    by_structure = {t["structure"]: t for t in body["trends"]}
    for name in ABSENT:
        assert by_structure[name]["n_sets"] == 0 and by_structure[name]["median_dice"] is None
        assert by_structure[name]["n_not_in_approved_set"] == 1
        assert by_structure[name]["edited_share"] == 0.0
    assert by_structure["Bone_Mandible"]["expected_dice"] == pytest.approx(0.848, abs=1e-3)
    text = site.client.get("/metrics", headers=site.headers("admin")).text
    assert 'rtcontour_qa_alert{structure="Brainstem"} 0.0' in text
    assert 'rtcontour_qa_alert{structure="Bone_Mandible"} 0.0' in text


def test_an_alert_needs_the_minimum_of_approved_sets_and_says_how_many_it_is_based_on(
    site: ApiHarness,
) -> None:
    days = [MONDAY + dt.timedelta(days=n) for n in range(5)]
    _add_sets(site, [_approved_set(day, {"Bone_Mandible": 0.60}) for day in days[:4]])
    body = site.client.get("/api/qa/trends", headers=site.headers("viewer")).json()
    assert body["alerts"] == []  # 4 sets: below RTCONTOUR_QA_ALERT_MIN_SETS (5)
    _add_sets(site, [_approved_set(days[4], {"Bone_Mandible": 0.60})])
    (alert,) = site.client.get("/api/qa/trends", headers=site.headers("viewer")).json()["alerts"]
    assert (alert["structure"], alert["n_sets"], alert["reasons"]) == (
        "Bone_Mandible", 5, ["model_card"])
    assert alert["expected_dice"] == pytest.approx(0.848, abs=1e-3)
    assert alert["message"] == (
        "Bone_Mandible: median Dice 0.60 over its last 5 approved sets is more than 0.10 below "
        "the 0.85 the model card expects of Bone_Mandible.")


@pytest.mark.parametrize(
    ("structure", "recent_dice", "alerted"),
    [("Bone_Mandible", 0.78, False),  # card 0.85: within the 0.1 margin
     ("Bone_Mandible", 0.70, True),
     ("Brainstem", 0.70, False),  # card 0.74: today's model, doing as its card says
     ("Larynx", 0.50, True)],  # card 0.64
    ids=["mandible-within-margin", "mandible-drifted", "brainstem-as-its-card",
         "larynx-drifted"],
)
def test_alerts_compare_each_structure_with_what_the_model_card_expects_of_it(
    structure: str, recent_dice: float, alerted: bool,
) -> None:
    from rtcontour.common.settings import Settings
    from rtcontour.service.qa_trends import manifest_expectations

    records = []
    for n in range(5):
        records += records_from_qa(f"job{n}", _approved_set(
            MONDAY + dt.timedelta(days=n), {structure: recent_dice}), None, None, MONDAY)
    trends = compute_trends(records, policy=AlertPolicy(),
                            expectations=manifest_expectations(Settings()))
    assert bool(trends.alerts) is alerted
    # The old absolute default (0.8) would have fired on every one of these.
    floored = compute_trends(records, policy=AlertPolicy(floor=0.8))
    assert [a.reasons for a in floored.alerts] == [("floor",)]


def test_a_drop_against_the_sites_own_earlier_sets_alerts_without_a_model_card() -> None:
    records = []
    for n, dice in enumerate([0.92] * 5 + [0.78] * 5):
        qa = _approved_set(MONDAY + dt.timedelta(days=n), {"Parotid_L": dice})
        qa["model_name"], qa["model_version"] = "site-model", "0.1.0"  # no card installed
        records += records_from_qa(f"job{n}", qa, None, None, MONDAY)
    policy = AlertPolicy(window=5, min_sets=5, margin=0.1)
    (alert,) = compute_trends(records, policy=policy).alerts
    assert alert.reasons == ("site_baseline",)
    assert (alert.median_dice, alert.baseline_dice, alert.n_baseline_sets) == (0.78, 0.92, 5)
    assert "below the 0.92 of this site's 5 earlier approved sets" in alert.message
    # Without earlier weeks there is nothing to drift from.
    assert compute_trends(records[5:], policy=policy).alerts == ()


def test_settings_refuse_a_minimum_of_sets_above_the_window() -> None:
    from pydantic import ValidationError

    from rtcontour.common.settings import Settings

    with pytest.raises(ValidationError, match="RTCONTOUR_QA_ALERT_MIN_SETS"):
        Settings(qa_alert_min_sets=20, qa_alert_window=10)
