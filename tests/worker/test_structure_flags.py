"""Per-structure confidence reaches the planner: in the job's structures (API), as a note,
and in the RTSTRUCT's ROI Observation Description; a structure not in the scan is reported
as not found."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from rtcontour.common.db import make_engine
from rtcontour.common.jobstore import JobStore
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings
from rtcontour.worker.pipeline import SegmenterCache
from rtcontour.worker.rtstruct import RoiSpec
from rtcontour.worker.sender import Sender
from rtcontour.worker.tasks import WorkerRuntime, execute_job
from tests.conftest import ThresholdModel, write_phantom_series


@dataclass(frozen=True)
class _Quality:
    confidence: float
    flag: str


@dataclass
class _Segmentation:
    masks: dict[str, np.ndarray]
    quality: dict[str, _Quality] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


class FlaggingModel(ThresholdModel):
    """Bone confident, Marker doubtful, Absent never found (as ``Segmenter.segment``)."""

    def __init__(self) -> None:
        super().__init__()
        self.rois = [*self.rois, RoiSpec("Absent", (0, 0, 255))]

    def segment(self, hu, spacing_mm):  # type: ignore[no-untyped-def]
        masks = self.predict(hu, spacing_mm)
        masks["Absent"] = np.zeros(hu.shape, dtype=bool)
        return _Segmentation(masks, {"Bone": _Quality(0.91, "ok"),
                                     "Marker": _Quality(0.32, "review")},
                             {"Absent": "fragment of 0.05 cc below the minimum of 5 cc"})


def test_confidence_and_flags_reach_the_job_and_the_rtstruct(
    settings: Settings, tmp_path: Path
) -> None:
    engine = make_engine(settings)
    create_schema(engine)
    store = JobStore(engine)
    model = FlaggingModel()
    runtime = WorkerRuntime(settings, store=store,
                            model_cache=SegmenterCache(loader=lambda *_: model,
                                                       resolver=lambda *_: Path("t")),
                            sender=Sender(settings))
    job = store.create_or_merge_for_series(series_instance_uid="1.2.3.4").job
    folder = settings.spool_dir / "jobs" / job.id
    write_phantom_series(folder, (12, 32, 32))
    store.set_spool_dir(job.id, str(folder), 12)
    store.mark_queued(job.id)

    assert execute_job(job.id, runtime).state == "done"
    output = store.output(job.id, "RTSTRUCT")
    by_name = {s["roi_name"]: s for s in output.summary}
    assert (by_name["Bone"]["confidence"], by_name["Bone"]["flag"]) == (0.91, "ok")
    assert (by_name["Marker"]["confidence"], by_name["Marker"]["flag"]) == (0.32, "review")
    assert by_name["Absent"]["found"] is False and "confidence" not in by_name["Absent"]
    notes = store.get(job.id).notes
    assert "Not found in the scan: Absent." in notes
    assert "Check first (low confidence): Marker." in notes
    rs = pydicom.dcmread(output.path)
    numbers = {item.ROIName: item.ROINumber for item in rs.StructureSetROISequence}
    descriptions = {item.ReferencedROINumber: item.get("ROIObservationDescription")
                    for item in rs.RTROIObservationsSequence}
    assert descriptions[numbers["Marker"]] == "check: low confidence (0.32)"
    assert descriptions[numbers["Bone"]] is None
