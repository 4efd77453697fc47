"""A DICOMweb destination: the sender STOWs a job's outputs to Orthanc's DICOMweb plugin, with
the same retries and ``send_failed`` reasons as C-STORE (wrong credentials, server down)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from rtcontour.common.dicomweb import probe
from rtcontour.common.jobstore import JobState
from rtcontour.common.routes import parse_routing
from rtcontour.common.settings import Destination
from rtcontour.worker.pipeline import SegmenterCache
from rtcontour.worker.sender import Sender
from rtcontour.worker.tasks import WorkerRuntime, execute_job
from tests.conftest import ThresholdModel, free_port, write_phantom_series
from tests.orthanc import PASSWORD, USER, running_orthanc
from tests.service.api_support import ApiHarness, make_harness
from tests.worker.pipeline_support import submit_series


def _api(tmp_path: Path, url: str, password: str) -> ApiHarness:
    routing = parse_routing({"routes": [{"name": "web", "destinations": [url],
                                         "outputs": ["RTSTRUCT", "SEG"]}], "default": "web"})
    api = make_harness(tmp_path, settings_extra={
        "min_slices": 5, "send_attempts": 2, "dicomweb_username": USER,
        "dicomweb_password": password}, routing=routing)
    api.routing = routing  # type: ignore[attr-defined]
    return api


def _submit(api: ApiHarness, tmp_path: Path) -> str:
    return submit_series(api, write_phantom_series(tmp_path / "ct"))


def _runtime(api: ApiHarness, sleeps: list[float]) -> WorkerRuntime:
    model = ThresholdModel()
    return WorkerRuntime(api.settings, store=api.store,
                         model_cache=SegmenterCache(loader=lambda *_: model,
                                                    resolver=lambda *_: Path("t")),
                         sender=Sender(api.settings, sleep=sleeps.append))


def test_destination_url_parses_as_a_dicomweb_destination() -> None:
    destination = Destination.parse("https://pacs.clinic.local/dicomweb/")
    assert destination.is_dicomweb and str(destination) == "https://pacs.clinic.local/dicomweb"
    assert (destination.host, destination.port, destination.tls) == ("pacs.clinic.local", 443,
                                                                      True)
    with pytest.raises(ValueError, match="nor a DICOMweb URL"):
        Destination.parse("pacs.clinic.local/dicomweb")


@pytest.mark.timeout(180)
def test_job_outputs_are_stowed_to_orthanc_and_wrong_credentials_end_send_failed(
    tmp_path: Path,
) -> None:
    with running_orthanc(tmp_path / "orthanc", dicomweb=True) as orthanc:
        api = _api(tmp_path / "good", orthanc.dicomweb_url, PASSWORD)
        assert probe(Destination.parse(orthanc.dicomweb_url), api.settings)[0]
        job_id = _submit(api, tmp_path / "good")
        assert execute_job(job_id, _runtime(api, [])).state == "done"
        stored = {}
        for orthanc_id in orthanc.instances():
            ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
            stored[str(ds.Modality)] = str(ds.SOPInstanceUID)
        outputs = {o.kind: o.sop_instance_uid for o in api.store.outputs(job_id)}
        assert stored == outputs  # the RTSTRUCT and the SEG
        job = api.store.get(job_id)
        assert sorted(job.sent_destinations) == sorted(
            f"{orthanc.dicomweb_url}|{uid}" for uid in outputs.values())
        api.engine.dispose()

        bad = _api(tmp_path / "bad", orthanc.dicomweb_url, "wrong-password")
        sleeps: list[float] = []
        job_id = _submit(bad, tmp_path / "bad")
        assert execute_job(job_id, _runtime(bad, sleeps)).state == "send_failed"
        reason = bad.store.get(job_id).failure_reason or ""
        assert "refused our credentials (HTTP 401)" in reason and "after 2 attempts" in reason
        assert len(sleeps) == 1  # one backoff between the 2 attempts, as for C-STORE
        assert bad.store.get(job_id).state == JobState.SEND_FAILED
        bad.engine.dispose()


def test_unreachable_dicomweb_destination_is_a_send_failure_with_the_reason(
    tmp_path: Path,
) -> None:
    api = _api(tmp_path, f"http://127.0.0.1:{free_port()}/dicom-web", PASSWORD)
    job_id = _submit(api, tmp_path)
    assert execute_job(job_id, _runtime(api, [])).state == "send_failed"
    assert "was not reachable" in (api.store.get(job_id).failure_reason or "")
    api.engine.dispose()
