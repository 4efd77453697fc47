"""``GET /api/destinations``: can each configured DICOM destination be reached (C-ECHO)?

The destinations of RTCONTOUR_DESTINATIONS and of every route.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter
from pydantic import BaseModel

from rtcontour.common.settings import Destination
from rtcontour.service.api.deps import AdminUser, Context

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/destinations", tags=["destinations"])


class DestinationOut(BaseModel):
    destination: str
    ae_title: str
    host: str
    port: int
    reachable: bool
    status: str
    elapsed_ms: float


@router.get("", response_model=list[DestinationOut], summary="C-ECHO every destination")
def check_destinations(_: AdminUser, ctx: Context) -> list[DestinationOut]:
    destinations = list(ctx.settings.destinations)
    for route in ctx.routing.routes:  # the routes' own destinations, each checked once
        for destination in route.parsed_destinations() or []:
            if destination not in destinations:
                destinations.append(destination)

    def check(destination: Destination) -> DestinationOut:
        start = time.perf_counter()
        try:
            reachable, message = ctx.echo(destination)
        except Exception as error:  # a broken peer must not break the dashboard
            reachable, message = False, f"C-ECHO error: {type(error).__name__}"
            logger.warning("C-ECHO to %s failed", destination, exc_info=True)
        return DestinationOut(
            destination=str(destination),
            ae_title=destination.ae_title,
            host=destination.host,
            port=destination.port,
            reachable=reachable,
            status=message,
            elapsed_ms=round((time.perf_counter() - start) * 1000, 1),
        )

    if not destinations:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(destinations))) as pool:
        return list(pool.map(check, destinations))
