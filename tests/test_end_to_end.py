"""End to end: DCMTK storescu -> ``rtcontour serve`` (subprocess) -> DCMTK storescp (the TPS).

Each test runs ``rtcontour serve`` on free ports in its own process group (killed whole at
teardown, so no stray worker takes the next test's messages).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pydicom
import pytest

from tests.conftest import (
    SLOW_INFERENCE_ENV,
    StoreScp,
    api_job,
    api_jobs,
    real_package,
    referenced_ct_uids,
    serve_env,
    sop_uids,
    storescu,
    wait_for_jobs,
    wait_until,
    write_phantom_series,
)
from tests.worker.conftest import dciodvfy_errors

SHAPE = (40, 128, 128)  # slices, rows, columns of the phantom CT


@pytest.fixture(params=["embedded-sqlite", "redis-postgresql"])
def backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """Broker and database of the serve under test: the embedded defaults, or Redis and
    PostgreSQL (skipped with a message when unreachable)."""
    if request.param == "embedded-sqlite":
        return {}
    return {
        "broker_url": request.getfixturevalue("redis_db_url"),
        "database_url": request.getfixturevalue("postgres_url"),
    }


def test_ct_series_in_rtstruct_out_job_done_over_api(
    tmp_path: Path, tps: StoreScp, serve_factory, test_package: Path, backend: dict[str, str]
) -> None:
    package = real_package() or test_package
    serve = serve_factory(
        serve_env(tmp_path / "var", destinations=tps.destination, model_package=package, **backend)
    )
    ct_files = write_phantom_series(tmp_path / "ct", SHAPE)

    storescu(serve.dicom_port, ct_files)

    (job,) = wait_for_jobs(serve, 1, timeout_s=240)
    detail = api_job(serve, job["id"])
    assert detail["state"] == "done", detail
    assert detail["n_instances"] == SHAPE[0] and detail["attempts"] == 1
    timings = detail["timings"]
    assert all(timings[f"{s}_s"] is not None for s in ("load", "inference", "write", "send"))
    assert detail["structures"] and detail["has_rtstruct"]
    received = wait_until(tps.received, 10, "the RTSTRUCT at the TPS")
    assert len(received) == 1
    rtstruct = received[0]
    assert dciodvfy_errors(rtstruct) == []
    assert referenced_ct_uids(rtstruct) == sop_uids(ct_files)
    assert pydicom.dcmread(rtstruct).SOPInstanceUID == detail["rtstruct_sop_instance_uid"]

    download = httpx.get(
        f"{serve.api_url}/api/jobs/{job['id']}/rtstruct", headers=serve.headers(), timeout=10
    )
    assert download.status_code == 200
    downloaded = tmp_path / "downloaded.dcm"
    downloaded.write_bytes(download.content)
    assert pydicom.dcmread(downloaded) == pydicom.dcmread(rtstruct)  # same data set
    archived = serve.data_dir / "archive" / job["id"] / f"RS_{rtstruct_uid(detail)}.dcm"
    assert download.content == archived.read_bytes()  # the archived file itself

    audit = httpx.get(f"{serve.api_url}/api/audit", headers=serve.headers(), timeout=10)
    events = {(e["event"], e["job_id"]) for e in audit.json()["items"]}
    assert {("job.created", job["id"]), ("job.sent", job["id"])} <= events


def rtstruct_uid(detail: dict) -> str:
    return str(detail["rtstruct_sop_instance_uid"])


def test_resend_merges_while_running_and_makes_new_job_after_done(
    tmp_path: Path, tps: StoreScp, serve_factory, slow_test_package: Path
) -> None:
    serve = serve_factory(
        serve_env(
            tmp_path / "var",
            destinations=tps.destination,
            model_package=slow_test_package,
            extra=SLOW_INFERENCE_ENV,
        )
    )
    ct_files = write_phantom_series(tmp_path / "ct", (24, 64, 64))
    storescu(serve.dicom_port, ct_files)
    wait_for_jobs(serve, 1, states={"running"}, timeout_s=60)

    storescu(serve.dicom_port, ct_files)  # the TPS sends the same series again

    (job,) = wait_for_jobs(serve, 1, timeout_s=120)
    assert job["state"] == "done"
    assert len(api_jobs(serve)) == 1  # merged, not a second job

    storescu(serve.dicom_port, ct_files)  # after done: a new job
    jobs = wait_for_jobs(serve, 2, timeout_s=120)
    assert {j["state"] for j in jobs} == {"done"}
    assert len({j["id"] for j in jobs}) == 2
    assert len({j["series_instance_uid"] for j in jobs}) == 1
    # Same series and model: the same deterministic RTSTRUCT UID both times.
    assert len({api_job(serve, j["id"])["rtstruct_sop_instance_uid"] for j in jobs}) == 1


def test_two_series_in_one_association_make_two_jobs(
    tmp_path: Path, tps: StoreScp, serve_factory, test_package: Path
) -> None:
    serve = serve_factory(
        serve_env(tmp_path / "var", destinations=tps.destination, model_package=test_package)
    )
    first = write_phantom_series(tmp_path / "a", (16, 64, 64), patient_id="RTC-A", seed=1)
    second = write_phantom_series(tmp_path / "b", (20, 64, 64), patient_id="RTC-B", seed=2)

    storescu(serve.dicom_port, first + second)

    jobs = wait_for_jobs(serve, 2, timeout_s=120)
    assert sorted(j["n_instances"] for j in jobs) == [16, 20]
    assert {j["state"] for j in jobs} == {"done"}
    received = wait_until(lambda: len(tps.received()) >= 2 and tps.received(), 10, "2 RTSTRUCTs")
    assert {frozenset(referenced_ct_uids(r)) for r in received} == {
        frozenset(sop_uids(first)),
        frozenset(sop_uids(second)),
    }


def test_openkbp_patient_contoured_end_to_end(
    tmp_path: Path, tps: StoreScp, serve_factory, test_package: Path
) -> None:
    from tests.phantoms import openkbp_ct, write_ct_series
    from tests.worker.conftest import openkbp_patient

    package = real_package() or test_package  # the trained model once committed
    hu, spacing_mm = openkbp_ct(openkbp_patient("pt_1.npz"))
    ct_files = write_ct_series(tmp_path / "ct", hu, spacing_mm, patient_id="RTC-OPENKBP-1")
    serve = serve_factory(
        serve_env(tmp_path / "var", destinations=tps.destination, model_package=package)
    )
    storescu(serve.dicom_port, ct_files)
    (job,) = wait_for_jobs(serve, 1, timeout_s=600)
    detail = api_job(serve, job["id"])
    assert detail["state"] == "done", detail
    if package != test_package:  # random weights may segment nothing
        assert any(s["volume_cc"] > 0 for s in detail["structures"])
    (rtstruct,) = wait_until(tps.received, 10, "the RTSTRUCT")
    assert dciodvfy_errors(rtstruct) == []
    assert referenced_ct_uids(rtstruct) == sop_uids(ct_files)
