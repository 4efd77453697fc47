"""Schema upgrades: a database of the release before ``job_outputs`` keeps its RTSTRUCTs."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from rtcontour.common.jobstore import JobState, JobStore
from rtcontour.common.schema import create_schema

OLD_JOBS_TABLE = """
CREATE TABLE jobs (
    id VARCHAR(32) PRIMARY KEY, series_instance_uid VARCHAR(64), active_series_uid VARCHAR(64),
    study_instance_uid VARCHAR(64), calling_ae VARCHAR(16), modality VARCHAR(16),
    series_description VARCHAR(64), n_instances INTEGER, state VARCHAR(16), failure_reason TEXT,
    model_name VARCHAR(64), model_version VARCHAR(32), rtstruct_sop_instance_uid VARCHAR(64),
    rtstruct_path TEXT, structures JSON, sent_destinations JSON, attempts INTEGER,
    generation INTEGER, created_at TIMESTAMP, updated_at TIMESTAMP, queued_at TIMESTAMP,
    started_at TIMESTAMP, finished_at TIMESTAMP, load_s FLOAT, inference_s FLOAT,
    contours_s FLOAT, send_s FLOAT, spool_dir TEXT, worker VARCHAR(128),
    lease_expires_at TIMESTAMP, purged_at TIMESTAMP
)
"""


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_existing_database_gains_outputs_table_and_its_rtstructs_move_over(
    database_url: str | None, tmp_path
) -> None:
    url = database_url or f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(OLD_JOBS_TABLE))
        connection.execute(text(
            "INSERT INTO jobs (id, series_instance_uid, state, rtstruct_sop_instance_uid, "
            "rtstruct_path, structures, sent_destinations, attempts, generation, created_at, "
            "updated_at, finished_at, n_instances, calling_ae, modality, series_description, "
            "study_instance_uid) VALUES ('a1', '1.2.3', 'done', '2.25.9', '/archive/a1/RS.dcm', "
            "'[{\"roi_name\": \"Brainstem\", \"volume_cc\": 25.1, \"colour\": [0, 0, 255]}]', "
            "'[]', 1, 0, '2026-01-01 10:00:00', '2026-01-01 10:01:00', '2026-01-01 10:01:00', "
            "3, 'TPS', 'CT', 'Head', '1.2')"
        ))
        connection.execute(text(
            "INSERT INTO jobs (id, series_instance_uid, state, sent_destinations, attempts, "
            "generation, created_at, updated_at, n_instances, calling_ae, modality, "
            "series_description, study_instance_uid) VALUES ('b2', '1.2.4', 'failed', '[]', 1, "
            "0, '2026-01-01 11:00:00', '2026-01-01 11:00:00', 3, 'TPS', 'CT', 'Head', '1.2')"
        ))

    create_schema(engine)
    create_schema(engine)  # a second start copies nothing twice

    store = JobStore(engine)
    (output,) = store.outputs("a1")
    assert (output.kind, output.sop_instance_uid, output.path) == (
        "RTSTRUCT", "2.25.9", "/archive/a1/RS.dcm")
    assert output.summary == [{"roi_name": "Brainstem", "volume_cc": 25.1, "colour": [0, 0, 255]}]
    assert store.outputs("b2") == []
    # The old rows still work with the new columns (route_name etc. added, empty).
    job = store.get("a1")
    assert job.job_state == JobState.DONE and job.route_name is None
    engine.dispose()


def test_outputs_are_one_row_per_kind_replaced_when_rebuilt(tmp_path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'new.db'}")
    create_schema(engine)
    store = JobStore(engine)
    job = store.create_or_merge_for_series(series_instance_uid="1.2.5").job
    store.record_output(job.id, kind="RTSTRUCT", sop_instance_uid="2.25.1", path="/a/RS.dcm")
    store.record_output(job.id, kind="RTDOSE", sop_instance_uid="2.25.2", path="/a/RD.dcm",
                        summary=[{"roi_name": "PTV70", "d95_gy": 68.2}])
    store.record_output(job.id, kind="RTSTRUCT", sop_instance_uid="2.25.3", path="/b/RS.dcm")
    assert [(o.kind, o.sop_instance_uid) for o in store.outputs(job.id)] == [
        ("RTSTRUCT", "2.25.3"), ("RTDOSE", "2.25.2")]
    assert store.output(job.id, "RTDOSE").summary == [{"roi_name": "PTV70", "d95_gy": 68.2}]
    assert store.output(job.id, "SEG") is None
    page = store.outputs_of([job.id, "nope"])
    assert [o.kind for o in page[job.id]] == ["RTSTRUCT", "RTDOSE"] and page["nope"] == []
