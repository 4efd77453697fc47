"""A route with ``outputs: [RTSTRUCT, SEG]``: the job archives both as rows of its outputs,
sends both to the route's destination (Orthanc stores them), and the API downloads the SEG.
A route without ``outputs`` writes the RTSTRUCT alone; a series the loader refuses gets no
SEG either."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from rtcontour.common.errors import ConfigurationError
from rtcontour.common.jobstore import JobState
from rtcontour.common.routes import parse_routing
from rtcontour.common.volume import load_series
from rtcontour.worker.tasks import execute_job
from tests.conftest import write_phantom_series
from tests.orthanc import running_orthanc
from tests.service.api_support import ApiHarness, make_harness
from tests.worker.pipeline_support import submit_series, threshold_runtime


def _harness(tmp_path: Path, destination: str | None, outputs: list[str] | None) -> ApiHarness:
    route: dict[str, object] = {"name": "hn"}
    if destination is not None:
        route["destinations"] = [destination]
    if outputs is not None:
        route["outputs"] = outputs
    routing = parse_routing({"routes": [route], "default": "hn"})
    harness = make_harness(tmp_path, settings_extra={"min_slices": 5}, routing=routing)
    harness.routing = routing  # type: ignore[attr-defined]
    return harness


def _submit(api: ApiHarness, tmp_path: Path, **series: object) -> str:
    return submit_series(api, write_phantom_series(tmp_path / "ct", **series))  # type: ignore[arg-type]




@pytest.mark.timeout(180)
def test_route_asking_for_seg_archives_sends_and_serves_it_beside_the_rtstruct(
    tmp_path: Path,
) -> None:
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        api = _harness(tmp_path, orthanc.destination, ["RTSTRUCT", "SEG"])
        job_id = _submit(api, tmp_path)
        assert execute_job(job_id, threshold_runtime(api)).state == "done"

        outputs = {output.kind: output for output in api.store.outputs(job_id)}
        assert set(outputs) == {"RTSTRUCT", "SEG"}
        seg_row = outputs["SEG"]
        assert Path(seg_row.path).name == f"SEG_{seg_row.sop_instance_uid}.dcm"
        assert [s["roi_name"] for s in seg_row.summary] == ["Bone", "Marker"]
        assert [s["segment_number"] for s in seg_row.summary] == [1, 2]
        assert api.store.get(job_id).requested_outputs == ["RTSTRUCT", "SEG"]

        stored = {}
        for orthanc_id in orthanc.instances():
            ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
            stored[str(ds.Modality)] = ds
        assert set(stored) == {"RTSTRUCT", "SEG"}
        assert stored["SEG"].SOPInstanceUID == seg_row.sop_instance_uid

    # The SEG's masks are the model's, voxel for voxel on the CT grid.
    job = api.store.get(job_id)
    series = load_series(sorted(Path(job.spool_dir).glob("*.dcm")))
    seg = hd.seg.segread(seg_row.path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(series.volume.sop_instance_uids), segment_numbers=[1, 2])
    hu = series.volume.array
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), hu > 500)
    np.testing.assert_array_equal(pixels[..., 1].astype(bool), hu > 1200)

    reply = api.client.get(f"/api/jobs/{job_id}/outputs/seg", headers=api.headers("clinician"))
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/dicom"
    assert f"SEG_{job_id}.dcm" in reply.headers["content-disposition"]
    assert pydicom.dcmread(io.BytesIO(reply.content)).SOPInstanceUID == seg_row.sop_instance_uid
    listed = api.client.get(f"/api/jobs/{job_id}/outputs", headers=api.headers("clinician"))
    assert {item["kind"] for item in listed.json()} >= {"RTSTRUCT", "SEG"}
    api.client.close()
    api.engine.dispose()


def test_route_without_outputs_writes_the_rtstruct_alone(tmp_path: Path) -> None:
    api = _harness(tmp_path, None, None)
    job_id = _submit(api, tmp_path)
    assert execute_job(job_id, threshold_runtime(api)).state == "done"
    assert [output.kind for output in api.store.outputs(job_id)] == ["RTSTRUCT"]
    api.client.close()
    api.engine.dispose()


def test_series_with_a_missing_slice_is_refused_before_any_seg_is_written(
    tmp_path: Path,
) -> None:
    api = _harness(tmp_path, None, ["RTSTRUCT", "SEG"])
    job_id = _submit(api, tmp_path)
    folder = Path(api.store.get(job_id).spool_dir)
    series = load_series(sorted(folder.glob("*.dcm")))
    (folder / f"{series.volume.sop_instance_uids[10]}.dcm").unlink()  # uneven spacing
    assert execute_job(job_id, threshold_runtime(api)).state == "failed"
    job = api.store.get(job_id)
    assert job.state == JobState.FAILED and "spacing" in (job.failure_reason or "").lower()
    assert api.store.outputs(job_id) == []
    api.client.close()
    api.engine.dispose()


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"name": "r", "outputs": ["SEG"]}, "the RTSTRUCT is always written"),
        ({"name": "r", "outputs": ["RTSTRUCT", "NIFTI"]}, "NIFTI is not an output kind"),
        ({"name": "r", "action": "ignore", "outputs": ["RTSTRUCT"]}, "takes no model"),
    ],
    ids=["seg-alone", "unknown-kind", "ignore-route"],
)
def test_routes_file_with_bad_outputs_is_refused_naming_the_route(
    route: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        parse_routing({"routes": [route]})
    assert "route 'r', field" in str(caught.value)


def test_outputs_are_case_insensitive_and_deduplicated() -> None:
    table = parse_routing({"routes": [{"name": "r", "outputs": ["rtstruct", "seg", "SEG"]}]})
    assert table.routes[0].outputs == ["RTSTRUCT", "SEG"]
