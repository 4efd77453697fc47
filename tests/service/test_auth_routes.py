"""Every route needs a token (401) and the right role (403), proven by enumerating the app.

A new route that is not in ``MIN_ROLE`` (or ``PUBLIC``) fails ``test_every_route_is_classified``,
so nobody can add an unauthenticated route by accident.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy.orm import Session
from starlette.routing import Mount, Route

from rtcontour.common.auth import Role, add_user, hash_token, issue_token, set_active
from tests.service.api_support import ApiHarness, add_finished_job, harness_fixture

PUBLIC = {("GET", "/health"), ("GET", "/"), ("GET", "/dashboard")}
PUBLIC_MOUNTS = {"/static"}  # the dashboard's JS and CSS (the login page's assets)

MIN_ROLE: dict[tuple[str, str], str] = {
    ("GET", "/api/openapi.json"): "viewer",
    ("GET", "/api/me"): "viewer",
    ("POST", "/api/login"): "viewer",
    ("GET", "/api/jobs"): "viewer",
    ("GET", "/api/jobs/{job_id}"): "viewer",
    ("GET", "/api/stats"): "viewer",
    ("GET", "/api/jobs/{job_id}/rtstruct"): "clinician",
    ("GET", "/api/jobs/{job_id}/outputs"): "viewer",
    ("GET", "/api/jobs/{job_id}/outputs/{kind}"): "clinician",
    ("GET", "/api/routes"): "admin",
    ("GET", "/api/refusals"): "admin",
    ("POST", "/api/jobs/{job_id}/retry"): "clinician",
    ("POST", "/api/jobs/{job_id}/approve"): "clinician",
    ("POST", "/api/jobs/{job_id}/reject"): "clinician",
    ("GET", "/api/jobs/{job_id}/preview"): "clinician",
    ("GET", "/api/jobs/{job_id}/preview.png"): "clinician",
    ("GET", "/api/jobs/{job_id}/viewer/meta"): "clinician",
    ("GET", "/api/jobs/{job_id}/viewer/ct"): "clinician",
    ("GET", "/api/jobs/{job_id}/viewer/contours"): "clinician",
    ("GET", "/api/qa/trends"): "viewer",
    ("GET", "/api/destinations"): "admin",
    ("GET", "/api/users"): "admin",
    ("POST", "/api/users"): "admin",
    ("PATCH", "/api/users/{name}"): "admin",
    ("POST", "/api/users/{name}/token"): "admin",
    ("GET", "/api/audit"): "admin",
    ("GET", "/metrics"): "admin",
    ("POST", "/dicomweb/studies"): "clinician",
    ("POST", "/api/pull"): "clinician",
    ("GET", "/api/pulls"): "clinician",
    ("GET", "/api/pulls/{pull_id}"): "clinician",
    ("GET", "/api/jobs/{job_id}/viewer/dose"): "clinician",
    ("GET", "/api/notifications"): "admin",
    ("GET", "/api/site-dataset"): "admin",
    ("DELETE", "/api/site-dataset/patients"): "admin",
    ("DELETE", "/api/site-dataset/patients/{key}"): "admin",
    ("POST", "/api/finetune"): "admin",
    ("GET", "/api/finetune"): "admin",
    ("GET", "/api/finetune/{run_id}"): "admin",
    ("GET", "/api/shadow"): "viewer",
    ("GET", "/api/routes/{name}/shadow"): "viewer",
    ("POST", "/api/routes/{name}/switch"): "admin",
}
# Routes that need a peer the test app lacks answer 503 with a sentence to an allowed role:
# STOW-RS in without an in-process listener, a pull without RTCONTOUR_PACS.
NEEDS_A_PEER = {("POST", "/dicomweb/studies"), ("POST", "/api/pull")}

BODIES = {
    ("POST", "/api/users"): {"name": "new-user", "role": "viewer"},
    ("PATCH", "/api/users/{name}"): {"role": "viewer"},
    ("POST", "/api/jobs/{job_id}/reject"): {"reason": "wrong patient"},
    ("POST", "/api/pull"): {"accession_number": "A123"},
}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    yield from harness_fixture(tmp_path)


def _endpoints(api: ApiHarness) -> list[tuple[str, str]]:
    """(method, path) of every route of the app, included routers flattened."""
    found = []
    # FastAPI includes routers lazily; iter_route_contexts flattens them with their prefixes.
    for context in iter_route_contexts(api.client.app.routes):  # type: ignore[attr-defined]
        original = context.original_route
        if isinstance(original, Mount):
            assert context.path in PUBLIC_MOUNTS, f"unexpected mount {context.path}"
            continue
        assert isinstance(original, (APIRoute, Route)), f"unexpected route {original!r}"
        assert context.path, f"route without a path: {original!r}"
        for method in sorted(context.methods or ()):
            if method != "HEAD":
                found.append((method, context.path))
    return found


def _call(api: ApiHarness, method: str, path: str, job_id: str, headers: dict[str, str]) -> int:
    url = path.replace("{job_id}", job_id).replace("{name}", "viewer-user")
    url = url.replace("{kind}", "RTSTRUCT")
    response = api.client.request(
        method, url, headers=headers, json=BODIES.get((method, path)), follow_redirects=False
    )
    return response.status_code


def test_every_route_is_classified(api: ApiHarness) -> None:
    endpoints = set(_endpoints(api))
    unclassified = endpoints - PUBLIC - set(MIN_ROLE)
    assert not unclassified, f"routes without an access rule in this test: {unclassified}"
    assert set(MIN_ROLE) <= endpoints, f"stale entries: {set(MIN_ROLE) - endpoints}"


def test_every_non_public_route_answers_401_without_or_with_a_bad_token(tmp_path: Path) -> None:
    from tests.service.api_support import make_harness

    # So many wrong tokens from one address would be throttled (429): a limit above them.
    api = make_harness(tmp_path, settings_extra={"login_failures_per_address": 10_000})
    try:
        _every_route_answers_401(api)
    finally:
        api.client.close()
        api.engine.dispose()


def _every_route_answers_401(api: ApiHarness) -> None:
    job = add_finished_job(api)
    checked = 0
    for method, path in _endpoints(api):
        if (method, path) in PUBLIC:
            assert _call(api, method, path, job.id, {}) in (200, 307), (method, path)
            continue
        for headers in (
            {},
            {"Authorization": "Bearer not-a-token"},
            {"Authorization": "Basic eDp5"},
        ):
            status = _call(api, method, path, job.id, headers)
            assert status == 401, f"{method} {path} with {headers}: {status}"
        checked += 1
    assert checked == len(MIN_ROLE)


@pytest.mark.parametrize("role", ["viewer", "clinician", "admin"], ids=str)
def test_role_matrix_403_below_the_routes_role_and_allowed_from_it(
    api: ApiHarness, role: str
) -> None:
    job = add_finished_job(api)
    failed = api.add_job(state="failed", failure_reason="x")
    for method, path in _endpoints(api):
        if (method, path) in PUBLIC:
            continue
        target = failed.id if path.endswith("/retry") else job.id
        status = _call(api, method, path, target, api.headers(role))
        if Role(role).allows(Role(MIN_ROLE[(method, path)])):
            assert status not in (401, 403), f"{role} {method} {path}: {status}"
            if (method, path) in NEEDS_A_PEER:
                assert status == 503, f"{role} {method} {path}: {status}"
                continue
            assert status < 500, f"{role} {method} {path}: {status}"
        else:
            assert status == 403, f"{role} {method} {path}: {status}"


def test_static_assets_and_health_need_no_token(api: ApiHarness) -> None:
    for path in ("/health", "/dashboard", "/static/dashboard.js", "/static/dashboard.css"):
        assert api.client.get(path).status_code == 200, path


def test_tokens_are_stored_hashed_and_disabled_or_rotated_tokens_stop_working(
    api: ApiHarness,
) -> None:
    with Session(api.engine) as session, session.begin():
        _, token = add_user(session, "dr-who", Role.clinician)
    headers = {"Authorization": f"Bearer {token}"}
    assert api.client.get("/api/me", headers=headers).json() == {
        "name": "dr-who",
        "role": "clinician",
    }
    from sqlalchemy import text

    with api.engine.connect() as connection:
        stored = [row[0] for row in connection.execute(text("SELECT token_sha256 FROM api_tokens"))]
    assert hash_token(token) in stored and token not in stored
    with Session(api.engine) as session, session.begin():
        new_token = issue_token(session, "dr-who")
    assert api.client.get("/api/me", headers=headers).status_code == 401
    new_headers = {"Authorization": f"Bearer {new_token}"}
    assert api.client.get("/api/me", headers=new_headers).status_code == 200
    with Session(api.engine) as session, session.begin():
        set_active(session, "dr-who", False)
    assert api.client.get("/api/me", headers=new_headers).status_code == 401


def test_bootstrap_admin_token_is_the_settings_token(api: ApiHarness) -> None:
    me = api.client.get("/api/me", headers=api.headers("admin")).json()
    assert me == {"name": "bootstrap-admin", "role": "admin"}


def test_login_is_throttled_per_address_and_per_user_and_audited(tmp_path: Path) -> None:
    from tests.service.api_support import make_harness

    api = make_harness(tmp_path, settings_extra={
        "login_failures_per_address": 3, "logins_per_user": 4, "login_window_s": 60})
    try:
        bad = {"Authorization": "Bearer rtc_not-a-token"}
        codes = [api.client.post("/api/login", headers=bad).status_code for _ in range(4)]
        assert codes == [401, 401, 401, 429]
        throttled = api.client.post("/api/login", headers=api.headers("viewer"))
        assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) >= 1
        assert "failed logins from this address" in throttled.json()["detail"]
        events = api.client.get("/api/audit", params={"event": "auth.login_throttled"},
                                headers=api.headers("admin")).json()["items"]
        assert len(events) == 2 and events[0]["detail"]["address"] == "testclient"
    finally:
        api.client.close()
        api.engine.dispose()
    api = make_harness(tmp_path / "c", settings_extra={
        "login_failures_per_address": 3, "login_window_s": 60})
    try:
        # Wrong tokens on any route count too: guessing through /api/jobs is throttled and
        # the lockout audited once; a colleague's valid token from the same address works.
        bad = {"Authorization": "Bearer rtc_guess"}
        codes = [api.client.get("/api/jobs", headers=bad).status_code for _ in range(5)]
        assert codes == [401, 401, 429, 429, 429]
        assert api.client.post("/api/login", headers=bad).status_code == 429
        assert api.client.get("/api/jobs", headers=api.headers("viewer")).status_code == 200
        events = api.client.get("/api/audit", params={"event": "auth.login_throttled"},
                                headers=api.headers("admin")).json()["items"]
        assert len(events) == 2  # the lockout through /api/jobs, the refused login
    finally:
        api.client.close()
        api.engine.dispose()
    api = make_harness(tmp_path / "b", settings_extra={"logins_per_user": 2,
                                                      "login_window_s": 60})
    try:
        codes = [api.client.post("/api/login", headers=api.headers("clinician")).status_code
                 for _ in range(3)]
        assert codes == [200, 200, 429]
        # Another user from the same address is not held back by the first one's logins.
        assert api.client.post("/api/login", headers=api.headers("viewer")).status_code == 200
    finally:
        api.client.close()
        api.engine.dispose()
