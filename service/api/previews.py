"""Preview images of a job's CT with its contours, and what the previews hold."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

from rtcontour.common.jobstore import Job
from rtcontour.service.api.deps import ClinicianUser, Context
from rtcontour.service.api.jobs import load_job, rtstruct_file
from rtcontour.service.previews import (
    PLANES,
    Plane,
    PreviewOutOfRange,
    PreviewUnavailable,
    PreviewVolume,
    render_png,
)

router = APIRouter(prefix="/api/jobs", tags=["previews"])


class RoiOut(BaseModel):
    roi_name: str
    colour: list[int]


class PreviewInfoOut(BaseModel):
    """How many images each plane has (index 0 .. n-1) and the ROIs drawn."""

    planes: dict[str, int]
    spacing_mm: list[float]
    rois: list[RoiOut]


def _volume(ctx: Context, job: Job) -> PreviewVolume:
    rtstruct = rtstruct_file(ctx.store, job)
    if rtstruct is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"job {job.id} has no RTSTRUCT yet (state {job.state}): nothing to preview",
        )
    ct_folder = Path(job.spool_dir) if job.spool_dir else ctx.settings.spool_dir / "jobs" / job.id
    try:
        volume: PreviewVolume = ctx.previews.get(job.id, ct_folder, rtstruct)
    except PreviewUnavailable as error:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"job {job.id}: no preview, {error}"
        ) from None
    return volume


@router.get(
    "/{job_id}/preview",
    response_model=PreviewInfoOut,
    summary="Planes and ROIs of a job's preview",
    responses={404: {"description": "the job has no output to preview"}},
)
def preview_info(job_id: str, _: ClinicianUser, ctx: Context) -> PreviewInfoOut:
    volume = _volume(ctx, load_job(ctx.store, job_id))
    return PreviewInfoOut(
        planes={plane: volume.size(plane) for plane in PLANES},
        spacing_mm=list(volume.spacing_mm),
        rois=[RoiOut(roi_name=roi.roi_name, colour=list(roi.colour)) for roi in volume.rois],
    )


@router.get(
    "/{job_id}/preview.png",
    response_class=Response,
    summary="A CT plane (W400/L40) with the contours in their ROI colours",
    responses={
        200: {"content": {"image/png": {}}},
        404: {"description": "the job has no output to preview"},
    },
)
def preview_png(
    job_id: str,
    _: ClinicianUser,
    ctx: Context,
    plane: Annotated[Plane, Query(description="axial, coronal or sagittal")] = "axial",
    index: Annotated[
        int | None, Query(ge=0, le=100_000, description="image index; default the middle")
    ] = None,
) -> Response:
    volume = _volume(ctx, load_job(ctx.store, job_id))
    chosen = volume.size(plane) // 2 if index is None else index
    try:
        png = render_png(volume, plane, chosen)
    except PreviewOutOfRange as error:
        # The standard validation error shape, as for a bad plane (documented 422 schema).
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "index"), "msg": str(error), "input": chosen}]
        ) from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})
