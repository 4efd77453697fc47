"""Shared helpers of the API tests (``test_api*``, ``test_auth*``, ``test_audit*``, previews).

Jobs are created through the job store; finished jobs get a real CT series (``tests.phantoms``)
in their spool folder and a real RTSTRUCT when ``worker.rtstruct`` is available.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.api.app import create_app
from service.auth import Role, add_user
from service.db import make_engine
from service.jobstore import Job, JobState, JobStore
from service.settings import Settings

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


@dataclass
class ApiHarness:
    """An app on a fresh SQLite database with one token per role and a fake queue."""

    settings: Settings
    engine: Engine
    store: JobStore
    client: TestClient
    tokens: dict[str, str]
    enqueued: list[str] = field(default_factory=list)

    def headers(self, role: str | None) -> dict[str, str]:
        if role is None:
            return {}
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def add_job(self, *, state: str = "done", **values: Any) -> Job:
        """A job row in ``state`` (columns set directly: tests need arbitrary histories)."""
        result = self.store.create_or_merge_for_series(
            series_instance_uid=values.pop("series_instance_uid", _uid()),
            calling_ae=values.pop("calling_ae", "TPS_A"),
            modality="CT",
            series_description=values.pop("series_description", "Head CT"),
            n_instances=values.pop("n_instances", 24),
        )
        now = dt.datetime.now(dt.UTC)
        with Session(self.engine) as session, session.begin():
            job = session.get(Job, result.job.id)
            assert job is not None
            job.state = state
            if state in (JobState.DONE, JobState.FAILED, JobState.SEND_FAILED):
                job.active_series_uid = None
                job.finished_at = values.pop("finished_at", now)
            for key, value in values.items():
                setattr(job, key, value)
        return self.store.get(result.job.id)


_counter = iter(range(1, 10**9))


def _uid() -> str:
    return f"1.2.826.0.1.3680043.10.543.{next(_counter)}"


def make_harness(tmp_path: Path, **app_kwargs: Any) -> ApiHarness:
    settings = Settings(data_dir=tmp_path / "var", admin_token=ADMIN_TOKEN)
    engine = make_engine(settings)
    enqueued: list[str] = []
    app_kwargs.setdefault("enqueue", enqueued.append)
    app_kwargs.setdefault("queue_depth", lambda: 3)
    app = create_app(settings, engine=engine, **app_kwargs)
    tokens = {"admin": ADMIN_TOKEN}
    with Session(engine) as session, session.begin():
        for role in (Role.clinician, Role.viewer):
            _, tokens[role.value] = add_user(session, f"{role.value}-user", role)
    return ApiHarness(settings, engine, JobStore(engine), TestClient(app), tokens, enqueued)


def harness_fixture(tmp_path: Path, **app_kwargs: Any) -> Iterator[ApiHarness]:
    """Body of each test module's ``api`` fixture (pytest fixtures are not shared by import)."""
    harness = make_harness(tmp_path, **app_kwargs)
    yield harness
    harness.client.close()
    harness.engine.dispose()
