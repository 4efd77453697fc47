"""The viewer's data: the CT as int16 bytes on the canonical grid with its affine, and the
contours as polygons per axial slice (rtcontour's and the approved set's), cached."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rtcontour.service import previews
from rtcontour.service.previews import VISIBLE_PALETTE, display_colour
from tests.phantoms import head_phantom
from tests.service.api_support import (
    MARKER_COLOUR,
    ApiHarness,
    add_finished_job,
    harness_fixture,
)

PHANTOM = head_phantom()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    yield from harness_fixture(tmp_path)


def _get(api: ApiHarness, job_id: str, what: str, **headers: str):  # noqa: ANN202
    response = api.client.get(
        f"/api/jobs/{job_id}/viewer/{what}", headers={**api.headers("clinician"), **headers}
    )
    assert response.status_code == 200, response.text
    return response


@pytest.mark.parametrize("patient_position", ["HFS", "FFS", "HFP"], ids=str)
def test_viewer_ct_is_the_canonical_volume_as_int16_with_its_affine(
    api: ApiHarness, patient_position: str
) -> None:
    from rtcontour.common.volume import load_series

    job = add_finished_job(api, patient_position=patient_position)
    meta = _get(api, job.id, "meta").json()
    assert meta["shape"] == list(PHANTOM.hu.shape) and meta["dtype"] == "int16"
    assert meta["spacing_mm"] == pytest.approx(list(PHANTOM.spacing_mm))
    canonical = load_series(sorted(Path(job.spool_dir).glob("*.dcm")), min_slices=1)
    assert np.allclose(meta["affine"], canonical.volume.to_canonical().affine, atol=1e-4)
    assert {w["name"]: (w["width"], w["level"]) for w in meta["windows"]} == {
        "soft tissue": (400, 40), "bone": (1800, 400), "lung": (1500, -600)}
    response = _get(api, job.id, "ct")
    assert response.headers["content-encoding"] == "gzip"  # httpx decoded it
    hu = np.frombuffer(response.content, "<i2").reshape(meta["shape"])
    assert np.array_equal(hu, np.rint(PHANTOM.hu).astype(np.int16))
    plain = _get(api, job.id, "ct", **{"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.content == response.content


def test_viewer_contours_are_polygons_on_the_marker_in_voxel_coordinates(api: ApiHarness) -> None:
    job = add_finished_job(api, patient_position="FFS")
    structures = _get(api, job.id, "contours").json()["structures"]
    marker = next(s for s in structures if s["roi_name"] == "Marker")
    assert marker["source"] == "rtcontour" and marker["colour"] == list(MARKER_COLOUR)
    assert marker["display_colour"] == list(MARKER_COLOUR)  # red stays red
    slices = np.flatnonzero(PHANTOM.marker.any(axis=(1, 2)))
    assert sorted(int(k) for k in marker["slices"]) == slices.tolist()
    points = np.array([p for polys in marker["slices"].values() for poly in polys
                       for p in zip(poly[0::2], poly[1::2], strict=True)])
    rows = np.flatnonzero(PHANTOM.marker.any(axis=(0, 2)))
    cols = np.flatnonzero(PHANTOM.marker.any(axis=(0, 1)))
    # Outlines run around the voxel centres, within half a voxel of the marker's edge.
    assert rows.min() - 0.6 <= points[:, 0].min() <= rows.min()
    assert rows.max() <= points[:, 0].max() <= rows.max() + 0.6
    assert cols.min() - 0.6 <= points[:, 1].min() <= cols.min()
    assert cols.max() <= points[:, 1].max() <= cols.max() + 0.6


def test_flagged_structures_and_the_approved_set_are_in_the_viewer(api: ApiHarness) -> None:
    from rtcontour.common.volume import load_series
    from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, save_rtstruct

    job = add_finished_job(api)
    output = api.store.output(job.id, "RTSTRUCT")
    assert output is not None and output.summary
    summary = [dict(item) for item in output.summary]
    summary[0].update(flag="review", confidence=0.41)  # Marker
    api.store.record_output(job.id, kind="RTSTRUCT", path=output.path,
                            sop_instance_uid=output.sop_instance_uid, summary=summary)
    # The clinicians' set: the marker moved 2 columns, named their way, in white.
    series = load_series(sorted(Path(job.spool_dir).glob("*.dcm")), min_slices=1)
    shifted = np.roll(PHANTOM.marker, 2, axis=2)
    dataset = build_rtstruct(series, {"Marker Dr": series.volume.array_from_canonical(shifted)},
                             [RoiSpec("Marker Dr", (255, 255, 255), "ORGAN")],
                             model_name="clinic", model_version="1")
    dose_job = api.add_job(kind="dose", source_job_id=job.id, state="done")
    folder = api.settings.spool_dir / "jobs" / dose_job.id
    save_rtstruct(dataset, folder / "RS_approved.dcm")
    api.store.set_spool_dir(dose_job.id, str(folder), 1)
    api.store.record_qa(job.id, {
        "reference_sop_instance_uid": str(dataset.SOPInstanceUID),
        "structure_set_job_id": dose_job.id,
        "structures": [{"roi_name": "Marker", "reference_name": "Marker Dr", "dice": 0.6,
                        "status": "edited"}]})
    meta = _get(api, job.id, "meta").json()
    assert meta["has_approved"] is True
    by_name = {(s["source"], s["roi_name"]): s for s in meta["structures"]}
    assert by_name[("rtcontour", "Marker")]["flag"] == "review"
    assert by_name[("rtcontour", "Marker")]["confidence"] == 0.41
    approved = by_name[("approved", "Marker Dr")]
    assert approved["matches"] == "Marker" and approved["display_colour"] == list(MARKER_COLOUR)
    structures = _get(api, job.id, "contours").json()["structures"]
    drawn = next(s for s in structures if s["source"] == "approved")
    columns = [c for polys in drawn["slices"].values() for poly in polys for c in poly[1::2]]
    assert min(columns) > np.flatnonzero(PHANTOM.marker.any(axis=(0, 1))).min() + 1
    # The dose job's page shows the same CT.
    assert _get(api, dose_job.id, "meta").json()["shape"] == list(PHANTOM.hu.shape)


def test_viewer_data_is_loaded_once_and_cached(
    api: ApiHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = add_finished_job(api)
    loads: list[Path] = []
    original = previews.load_canonical_ct

    def counting(folder: Path):  # noqa: ANN202
        loads.append(folder)
        return original(folder)

    monkeypatch.setattr(previews, "load_canonical_ct", counting)
    for what in ("meta", "ct", "contours", "ct", "meta"):
        _get(api, job.id, what)
    api.client.get(f"/api/jobs/{job.id}/preview.png?plane=axial&index=3",
                   headers=api.headers("clinician"))
    assert len(loads) == 1


def test_viewer_of_a_purged_or_imageless_job_says_why(api: ApiHarness) -> None:
    import datetime as dt

    from sqlalchemy.orm import Session

    from rtcontour.common.jobstore import Job

    purged = add_finished_job(api)
    with Session(api.engine) as session, session.begin():
        row = session.get(Job, purged.id)
        assert row is not None
        row.purged_at = dt.datetime.now(dt.UTC)
    response = api.client.get(f"/api/jobs/{purged.id}/viewer/ct", headers=api.headers("admin"))
    assert response.status_code == 410 and "retention" in response.json()["detail"]
    empty = api.add_job(state="failed")
    response = api.client.get(f"/api/jobs/{empty.id}/viewer/meta", headers=api.headers("admin"))
    assert response.status_code == 404 and "spool folder" in response.json()["detail"]
    viewer = api.client.get(f"/api/jobs/{purged.id}/viewer/ct", headers=api.headers("viewer"))
    assert viewer.status_code == 403


@pytest.mark.parametrize(
    ("name", "colour", "visible"),
    [("Bone_Mandible", (230, 230, 230), None), ("Grey", (128, 128, 128), None),
     ("Dark", (0, 0, 100), (0, 0, 200)), ("Parotid_L", (255, 0, 0), (255, 0, 0))],
    ids=["near-white", "grey", "dark-brightened", "saturated-unchanged"],
)
def test_display_colours_stay_visible_on_a_greyscale_ct(
    name: str, colour: tuple[int, int, int], visible: tuple[int, int, int] | None
) -> None:
    shown = display_colour(name, colour)
    if visible is None:
        assert shown in VISIBLE_PALETTE and shown == display_colour(name, colour)
    else:
        assert shown == visible


def test_gzip_bytes_are_the_raw_volume() -> None:
    from rtcontour.common.volume import Volume

    volume = Volume(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4), "1.2.3")
    ct = previews.make_viewer_ct(volume)
    assert gzip.decompress(ct.gzip_bytes) == ct.raw_bytes == volume.array.astype("<i2").tobytes()
