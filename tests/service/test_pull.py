"""Pull from the PACS (``POST /api/pull``, ``service.pull``) against Orthanc as the PACS:
C-FIND, the CT series a route would take, clear sentences for nothing / several, and a C-GET
retrieve into the listener's spool whose job records who pulled it. (The C-MOVE into a running
``rtcontour serve`` is in tests/test_dicomweb_pull_end_to_end.py.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError

from rtcontour.common.routes import parse_routing
from rtcontour.common.settings import Settings
from rtcontour.service.pull import InvalidQuery, PullQuery
from tests.orthanc import Orthanc, running_orthanc
from tests.phantoms import ct_datasets, head_phantom, write_datasets
from tests.service.api_support import make_harness
from tests.service.test_dicomweb_in import Wired


def _series(folder: Path, *, study_uid: str, accession: str, description: str,
            patient_id: str = "PULL-001") -> list[Path]:
    phantom = head_phantom((6, 32, 32))
    datasets = ct_datasets(phantom.hu, phantom.spacing_mm, study_uid=study_uid,
                           patient_id=patient_id, series_description=description)
    for ds in datasets:
        ds.AccessionNumber = accession
    return write_datasets(folder, datasets)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, dict[str, str]]]:
    """Orthanc holding study A123 (three CT series: 'Head CT', 'Head CT 2', 'Scout') and study
    B456 (one CT series); yields it and the series UIDs by description."""
    folder = tmp_path_factory.mktemp("pacs")
    with running_orthanc(folder / "orthanc") as orthanc:
        uids: dict[str, str] = {}
        for accession, study, descriptions in (
                ("A123", pydicom.uid.generate_uid(), ("Head CT", "Head CT 2", "Scout")),
                ("B456", pydicom.uid.generate_uid(), ("Brain CT",))):
            for description in descriptions:
                files = _series(folder / description.replace(" ", "_"), study_uid=study,
                                accession=accession, description=description)
                for path in files:
                    orthanc.upload(path)
                uids[description] = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        yield orthanc, uids


@pytest.mark.parametrize(("value", "accepted"), [
    ("ORTHANC@pacs.clinic.local:104", True), ("PACS@10.0.0.5:11112+tls", True),
    ("pacs.clinic.local:104", False), ("https://pacs/dicomweb", False), ("A@h:0", False),
], ids=["ae-host-port", "tls", "no-ae", "url", "port-0"])
def test_pacs_setting_is_validated(value: str, accepted: bool) -> None:
    if accepted:
        assert str(Settings(pacs=value).pacs) == value
    else:
        with pytest.raises(ValidationError, match="RTCONTOUR_PACS|port"):
            Settings(pacs=value)


def test_a_query_names_something_without_wildcards() -> None:
    with pytest.raises(InvalidQuery, match="say what to pull"):
        PullQuery()
    with pytest.raises(InvalidQuery, match="wildcards"):
        PullQuery(patient_id="PULL*")
    with pytest.raises(InvalidQuery, match="not a valid UID"):
        PullQuery(series_instance_uid="1.2.abc")


@pytest.mark.timeout(180)
def test_pull_answers_nothing_and_several_with_sentences_and_follows_the_routes(
    pacs: tuple[Orthanc, dict[str, str]], tmp_path: Path
) -> None:
    orthanc, uids = pacs
    api = make_harness(tmp_path / "a", settings_extra={"pacs": orthanc.destination})
    headers = api.headers("clinician")

    nothing = api.client.post("/api/pull", json={"accession_number": "NOPE"}, headers=headers)
    assert nothing.status_code == 404
    assert nothing.json()["detail"] == "nothing matches accession number NOPE on the PACS"

    several = api.client.post("/api/pull", json={"accession_number": "A123"}, headers=headers)
    assert several.status_code == 409
    detail = several.json()["detail"]
    assert detail.startswith("3 CT series match accession number A123")
    assert all(uids[name] in detail for name in ("Head CT", "Head CT 2", "Scout"))
    assert "Pull one by its series UID" in detail

    assert api.client.post("/api/pull", json={"accession_number": "A123"},
                           headers=api.headers("viewer")).status_code == 403
    assert api.client.post("/api/pull", json={}, headers=headers).status_code == 400
    unconfigured = make_harness(tmp_path / "b")
    reply = unconfigured.client.post("/api/pull", json={"accession_number": "A123"},
                                     headers=unconfigured.headers("clinician"))
    assert reply.status_code == 503 and "RTCONTOUR_PACS" in reply.json()["detail"]
    for harness in (api, unconfigured):
        harness.client.close()
        harness.engine.dispose()

    # Routes that ignore the scout and the second CT leave one series to pull: no ambiguity.
    routing = parse_routing({"routes": [
        {"name": "scouts", "match": {"series_description": "scout"}, "action": "ignore"},
        {"name": "repeats", "match": {"series_description": ".* 2"}, "action": "ignore"},
        {"name": "head"}], "default": "head"})
    routed = make_harness(tmp_path / "c", settings_extra={"pacs": orthanc.destination},
                          routing=routing)
    chosen = routed.client.post("/api/pull", json={"accession_number": "A123"},
                                headers=routed.headers("clinician"))
    assert chosen.status_code == 202, chosen.text
    assert chosen.json()["series_instance_uid"] == uids["Head CT"]
    routed.client.close()
    routed.engine.dispose()


@pytest.mark.timeout(180)
def test_pull_by_c_get_feeds_the_listener_and_the_job_says_who_pulled_it(
    pacs: tuple[Orthanc, dict[str, str]], tmp_path: Path
) -> None:
    orthanc, uids = pacs
    api = make_harness(tmp_path, settings_extra={
        "pacs": orthanc.destination, "pacs_retrieve": "get", "min_slices": 5})
    wired = Wired(api)

    reply = api.client.post("/api/pull", json={"accession_number": "B456"},
                            headers=api.headers("clinician"))

    assert reply.status_code == 202, reply.text
    pull = reply.json()
    assert (pull["state"], pull["series_instance_uid"], pull["requested_by"]) == (
        "retrieving", uids["Brain CT"], "clinician-user")
    deadline = time.monotonic() + 60
    while pull["state"] == "retrieving" and time.monotonic() < deadline:
        time.sleep(0.2)
        pull = api.client.get(f"/api/pulls/{pull['id']}", headers=api.headers("clinician")).json()
    assert (pull["state"], pull["retrieved_instances"], pull["reason"]) == ("retrieved", 6, None)

    (arrival,) = wired.tracker.poll(flush=True)
    assert (arrival.calling_ae, arrival.n_instances) == (orthanc.ae_title, 6)
    (job,) = api.store.list()
    assert (job.received_via, job.requested_by, job.calling_ae) == (
        "pull", "clinician-user", orthanc.ae_title)
    assert api.client.get(f"/api/pulls/{pull['id']}",
                          headers=api.headers("clinician")).json()["job_id"] == job.id
    events = {row["event"]: row for row in api.client.get(
        "/api/audit", headers=api.headers("admin")).json()["items"]}
    assert events["pull.requested"]["actor"] == "clinician-user"
    assert "B456" not in str(events["pull.requested"])  # the query's values are not audited
    assert {"pull.retrieved", "job.pulled"} <= set(events)
    wired.tracker.stop(flush=False)
    api.client.close()
    api.engine.dispose()


def test_rtcontour_pull_says_what_it_found_and_exits_non_zero(
    pacs: tuple[Orthanc, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from rtcontour.service.cli import main

    orthanc, uids = pacs
    monkeypatch.setenv("RTCONTOUR_DATA_DIR", str(tmp_path / "var"))
    assert main(["pull", "--accession", "A123"]) == 2  # no RTCONTOUR_PACS yet
    assert "set RTCONTOUR_PACS=AET@host:port" in capsys.readouterr().err
    monkeypatch.setenv("RTCONTOUR_PACS", orthanc.destination)
    assert main(["pull", "--accession", "NOPE"]) == 1
    assert capsys.readouterr().err.strip() == (
        "rtcontour pull: nothing matches accession number NOPE on the PACS")
    assert main(["pull", "--patient-id", "PULL-001"]) == 1
    err = capsys.readouterr().err
    assert "4 CT series match patient ID PULL-001" in err and uids["Brain CT"] in err
    assert main(["pull"]) == 2
    assert "say what to pull" in capsys.readouterr().err
