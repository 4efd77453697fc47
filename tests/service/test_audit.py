"""The audit log: downloads, logins, user and token changes, rejected associations; no PHI."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtcontour.common import audit
from rtcontour.service.users_cli import main as users_main
from tests.service.api_support import ADMIN_TOKEN, ApiHarness, add_finished_job, harness_fixture


@pytest.fixture
def api(tmp_path: Path, database_url: str | None) -> Iterator[ApiHarness]:
    """The API on SQLite and on PostgreSQL (``database_url`` from tests/conftest.py)."""
    yield from harness_fixture(tmp_path, database_url)


def _entries(api: ApiHarness, query: str = "") -> list[dict]:
    response = api.client.get(f"/api/audit?{query}", headers=api.headers("admin"))
    assert response.status_code == 200, response.text
    return response.json()["items"]


def test_rtstruct_download_is_audited_with_user_job_and_uid_but_no_patient(
    api: ApiHarness, caplog: pytest.LogCaptureFixture
) -> None:
    job = add_finished_job(api)
    caplog.set_level(logging.DEBUG)
    response = api.client.get(f"/api/jobs/{job.id}/rtstruct", headers=api.headers("clinician"))
    assert response.status_code == 200
    (entry,) = _entries(api, "event=rtstruct.download")
    assert entry["actor"] == "clinician-user" and entry["job_id"] == job.id
    rtstruct = api.store.output(job.id, "RTSTRUCT")
    assert entry["detail"]["sop_instance_uid"] == rtstruct.sop_instance_uid
    everything = json.dumps(_entries(api)) + caplog.text
    assert "Phantom" not in everything and "RTC-PHANTOM" not in everything  # patient name / ID


def test_logins_and_failed_logins_are_audited(api: ApiHarness) -> None:
    assert api.client.post("/api/login", headers=api.headers("viewer")).status_code == 200
    bad = api.client.post("/api/login", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401
    logins = _entries(api, "event=auth.login")
    assert [e["actor"] for e in logins] == ["viewer-user"]
    failed = _entries(api, "event=auth.login_failed")
    assert len(failed) == 1 and "wrong" not in json.dumps(failed)  # the token is never stored


def test_user_and_token_changes_over_the_api_are_audited(api: ApiHarness) -> None:
    h = api.headers("admin")
    created = api.client.post("/api/users", json={"name": "physicist", "role": "viewer"}, headers=h)
    assert created.status_code == 201 and created.json()["token"].startswith("rtc_")
    token = created.json()["token"]
    assert (
        api.client.get("/api/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    )
    assert (
        api.client.patch("/api/users/physicist", json={"role": "clinician"}, headers=h).status_code
        == 200
    )
    rotated = api.client.post("/api/users/physicist/token", headers=h)
    assert rotated.status_code == 200
    assert (
        api.client.get("/api/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    )
    assert (
        api.client.patch("/api/users/physicist", json={"active": False}, headers=h).status_code
        == 200
    )
    events = [e["event"] for e in _entries(api, "actor=bootstrap-admin")]
    assert events == ["user.disabled", "user.token_issued", "user.role_changed", "user.added"]
    assert (
        api.client.post(
            "/api/users", json={"name": "physicist", "role": "viewer"}, headers=h
        ).status_code
        == 409
    )
    assert api.client.patch("/api/users/ghost", json={"active": True}, headers=h).status_code == 404
    users = {u["name"]: u for u in api.client.get("/api/users", headers=h).json()}
    assert users["physicist"]["active"] is False and users["physicist"]["role"] == "clinician"


def test_users_cli_adds_lists_disables_and_issues_tokens_with_audit(
    api: ApiHarness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RTCONTOUR_DATA_DIR", str(api.settings.data_dir))
    monkeypatch.setenv("RTCONTOUR_ADMIN_TOKEN", ADMIN_TOKEN)
    if api.settings.database_url:
        monkeypatch.setenv("RTCONTOUR_DATABASE_URL", api.settings.database_url)
    assert users_main(["add", "dr-smith", "--role", "clinician"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {token}"}
    assert api.client.get("/api/me", headers=headers).json() == {
        "name": "dr-smith",
        "role": "clinician",
    }
    assert users_main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "dr-smith" in listing and "clinician" in listing and token not in listing
    assert users_main(["token", "dr-smith"]) == 0
    new_token = capsys.readouterr().out.strip().splitlines()[-1]
    assert api.client.get("/api/me", headers=headers).status_code == 401
    assert users_main(["disable", "dr-smith"]) == 0
    assert (
        api.client.get("/api/me", headers={"Authorization": f"Bearer {new_token}"}).status_code
        == 401
    )
    assert users_main(["disable", "nobody"]) == 1
    assert "does not exist" in capsys.readouterr().err
    events = [e["event"] for e in _entries(api) if e["actor"].startswith("cli")]
    assert events == ["user.disabled", "user.token_issued", "user.added"]


def test_listener_recorder_audits_rejected_associations(api: ApiHarness) -> None:
    recorder = audit.make_recorder(api.engine)
    recorder(
        audit.ASSOCIATION_REJECTED,
        {
            "calling_ae": "ROGUE",
            "address": "10.0.0.9",
            "reason": "unknown calling AE",
            "PatientName": "Doe^Jane",
        },
    )
    (entry,) = _entries(api, "event=dicom.association_rejected")
    assert entry["actor"] == "dicom-listener"
    assert entry["detail"] == {
        "calling_ae": "ROGUE",
        "address": "10.0.0.9",
        "reason": "unknown calling AE",
    }


def test_audit_filters_and_pagination(api: ApiHarness) -> None:
    for i in range(5):
        audit.record(
            api.engine,
            audit.JOB_CREATED,
            "intake",
            {"series_instance_uid": f"1.2.{i}"},
            job_id=f"job{i}",
        )
    audit.record(api.engine, audit.JOB_SENT, "worker", {"destination": "TPS@h:104"}, job_id="job1")
    page = api.client.get(
        "/api/audit?limit=2&offset=1&event=job.created", headers=api.headers("admin")
    ).json()
    assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == 1
    assert [e["job_id"] for e in page["items"]] == ["job3", "job2"]
    assert [e["event"] for e in _entries(api, "job_id=job1")] == ["job.sent", "job.created"]
    assert _entries(api, "since=2999-01-01T00:00:00") == []
    assert len(_entries(api, "until=2999-01-01T00:00:00Z&actor=worker")) == 1
    assert api.client.get("/api/audit", headers=api.headers("clinician")).status_code == 403
