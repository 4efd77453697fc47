"""Dose jobs in-process: a structure set whose CT rtcontour does not hold, or without a PTV,
ends with the reason; OARs the clinicians did not send come from rtcontour's own contours."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from rtcontour.common.db import make_engine
from rtcontour.common.jobstore import JobState, JobStore, utcnow
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings
from rtcontour.common.volume import CtSeries, load_series
from rtcontour.worker.dose_pipeline import DosePredictorCache
from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, save_rtstruct
from rtcontour.worker.sender import Sender
from rtcontour.worker.tasks import WorkerRuntime, execute_job
from tests.conftest import write_phantom_series

SHAPE = (16, 48, 48)




def _box(series: CtSeries, z: slice, y: slice, x: slice) -> np.ndarray:
    mask = np.zeros(series.volume.array.shape, dtype=bool)
    mask[z, y, x] = True
    return mask


def _structure_set(series: CtSeries, names: list[str], path: Path) -> Path:
    boxes = {
        "PTV70": (slice(5, 11), slice(18, 30), slice(18, 30)),
        "Brain Stem": (slice(10, 14), slice(26, 32), slice(20, 26)),
        "Mandible": (slice(6, 9), slice(8, 14), slice(12, 36)),
        "Parotid Lt": (slice(4, 10), slice(14, 22), slice(32, 40)),
        "Esophagus": (slice(9, 15), slice(30, 34), slice(22, 26)),
        "Larynx": (slice(3, 6), slice(10, 16), slice(20, 28)),
    }
    masks = {name: _box(series, *boxes[name]) for name in names}
    rois = [RoiSpec(name, (255, 0, 0), "PTV" if name.startswith("PTV") else "ORGAN")
            for name in names]
    dataset = build_rtstruct(series, masks, rois, model_name="clinic", model_version="1")
    return save_rtstruct(dataset, path)


@pytest.fixture
def runtime(settings: Settings, tiny_dose_package: Path) -> WorkerRuntime:
    settings = settings.model_copy(update={"model_packages_dir": tiny_dose_package.parent,
                                           "min_slices": 5})
    engine = make_engine(settings)
    create_schema(engine)
    return WorkerRuntime(settings, store=JobStore(engine), sender=Sender(settings),
                         dose_predictors=DosePredictorCache())


def _contour_job(
    runtime: WorkerRuntime, tmp_path: Path, with_mandible: bool, with_rtstruct: bool = True,
    ours: list[str] | None = None,
) -> CtSeries:
    """A done contour job holding a phantom CT, with rtcontour's RTSTRUCT (``ours``; else a
    Mandible, if ``with_mandible``) as its output unless not ``with_rtstruct``."""
    store, settings = runtime.store, runtime.settings
    files = write_phantom_series(tmp_path / "ct", SHAPE)
    series = load_series(files)
    job = store.create_or_merge_for_series(series_instance_uid=series.series_instance_uid).job
    folder = settings.spool_dir / "jobs" / job.id
    folder.mkdir(parents=True)
    for path in files:
        shutil.copy(path, folder / path.name)
    store.set_spool_dir(job.id, str(folder), len(files))
    if with_rtstruct:
        names = ours or (["Mandible"] if with_mandible else ["Brain Stem"])
        rs = _structure_set(series, names, settings.archive_dir / job.id / "RS.dcm")
        store.record_output(job.id, kind="RTSTRUCT", path=str(rs),
                            sop_instance_uid=str(pydicom.dcmread(rs).SOPInstanceUID))
    store._update(job.id, state=JobState.DONE.value, active_series_uid=None,
                  finished_at=utcnow())
    return series


def _dose_job(runtime: WorkerRuntime, rs: Path, route_name: str | None = None) -> str:
    store = runtime.store
    ds = pydicom.dcmread(rs)
    job = store.create_or_merge_for_series(series_instance_uid=str(ds.SeriesInstanceUID),
                                           modality="RTSTRUCT", kind="dose",
                                           route_name=route_name).job
    folder = runtime.settings.spool_dir / "jobs" / job.id
    folder.mkdir(parents=True)
    shutil.copy(rs, folder / f"{ds.SOPInstanceUID}.dcm")
    store.set_spool_dir(job.id, str(folder), 1)
    store.mark_queued(job.id)
    return job.id


def test_missing_oars_come_from_rtcontours_own_contours_and_the_job_says_so(
    runtime: WorkerRuntime, tmp_path: Path
) -> None:
    series = _contour_job(runtime, tmp_path, with_mandible=True)
    rs = _structure_set(series, ["PTV70", "Brain Stem"], tmp_path / "approved.dcm")
    job_id = _dose_job(runtime, rs)
    assert execute_job(job_id, runtime).state == "done", runtime.store.get(job_id).failure_reason
    metrics = {m["roi_name"]: m for m in runtime.store.output(job_id, "RTDOSE").summary}
    assert metrics["Brain Stem"]["from_rtcontour"] is False
    assert metrics["Bone_Mandible"]["from_rtcontour"] is True  # rtcontour's own contour
    assert metrics["PTV70"]["type"] == "PTV" and metrics["PTV70"]["dvh"][0] == 100.0
    rd = pydicom.dcmread(runtime.store.output(job_id, "RTDOSE").path)
    # The RTDOSE's DVHs reference ROIs of the approved structure set only.
    approved_numbers = {int(r.ROINumber) for r in pydicom.dcmread(rs).StructureSetROISequence}
    assert {int(d.DVHReferencedROISequence[0].ReferencedROINumber)
            for d in rd.DVHSequence} <= approved_numbers


def test_a_dose_job_reads_rtcontours_own_rtstruct_once_for_qa_and_the_borrowed_oars(
    runtime: WorkerRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rtcontour.worker.dose_pipeline as dose_pipeline

    series = _contour_job(runtime, tmp_path, with_mandible=True)
    rs = _structure_set(series, ["PTV70", "Brain Stem"], tmp_path / "approved.dcm")
    job_id = _dose_job(runtime, rs)
    reads: list[str] = []
    real_read = dose_pipeline.read_structure_set

    def counting_read(path, series):  # type: ignore[no-untyped-def]
        reads.append(Path(path).name)
        return real_read(path, series)

    monkeypatch.setattr(dose_pipeline, "read_structure_set", counting_read)
    assert execute_job(job_id, runtime).state == "done"
    assert reads.count("RS.dcm") == 1  # ours: once, though QA and the dose both use it
    job = runtime.store.get(job_id)
    assert job.source_job_id is not None and runtime.store.get(job.source_job_id).qa
    metrics = {m["roi_name"]: m for m in runtime.store.output(job_id, "RTDOSE").summary}
    assert metrics["Bone_Mandible"]["from_rtcontour"] is True


@pytest.mark.parametrize(
    ("case", "reason"),
    [("never-received", "rtcontour does not hold the CT series"),
     ("purged", "was deleted by the retention policy: send the CT again"),
     ("no-ptv", "the structure set has no PTV with a prescription")],
    ids=["never-received", "purged", "no-ptv"],
)
def test_structure_set_that_cannot_be_predicted_fails_with_the_reason(
    runtime: WorkerRuntime, tmp_path: Path, case: str, reason: str
) -> None:
    if case == "never-received":
        series = load_series(write_phantom_series(tmp_path / "other", SHAPE))
    else:
        series = _contour_job(runtime, tmp_path, with_mandible=False, with_rtstruct=False)
    if case == "purged":
        (holder,) = runtime.store.list()
        runtime.store._update(holder.id, purged_at=utcnow())
    names = ["Brain Stem"] if case == "no-ptv" else ["PTV70", "Brain Stem"]
    job_id = _dose_job(runtime, _structure_set(series, names, tmp_path / "approved.dcm"))
    assert execute_job(job_id, runtime).state == "failed"
    job = runtime.store.get(job_id)
    assert reason in job.failure_reason and job.failure_reason.startswith("Not predicted")
    assert runtime.store.outputs(job_id) == []


def test_structure_set_without_ptv_still_measures_the_edits_and_notes_the_missing_dose(
    runtime: WorkerRuntime, tmp_path: Path
) -> None:
    series = _contour_job(runtime, tmp_path, with_mandible=False)
    (contour_job,) = runtime.store.list()
    job_id = _dose_job(runtime, _structure_set(series, ["Brain Stem"], tmp_path / "a.dcm"))
    assert execute_job(job_id, runtime).state == "done"
    job = runtime.store.get(job_id)
    assert runtime.store.outputs(job_id) == []
    assert job.notes and job.notes[0].startswith("No dose predicted: the structure set has no PTV")
    qa = runtime.store.get(contour_job.id).qa
    assert qa["structure_set_job_id"] == job_id
    (brainstem,) = qa["structures"]  # the same box both sides
    assert brainstem["roi_name"] == "Brain Stem" and brainstem["dice"] == 1.0
    assert brainstem["status"] == "unchanged" and brainstem["added_path_length_mm"] == 0.0


OURS = ["Brain Stem", "Esophagus", "Larynx", "Mandible", "Parotid Lt"]


@pytest.mark.parametrize(
    ("qa_absent", "status"),
    [(None, "not_in_approved_set"), ("deleted", "deleted")],
    ids=["default-not-in-the-approved-set", "route-says-absent-means-deleted"],
)
def test_an_approved_set_lacking_three_organs_raises_no_alert_and_says_they_are_not_in_it(
    runtime: WorkerRuntime, tmp_path: Path, qa_absent: str | None, status: str
) -> None:
    from rtcontour.service.qa_trends import AlertPolicy, qa_trends

    route = None
    if qa_absent is not None:
        routes = tmp_path / "routes.yaml"
        routes.write_text("routes:\n  - name: dose\n    match: {modality: RTSTRUCT}\n"
                          f"    qa_absent: {qa_absent}\ndefault: ignore\n")
        runtime.settings = runtime.settings.model_copy(update={"routes_file": routes})
        route = "dose"
    series = _contour_job(runtime, tmp_path, with_mandible=True, ours=OURS)
    (contour_job,) = runtime.store.list()
    # The clinic draws only what the plan needs: no Brainstem, Esophagus or Larynx.
    rs = _structure_set(series, ["PTV70", "Mandible", "Parotid Lt"], tmp_path / "approved.dcm")
    job_id = _dose_job(runtime, rs, route_name=route)
    assert execute_job(job_id, runtime).state == "done", runtime.store.get(job_id).failure_reason

    qa = runtime.store.get(contour_job.id).qa
    by_name = {item["roi_name"]: item for item in qa["structures"]}
    for name in ("Brain Stem", "Esophagus", "Larynx"):
        assert by_name[name]["status"] == status and by_name[name]["reference_name"] is None
        # The dose prediction used rtcontour's own contour of it: said so, not approved.
        assert by_name[name]["borrowed_into_dose"] is True
    assert by_name["Mandible"]["status"] == "unchanged"
    assert by_name["Mandible"]["borrowed_into_dose"] is False
    assert sorted(qa["borrowed_into_dose"]) == ["Brainstem", "Esophagus", "Larynx"]
    if status == "not_in_approved_set":
        assert by_name["Larynx"]["dice"] is None
    else:
        assert by_name["Larynx"]["dice"] == 0.0

    trends = qa_trends(runtime.store, policy=AlertPolicy(min_sets=1, floor=0.8))
    alerted = {alert.structure for alert in trends.alerts}
    if status == "not_in_approved_set":
        assert alerted == set()  # even an alert after one set with a floor: nothing to say
    else:
        assert alerted == {"Brain Stem", "Esophagus", "Larynx"}


@pytest.mark.parametrize("normalise", [False, True], ids=["as-predicted", "normalised"])
def test_a_normalised_dose_meets_the_prescription_at_d95_and_says_so(
    runtime: WorkerRuntime, tmp_path: Path, normalise: bool
) -> None:
    # the committed dose model (the tiny test package predicts no dose to scale)
    committed = Path(__file__).resolve().parents[2] / "models" / "packages"
    runtime.settings = runtime.settings.model_copy(
        update={"dose_normalise": normalise, "model_packages_dir": committed})
    series = _contour_job(runtime, tmp_path, with_mandible=True)
    rs = _structure_set(series, ["PTV70", "Brain Stem"], tmp_path / "approved.dcm")
    job_id = _dose_job(runtime, rs)
    assert execute_job(job_id, runtime).state == "done", runtime.store.get(job_id).failure_reason
    output = runtime.store.output(job_id, "RTDOSE")
    ptv = next(m for m in output.summary if m["roi_name"] == "PTV70")
    rd = pydicom.dcmread(output.path)
    notes = " ".join(runtime.store.get(job_id).notes or [])
    if normalise:
        assert ptv["d_95_gy"] == pytest.approx(70.0, abs=0.5)
        assert ptv["normalisation_factor"] > 0 and "PTV70 D95" in ptv["normalisation"]
        assert "NORMALISED" in rd.DoseComment and len(rd.DoseComment) <= 64
        assert "scaled by" in rd.ImageComments and "scaled by" in notes
    else:
        assert "normalisation" not in ptv and "NORMALISED" not in rd.DoseComment
        assert "scaled by" not in notes
