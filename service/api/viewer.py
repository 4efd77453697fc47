"""The job page's slice viewer: the CT volume and the contours, rendered by the browser.

``/viewer/meta`` gives the grid (shape (slices, rows, columns) of the canonical orientation:
axis 0 superior->inferior, 1 anterior->posterior, 2 patient right->left; spacing in mm; the
affine from voxel index to patient LPS mm) and the structures; ``/viewer/ct`` the HU as int16
little-endian bytes in that order (gzip-encoded when the client accepts it);
``/viewer/contours`` each structure's polygons per axial slice in voxel coordinates (row,
column), rtcontour's own and, when the job has ``qa``, the approved structure set's. A dose
job shows its source job's CT with the structures its prediction used (the approved set, and
rtcontour's contours it borrowed, source ``borrowed``) and ``/viewer/dose``: the RTDOSE grid
in canonical orientation as uint16 little-endian cGy, placed on the CT by ``meta.dose``. All
clinician, like the previews: they show the patient's images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response, status
from pydantic import BaseModel, Field

from rtcontour.common.jobstore import Job, JobNotFound
from rtcontour.common.structure_names import to_tg263
from rtcontour.service.api.deps import AppContext, ClinicianUser, Context
from rtcontour.service.api.jobs import load_job, output_file
from rtcontour.service.previews import ContourSource, PreviewUnavailable, ViewerCt, ViewerDose

router = APIRouter(prefix="/api/jobs", tags=["viewer"])

# Window presets (width, level) in HU offered by the viewer.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft tissue": (400.0, 40.0),
    "bone": (1800.0, 400.0),
    "lung": (1500.0, -600.0),
}
_CACHE = "private, max-age=300"
_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "the job has no CT or contours to show"},
    410: {"description": "deleted by the retention policy"},
}


class ViewerStructureOut(BaseModel):
    roi_name: str
    source: str = Field(description="rtcontour (solid), approved (dashed), or borrowed: "
                        "rtcontour's contour a dose prediction used where the approved set "
                        "had none")
    colour: list[int] = Field(description="the structure set's RGB display colour")
    display_colour: list[int] = Field(
        description="RGB as drawn over the CT (grey, white and dark colours replaced)"
    )
    flag: str | None = Field(None, description="review: the model is unsure; ok")
    confidence: float | None = None
    matches: str | None = Field(None, description="approved: the rtcontour structure it is")


class WindowOut(BaseModel):
    name: str
    width: float
    level: float


class DoseOverlayOut(BaseModel):
    """Where ``/viewer/dose`` lies on the CT: dose voxel (i, j, k) is at the CT's canonical
    voxel index ``origin_index + step * (i, j, k)``."""

    shape: list[int] = Field(description="(slices, rows, columns) of the dose grid, canonical")
    origin_index: list[float]
    step: list[float] = Field(description="CT voxels per dose voxel along each axis")
    dtype: str
    byte_order: str
    units: str
    max_gy: float
    prescriptions_gy: dict[str, float] = Field(
        default_factory=dict, description="PTV -> prescription the prediction used"
    )


class ViewerMetaOut(BaseModel):
    shape: list[int] = Field(description="(slices, rows, columns), canonical orientation")
    spacing_mm: list[float] = Field(description="(slice, row, column)")
    affine: list[list[float]] = Field(description="4x4: voxel (slice, row, column, 1) -> LPS mm")
    frame_of_reference_uid: str
    dtype: str
    byte_order: str
    hu_min: int
    hu_max: int
    windows: list[WindowOut]
    structures: list[ViewerStructureOut]
    has_approved: bool = Field(description="the approved structure set is overlaid too")
    kind: str = Field("contour", description="the job's kind: contour or dose")
    dose: DoseOverlayOut | None = Field(
        None, description="a dose job with an RTDOSE: its grid on the CT (``/viewer/dose``)"
    )


def _ct_folder(ctx: AppContext, job: Job) -> Path:
    return Path(job.spool_dir) if job.spool_dir else ctx.settings.spool_dir / "jobs" / job.id


def _contour_job(ctx: AppContext, job: Job) -> Job:
    """The contour job whose CT is shown: the job itself, or a dose job's source job."""
    if job.purged_at is not None:
        raise HTTPException(
            status.HTTP_410_GONE,
            detail=f"job {job.id}'s images were deleted by the retention policy",
        )
    if (job.kind or "contour") == "dose" and job.source_job_id:
        return _contour_job(ctx, load_job(ctx.store, job.source_job_id))
    return job


def _approved_file(ctx: AppContext, qa: dict[str, Any] | None) -> Path | None:
    """The approved structure set's file (in its dose job's folder), if it is still there."""
    job_id = (qa or {}).get("structure_set_job_id")
    if not job_id:
        return None
    try:
        holder = ctx.store.get(str(job_id))
    except JobNotFound:
        return None
    if not holder.spool_dir or not Path(holder.spool_dir).is_dir():
        return None
    for path in sorted(Path(holder.spool_dir).glob("*.dcm")):
        return path
    return None


def _sources(ctx: AppContext, job: Job) -> list[ContourSource]:
    """rtcontour's RTSTRUCT (flags and confidence from its summary), then the approved set
    (each ROI matched to an rtcontour structure through the job's ``qa``)."""
    sources = []
    rtstruct = ctx.store.output(job.id, "RTSTRUCT")
    rtstruct_path = output_file(rtstruct)
    if rtstruct is not None and rtstruct_path is not None:
        details: dict[str, dict[str, Any]] = {}
        for item in rtstruct.summary or []:
            if isinstance(item, dict) and item.get("roi_name"):
                details[str(item["roi_name"])] = {
                    key: item[key] for key in ("flag", "confidence") if item.get(key) is not None
                }
        sources.append(ContourSource("rtcontour", rtstruct_path, details))
    approved_path = _approved_file(ctx, job.qa)
    if approved_path is not None:
        matched = {
            str(item["reference_name"]): {"matches": item.get("roi_name")}
            for item in (job.qa or {}).get("structures", [])
            if isinstance(item, dict) and item.get("reference_name")
        }
        sources.append(ContourSource("approved", approved_path, matched))
    return sources


def _is_dose(job: Job) -> bool:
    return (job.kind or "contour") == "dose"


def _dose_sources(ctx: AppContext, job: Job, ct_job: Job) -> list[ContourSource]:
    """A dose job's structures: its approved structure set, then the OARs its prediction
    borrowed from rtcontour's RTSTRUCT of the CT (``from_rtcontour`` in the RTDOSE summary)."""
    sources = []
    folder = Path(job.spool_dir) if job.spool_dir else None
    approved = next(iter(sorted(folder.glob("*.dcm"))), None) if folder and folder.is_dir() \
        else None
    if approved is not None:
        sources.append(ContourSource("approved", approved, {}))
    rtdose = ctx.store.output(job.id, "RTDOSE")
    borrowed = {
        str(item.get("tg263_name") or item.get("roi_name"))
        for item in (rtdose.summary if rtdose is not None else None) or []
        if isinstance(item, dict) and item.get("from_rtcontour")
    }
    ours = ctx.store.output(ct_job.id, "RTSTRUCT")
    ours_path = output_file(ours)
    if borrowed and ours is not None and ours_path is not None:
        names = frozenset(
            str(item["roi_name"]) for item in ours.summary or []
            if isinstance(item, dict) and item.get("roi_name")
            and (item["roi_name"] in borrowed or to_tg263(str(item["roi_name"])) in borrowed)
        )
        if names:
            sources.append(ContourSource("borrowed", ours_path, {}, names))
    return sources


def _viewer_ct(ctx: AppContext, job: Job) -> ViewerCt:
    try:
        ct: ViewerCt = ctx.previews.ct(job.id, _ct_folder(ctx, job))
    except PreviewUnavailable as error:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"job {job.id}: nothing to show, {error}"
        ) from None
    return ct


def _contours(ctx: AppContext, job: Job, shown: Job) -> bytes:
    """The contours of ``shown`` (the job asked for) on the CT of ``job`` (its contour job)."""
    sources = _dose_sources(ctx, shown, job) if _is_dose(shown) else _sources(ctx, job)
    try:
        body: bytes = ctx.previews.contours(job.id, _ct_folder(ctx, job), sources)
    except PreviewUnavailable as error:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"job {job.id}: no contours, {error}"
        ) from None
    return body


def _viewer_dose(ctx: AppContext, shown: Job, job: Job) -> ViewerDose:
    """The RTDOSE of dose job ``shown`` on the CT of its contour job ``job``; 404 without."""
    path = output_file(ctx.store.output(shown.id, "RTDOSE"))
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {shown.id} has no RTDOSE")
    try:
        dose: ViewerDose = ctx.previews.dose(job.id, _ct_folder(ctx, job), path)
    except PreviewUnavailable as error:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"job {shown.id}: no dose to show, {error}"
        ) from None
    return dose


def _prescriptions(ctx: AppContext, job: Job) -> dict[str, float]:
    """PTV ROI name -> prescription in Gy, from the RTDOSE summary."""
    rtdose = ctx.store.output(job.id, "RTDOSE")
    return {
        str(item["roi_name"]): float(item["prescription_gy"])
        for item in (rtdose.summary if rtdose is not None else None) or []
        if isinstance(item, dict) and item.get("roi_name") and item.get("prescription_gy")
    }


@router.get(
    "/{job_id}/viewer/meta",
    response_model=ViewerMetaOut,
    summary="The viewer's grid (shape, spacing, affine), window presets and structures",
    responses=_RESPONSES,
)
def viewer_meta(job_id: str, _: ClinicianUser, ctx: Context) -> ViewerMetaOut:
    shown = load_job(ctx.store, job_id)
    job = _contour_job(ctx, shown)
    ct = _viewer_ct(ctx, job)
    structures = json.loads(_contours(ctx, job, shown))["structures"]
    dose = None
    if _is_dose(shown) and output_file(ctx.store.output(shown.id, "RTDOSE")) is not None:
        dose = DoseOverlayOut(**_viewer_dose(ctx, shown, job).meta(),
                              prescriptions_gy=_prescriptions(ctx, shown))
    return ViewerMetaOut(
        **ct.meta(),
        windows=[WindowOut(name=n, width=w, level=lv) for n, (w, lv) in WINDOW_PRESETS.items()],
        structures=[
            ViewerStructureOut(**{k: v for k, v in s.items() if k != "slices"})
            for s in structures
        ],
        has_approved=any(s["source"] == "approved" for s in structures),
        kind="dose" if _is_dose(shown) else "contour",
        dose=dose,
    )


@router.get(
    "/{job_id}/viewer/ct",
    response_class=Response,
    summary="The CT as int16 little-endian HU, (slices, rows, columns) canonical order",
    responses={200: {"content": {"application/octet-stream": {}}}, **_RESPONSES},
)
def viewer_ct(job_id: str, request: Request, _: ClinicianUser, ctx: Context) -> Response:
    job = _contour_job(ctx, load_job(ctx.store, job_id))
    ct = _viewer_ct(ctx, job)
    shape = ",".join(str(n) for n in ct.volume.shape)
    headers = {"Cache-Control": _CACHE, "X-Volume-Shape": shape, "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", "").lower():
        headers["Content-Encoding"] = "gzip"
        return Response(ct.gzip_bytes, media_type="application/octet-stream", headers=headers)
    return Response(ct.raw_bytes, media_type="application/octet-stream", headers=headers)


@router.get(
    "/{job_id}/viewer/contours",
    response_class=Response,
    summary="Each structure's contours as polygons per axial slice, in voxel coordinates",
    responses={200: {"content": {"application/json": {}}}, **_RESPONSES},
)
def viewer_contours(job_id: str, _: ClinicianUser, ctx: Context) -> Response:
    shown = load_job(ctx.store, job_id)
    body = _contours(ctx, _contour_job(ctx, shown), shown)
    return Response(body, media_type="application/json", headers={"Cache-Control": _CACHE})


@router.get(
    "/{job_id}/viewer/dose",
    response_class=Response,
    summary="A dose job's predicted dose as uint16 little-endian cGy, canonical order",
    responses={200: {"content": {"application/octet-stream": {}}}, **_RESPONSES},
)
def viewer_dose(job_id: str, request: Request, _: ClinicianUser, ctx: Context) -> Response:
    shown = load_job(ctx.store, job_id)
    dose = _viewer_dose(ctx, shown, _contour_job(ctx, shown))
    shape = ",".join(str(n) for n in dose.volume.shape)
    headers = {"Cache-Control": _CACHE, "X-Volume-Shape": shape, "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", "").lower():
        headers["Content-Encoding"] = "gzip"
        return Response(dose.gzip_bytes, media_type="application/octet-stream", headers=headers)
    raw = dose.volume.array.astype("<u2", copy=False).tobytes()
    return Response(raw, media_type="application/octet-stream", headers=headers)
