"""Intake: a complete series becomes (or merges into) a job, its files move, it is enqueued."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtcontour.common.db import make_engine
from rtcontour.common.jobstore import JobState, JobStore
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings
from rtcontour.service.intake import Intake, SeriesArrival, job_folder

SERIES = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def store(settings: Settings) -> JobStore:
    engine = make_engine(settings)
    create_schema(engine)
    return JobStore(engine)


def _arrival(settings: Settings, uids: list[str], series: str = SERIES) -> SeriesArrival:
    folder = settings.spool_dir / "incoming" / series
    folder.mkdir(parents=True, exist_ok=True)
    for uid in uids:
        (folder / f"{uid}.dcm").write_bytes(f"instance {uid}".encode())
    return SeriesArrival(series, "1.2.3", "TPS", "CT", "Head", folder, len(uids))


def test_series_becomes_queued_job_with_files_moved_and_enqueued(
    settings: Settings, store: JobStore
) -> None:
    enqueued: list[str] = []
    audited: list[tuple[str, dict]] = []
    intake = Intake(settings, store, enqueued.append, audit=lambda e, d: audited.append((e, d)))
    arrival = _arrival(settings, ["1.1", "1.2", "1.3"])
    intake.series_complete(arrival)
    (job,) = store.list()
    assert enqueued == [job.id]
    assert job.state == JobState.QUEUED and job.n_instances == 3
    folder = job_folder(settings, job.id)
    assert job.spool_dir == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["1.1.dcm", "1.2.dcm", "1.3.dcm"]
    assert not arrival.folder.exists()
    assert audited == [
        ("job.created",
         {"job_id": job.id, "series_instance_uid": SERIES, "calling_ae": "TPS", "n_instances": 3})
    ]


@pytest.mark.parametrize("state", ["queued", "running"], ids=["while-queued", "while-running"])
def test_resend_while_active_merges_and_dedupes_by_sop_instance_uid(
    settings: Settings, store: JobStore, state: str
) -> None:
    enqueued: list[str] = []
    intake = Intake(settings, store, enqueued.append)
    intake.series_complete(_arrival(settings, ["1.1", "1.2"]))
    (job,) = store.list()
    if state == "running":
        store.claim(job.id, "w", 60)
    intake.series_complete(_arrival(settings, ["1.2", "1.3"]))
    assert store.count() == 1
    merged = store.get(job.id)
    assert merged.n_instances == 3 and merged.generation == 2  # merge, then files in place
    assert merged.state == state
    assert enqueued == [job.id, job.id]
    assert (job_folder(settings, job.id) / "1.2.dcm").read_bytes() == b"instance 1.2"


def test_resend_after_done_makes_new_job(settings: Settings, store: JobStore) -> None:
    intake = Intake(settings, store, lambda _: None)
    intake.series_complete(_arrival(settings, ["1.1", "1.2"]))
    (first,) = store.list()
    store.claim(first.id, "w", 60)
    store.transition(first.id, JobState.DONE)
    intake.series_complete(_arrival(settings, ["1.1", "1.2"]))
    assert store.count() == 2
    second = next(j for j in store.list() if j.id != first.id)
    assert second.state == JobState.QUEUED and second.n_instances == 2


def test_enqueue_failure_keeps_job_for_recovery(settings: Settings, store: JobStore) -> None:
    def broker_down(job_id: str) -> None:
        raise ConnectionError("broker unreachable")

    Intake(settings, store, broker_down).series_complete(_arrival(settings, ["1.1"]))
    (job,) = store.list()
    assert job.state == JobState.QUEUED
    assert store.recoverable_jobs() == [job.id]


def test_two_series_make_two_jobs(settings: Settings, store: JobStore) -> None:
    intake = Intake(settings, store, lambda _: None)
    intake.series_complete(_arrival(settings, ["1.1"], series="1.2.3.4.1"))
    intake.series_complete(_arrival(settings, ["2.1"], series="1.2.3.4.2"))
    assert {j.series_instance_uid for j in store.list()} == {"1.2.3.4.1", "1.2.3.4.2"}


def test_default_intake_enqueues_on_embedded_broker(settings: Settings, store: JobStore) -> None:
    Intake(settings, store).series_complete(_arrival(settings, ["1.1"]))
    queue = Path(settings.data_dir) / "broker" / "queue"
    assert len([p for p in queue.iterdir() if p.name.endswith(".rtcontour.msg")]) == 1


# -- routing -----------------------------------------------------------------------------------
ROUTES = """
routes:
  - name: head-and-neck
    match: {calling_ae: "TPS", series_description: ".*head.*"}
    model: hn-model
    destinations: ["PLAN@127.0.0.1:104"]
  - name: pelvis
    match: {series_description: ".*pelvis.*"}
    action: ignore
default: ignore
"""


def _routed_intake(
    settings: Settings, store: JobStore, enqueued: list[str], audited: list[tuple[str, dict]]
) -> Intake:
    from rtcontour.common.routes import load_routing

    path = settings.data_dir / "routes.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ROUTES)
    routing = load_routing(settings.model_copy(update={"routes_file": path}))
    return Intake(settings, store, enqueued.append,
                  audit=lambda e, d: audited.append((e, d)), routing=routing)


def _dicom_arrival(
    settings: Settings, series: str, description: str, calling_ae: str = "TPS"
) -> SeriesArrival:
    from tests.conftest import write_phantom_series

    folder = settings.spool_dir / "incoming" / series
    files = write_phantom_series(folder, (6, 16, 16), series_uid=series,
                                 series_description=description)
    return SeriesArrival(series, "1.2.3", calling_ae, "CT", description, folder, len(files))


def test_routed_series_records_its_route_model_and_destinations(
    settings: Settings, store: JobStore
) -> None:
    enqueued: list[str] = []
    intake = _routed_intake(settings, store, enqueued, [])
    intake.series_complete(_dicom_arrival(settings, SERIES, "Head 2mm"))
    (job,) = store.list()
    assert enqueued == [job.id] and job.state == JobState.QUEUED
    assert (job.route_name, job.model_request) == ("head-and-neck", "hn-model")
    assert job.destinations == ["PLAN@127.0.0.1:104"]


@pytest.mark.parametrize(
    ("description", "calling_ae", "reason"),
    [("Pelvis 3mm", "TPS", "route pelvis: ignore"),
     ("Head 2mm", "SCANNER", "no route matched")],
    ids=["ignore-route", "no-route-matched"],
)
def test_series_no_route_contours_is_an_ignored_job_with_its_reason_never_enqueued(
    settings: Settings, store: JobStore, description: str, calling_ae: str, reason: str
) -> None:
    enqueued: list[str] = []
    audited: list[tuple[str, dict]] = []
    intake = _routed_intake(settings, store, enqueued, audited)
    arrival = _dicom_arrival(settings, SERIES, description, calling_ae)
    intake.series_complete(arrival)
    (job,) = store.list()
    assert enqueued == []
    assert job.state == JobState.IGNORED and job.ignored_reason == reason
    assert job.failure_reason is None and job.finished_at is not None
    assert job.n_instances == 6 and len(list(job_folder(settings, job.id).glob("*.dcm"))) == 6
    assert [event for event, _ in audited] == ["job.ignored"]
    assert audited[0][1]["reason"] == reason
    # Sent again, it is a new ignored job (visible again), not a merge into the old one.
    intake.series_complete(_dicom_arrival(settings, SERIES, description, calling_ae))
    assert [j.state for j in store.list()] == [JobState.IGNORED, JobState.IGNORED]


def test_intake_records_who_the_patient_is_for_the_roles_allowed_to_see_it(
    settings: Settings, store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    intake = Intake(settings, store, lambda _: None)
    intake.series_complete(_dicom_arrival(settings, SERIES, "Head 2mm"))
    (job,) = store.list()
    assert job.patient_id == "RTC-PHANTOM-001" and job.patient_name
    assert job.study_date is not None and job.review_required is False
    assert "RTC-PHANTOM-001" not in caplog.text and str(job.patient_name) not in caplog.text


def test_intake_stopped_half_way_is_finished_like_a_new_job_when_the_series_is_rearmed(
    settings: Settings, store: JobStore
) -> None:
    """The listener died after creating the job (still "received") and before moving every
    file; the journal re-arms the series at restart and its arrival finishes that job: the
    route's decision (here: ignore) and who the patient is are applied, not skipped."""
    enqueued: list[str] = []
    audited: list[tuple[str, dict]] = []
    intake = _routed_intake(settings, store, enqueued, audited)
    half_done = store.create_or_merge_for_series(series_instance_uid=SERIES).job
    assert half_done.state == JobState.RECEIVED and half_done.patient_id is None
    intake.series_complete(_dicom_arrival(settings, SERIES, "Pelvis 3mm"))
    (job,) = store.list()
    assert job.id == half_done.id and enqueued == []
    assert job.state == JobState.IGNORED and job.ignored_reason == "route pelvis: ignore"
    assert job.patient_id == "RTC-PHANTOM-001"
    assert [event for event, _ in audited] == ["job.ignored"]
