"""``POST /dicomweb/studies``: DICOMweb STOW-RS in (PS3.18 10.5).

A ``multipart/related; type="application/dicom"`` body of Part 10 instances (CT images and
structure sets) is taken exactly as the DICOM listener takes C-STOREs (``service.ingest``):
same checks, spool, series journal and tracker, quiet period, routes and refusals list, with
the API user's name in place of the calling AE title. Needs a clinician's or admin's token
(a system that sends, such as a TPS or a DICOMweb router, gets a user of its own with the
clinician role). Answers the Store Instances Response in DICOM JSON: 200 every instance
stored, 202 some refused (Failed SOP Sequence with the reasons), 409 none. A standalone
``rtcontour api`` has no listener to feed and answers 503.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from rtcontour.common import audit
from rtcontour.common.dicomweb import DICOM_JSON, StowResult, split_multipart, stow_response
from rtcontour.service.api.deps import ClinicianUser, Context
from rtcontour.service.ingest import InstanceReceiver, Sender

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

STOW_RECEIVED = "dicomweb.stow"
MAX_REQUEST_BYTES = 2 * 1024**3  # a CT series of ~4,000 slices; send more in several requests
NO_LISTENER = (
    "DICOMweb STOW-RS feeds the DICOM listener running in the same process, and this "
    "`rtcontour api` runs none: send to the API of `rtcontour serve` (or by C-STORE to the "
    "listener)")


@router.post("/studies", summary="STOW-RS: store CT instances and structure sets",
             responses={200: {"description": "every instance stored"},
                        202: {"description": "some instances refused (Failed SOP Sequence)"},
                        409: {"description": "no instance stored"},
                        503: {"description": "no DICOM listener in this process"}})
async def store_instances(
    request: Request, principal: ClinicianUser, ctx: Context,
    content_type: Annotated[str, Header()] = "",
) -> JSONResponse:
    receiver = ctx.receiver
    if receiver is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=NO_LISTENER)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise HTTPException(413,
                            detail=f"a STOW-RS request may hold {MAX_REQUEST_BYTES} bytes at "
                                   "most: send the series in several requests")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            raise HTTPException(413,
                                detail=f"a STOW-RS request may hold {MAX_REQUEST_BYTES} bytes "
                                       "at most: send the series in several requests")
    try:
        parts = split_multipart(bytes(body), content_type)
    except ValueError as exc:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, detail=str(exc)) from None
    del body
    if not parts:
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            detail="the multipart body holds no application/dicom part")
    address = request.client.host if request.client else ""
    sender = Sender(calling_ae=principal.name, address=address, origin="dicomweb",
                    actor=principal.name)
    results = await run_in_threadpool(_store_all, receiver, parts, sender)
    code, document = stow_response(results)
    stored = sum(1 for result in results if result.failure_reason is None)
    audit.record(ctx.engine, STOW_RECEIVED, principal.name, {
        "address": address, "instances": len(results), "stored": stored,
        "refused": len(results) - stored})
    logger.info("STOW-RS from %s (%s): %d of %d instances stored", principal.name, address,
                stored, len(results))
    return JSONResponse(document, status_code=code, media_type=DICOM_JSON)


def _store_all(receiver: InstanceReceiver, parts: list[bytes], sender: Sender
               ) -> list[StowResult]:
    """Store each part under one tracker "association", released at the end (the series
    then becomes a job after the quiet period, as after a C-STORE association's release)."""
    with receiver.association() as serial:
        return [receiver.store_part10(serial, part, sender) for part in parts]
