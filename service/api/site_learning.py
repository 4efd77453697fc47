"""Learning from the clinic (issue 23), for admins: the kept site data set, fine-tuning runs,
a route's shadow package beside its active one, and the switch between them.

- ``GET /api/site-dataset``: kept sets per structure and the sets (no patient name or ID).
- ``DELETE /api/site-dataset/patients?patient_id=...`` (or ``/patients/{key}``): remove a
  patient's kept sets, audited.
- ``POST /api/finetune``: queue ``rtcontour finetune`` on a worker (audited); ``GET
  /api/finetune`` and ``/api/finetune/{run_id}``: the runs and how they ended.
- ``GET /api/routes/{name}/shadow``: per structure, the active and the shadow package
  against what the clinicians approved, on the same approved sets (viewers: the dashboard's
  side-by-side view).
- ``POST /api/routes/{name}/switch``: swap the route's active and shadow package (audited);
  the same call switches back.
"""

from __future__ import annotations

import logging
import statistics
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import BaseModel, Field
from sqlalchemy import select

from rtcontour.common import audit
from rtcontour.common.errors import ModelPackageError
from rtcontour.common.finetune_runs import (
    FinetuneOptions,
    FinetuneRequest,
    create_run,
    enqueue_finetune,
    list_runs,
    read_status,
)
from rtcontour.common.jobstore import Job
from rtcontour.common.route_models import RouteModelStore
from rtcontour.common.routes import Route
from rtcontour.models.package import load_package
from rtcontour.models.registry import resolve_package_path
from rtcontour.models.site_data import SiteDataset, patient_key
from rtcontour.service.api.deps import AdminUser, Context, DbSession, ViewerUser

logger = logging.getLogger(__name__)

router = APIRouter(tags=["site learning"])

PATIENT_REMOVED = "site_dataset.patient_removed"
FINETUNE_QUEUED = "finetune.queued"
ROUTE_SWITCHED = "route.model_switched"


class SiteDatasetOut(BaseModel):
    directory: str
    retention_days: float = Field(description="kept sets older than this are removed; 0: "
                                  "kept until an admin removes them")
    min_sets: int = Field(description="rtcontour finetune refuses a structure with fewer")
    sets: int
    patients: int
    per_structure: dict[str, int]
    oldest: str | None = None
    newest: str | None = None
    kept: list[dict[str, Any]]


@router.get("/api/site-dataset", response_model=SiteDatasetOut,
            summary="The kept site data set: sets per structure (admin)")
def get_site_dataset(_: AdminUser, ctx: Context) -> SiteDatasetOut:
    dataset = SiteDataset(ctx.settings.effective_site_dataset_dir)
    kept = [{"set_id": item.set_id, "patient_key": item.patient_key, "kept_at": item.kept_at,
             "structures": item.structures, "unknown": list(item.unknown),
             "contour_job_id": item.contour_job_id, "route": item.route, "model": item.model}
            for item in dataset.sets()]
    return SiteDatasetOut(directory=str(dataset.root),
                          retention_days=ctx.settings.site_dataset_retention_days,
                          min_sets=ctx.settings.finetune_min_sets, kept=kept,
                          **dataset.counts())


class RemovedOut(BaseModel):
    patient_key: str
    removed: list[str]


def _remove_patient(key: str, principal: Any, ctx: Any, session: Any) -> RemovedOut:
    removed = SiteDataset(ctx.settings.effective_site_dataset_dir).delete_patient(key)
    if not removed:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no kept set of that patient")
    audit.record(session, PATIENT_REMOVED, principal.name,
                 {"patient_key": key, "sets": ", ".join(removed), "count": len(removed)})
    session.commit()
    logger.info("site data set: %d set(s) of patient key %s removed by %s", len(removed),
                key[:12], principal.name)
    return RemovedOut(patient_key=key, removed=removed)


@router.delete("/api/site-dataset/patients", response_model=RemovedOut,
               summary="Remove a patient's kept sets by Patient ID (admin, audited)")
def delete_patient(principal: AdminUser, ctx: Context, session: DbSession,
                   patient_id: Annotated[str, Query(min_length=1, max_length=64)]) -> RemovedOut:
    # a query parameter, which the access log leaves out, never a path holding the ID
    return _remove_patient(patient_key(patient_id), principal, ctx, session)


@router.delete("/api/site-dataset/patients/{key}", response_model=RemovedOut,
               summary="Remove a patient's kept sets by the key GET /api/site-dataset shows")
def delete_patient_by_key(key: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")],
                          principal: AdminUser, ctx: Context, session: DbSession) -> RemovedOut:
    return _remove_patient(key, principal, ctx, session)


class FinetuneRunOut(BaseModel):
    run_id: str
    state: str
    values: dict[str, Any] = Field(default_factory=dict, description="the run's status")


@router.post("/api/finetune", response_model=FinetuneRunOut,
             status_code=status.HTTP_202_ACCEPTED,
             summary="Queue a fine-tuning run on a worker (admin, audited)")
def post_finetune(body: FinetuneOptions, principal: AdminUser, ctx: Context,
                  session: DbSession) -> FinetuneRunOut:
    request = FinetuneRequest(**body.model_dump(), requested_by=principal.name)
    try:
        resolve_package_path(ctx.settings, request.package)
    except ModelPackageError as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    run_id = create_run(ctx.settings, request)
    enqueue_finetune(ctx.settings, run_id)
    audit.record(session, FINETUNE_QUEUED, principal.name,
                 {"run_id": run_id, "package": request.package, "site": request.site,
                  "steps": request.steps, "minutes": request.minutes})
    session.commit()
    return FinetuneRunOut(run_id=run_id, state="queued", values=read_status(ctx.settings, run_id))


@router.get("/api/finetune", response_model=list[FinetuneRunOut],
            summary="Fine-tuning runs, newest first (admin)")
def get_finetune_runs(_: AdminUser, ctx: Context) -> list[FinetuneRunOut]:
    return [FinetuneRunOut(run_id=run["run_id"], state=run["state"], values=run)
            for run in list_runs(ctx.settings)]


@router.get("/api/finetune/{run_id}", response_model=FinetuneRunOut,
            summary="One fine-tuning run (admin)")
def get_finetune_run(run_id: str, _: AdminUser, ctx: Context) -> FinetuneRunOut:
    try:
        values = read_status(ctx.settings, run_id)
    except (ValueError, FileNotFoundError):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no fine-tuning run {run_id}") from None
    return FinetuneRunOut(run_id=run_id, state=values["state"], values=values)


# -- shadow and switch --------------------------------------------------------------------------
def _route(ctx: Any, name: str) -> Route:
    route = ctx.routing.route(name)
    if route is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"route {name!r} does not exist")
    return route


def _package_id(ctx: Any, request: str | None) -> str | None:
    """``name-version`` of the package a model request resolves to (None: unresolvable)."""
    try:
        manifest = load_package(resolve_package_path(ctx.settings, request)).manifest
    except ModelPackageError:
        return None
    return f"{manifest.name}-{manifest.version}"


def _figures(values: list[float]) -> dict[str, float | None]:
    return {"mean": round(statistics.fmean(values), 4) if values else None,
            "median": round(statistics.median(values), 4) if values else None}


class ShadowOut(BaseModel):
    route: str
    active: str | None
    shadow: str | None
    active_package: str | None
    shadow_package: str | None
    switched: bool
    switched_by: str | None = None
    switched_at: str | None = None
    approved_sets: int = Field(description="approved sets both packages were compared on")
    structures: list[dict[str, Any]]


def shadow_comparison(store: Any, route_name: str, active: str | None, shadow: str | None,
                      ) -> tuple[int, list[dict[str, Any]]]:
    """(sets, per structure): each package's Dice/HD95 against the approved sets of the route
    on which both ran (as active or as shadow, so the figures stay paired after a switch)."""
    query = select(Job.id, Job.qa, Job.model_name, Job.model_version).where(
        Job.qa.is_not(None), Job.route_name == route_name)
    per: dict[str, dict[str, dict[str, list[float]]]] = {}
    sets = 0
    with store.session() as session:
        rows = list(session.execute(query))
    for _job_id, qa, model_name, model_version in rows:
        if not isinstance(qa, dict) or not isinstance(qa.get("shadow"), dict):
            continue
        ran = {f"{model_name}-{model_version}": qa.get("structures") or [],
               f"{qa['shadow'].get('model_name')}-{qa['shadow'].get('model_version')}":
               qa["shadow"].get("structures") or []}
        if active not in ran or shadow not in ran:
            continue
        sets += 1
        for package, structures in ran.items():
            side = "active" if package == active else "shadow"
            for item in structures:
                if item.get("status") == "not_in_approved_set" or item.get("roi_name") is None:
                    continue
                slot = per.setdefault(item["roi_name"], {}).setdefault(
                    side, {"dice": [], "hd95_mm": []})
                for key in ("dice", "hd95_mm"):
                    if isinstance(item.get(key), int | float):
                        slot[key].append(float(item[key]))
    structures = []
    for name, sides in per.items():
        row: dict[str, Any] = {"roi_name": name}
        for side in ("active", "shadow"):
            values = sides.get(side, {"dice": [], "hd95_mm": []})
            row[side] = {"n": len(values["dice"]), "dice": _figures(values["dice"]),
                         "hd95_mm": _figures(values["hd95_mm"])}
        mean_active, mean_shadow = row["active"]["dice"]["mean"], row["shadow"]["dice"]["mean"]
        row["dice_difference"] = (None if mean_active is None or mean_shadow is None
                                  else round(mean_shadow - mean_active, 4))
        structures.append(row)
    return sets, structures


def _shadow_of(ctx: Any, route: Route) -> ShadowOut:
    name = route.name
    models = RouteModelStore(ctx.engine).effective(route)
    active_package = _package_id(ctx, models.model)
    shadow_package = _package_id(ctx, models.shadow_model) if models.shadow_model else None
    sets, structures = shadow_comparison(ctx.store, name, active_package, shadow_package)
    return ShadowOut(route=name, active=models.model, shadow=models.shadow_model,
                     active_package=active_package, shadow_package=shadow_package,
                     switched=models.switched, switched_by=models.switched_by,
                     switched_at=models.switched_at.isoformat() if models.switched_at else None,
                     approved_sets=sets, structures=structures)


@router.get("/api/routes/{name}/shadow", response_model=ShadowOut,
            summary="A route's active and shadow package side by side per structure")
def get_shadow(name: str, _: ViewerUser, ctx: Context) -> ShadowOut:
    return _shadow_of(ctx, _route(ctx, name))


@router.get("/api/shadow", response_model=list[ShadowOut],
            summary="Every contour route with a shadow package, side by side (the dashboard)")
def get_shadows(_: ViewerUser, ctx: Context) -> list[ShadowOut]:
    store = RouteModelStore(ctx.engine)
    return [_shadow_of(ctx, route) for route in ctx.routing.routes
            if route.action == "contour" and store.effective(route).shadow_model is not None]


class SwitchOut(BaseModel):
    route: str
    model: str | None
    shadow_model: str | None
    switched: bool


@router.post("/api/routes/{name}/switch", response_model=SwitchOut,
             summary="Make the route's shadow package the active one (admin, audited)")
def switch_route(name: str, principal: AdminUser, ctx: Context, session: DbSession) -> SwitchOut:
    route = _route(ctx, name)
    store = RouteModelStore(ctx.engine)
    before = store.effective(route)
    try:
        after = store.switch(route, principal.name, default_model=_package_id(ctx, None))
    except ValueError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    audit.record(session, ROUTE_SWITCHED, principal.name,
                 {"route": name, "from": before.model, "to": after.model,
                  "shadow": after.shadow_model})
    session.commit()
    logger.info("route %s switched to %s (shadow %s) by %s", name, after.model,
                after.shadow_model, principal.name)
    return SwitchOut(route=name, model=after.model, shadow_model=after.shadow_model,
                     switched=after.switched)
