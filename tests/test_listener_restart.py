"""Issue 14, nothing acknowledged is lost: ``rtcontour serve`` (embedded defaults) killed whole
with SIGKILL, as a power cut would, at the moments between a series' first instance and its
job, then started again on the same data folder.

- in the quiet period after the TPS got Success for every instance and released: the series
  becomes its job after the restart, and its RTSTRUCT reaches the TPS once, nothing re-sent;
- while the intake had moved part of the series into the job it had created: the same job
  gets the rest and completes once;
- before the association was released: the TPS saw the association fail; the instances are
  no job of their own, and the series sent again makes one job
  (``tests/service/test_listener_main.py`` for the listener alone).
Killed mid-inference, the job completes exactly once (``tests/test_worker_faults.py``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pydicom
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import (
    REPO_ROOT,
    StoreScp,
    api_job,
    api_jobs,
    referenced_ct_uids,
    serve_env,
    sop_uids,
    storescu,
    wait_for_jobs,
    wait_until,
    write_phantom_series,
)

SHAPE = (12, 64, 64)

# Run as `python SCRIPT`: `rtcontour serve` whose intake dies (the whole process group,
# SIGKILL) after moving half of the first series it takes into the job it created.
DIE_MID_INTAKE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import rtcontour.service.intake as intake

def move_half_then_die(source, target):
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(source.glob("*.dcm"))
    for path in files[: len(files) // 2]:
        os.replace(path, target / path.name)
    print("intake: killed after moving", len(files) // 2, "of", len(files), flush=True)
    os.killpg(0, signal.SIGKILL)

intake._move_instances = move_half_then_die
from rtcontour.service.cli import main
sys.exit(main(["serve"]))
"""


def _one_rtstruct_for_all(serve, tps: StoreScp, ct_files: list[Path]) -> dict:  # type: ignore[no-untyped-def]
    (job,) = wait_for_jobs(serve, 1, timeout_s=120)
    detail = api_job(serve, job["id"])
    assert detail["state"] == "done", detail
    assert detail["n_instances"] == len(ct_files)
    received = wait_until(tps.received, 10, "the RTSTRUCT at the TPS")
    time.sleep(1.0)
    assert len(tps.received()) == 1, "the TPS must receive the RTSTRUCT exactly once"
    assert referenced_ct_uids(received[0]) == sop_uids(ct_files)
    return detail


def test_serve_killed_in_the_quiet_period_contours_the_series_after_restart(
    tmp_path: Path, tps: StoreScp, serve_factory, test_package: Path
) -> None:
    env = serve_env(
        tmp_path / "var", destinations=tps.destination, model_package=test_package,
        extra={"RTCONTOUR_QUIET_PERIOD_S": "6"},
    )
    serve = serve_factory(env)
    ct_files = write_phantom_series(tmp_path / "ct", SHAPE)
    storescu(serve.dicom_port, ct_files)  # Success for every instance, released
    series_uid = pydicom.dcmread(ct_files[0], stop_before_pixels=True).SeriesInstanceUID
    journal = tmp_path / "var" / "spool" / "journal" / series_uid
    assert [p.suffix for p in journal.iterdir()] == [".released"]  # before the release reply
    time.sleep(1.0)
    assert api_jobs(serve) == []  # inside the quiet period: no job yet
    serve.kill()

    serve.start()
    _one_rtstruct_for_all(serve, tps, ct_files)
    assert "acknowledged before the restart" in serve.log()


def test_serve_killed_while_its_intake_moved_files_completes_that_job_after_restart(
    tmp_path: Path, tps: StoreScp, serve_factory, test_package: Path
) -> None:
    script = tmp_path / "die_mid_intake.py"
    script.write_text(DIE_MID_INTAKE.format(repo=str(REPO_ROOT)))
    env = serve_env(tmp_path / "var", destinations=tps.destination, model_package=test_package)
    dying = serve_factory(env, command=[sys.executable, str(script)])
    ct_files = write_phantom_series(tmp_path / "ct", SHAPE)
    storescu(dying.dicom_port, ct_files)
    assert dying.process is not None
    dying.process.wait(30)
    assert "intake: killed after moving 6 of 12" in dying.log()
    jobs_dir = tmp_path / "var" / "spool" / "jobs"
    (job_folder,) = jobs_dir.iterdir()
    assert len(list(job_folder.glob("*.dcm"))) == 6  # the other six still in incoming/

    serve = serve_factory(env)
    detail = _one_rtstruct_for_all(serve, tps, ct_files)
    assert detail["id"] == job_folder.name  # the job the dead intake created, not a new one


def test_serve_killed_before_the_release_makes_one_job_when_the_series_is_sent_again(
    tmp_path: Path, tps: StoreScp, serve_factory, test_package: Path
) -> None:
    env = serve_env(tmp_path / "var", destinations=tps.destination, model_package=test_package)
    serve = serve_factory(env)
    ct_files = write_phantom_series(tmp_path / "ct", SHAPE)
    ae = AE(ae_title="TPS")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", serve.dicom_port, ae_title="RTCONTOUR")
    assert assoc.is_established
    for path in ct_files[:5]:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    serve.kill()
    assoc.abort()

    serve.start()
    time.sleep(3.0)  # three quiet periods: the five instances make no job
    assert api_jobs(serve) == []
    assert "stay interrupted until it is sent again" in serve.log()
    storescu(serve.dicom_port, ct_files)
    _one_rtstruct_for_all(serve, tps, ct_files)
