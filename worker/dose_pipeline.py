"""The dose job: an approved structure set in, a predicted RTDOSE out (job kind ``dose``).

Steps (``dose_steps``), over the same ``JobContext`` as a contour job::

    LoadStructureSet -> the RTSTRUCT of the job folder; the CT it references, from the
                        contour job that holds it (``JobStore.ct_holder``); refusals raise
                        InvalidSeries with the reason                          stage "load"
    MeasureEdits     -> rtcontour's own RTSTRUCT of that CT against the approved one (worker.qa),
                        stored with the contour job (QA: what the clinicians changed)
    PredictDose      -> structures rasterised on the CT, OARs the clinicians did not send
                        taken from rtcontour's own RTSTRUCT of that CT (the job says so),
                        prescriptions from PTV names (route overrides first), the dose
                        package's DosePredictor; no PTV: no dose (a note), unless QA was
                        not measured either (then the job fails)           stage "inference"
    BuildOutputs     -> RtdoseWriter: RTDOSE with DVHs; the summary holds the DVH metrics
                        (OpenKBP definitions) and a cumulative DVH per structure  "contours"
    Archive, Send    -> as for contours: a job_outputs row of kind RTDOSE, C-STORE to the
                        route's destinations                                     stage "send"
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom

from rtcontour.common.errors import InvalidSeries
from rtcontour.common.settings import Settings
from rtcontour.common.structure_names import to_tg263
from rtcontour.common.volume import load_series
from rtcontour.models.dose.metrics import dvh_metrics
from rtcontour.models.dose.predict import DosePredictor, normalise_to_prescription
from rtcontour.models.registry import resolve_dose_package
from rtcontour.worker.dose_prediction import dose_grid, predict_dose_for_series
from rtcontour.worker.pipeline import JobContext, WrittenOutput
from rtcontour.worker.qa import compare_structure_sets
from rtcontour.worker.rtdose import DoseVolumeHistogram, build_rtdose, cumulative_dvh
from rtcontour.worker.structure_sets import (
    StructureSet,
    UnusableStructureSet,
    match_oars,
    prescriptions_from_names,
    read_structure_set,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DoseContext",
    "DosePredictorCache",
    "LoadStructureSet",
    "MeasureEdits",
    "PredictDose",
    "RtdoseWriter",
    "dvh_summary",
    "our_structure_set",
    "referenced_ct_series",
    "resolve_dose_package",
]

DVH_STEP_GY = 1.0  # the summary's cumulative DVH: volume fraction at every whole Gy


class Normalisation(NamedTuple):
    """How a predicted dose was scaled (RTCONTOUR_DOSE_NORMALISE)."""

    ptv: str  # the structure set's ROI name of the highest-prescription PTV
    prescription_gy: float
    factor: float


@dataclass
class DoseContext:
    """What the dose steps add to a job's context (``JobContext.dose``)."""

    structure_set_path: Path | None = None
    structure_set: StructureSet | None = None
    borrowed_oars: tuple[str, ...] = ()  # TG-263 names taken from rtcontour's own contours
    dose_gy: np.ndarray | None = None  # on the CT's stored grid
    oars: dict[str, str] = field(default_factory=dict)  # TG-263 name -> ROI name used
    prescriptions_gy: dict[str, float] = field(default_factory=dict)
    predictor: DosePredictor | None = None
    qa_job_id: str | None = None  # the contour job whose contours were compared (QA)
    no_dose_reason: str | None = None  # set when there is nothing to predict a dose for
    # rtcontour's own RTSTRUCT of the CT, read once for QA and the borrowed OARs (see
    # ``our_structure_set``); ``ours_read`` tells "none" from "not read yet".
    ours: StructureSet | None = None
    ours_read: bool = False
    normalisation: Normalisation | None = None  # set when the dose was scaled to a PTV


def referenced_ct_series(dataset: pydicom.Dataset) -> tuple[str, str]:
    """(CT Series Instance UID, Frame of Reference UID) that a structure set references."""
    for frame in dataset.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                uid = str(series.get("SeriesInstanceUID", "")).strip()
                if uid:
                    return uid, str(frame.get("FrameOfReferenceUID", "")).strip()
    raise InvalidSeries("The structure set references no CT series "
                        "(ReferencedFrameOfReferenceSequence names none).")


class DosePredictorCache:
    """One DosePredictor per package folder for the life of the worker process."""

    def __init__(self, loader: Callable[[Path], DosePredictor] = DosePredictor) -> None:
        self._loader = loader
        self._predictors: dict[str, DosePredictor] = {}

    def get(self, settings: Settings, request: str | None = None) -> DosePredictor:
        path = resolve_dose_package(settings, request).resolve()
        if str(path) not in self._predictors:
            self._predictors[str(path)] = self._loader(path)
        return self._predictors[str(path)]


def our_structure_set(ctx: JobContext) -> StructureSet | None:
    """rtcontour's own RTSTRUCT of the job's CT on its grid, read once per job; None when
    rtcontour did not contour that CT (or its file is gone). Raises ``UnusableStructureSet``."""
    dose = _dose(ctx)
    if not dose.ours_read:
        ours = (ctx.store.output(ctx.source_job_id, "RTSTRUCT")
                if ctx.source_job_id is not None else None)
        if ours is not None and Path(ours.path).is_file() and ctx.series is not None:
            dose.ours = read_structure_set(Path(ours.path), ctx.series)
        dose.ours_read = True
    return dose.ours


def _dose(ctx: JobContext) -> DoseContext:
    if ctx.dose is None:
        ctx.dose = DoseContext()
    dose: DoseContext = ctx.dose
    return dose


class LoadStructureSet:
    """The job's RTSTRUCT and the CT series it references (held by a contour job)."""

    name = "load structure set"
    stage: str | None = "load"

    def run(self, ctx: JobContext) -> None:
        files = sorted(ctx.spool_dir.glob("*.dcm"))
        if not files:
            raise InvalidSeries("The job folder holds no DICOM instance.")
        if len(files) > 1:
            logger.warning("job %s: %d structure sets in one series; the last by name is used",
                           ctx.job_id, len(files))
        path = files[-1]
        header = pydicom.dcmread(path, stop_before_pixels=True)
        series_uid, frame_uid = referenced_ct_series(header)
        holder, reason = ctx.store.ct_holder(series_uid)
        if holder is None:
            raise InvalidSeries(f"Not predicted: {reason}.")
        ctx.store.record_source(ctx.job_id, holder.id)
        folder = Path(holder.spool_dir) if holder.spool_dir else (
            ctx.settings.spool_dir / "jobs" / holder.id)
        ct_files = sorted(folder.glob("*.dcm"))
        if not ct_files:
            raise InvalidSeries(f"Not predicted: the CT of job {holder.id} has no files left.")
        ctx.series = load_series(ct_files, min_slices=ctx.settings.min_slices,
                                 gap_tolerance=ctx.settings.slice_gap_tolerance)
        if frame_uid and frame_uid != ctx.series.volume.frame_of_reference_uid:
            raise InvalidSeries(
                f"Not predicted: the structure set's frame of reference {frame_uid} is not the "
                f"CT's ({ctx.series.volume.frame_of_reference_uid}).")
        try:
            structure_set = read_structure_set(path, ctx.series)
        except UnusableStructureSet as error:
            raise InvalidSeries(f"Not predicted: {error}") from None
        dose = _dose(ctx)
        dose.structure_set_path, dose.structure_set = path, structure_set
        ctx.source_job_id = holder.id
        logger.info("job %s: structure set %s on CT series %s of job %s (%d structures)",
                    ctx.job_id, structure_set.sop_instance_uid, series_uid, holder.id,
                    len(structure_set.masks))


class MeasureEdits:
    """What the clinicians changed: rtcontour's RTSTRUCT of the CT against the approved one
    (``worker.qa``), stored with the contour job (``Job.qa``). Skipped, with a log line, when
    rtcontour did not contour that CT."""

    name = "measure edits"
    stage: str | None = None

    def __init__(self, extra_names: Callable[[], dict[str, str] | None] = lambda: None,
                 absent_means_deleted: Callable[[JobContext], bool] = lambda ctx: False,
                 ) -> None:
        self.extra_names = extra_names
        # The route's qa_absent: an organ the approved set lacks is deleted (True), or not in
        # the approved set (False, the default).
        self.absent_means_deleted = absent_means_deleted

    def run(self, ctx: JobContext) -> None:
        dose = _dose(ctx)
        if ctx.series is None or dose.structure_set is None or ctx.source_job_id is None:
            raise RuntimeError("MeasureEdits needs LoadStructureSet first")
        holder = ctx.store.get(ctx.source_job_id)
        our_set = our_structure_set(ctx)
        if our_set is None:
            logger.info("job %s: rtcontour did not contour CT job %s: no QA", ctx.job_id,
                        holder.id)
            return
        shape = ctx.series.volume.array.shape
        auto = dict(our_set.masks)
        auto.update({name: np.zeros(shape, dtype=bool) for name in our_set.empty})
        extra = self.extra_names()
        wanted = {to_tg263(name, extra) or name for name in auto}
        approved = dose.structure_set
        reference = {name: mask for name, mask in approved.masks.items()
                     if (to_tg263(name, extra) or name) in wanted}
        reference.update({name: np.zeros(shape, dtype=bool) for name in approved.empty
                          if (to_tg263(name, extra) or name) in wanted})
        result = compare_structure_sets(auto, reference, ctx.series.volume.spacing_mm,
                                        extra_names=extra,
                                        absent_means_deleted=self.absent_means_deleted(ctx))
        job = ctx.store.get(ctx.job_id)
        qa = {
            "reference_sop_instance_uid": approved.sop_instance_uid,
            "received_at": job.created_at.isoformat(),
            "structure_set_job_id": ctx.job_id,
            "model_name": holder.model_name,
            "model_version": holder.model_version,
            **result.as_dict(),
        }
        ctx.store.record_qa(holder.id, qa)
        dose.qa_job_id = holder.id
        edited = sum(1 for item in result.structures
                     if item.status not in ("unchanged", "not_in_approved_set"))
        absent = sum(1 for item in result.structures if item.status == "not_in_approved_set")
        logger.info("job %s: QA of contour job %s: %d structures, %d changed, %d not in the "
                    "approved set", ctx.job_id, holder.id, len(result.structures), edited,
                    absent)


class PredictDose:
    """Prescriptions, missing OARs from our own contours, the dose model."""

    name = "predict dose"
    stage: str | None = "inference"

    def __init__(self, predictor_provider: Callable[[str | None], DosePredictor],
                 prescriptions: Callable[[JobContext], dict[str, float] | None],
                 normalise: bool = False) -> None:
        self.predictor_provider = predictor_provider
        self.prescriptions = prescriptions
        self.normalise = normalise

    def run(self, ctx: JobContext) -> None:
        dose = _dose(ctx)
        if ctx.series is None or dose.structure_set is None:
            raise RuntimeError("PredictDose needs LoadStructureSet first")
        approved = dose.structure_set
        prescriptions = prescriptions_from_names(approved.roi_names,
                                                 overrides=self.prescriptions(ctx) or {})
        ptvs = [name for name in prescriptions if name in approved.masks]
        if not ptvs:
            reason = ("the structure set has no PTV with a prescription and contours (names "
                      "such as PTV70, PTV_70Gy or PTV7000, or the route's prescriptions)")
            if dose.qa_job_id is None:
                raise InvalidSeries(f"Not predicted: {reason}.")
            # The clinicians' edits were measured: that stands; only the dose is not made.
            dose.no_dose_reason = reason
            ctx.store.add_note(ctx.job_id, f"No dose predicted: {reason}.")
            logger.info("job %s: no dose predicted: no PTV", ctx.job_id)
            return
        masks = dict(approved.masks)
        borrowed = self._borrow_missing_oars(ctx, masks)
        structure_set = StructureSet(approved.sop_instance_uid, approved.frame_of_reference_uid,
                                     masks, approved.roi_numbers, approved.empty, approved.notes)
        predictor = self.predictor_provider(ctx.model_request)
        ctx.store.record_model(ctx.job_id, predictor.manifest.name, predictor.manifest.version)
        prediction = predict_dose_for_series(ctx.series, structure_set, predictor, prescriptions)
        dose.dose_gy = prediction.dose_gy
        if self.normalise:
            target = max(prediction.prescriptions_gy, key=prediction.prescriptions_gy.__getitem__)
            dose.dose_gy, factor = normalise_to_prescription(
                prediction.dose_gy, [(structure_set.masks[target],
                                      prediction.prescriptions_gy[target])])
            if factor is None:
                ctx.store.add_note(ctx.job_id, f"Not normalised: the prediction gives {target} "
                                   "no dose at D95.")
                logger.warning("job %s: dose not normalised: %s D95 is 0 Gy", ctx.job_id,
                               target)
            else:
                dose.normalisation = Normalisation(target, prediction.prescriptions_gy[target],
                                                   factor)
                ctx.store.add_note(ctx.job_id, normalisation_text(*dose.normalisation) + ".")
                logger.info("job %s: dose normalised by %.3f", ctx.job_id, factor)
        dose.oars = prediction.oars
        dose.prescriptions_gy = prediction.prescriptions_gy
        dose.borrowed_oars = tuple(name for name in borrowed if name in prediction.oars)
        dose.structure_set = structure_set
        dose.predictor = predictor
        if dose.borrowed_oars:
            logger.info("job %s: OARs not in the structure set, taken from rtcontour's own "
                        "contours: %s", ctx.job_id, ", ".join(dose.borrowed_oars))
            ctx.store.add_note(ctx.job_id, "OARs not in the structure set, taken from "
                               "rtcontour's own contours: " + ", ".join(dose.borrowed_oars) + ".")
            if dose.qa_job_id is not None:
                _mark_borrowed_in_qa(ctx, dose.qa_job_id, dose.borrowed_oars)

    @staticmethod
    def _borrow_missing_oars(ctx: JobContext, masks: dict[str, np.ndarray]) -> list[str]:
        """Add to ``masks`` the OARs of rtcontour's RTSTRUCT of the CT that ``masks`` lacks."""
        try:
            our_set = our_structure_set(ctx)
        except UnusableStructureSet:
            logger.warning("job %s: rtcontour's own RTSTRUCT of the CT is unreadable",
                           ctx.job_id)
            return []
        if our_set is None:
            return []
        have = match_oars(masks)
        borrowed = []
        for tg263, roi_name in match_oars(our_set.masks).items():
            if tg263 not in have and tg263 not in masks:
                masks[tg263] = our_set.masks[roi_name]
                borrowed.append(tg263)
        return borrowed


def _mark_borrowed_in_qa(ctx: JobContext, contour_job_id: str, borrowed: tuple[str, ...]) -> None:
    """Say in the contour job's QA which of rtcontour's own organs the dose prediction used
    (``borrowed_into_dose``, overall and per structure), so that nobody reads them as
    approved."""
    qa = dict(ctx.store.get(contour_job_id).qa or {})
    if not qa:
        return
    qa["borrowed_into_dose"] = list(borrowed)
    structures = []
    for item in qa.get("structures") or []:
        if isinstance(item, dict) and item.get("roi_name") is not None:
            item = {**item, "borrowed_into_dose":
                    (to_tg263(str(item["roi_name"])) or item["roi_name"]) in borrowed}
        structures.append(item)
    qa["structures"] = structures
    ctx.store.record_qa(contour_job_id, qa)


def normalisation_text(ptv: str, prescription_gy: float, factor: float) -> str:
    """How a normalised dose was scaled, for the job, its page and the RTDOSE."""
    return (f"normalised: the prediction scaled by {factor:.3f} so that {ptv} D95 = its "
            f"prescription {prescription_gy:g} Gy (RTCONTOUR_DOSE_NORMALISE)")


def dvh_summary(
    dose_gy: np.ndarray,
    masks: dict[str, np.ndarray],
    ptvs: dict[str, float],
    oars: dict[str, str],
    borrowed: tuple[str, ...],
    spacing_mm: tuple[float, float, float],
) -> list[dict[str, Any]]:
    """One entry per PTV and OAR: DVH metrics (OpenKBP definitions, Gy) and a cumulative
    DVH (``dvh``: volume percent at 0, 1, 2, ... Gy)."""
    ptv_masks = {name: masks[name] for name in ptvs}
    oar_masks = {roi: masks[roi] for roi in oars.values()}
    metrics = dvh_metrics(dose_gy, oar_masks, ptv_masks, spacing_mm)
    voxel_cc = float(np.prod(spacing_mm)) / 1000.0
    top = float(dose_gy.max()) if dose_gy.size else 0.0
    levels = np.arange(0.0, top + DVH_STEP_GY, DVH_STEP_GY)
    entries = []
    names = [(name, "PTV") for name in ptvs] + [(roi, "OAR") for roi in oars.values()]
    tg263 = {roi: name for name, roi in oars.items()}
    for name, kind in names:
        voxels = dose_gy[masks[name]]
        if voxels.size == 0:
            continue
        dvh = [round(float((voxels >= level).mean() * 100.0), 2) for level in levels]
        entry: dict[str, Any] = {
            "roi_name": name,
            "type": kind,
            "volume_cc": round(float(voxels.size) * voxel_cc, 2),
            "mean_gy": round(float(voxels.mean()), 2),
            "max_gy": round(float(voxels.max()), 2),
            "dvh_step_gy": DVH_STEP_GY,
            "dvh": dvh,
        }
        if kind == "PTV":
            entry["prescription_gy"] = ptvs[name]
            for metric in ("D_99", "D_95", "D_1"):
                entry[metric.lower() + "_gy"] = round(metrics[(metric, name)], 2)
        else:
            entry["tg263_name"] = tg263[name]
            entry["d_0.1cc_gy"] = round(metrics[("D_0.1_cc", name)], 2)
            entry["from_rtcontour"] = tg263[name] in borrowed
        entries.append(entry)
    return entries


class RtdoseWriter:
    """The RTDOSE output: the predicted dose, DVHs of the approved structures."""

    kind = "RTDOSE"

    def build(self, ctx: JobContext) -> WrittenOutput | None:
        dose = _dose(ctx)
        if dose.no_dose_reason is not None:
            return None
        if ctx.series is None or dose.dose_gy is None or dose.structure_set is None or (
                dose.predictor is None):
            raise RuntimeError("RtdoseWriter needs PredictDose first")
        volume = ctx.series.volume
        structure_set = dose.structure_set
        voxel_cc = float(np.prod(volume.spacing_mm)) / 1000.0
        # DVH items reference ROIs of the approved structure set only (not borrowed ones).
        dvhs: list[DoseVolumeHistogram] = [
            cumulative_dvh(dose.dose_gy, structure_set.masks[name],
                           structure_set.roi_numbers[name], voxel_cc)
            for name in [*dose.prescriptions_gy, *dose.oars.values()]
            if name in structure_set.roi_numbers
        ]
        grid, affine = dose_grid(dose.dose_gy, volume.affine, volume.spacing_mm)
        manifest = dose.predictor.manifest
        normalised = (None if dose.normalisation is None
                      else normalisation_text(*dose.normalisation))
        dataset = build_rtdose(grid, affine, ctx.series,
                               structure_set_uid=structure_set.sop_instance_uid,
                               model_name=manifest.name, model_version=manifest.version,
                               dvhs=dvhs, prescriptions_gy=dose.prescriptions_gy,
                               normalisation=normalised)
        summary = dvh_summary(dose.dose_gy, structure_set.masks, dose.prescriptions_gy,
                              dose.oars, dose.borrowed_oars, volume.spacing_mm)
        if dose.normalisation is not None:
            for entry in summary:
                if entry.get("roi_name") == dose.normalisation.ptv:
                    entry["normalisation_factor"] = round(dose.normalisation.factor, 4)
                    entry["normalisation"] = normalised
        return WrittenOutput(kind=self.kind, dataset=dataset,
                             sop_instance_uid=str(dataset.SOPInstanceUID), summary=summary)
