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

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from rtcontour.common.auth import Role, add_user
from rtcontour.common.db import make_engine
from rtcontour.common.jobstore import Job, JobState, JobStore
from rtcontour.common.settings import Settings
from rtcontour.service.api.app import create_app

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
        # The RTSTRUCT is a row of the job's outputs (given here as the old column names).
        rtstruct_path = values.pop("rtstruct_path", None)
        rtstruct_uid = values.pop("rtstruct_sop_instance_uid", None)
        structures = values.pop("structures", None)
        if rtstruct_path is not None or structures is not None:
            self.store.record_output(result.job.id, kind="RTSTRUCT", path=rtstruct_path or "",
                                     sop_instance_uid=rtstruct_uid or "", summary=structures)
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


def make_harness(
    tmp_path: Path,
    database_url: str | None = None,
    *,
    settings_extra: dict[str, Any] | None = None,
    **app_kwargs: Any,
) -> ApiHarness:
    """``database_url``: None for the embedded SQLite, or e.g. the ``postgres_url`` fixture;
    ``settings_extra``: more settings (e.g. destinations); ``app_kwargs`` go to create_app."""
    settings = Settings(
        data_dir=tmp_path / "var",
        admin_token=ADMIN_TOKEN,
        database_url=database_url,
        **(settings_extra or {}),
    )
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


def harness_fixture(
    tmp_path: Path, database_url: str | None = None, **app_kwargs: Any
) -> Iterator[ApiHarness]:
    """Body of each test module's ``api`` fixture (pytest fixtures are not shared by import)."""
    harness = make_harness(tmp_path, database_url, **app_kwargs)
    yield harness
    harness.client.close()
    harness.engine.dispose()


MARKER_COLOUR = (255, 0, 0)
BODY_COLOUR = (0, 255, 0)


def add_finished_job(
    harness: ApiHarness,
    *,
    patient_position: str = "HFS",
    series_description: str = "Synthetic head CT",
    **values: Any,
) -> Job:
    """A done job with a real phantom CT in its spool folder and a real archived RTSTRUCT.

    ROIs: ``Marker`` (red; the phantom's left-anterior-superior cube) and ``Body`` (green).
    """
    from rtcontour.common.volume import load_series
    from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, save_rtstruct
    from tests.phantoms import head_phantom, write_ct_series

    phantom = head_phantom()
    job = harness.add_job(state="done", series_description=series_description, **values)
    ct_folder = harness.settings.spool_dir / "jobs" / job.id
    paths = write_ct_series(
        ct_folder,
        phantom.hu,
        phantom.spacing_mm,
        patient_position=patient_position,
        series_description=series_description,
        seed=1,
    )
    series = load_series(paths, min_slices=1)
    masks = {
        "Marker": series.volume.array_from_canonical(phantom.marker),
        "Body": series.volume.array_from_canonical(phantom.body),
    }
    rois = [RoiSpec("Marker", MARKER_COLOUR, "MARKER"), RoiSpec("Body", BODY_COLOUR, "EXTERNAL")]
    dataset = build_rtstruct(series, masks, rois, model_name="phantom-net", model_version="1.0.0")
    path = save_rtstruct(dataset, harness.settings.archive_dir / job.id / "RS.dcm")
    voxel_cc = float(np.prod(phantom.spacing_mm)) / 1000.0
    harness.store.set_spool_dir(job.id, str(ct_folder), len(paths))
    harness.store.record_model(job.id, "phantom-net", "1.0.0")
    harness.store.record_output(
        job.id,
        kind="RTSTRUCT",
        sop_instance_uid=str(dataset.SOPInstanceUID),
        path=str(path),
        summary=[
            {
                "roi_name": "Marker",
                "volume_cc": round(phantom.marker.sum() * voxel_cc, 2),
                "colour": list(MARKER_COLOUR),
            },
            {
                "roi_name": "Body",
                "volume_cc": round(phantom.body.sum() * voxel_cc, 2),
                "colour": list(BODY_COLOUR),
            },
        ],
    )
    for stage, seconds in (("load", 0.4), ("inference", 12.5), ("contours", 0.8), ("send", 0.3)):
        harness.store.record_stage(job.id, stage, seconds)
    return harness.store.get(job.id)
