"""The worker's part of learning from the clinic (issue 23): shadow contours, their QA, the kept
site data set, and fine-tuning runs queued from the API.

Contour jobs::

    Segment        -> the route's active package (sent)
    ShadowSegment  -> the route's shadow package (common.route_models: the routes file's
                      shadow_model, or the one an admin switched out), its masks kept in the
                      job's archive folder (shadow/), never written as an output nor sent

Structure set (dose) jobs, after MeasureEdits (worker.dose_pipeline)::

    MeasureShadow   -> the shadow package's contours of that CT against the approved set too,
                       stored in the contour job's QA as qa["shadow"]
    KeepForTraining -> for a route with keep_for_training (the structure set's route or its
                       CT's), the CT and the approved contours, by TG-263 name (the clinic's
                       structure name mapping applied), as a kept set (models.site_data)

Neither shadow nor keeping can fail a job: a failure is logged and noted on the job.
The ``rtcontour.finetune`` task (``register_finetune_task``) runs :func:`models.finetune.finetune`
for a run the API queued (``common.finetune_runs``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from celery import Celery

from rtcontour.common.audit import make_recorder
from rtcontour.common.finetune_runs import (
    FINETUNE_TASK,
    read_request,
    read_status,
    update_status,
)
from rtcontour.common.route_models import effective_models
from rtcontour.common.routes import Route, load_routing
from rtcontour.common.settings import Settings
from rtcontour.common.structure_names import to_tg263
from rtcontour.models.data import TARGET_SPACING_MM
from rtcontour.models.labels import ORGANS
from rtcontour.models.package import load_package
from rtcontour.models.registry import resolve_package_path
from rtcontour.models.site_data import SiteDataset
from rtcontour.worker.pipeline import JobContext, SegmentationModel, segment_on_ct_grid
from rtcontour.worker.qa import compare_structure_sets

logger = logging.getLogger(__name__)

__all__ = [
    "KEPT_EVENT",
    "KeepForTraining",
    "MeasureShadow",
    "ShadowSegment",
    "purge_site_dataset",
    "register_finetune_task",
    "shadow_folder",
]

KEPT_EVENT = "site_dataset.kept"
SHADOW_MASKS = "masks.npz"
SHADOW_META = "shadow.json"


def shadow_folder(settings: Settings, job_id: str) -> Path:
    """Where a contour job's shadow contours are kept (``<archive>/<job_id>/shadow``)."""
    return settings.archive_dir / job_id / "shadow"


def _route(settings: Settings, name: str | None) -> Route | None:
    if name is None:
        return None
    return load_routing(settings).route(name)


def _approved_like(auto_names: list[str], approved: Any, extra: dict[str, str] | None,
                   shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The approved set's structures that pair with one of ``auto_names`` (as MeasureEdits:
    the approved set's other structures, PTVs and the like, are no organ of ours)."""
    wanted = {to_tg263(name, extra) or name for name in auto_names}
    reference = {name: mask for name, mask in approved.masks.items()
                 if (to_tg263(name, extra) or name) in wanted}
    reference.update({name: np.zeros(shape, dtype=bool) for name in approved.empty
                      if (to_tg263(name, extra) or name) in wanted})
    return reference


class ShadowSegment:
    """The route's shadow package on the same CT; its masks go to the job's archive folder."""

    name = "shadow segment"
    stage: str | None = None  # not the job's latency: nothing waits on the shadow

    def __init__(self, model_provider: Callable[[str | None], SegmentationModel]) -> None:
        self.model_provider = model_provider

    def run(self, ctx: JobContext) -> None:
        if ctx.series is None or ctx.model is None:
            raise RuntimeError("ShadowSegment needs Segment first")
        try:
            route = _route(ctx.settings, ctx.store.get(ctx.job_id).route_name)
            shadow = effective_models(ctx.store.engine, route).shadow_model
            if shadow is None:
                return
            started = time.perf_counter()
            model = self.model_provider(shadow)
            if (model.name, model.version) == (ctx.model.name, ctx.model.version):
                logger.info("job %s: the shadow package is the active one; not run twice",
                            ctx.job_id)
                return
            masks, _ = segment_on_ct_grid(ctx.series, model)
            folder = shadow_folder(ctx.settings, ctx.job_id)
            folder.mkdir(parents=True, exist_ok=True)
            packed: dict[str, Any] = {f"roi_{i}": np.packbits(mask)
                                      for i, mask in enumerate(masks.values())}
            np.savez_compressed(folder / SHADOW_MASKS, **packed)
            meta = {"model_name": model.name, "model_version": model.version,
                    "request": shadow, "rois": list(masks),
                    "shape": list(ctx.series.volume.array.shape),
                    "seconds": round(time.perf_counter() - started, 2)}
            (folder / SHADOW_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            logger.info("job %s: shadow package %s %s contoured the CT in %.1f s (not sent)",
                        ctx.job_id, model.name, model.version, meta["seconds"])
        except Exception as error:  # the active model's contours must still go out
            logger.exception("job %s: the shadow package failed", ctx.job_id)
            ctx.store.add_note(ctx.job_id, f"Shadow model not run: {error}")


def load_shadow_masks(settings: Settings, job_id: str
                      ) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(meta, roi_name -> bool mask on the CT's stored grid) of a contour job's shadow run."""
    folder = shadow_folder(settings, job_id)
    if not (folder / SHADOW_META).is_file():
        return None
    meta = json.loads((folder / SHADOW_META).read_text(encoding="utf-8"))
    shape = tuple(meta["shape"])
    size = int(np.prod(shape))
    with np.load(folder / SHADOW_MASKS) as npz:
        masks = {name: np.unpackbits(npz[f"roi_{i}"])[:size].reshape(shape).astype(bool)
                 for i, name in enumerate(meta["rois"])}
    return meta, masks


class MeasureShadow:
    """The shadow package's contours of the CT against the approved set, in the contour job's
    QA as ``qa["shadow"]`` (the same figures as the active model's)."""

    name = "measure shadow"
    stage: str | None = None

    def __init__(self, extra_names: Callable[[], dict[str, str] | None] = lambda: None,
                 absent_means_deleted: Callable[[JobContext], bool] = lambda ctx: False) -> None:
        self.extra_names = extra_names
        self.absent_means_deleted = absent_means_deleted

    def run(self, ctx: JobContext) -> None:
        dose = ctx.dose
        if dose is None or dose.qa_job_id is None or ctx.series is None:
            return
        try:
            found = load_shadow_masks(ctx.settings, dose.qa_job_id)
            if found is None:
                return
            meta, auto = found
            shape = ctx.series.volume.array.shape
            if tuple(meta["shape"]) != shape:
                logger.warning("job %s: shadow masks of job %s are not on this CT's grid",
                               ctx.job_id, dose.qa_job_id)
                return
            extra = self.extra_names()
            reference = _approved_like(list(auto), dose.structure_set, extra, shape)
            result = compare_structure_sets(auto, reference, ctx.series.volume.spacing_mm,
                                            extra_names=extra,
                                            absent_means_deleted=self.absent_means_deleted(ctx))
            qa = dict(ctx.store.get(dose.qa_job_id).qa or {})
            qa["shadow"] = {"model_name": meta["model_name"],
                            "model_version": meta["model_version"], **result.as_dict()}
            ctx.store.record_qa(dose.qa_job_id, qa)
            logger.info("job %s: QA of the shadow package %s %s on contour job %s",
                        ctx.job_id, meta["model_name"], meta["model_version"], dose.qa_job_id)
        except Exception as error:
            logger.exception("job %s: QA of the shadow contours failed", ctx.job_id)
            ctx.store.add_note(ctx.job_id, f"Shadow model QA not measured: {error}")


class KeepForTraining:
    """The CT and the approved contours as a kept set, when the route says so."""

    name = "keep for training"
    stage: str | None = None

    def __init__(self, extra_names: Callable[[], dict[str, str] | None] = lambda: None) -> None:
        self.extra_names = extra_names

    def run(self, ctx: JobContext) -> None:
        dose = ctx.dose
        if dose is None or dose.qa_job_id is None or ctx.series is None:
            return  # only sets that QA compared with rtcontour's own contours
        job = ctx.store.get(ctx.job_id)
        holder = ctx.store.get(dose.qa_job_id)
        try:
            routes = [_route(ctx.settings, job.route_name), _route(ctx.settings,
                                                                  holder.route_name)]
            if not any(route is not None and route.keep_for_training for route in routes):
                return
            kept = self._keep(ctx, job, holder)
        except Exception as error:
            logger.exception("job %s: the approved set could not be kept", ctx.job_id)
            ctx.store.add_note(ctx.job_id, f"Not kept for training: {error}")
            return
        ctx.store.add_note(ctx.job_id, "Kept for training in the site data set: "
                           + (", ".join(kept.structures) or "no organ") + "; unknown: "
                           + (", ".join(kept.unknown) or "none") + ".")
        make_recorder(ctx.store.engine, actor="worker")(KEPT_EVENT, {
            "job_id": ctx.job_id, "contour_job_id": holder.id, "set_id": kept.set_id,
            "structures": ", ".join(kept.structures)})

    def _keep(self, ctx: JobContext, job: Any, holder: Any) -> Any:
        if ctx.series is None:
            raise RuntimeError("KeepForTraining needs the CT series")
        extra = self.extra_names()
        approved = ctx.dose.structure_set
        organs = {organ.roi_name for organ in ORGANS}
        volume = ctx.series.volume
        masks: dict[str, np.ndarray] = {}
        names: dict[str, str] = {}
        for roi_name, mask in approved.masks.items():
            organ = to_tg263(roi_name, extra)
            if organ in organs and organ not in masks and mask.any():
                masks[organ] = volume.with_array(mask).to_canonical().array.astype(bool)
                names[organ] = roi_name
        target = TARGET_SPACING_MM
        if holder.model_name and holder.model_version:
            package = resolve_package_path(
                ctx.settings, f"{holder.model_name}-{holder.model_version}")
            target = load_package(package).manifest.target_spacing_mm
        canonical = volume.to_canonical()
        patient = holder.patient_id or job.patient_id or f"study:{holder.study_instance_uid}"
        return SiteDataset(ctx.settings.effective_site_dataset_dir).keep(
            ctx.job_id, hu=canonical.array, spacing_mm=canonical.spacing_mm,
            organ_masks=masks, organ_names=names, patient_id=patient,
            target_spacing_mm=target, contour_job_id=holder.id,
            structure_set_job_id=ctx.job_id,
            reference_sop_instance_uid=approved.sop_instance_uid,
            route=job.route_name or holder.route_name,
            model=f"{holder.model_name}-{holder.model_version}" if holder.model_name else None)


def purge_site_dataset(settings: Settings) -> list[str]:
    """The site data set's own retention (RTCONTOUR_SITE_DATASET_RETENTION_DAYS)."""
    return SiteDataset(settings.effective_site_dataset_dir).purge_older_than(
        settings.site_dataset_retention_days)


# -- fine-tuning runs queued from the API --------------------------------------------------------
def run_finetune(settings: Settings, run_id: str) -> str:
    """Run the fine-tuning ``run_id`` the API queued; its status says how it ended."""
    request = read_request(settings, run_id)
    state = read_status(settings, run_id).get("state")
    if state not in ("queued", "starting"):  # never run twice
        logger.warning("fine-tuning run %s is %s: not run again", run_id, state)
        return str(state)
    update_status(settings, run_id, state="running", started_at=time.time(), pid=os.getpid())
    try:
        from rtcontour.models.finetune import FinetuneRefused, finetune
        from rtcontour.models.package import default_packages_root
    except ModuleNotFoundError as error:
        update_status(settings, run_id, state="failed",
                      reason=f"this worker lacks the 'train' extra ({error.name} is not "
                             "installed): pip install 'rtcontour[train]'")
        return "failed"
    packages_dir = settings.model_packages_dir or default_packages_root()
    last_report = [0.0]

    def on_step(step: int, loss: float) -> None:
        if time.monotonic() - last_report[0] > 5:
            last_report[0] = time.monotonic()
            update_status(settings, run_id, step=step, loss=round(loss, 4))

    try:
        base = resolve_package_path(settings, request.package)
        result = finetune(
            base, request.site, SiteDataset(settings.effective_site_dataset_dir), packages_dir,
            steps=request.steps, minutes=request.minutes, holdout=request.holdout,
            min_sets=request.min_sets or settings.finetune_min_sets,
            exclude=request.exclude, threads=request.threads, device="auto",
            openkbp_limit=request.openkbp_limit, on_step=on_step,
            command=request.command(), run_dir=settings.finetune_dir / run_id / "run")
    except FinetuneRefused as error:
        update_status(settings, run_id, state="refused", reason=str(error))
        return "refused"
    except Exception as error:
        logger.exception("fine-tuning run %s failed", run_id)
        update_status(settings, run_id, state="failed", reason=str(error))
        return "failed"
    finally:
        shutil.rmtree(settings.finetune_dir / run_id / "run", ignore_errors=True)
    update_status(settings, run_id, state="done", package=result.package.name,
                  recommended=result.report.recommended,
                  report=result.report.model_dump(mode="json"))
    return "done"


def launch_finetune(settings: Settings, run_id: str) -> str:
    """Start run ``run_id`` in a process of its own (niced, its log in the run's folder), so
    that this worker keeps serving contour jobs; the run writes its status as it goes."""
    state = read_status(settings, run_id).get("state")
    if state != "queued":  # a message delivered again: a run is never started twice
        logger.warning("fine-tuning run %s is %s, not queued: not started again", run_id, state)
        return str(state)
    folder = settings.finetune_dir / run_id
    with open(folder / "log.txt", "ab") as log_file:
        process = subprocess.Popen(  # noqa: S603 - our own module, a validated run id
            ["nice", "-n", "10", sys.executable, "-m", "rtcontour.worker.site_training", run_id],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=os.environ.copy())
    update_status(settings, run_id, state="starting", pid=process.pid,
                  host=socket.gethostname())
    logger.info("fine-tuning run %s started (pid %d)", run_id, process.pid)
    return "starting"


def register_finetune_task(app: Celery, settings: Settings) -> None:
    """Define ``rtcontour.finetune`` on ``app``: start one queued run."""

    @app.task(name=FINETUNE_TASK, shared=False, acks_late=True, ignore_result=True,
              time_limit=120)
    def finetune_task(run_id: str) -> str:
        return launch_finetune(settings, run_id)


def main(argv: list[str] | None = None) -> int:
    """``python -m rtcontour.worker.site_training RUN_ID``: run a queued fine-tuning run (the
    settings from the environment, as the worker that started it)."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = run_finetune(Settings.model_validate({}), args[0])  # from RTCONTOUR_*
    return 0 if state == "done" else 1


if __name__ == "__main__":
    raise SystemExit(main())
