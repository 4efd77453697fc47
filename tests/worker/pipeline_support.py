"""Shared helpers of the in-process pipeline tests: a phantom series handed to the intake as the
listener would after its quiet period, and a worker runtime with the threshold model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom

from rtcontour.service.intake import Intake, SeriesArrival
from rtcontour.worker.pipeline import SegmenterCache
from rtcontour.worker.sender import Sender
from rtcontour.worker.tasks import WorkerRuntime
from tests.conftest import ThresholdModel
from tests.service.api_support import ApiHarness


def submit_series(api: ApiHarness, files: list[Path], quiet_s: float | None = None) -> str:
    """Move ``files`` (one CT series) into the spool and hand them to the intake with the
    harness's routing (``api.routing``), calling AE "TPS"; returns the job id it queued."""
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    arrival = api.settings.spool_dir / "incoming" / str(ds.SeriesInstanceUID)
    arrival.mkdir(parents=True)
    for path in files:
        shutil.move(path, arrival / f"{pydicom.dcmread(path).SOPInstanceUID}.dcm")
    enqueued: list[str] = []
    Intake(api.settings, api.store, enqueued.append,
           routing=api.routing).series_complete(  # type: ignore[attr-defined]
        SeriesArrival(str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), "TPS", "CT", "Head",
                      arrival, len(files), quiet_s=quiet_s))
    return enqueued[0]


def threshold_runtime(api: ApiHarness, model: ThresholdModel | None = None) -> WorkerRuntime:
    """A worker runtime on the harness's store with ``model`` (a new ThresholdModel) and a
    sender that does not wait between attempts."""
    model = model or ThresholdModel()
    return WorkerRuntime(api.settings, store=api.store,
                         model_cache=SegmenterCache(loader=lambda *_: model,
                                                    resolver=lambda *_: Path("t")),
                         sender=Sender(api.settings, sleep=lambda _: None))
