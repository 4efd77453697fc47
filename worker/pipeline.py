"""The contouring pipeline: ordered ``Step``s over a ``JobContext``.

Default steps (``default_steps``)::

    LoadSeries  -> the job folder's CT files as a CtSeries (common.volume), refusals raise
                   InvalidSeries                                                stage "load"
    Segment     -> the model (stage "model_load"), to canonical and the model's grid
                   ("preprocess"), the network ("inference"), masks back to the CT grid
                   with their confidence ("postprocess")
    BuildOutputs-> each OutputWriter builds its DICOM object (RTSTRUCT; a SEG when the
                   job's route lists it in ``outputs``)                       stage "contours"
    Archive     -> each output written atomically to archive_dir/<job_id>/     stage "archive"
    Send        -> each output C-STOREd to every destination (worker.sender)  stage "send"

A new capability appends a step or an ``OutputWriter`` (DICOM SEG, dose prediction, QA)
without touching the others. Steps raise domain errors (``InvalidSeries``,
``DestinationUnavailable``, ``ModelPackageError``); the Celery task maps them to job states.

The segmenter is loaded once per worker process: ``SegmenterCache`` keeps it by package path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from rtcontour.common.errors import InvalidSeries
from rtcontour.common.jobstore import OUTPUT_FILE_PREFIXES, JobStore
from rtcontour.common.settings import Destination, Settings
from rtcontour.common.volume import CtSeries, load_series
from rtcontour.models.inference import Segmenter
from rtcontour.models.package import (
    load_package,
)
from rtcontour.models.registry import resolve_package_path
from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct
from rtcontour.worker.seg import build_seg
from rtcontour.worker.sender import Sender, deliver

logger = logging.getLogger(__name__)

__all__ = [
    "Archive",
    "BuildOutputs",
    "JobContext",
    "LoadSeries",
    "OutputWriter",
    "RtstructWriter",
    "SegWriter",
    "Segment",
    "SegmentationModel",
    "SegmenterCache",
    "Send",
    "SendArchived",
    "Step",
    "WrittenOutput",
    "default_steps",
    "masks_on_ct_grid",
    "record_stage",
    "run_steps",
    "structure_summary",
]


class SegmentationModel(Protocol):
    """What the pipeline needs of a model: a name, a version, its ROIs, and ``predict``.

    ``predict(hu, spacing_mm)``: ``hu`` float32 (slices, rows, columns) in canonical
    orientation, ``spacing_mm`` (slice, row, column); returns roi_name -> bool mask, same shape.
    """

    name: str
    version: str
    rois: Sequence[RoiSpec]

    def predict(
        self, hu: np.ndarray, spacing_mm: tuple[float, float, float]
    ) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class StructureFlag:
    """A structure's confidence in [0, 1] and flag ("review" below the model's threshold, else
    "ok"), from ``models.inference.Segmenter.segment``."""

    confidence: float
    flag: str


@dataclass
class WrittenOutput:
    """One DICOM object a job produced: built, then archived (``path``), then sent."""

    kind: str  # "RTSTRUCT", "RTDOSE", ...
    dataset: Dataset | None  # None: already archived (sent again from its file)
    sop_instance_uid: str
    path: Path | None = None
    summary: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class JobContext:
    """Everything one run of a job's pipeline reads and produces."""

    job_id: str
    settings: Settings
    store: JobStore
    spool_dir: Path
    generation: int = 0
    series: CtSeries | None = None
    model: SegmentationModel | None = None
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # on series.volume's grid
    quality: dict[str, StructureFlag] = field(default_factory=dict)  # per predicted structure
    outputs: list[WrittenOutput] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # From the job's route: the model asked for (None: newest package) and the destinations
    # (None: RTCONTOUR_DESTINATIONS).
    model_request: str | None = None
    route_destinations: list[str] | None = None
    # The output kinds the route asked for ("RTSTRUCT", "SEG"; None: the RTSTRUCT alone).
    requested_outputs: list[str] | None = None
    # A dose job: its route's prescriptions, the contour job holding its CT, the dose steps'
    # working state (worker.dose_pipeline.DoseContext).
    prescriptions_gy: dict[str, float] | None = None
    source_job_id: str | None = None
    dose: Any = None

    @property
    def archive_dir(self) -> Path:
        return self.settings.archive_dir / self.job_id

    @property
    def destinations(self) -> list[Destination]:
        """Where this job's outputs go: its route's destinations or the settings' list."""
        if self.route_destinations is None:
            return list(self.settings.destinations)
        return [Destination.parse(text) for text in self.route_destinations]


class Step(Protocol):
    """One stage of the pipeline; ``stage`` names its timing (or None: not timed)."""

    name: str
    stage: str | None

    def run(self, ctx: JobContext) -> None: ...


class OutputWriter(Protocol):
    """Builds one kind of DICOM output from the context (None: nothing to write this time,
    e.g. no dose for a structure set without a PTV; the writer notes why)."""

    kind: str

    def build(self, ctx: JobContext) -> WrittenOutput | None: ...


def run_steps(
    ctx: JobContext, steps: Sequence[Step], before_step: Callable[[Step], None] | None = None
) -> None:
    """Run ``steps`` in order, recording each stage's seconds in ``ctx.timings`` and the store.

    ``before_step(step)`` is called first for each step (the task uses it to check that it
    still holds the job and that no instances were merged meanwhile).
    """
    for step in steps:
        if before_step is not None:
            before_step(step)
        started = time.perf_counter()
        step.run(ctx)
        seconds = time.perf_counter() - started
        if step.stage is not None:
            record_stage(ctx, step.stage, seconds)
        logger.info("job %s: %s took %.2f s", ctx.job_id, step.name, seconds)


def record_stage(ctx: JobContext, stage: str, seconds: float) -> None:
    """Add ``seconds`` to the run's ``stage`` (``common.jobstore.STAGES``) and store the sum (a
    step without a ``stage`` of its own records its parts with this)."""
    ctx.timings[stage] = ctx.timings.get(stage, 0.0) + seconds
    ctx.store.record_stage(ctx.job_id, stage, ctx.timings[stage])


class LoadSeries:
    name = "load series"
    stage: str | None = "load"

    def run(self, ctx: JobContext) -> None:
        files = sorted(ctx.spool_dir.glob("*.dcm"))
        if not files:
            raise InvalidSeries("The job folder holds no DICOM instance.")
        ctx.series = load_series(
            files,
            min_slices=ctx.settings.min_slices,
            gap_tolerance=ctx.settings.slice_gap_tolerance,
        )


class Segment:
    """The job's model (stage "model_load": 0 when resident) on its CT: stages "preprocess"
    (to canonical, to the model's grid), "inference" (the network), "postprocess" (back to
    the model's then the CT's grid, clean-up, confidence)."""

    name = "segment"
    stage: str | None = None  # records its parts

    def __init__(self, model_provider: Callable[[str | None], SegmentationModel]) -> None:
        self.model_provider = model_provider  # model request ("name", "name-version", None)

    def run(self, ctx: JobContext) -> None:
        if ctx.series is None:
            raise RuntimeError("Segment needs LoadSeries first")
        started = time.perf_counter()
        model = self.model_provider(ctx.model_request)
        record_stage(ctx, "model_load", time.perf_counter() - started)
        ctx.model = model
        ctx.store.record_model(ctx.job_id, model.name, model.version)
        timings: dict[str, float] = {}
        ctx.masks, ctx.quality = segment_on_ct_grid(ctx.series, model, timings)
        for stage in ("preprocess", "inference", "postprocess"):
            record_stage(ctx, stage, timings.get(stage, 0.0))


def masks_on_ct_grid(series: CtSeries, model: SegmentationModel) -> dict[str, np.ndarray]:
    """roi_name -> bool mask on ``series.volume``'s grid (slices, rows, columns as stored):
    the CT goes to canonical orientation, through the model, and the masks come back."""
    return segment_on_ct_grid(series, model)[0]


def segment_on_ct_grid(
    series: CtSeries, model: SegmentationModel, timings: dict[str, float] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, StructureFlag]]:
    """``masks_on_ct_grid`` plus each predicted structure's confidence and flag, when the
    model gives them (a model package's ``Segmenter.segment``; else none).

    ``timings``, when given, receives seconds per part: "preprocess", "inference" and
    "postprocess" (a model without ``segment`` timings: all of ``predict`` is "inference").
    """
    started = time.perf_counter()
    volume = series.volume
    canonical = volume.to_canonical()
    hu = canonical.array.astype(np.float32)
    parts = {"preprocess": time.perf_counter() - started}
    quality: dict[str, StructureFlag] = {}
    segment = getattr(model, "segment", None)
    called = time.perf_counter()
    if callable(segment):
        result = segment(hu, canonical.spacing_mm)
        masks = result.masks
        quality = {name: StructureFlag(round(float(q.confidence), 3), str(q.flag))
                   for name, q in result.quality.items()}
        for name, why in result.dropped.items():
            logger.info("structure %s not kept: %s", name, why)
        inner = dict(getattr(result, "timings", None) or {})
    else:
        masks = model.predict(hu, canonical.spacing_mm)
        inner = {}
    if not inner:
        inner = {"inference": time.perf_counter() - called}
    del hu
    returned = time.perf_counter()
    on_ct_grid = {
        roi.name: volume.array_from_canonical(
            np.asarray(masks.get(roi.name, np.zeros(canonical.shape, bool)), dtype=bool)
        )
        for roi in model.rois
    }
    if timings is not None:
        for part in ("preprocess", "inference", "postprocess"):
            timings[part] = parts.get(part, 0.0) + inner.get(part, 0.0)
        timings["postprocess"] += time.perf_counter() - returned
    return on_ct_grid, quality


def structure_summary(
    series: CtSeries,
    masks: dict[str, np.ndarray],
    rois: Sequence[RoiSpec],
    quality: dict[str, StructureFlag] | None = None,
) -> list[dict[str, Any]]:
    """[{roi_name, volume_cc, colour, found, confidence, flag}] for each ROI: volume from the
    voxel count x voxel size (the mask's voxels, i.e. inside the pixel-edge contours); found
    False for a structure not in the scan (empty); confidence and flag when the model gave
    them (flag "review": check it first)."""
    voxel_cc = float(np.prod(series.volume.spacing_mm)) / 1000.0
    summary = []
    for roi in rois:
        voxels = int(np.count_nonzero(masks[roi.name]))
        item: dict[str, Any] = {
            "roi_name": roi.name,
            "volume_cc": round(float(voxels) * voxel_cc, 3),
            "colour": list(roi.colour_rgb),
            "found": voxels > 0,
        }
        if quality and roi.name in quality:
            item["confidence"] = quality[roi.name].confidence
            item["flag"] = quality[roi.name].flag
        summary.append(item)
    return summary


def review_notes(quality: dict[str, StructureFlag]) -> dict[str, str]:
    """ROI Observation Descriptions for the structures flagged for review (seen in the TPS)."""
    return {name: f"check: low confidence ({q.confidence:.2f})"
            for name, q in quality.items() if q.flag == "review"}


class RtstructWriter:
    """The RTSTRUCT output: every ROI of the model, contours from the masks."""

    kind = "RTSTRUCT"

    def build(self, ctx: JobContext) -> WrittenOutput:
        if ctx.series is None or ctx.model is None:
            raise RuntimeError("RtstructWriter needs LoadSeries and Segment first")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # empty ROIs are legal, logged below
            dataset = build_rtstruct(
                ctx.series,
                ctx.masks,
                list(ctx.model.rois),
                model_name=ctx.model.name,
                model_version=ctx.model.version,
                min_area_mm2=ctx.settings.min_contour_area_mm2,
                smoothing=ctx.settings.smoothing,
                observation_notes=review_notes(ctx.quality),
            )
        summary = structure_summary(ctx.series, ctx.masks, ctx.model.rois, ctx.quality)
        empty = [str(s["roi_name"]) for s in summary if not s["found"]]
        if empty:
            logger.info("job %s: not found in the scan (left out of the RTSTRUCT): %s",
                        ctx.job_id, ", ".join(empty))
            ctx.store.add_note(ctx.job_id, "Not found in the scan: " + ", ".join(empty) + ".")
        flagged = [name for name, q in ctx.quality.items() if q.flag == "review"]
        if flagged:
            ctx.store.add_note(ctx.job_id, "Check first (low confidence): "
                               + ", ".join(flagged) + ".")
        return WrittenOutput(
            kind=self.kind,
            dataset=dataset,
            sop_instance_uid=str(dataset.SOPInstanceUID),
            summary=summary,
        )


class SegWriter:
    """The DICOM SEG output (when the job's route lists "SEG"): the same structures as the
    RTSTRUCT, voxel for voxel on the CT grid (``worker.seg.build_seg``)."""

    kind = "SEG"

    def build(self, ctx: JobContext) -> WrittenOutput | None:
        if self.kind not in (ctx.requested_outputs or []):
            return None
        if ctx.series is None or ctx.model is None:
            raise RuntimeError("SegWriter needs LoadSeries and Segment first")
        summary = [item for item in structure_summary(ctx.series, ctx.masks, ctx.model.rois,
                                                      ctx.quality) if item["found"]]
        if not summary:
            ctx.store.add_note(ctx.job_id, "No SEG written: no structure was found in the scan.")
            return None
        headers = [pydicom.dcmread(path, stop_before_pixels=True)
                   for path in sorted(ctx.spool_dir.glob("*.dcm"))]
        dataset = build_seg(ctx.series, headers, ctx.masks, list(ctx.model.rois),
                            model_name=ctx.model.name, model_version=ctx.model.version)
        for number, item in enumerate(summary, start=1):
            item["segment_number"] = number
        return WrittenOutput(kind=self.kind, dataset=dataset,
                             sop_instance_uid=str(dataset.SOPInstanceUID), summary=summary)


class BuildOutputs:
    name = "build outputs"
    stage: str | None = "contours"

    def __init__(self, writers: Sequence[OutputWriter]) -> None:
        self.writers = list(writers)

    def run(self, ctx: JobContext) -> None:
        built = [writer.build(ctx) for writer in self.writers]
        ctx.outputs = [output for output in built if output is not None]


class Archive:
    """Writes each output to ``archive_dir/<job_id>/<PREFIX>_<uid>.dcm`` atomically and
    records it as a row of the job's outputs (any kind)."""

    name = "archive"
    stage: str | None = "archive"

    def run(self, ctx: JobContext) -> None:
        ctx.archive_dir.mkdir(parents=True, exist_ok=True)
        for output in ctx.outputs:
            prefix = OUTPUT_FILE_PREFIXES.get(output.kind, output.kind)
            final = ctx.archive_dir / f"{prefix}_{output.sop_instance_uid}.dcm"
            temp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
            if output.dataset is None:
                raise RuntimeError(f"output {output.kind} has no dataset to archive")
            output.dataset.save_as(temp, enforce_file_format=True)
            with open(temp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temp, final)
            output.path = final
            ctx.store.record_output(
                ctx.job_id,
                kind=output.kind,
                sop_instance_uid=output.sop_instance_uid,
                path=str(final),
                summary=output.summary,
            )
            logger.info("job %s: archived %s %s", ctx.job_id, output.kind, final)


class SendArchived:
    """The job's archived outputs as the context's outputs (an approved job, or a retried
    send_failed one: sent as they were archived, never rebuilt)."""

    name = "load archived outputs"
    stage: str | None = None

    def run(self, ctx: JobContext) -> None:
        ctx.outputs = []
        for output in ctx.store.outputs(ctx.job_id):
            path = Path(output.path)
            if not path.is_file():
                raise InvalidSeries(f"The {output.kind} to send is no longer archived "
                                    f"({path.name}); send the series again.")
            ctx.outputs.append(WrittenOutput(output.kind, None, output.sop_instance_uid, path,
                                             list(output.summary or [])))


class Send:
    """C-STOREs every archived output to every destination of the job's route (or
    RTCONTOUR_DESTINATIONS), skipping ones already sent."""

    name = "send"
    stage: str | None = "send"

    def __init__(self, sender: Sender, on_sent: Callable[[str, str, str], None] | None = None):
        self.sender = sender
        self.on_sent = on_sent

    def run(self, ctx: JobContext) -> None:
        destinations = ctx.destinations
        if not destinations:
            logger.info("job %s: no destination configured; nothing sent", ctx.job_id)
            return
        for output in ctx.outputs:
            if output.path is None:
                raise RuntimeError("Send needs Archive first")
            uid = output.sop_instance_uid

            def sent(destination: str, uid: str = uid) -> None:
                if self.on_sent is not None:
                    self.on_sent(ctx.job_id, destination, uid)

            deliver(
                job_id=ctx.job_id,
                path=output.path,
                sop_instance_uid=uid,
                destinations=destinations,
                store=ctx.store,
                sender=self.sender,
                on_sent=sent,
            )
        if ctx.outputs:  # the end of the end-to-end figure (common.timings)
            ctx.store.record_delivered(ctx.job_id)


def default_steps(
    model_provider: Callable[[str | None], SegmentationModel],
    sender: Sender,
    writers: Sequence[OutputWriter] | None = None,
    on_sent: Callable[[str, str, str], None] | None = None,
) -> list[Step]:
    """load -> segment -> build outputs (RTSTRUCT, and a SEG where the route asks) -> archive
    -> send."""
    return [
        LoadSeries(),
        Segment(model_provider),
        BuildOutputs(writers if writers is not None else [RtstructWriter(), SegWriter()]),
        Archive(),
        Send(sender, on_sent),
    ]


# -- the model, loaded once per process ------------------------------------------------------
@dataclass
class PackagedModel:
    """A model package with its ``Segmenter``: the ``SegmentationModel`` of a real package."""

    name: str
    version: str
    rois: Sequence[RoiSpec]
    segmenter: Any

    def predict(
        self, hu: np.ndarray, spacing_mm: tuple[float, float, float]
    ) -> dict[str, np.ndarray]:
        result: dict[str, np.ndarray] = self.segmenter.predict(hu, spacing_mm)
        return result

    def segment(self, hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> Any:
        """Masks with a confidence and flag per structure (``Segmenter.segment``)."""
        return self.segmenter.segment(hu, spacing_mm)

    def warm_up(self) -> float:
        """One network call on blank windows (``Segmenter.warm_up``); seconds taken."""
        return float(self.segmenter.warm_up())


def load_packaged_model(path: Path, overlap: float, mirror_tta: bool) -> PackagedModel:
    """Load a model package and build its Segmenter (slow: do it once per process)."""
    package = load_package(path)
    manifest = package.manifest
    rois = [
        RoiSpec(
            label.roi_name,
            (int(label.colour_rgb[0]), int(label.colour_rgb[1]), int(label.colour_rgb[2])),
            getattr(label, "interpreted_type", "ORGAN") or "ORGAN",
        )
        for label in sorted(manifest.labels, key=lambda label: label.index)
    ]
    segmenter = Segmenter(package, overlap=overlap, mirror_tta=mirror_tta)
    logger.info("loaded model %s %s from %s", manifest.name, manifest.version, path)
    return PackagedModel(str(manifest.name), str(manifest.version), rois, segmenter)


class SegmenterCache:
    """Every model a worker uses, each loaded once per process and kept resident, keyed by
    package path, overlap and mirroring (several routes may name several packages)."""

    def __init__(
        self,
        loader: Callable[[Path, float, bool], SegmentationModel] = load_packaged_model,
        resolver: Callable[[Settings, str | None], Path] = resolve_package_path,
    ) -> None:
        self._loader = loader
        self._resolver = resolver
        self._models: dict[tuple[str, float, bool], SegmentationModel] = {}
        # One load at a time: a job asking while the start-up warm-up loads waits for it.
        self._lock = threading.Lock()

    def get(self, settings: Settings, request: str | None = None) -> SegmentationModel:
        with self._lock:
            return self._get_locked(settings, request)

    def warm(self, settings: Settings, request: str | None = None) -> SegmentationModel:
        """``get``, then one network call on blank windows if the model offers ``warm_up``,
        under the same lock (a job cannot run the model meanwhile: one inference request)."""
        with self._lock:
            started = time.perf_counter()
            model = self._get_locked(settings, request)
            warm_up = getattr(model, "warm_up", None)
            if callable(warm_up):
                warm_up()
            logger.info("model %s %s resident and warmed in %.2f s", model.name, model.version,
                        time.perf_counter() - started)
            return model

    def _get_locked(self, settings: Settings, request: str | None) -> SegmentationModel:
        path = self._resolver(settings, request).resolve()
        key = (str(path), settings.inference_overlap, settings.mirror_tta)
        if key not in self._models:
            self._models[key] = self._loader(path, settings.inference_overlap, settings.mirror_tta)
        return self._models[key]

    def resident(self) -> list[str]:
        """The package folders of the models loaded so far."""
        return sorted({key[0] for key in self._models})
