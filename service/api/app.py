"""The FastAPI application: ``create_app(settings)`` builds it, ``main(argv)`` serves it.

Routers, one per resource: ``jobs``, ``previews``, ``users``, ``audit``, ``metrics``,
``dashboard``. Everything except ``/health`` and the dashboard's static files needs a bearer
token (see ``deps.py``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine

from rtcontour.common import __version__
from rtcontour.common.db import make_engine
from rtcontour.common.dicomweb import probe as dicomweb_probe
from rtcontour.common.jobstore import JobStore
from rtcontour.common.queue import enqueue_job
from rtcontour.common.queue import queue_depth as queue_depth_of
from rtcontour.common.routes import RoutingTable, load_routing
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Destination, Settings
from rtcontour.common.tls import associate
from rtcontour.service.api import (
    audit,
    dashboard,
    destinations,
    dicomweb,
    jobs,
    metrics,
    notifications,
    previews,
    pull,
    qa,
    refusals,
    review,
    routes,
    site_learning,
    stats,
    users,
    viewer,
)
from rtcontour.service.api.deps import AppContext, ViewerUser
from rtcontour.service.api.ratelimit import SlidingWindowLimit
from rtcontour.service.ingest import InstanceReceiver
from rtcontour.service.previews import PreviewCache

logger = logging.getLogger(__name__)


class HealthOut(BaseModel):
    status: str
    version: str


def c_echo(
    destination: Destination, settings: Settings, timeout_s: float = 3.0
) -> tuple[bool, str]:
    """C-ECHO ``destination`` as the sender would reach it (our AE title, TLS for ``+tls``);
    return (reachable, a short status sentence). A DICOMweb destination gets a QIDO-RS query."""
    if destination.is_dicomweb:
        return dicomweb_probe(destination, settings, timeout_s)
    ae = AE(ae_title=settings.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    assoc = associate(ae, destination, settings)
    if not assoc.is_established:
        if assoc.is_rejected:
            return False, "association rejected"
        tls = " or TLS handshake failed" if destination.tls else ""
        return False, f"unreachable{tls}"
    try:
        answer = assoc.send_c_echo()
    finally:
        assoc.release()
    if answer and getattr(answer, "Status", None) == 0:
        return True, "C-ECHO succeeded"
    return False, "C-ECHO failed"


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    enqueue: Callable[[str], None] | None = None,
    queue_depth: Callable[[], int | None] | None = None,
    echo: Callable[[Destination], tuple[bool, str]] | None = None,
    routing: RoutingTable | None = None,
    receiver: InstanceReceiver | None = None,
) -> FastAPI:
    """Build the API for ``settings``; collaborators may be injected (tests, ``serve``).

    ``engine``: the job store's engine (default ``make_engine(settings)``; tables are created
    if missing); ``enqueue(job_id)``: queue a job (default ``common.queue.enqueue_job``);
    ``queue_depth()``: broker queue length; ``echo(destination)``: C-ECHO check;
    ``routing``: the routing rules (default: ``RTCONTOUR_ROUTES_FILE``, validated here);
    ``receiver``: the in-process listener's (``rtcontour serve``), for STOW-RS in and C-GET
    pulls (without one, ``POST /dicomweb/studies`` answers 503).
    """
    routing = routing if routing is not None else load_routing(settings)
    engine = engine or make_engine(settings)
    create_schema(engine)
    app = FastAPI(
        title="rtcontour",
        version=__version__,
        description="DICOM-RT auto-contouring: jobs, previews, RTSTRUCT downloads, audit.",
        # The schema is served behind authentication (/api/openapi.json) like every route.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = AppContext(
        settings=settings,
        engine=engine,
        store=JobStore(engine),
        enqueue=enqueue or (lambda job_id: enqueue_job(settings, job_id)),
        queue_depth=queue_depth or queue_depth_of(settings),
        echo=echo or (lambda destination: c_echo(destination, settings)),
        previews=PreviewCache(),
        routing=routing,
        login_failures=SlidingWindowLimit(settings.login_failures_per_address,
                                          settings.login_window_s),
        user_logins=SlidingWindowLimit(settings.logins_per_user, settings.login_window_s),
        receiver=receiver,
    )

    @app.get("/health", response_model=HealthOut, tags=["health"], summary="Liveness (no auth)")
    def health() -> HealthOut:
        return HealthOut(status="ok", version=__version__)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi_schema(_: ViewerUser) -> JSONResponse:
        return JSONResponse(app.openapi())

    for module in (jobs, review, refusals, notifications, previews, viewer, qa, stats,
                   destinations, routes, site_learning, users, audit, metrics, dicomweb, pull,
                   dashboard):
        app.include_router(module.router)
    dashboard.mount_static(app)
    return app


def main(argv: list[str] | None = None) -> int:
    """``rtcontour api``: serve the API and dashboard with uvicorn."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="rtcontour api",
        description=(
            "Run only the HTTP API and the dashboard (http://HOST:PORT/dashboard), for an "
            "installation whose listener and workers run as separate processes: give it the "
            "same RTCONTOUR_DATABASE_URL, RTCONTOUR_BROKER_URL and RTCONTOUR_DATA_DIR as them."
        ),
        epilog=(
            "Every request except /health and the dashboard page needs a bearer token: "
            "RTCONTOUR_ADMIN_TOKEN, or a user's token from 'rtcontour users token NAME'."
        ),
    )
    parser.add_argument("--host", help="bind address (default RTCONTOUR_API_HOST)")
    parser.add_argument("--port", type=int, help="port (default RTCONTOUR_API_PORT)")
    args = parser.parse_args(argv)
    settings = Settings.model_validate({})  # from the environment (RTCONTOUR_*)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.admin_token is None:
        logger.warning("using the development admin token (RTCONTOUR_ADMIN_TOKEN is not set)")
    app = create_app(settings)
    config = uvicorn.Config(app, host=args.host or settings.api_host,
                            port=args.port or settings.api_port)  # configures uvicorn's logs
    logging.getLogger("uvicorn.access").addFilter(QueryStringFilter())
    uvicorn.Server(config).run()
    return 0


class QueryStringFilter(logging.Filter):
    """Leaves the query string out of uvicorn's access log: ``?patient=`` holds a patient's
    name or ID, and logs never hold those (the path and status stay)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path, query_mark, _ = args[2].partition("?")
            record.args = (*args[:2], path + ("?..." if query_mark else ""), *args[3:])
        return True
