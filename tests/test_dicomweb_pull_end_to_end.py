"""End to end with real peers: a running ``rtcontour serve`` takes a CT series by STOW-RS
(a raw multipart POST of real DICOM files, and Orthanc's DICOMweb plugin sending one) and
pulls one from Orthanc as the PACS (C-FIND, C-MOVE to its own listener); each becomes a job
and an RTSTRUCT sent to the TPS, like a C-STORE would, and says how it came and who asked."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.conftest import (
    StoreScp,
    api_job,
    real_package,
    referenced_ct_uids,
    serve_env,
    sop_uids,
    wait_for_jobs,
    write_phantom_series,
)
from tests.orthanc import running_orthanc
from tests.service.test_dicomweb_in import multipart

SHAPE = (12, 64, 64)


def _to_orthanc(orthanc, files: list[Path]) -> str:  # type: ignore[no-untyped-def]
    """Store ``files`` in Orthanc; return its id of their series."""
    answers = [orthanc.post("/instances", path.read_bytes()) for path in files]
    return str(answers[0]["ParentSeries"])


@pytest.mark.timeout(300)
def test_stow_and_pull_into_running_serve_become_jobs_with_rtstructs(
    tmp_path: Path, tps: StoreScp, serve_factory, request: pytest.FixtureRequest
) -> None:
    package = real_package() or request.getfixturevalue("test_package")
    env = serve_env(tmp_path / "var", destinations=tps.destination, model_package=package)
    api_url = f"http://127.0.0.1:{env['RTCONTOUR_API_PORT']}"
    auth = {"Authorization": f"Bearer {env['RTCONTOUR_ADMIN_TOKEN']}"}
    with running_orthanc(
        tmp_path / "orthanc", dicomweb=True,
        modalities={"rtcontour": ("RTCONTOUR", "127.0.0.1", int(env["RTCONTOUR_DICOM_PORT"]))},
        dicomweb_servers={"rtcontour": {"Url": f"{api_url}/dicomweb/", "HttpHeaders": auth}},
    ) as orthanc:
        env["RTCONTOUR_PACS"] = orthanc.destination
        serve = serve_factory(env)
        stowed = write_phantom_series(tmp_path / "stowed", SHAPE, seed=1)
        relayed = write_phantom_series(tmp_path / "relayed", SHAPE, seed=2)
        pulled = write_phantom_series(tmp_path / "pulled", SHAPE, seed=3)
        for path in pulled:  # the PACS's copy carries the accession number a user types
            ds = pydicom.dcmread(path)
            ds.AccessionNumber = "A123"
            ds.save_as(path, enforce_file_format=True)

        # 1. A raw STOW-RS request built from the DICOM files.
        body, headers = multipart(stowed)
        reply = httpx.post(f"{api_url}/dicomweb/studies", content=body,
                           headers={**headers, **auth}, timeout=60)
        assert reply.status_code == 200, reply.text
        # 2. Orthanc's DICOMweb plugin sends a series it holds (STOW-RS client).
        sent = orthanc.post("/dicom-web/servers/rtcontour/stow",
                            json.dumps({"Resources": [_to_orthanc(orthanc, relayed)]}).encode())
        assert not (isinstance(sent, dict) and sent.get("FailedInstancesCount")), sent
        # 3. A pull by accession number: C-FIND, then C-MOVE to rtcontour's own listener.
        _to_orthanc(orthanc, pulled)
        reply = httpx.post(f"{api_url}/api/pull", json={"accession_number": "A123"},
                           headers=auth, timeout=60)
        assert reply.status_code == 202, reply.text

        jobs = wait_for_jobs(serve, 3, timeout_s=240)

    by_series = {job["series_instance_uid"]: api_job(serve, job["id"]) for job in jobs}
    for files, via in ((stowed, "dicomweb"), (relayed, "dicomweb"), (pulled, "pull")):
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        job = by_series[series_uid]
        assert job["state"] == "done", job
        assert (job["received_via"], job["requested_by"]) == (via, "bootstrap-admin")
        assert job["n_instances"] == SHAPE[0] and job["has_rtstruct"]
    assert by_series[str(pydicom.dcmread(pulled[0]).SeriesInstanceUID)]["calling_ae"] == (
        orthanc.ae_title)
    # Each RTSTRUCT reached the TPS and references its whole CT series.
    received = {str(pydicom.dcmread(path).ReferencedFrameOfReferenceSequence[0]
                    .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
                    .SeriesInstanceUID): path for path in tps.received()}
    for files in (stowed, relayed, pulled):
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        assert referenced_ct_uids(received[series_uid]) == sop_uids(files)
