"""The FastAPI application: ``create_app(settings)`` builds it, ``main(argv)`` serves it.

Routers, one per resource: ``jobs``, ``previews``, ``users``, ``audit``, ``metrics``,
``dashboard``. Everything except ``/health`` and the dashboard's static files needs a bearer
token (see ``deps.py``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import Engine

from service import __version__
from service.api.deps import AppContext, ViewerUser
from service.db import create_schema, make_engine
from service.jobstore import JobStore
from service.settings import Destination, Settings

logger = logging.getLogger(__name__)


class HealthOut(BaseModel):
    status: str
    version: str


def celery_enqueuer(settings: Settings) -> Callable[[str], None]:
    """Return ``enqueue(job_id)``: the worker's ``enqueue_job`` (task ``rtcontour.run_job``)."""

    def enqueue(job_id: str) -> None:
        from worker.celery_app import enqueue_job

        enqueue_job(settings, job_id)

    return enqueue


def broker_queue_depth(settings: Settings) -> Callable[[], int | None]:
    """Return ``depth()``: job messages waiting in the broker's queue (None if unknown).

    Works for Redis and the embedded broker alike (kombu's passive queue declare); the
    Celery client is built at the first call, not at import.
    """
    client: list[Any] = []

    def depth() -> int | None:
        try:
            from kombu.exceptions import ChannelError

            from worker.celery_app import QUEUE, make_celery

            if not client:
                client.append(make_celery(settings))
            with client[0].connection_for_read() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
                try:
                    declared = connection.default_channel.queue_declare(queue=QUEUE, passive=True)
                except ChannelError:
                    return 0  # the queue does not exist yet (Redis drops empty lists)
                return int(declared.message_count)
        except Exception as error:  # the dashboard shows "unknown" rather than failing
            logger.warning("queue depth unavailable from the broker: %s", error)
            return None

    return depth


def c_echo(
    destination: Destination, settings: Settings, timeout_s: float = 3.0
) -> tuple[bool, str]:
    """C-ECHO ``destination`` as the sender would reach it (our AE title, TLS for ``+tls``);
    return (reachable, a short status sentence)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from service.sender import associate

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
) -> FastAPI:
    """Build the API for ``settings``; collaborators may be injected (tests, ``serve``).

    ``engine``: the job store's engine (default ``make_engine(settings)``; tables are created
    if missing); ``enqueue(job_id)``: queue a job (default ``worker.celery_app.enqueue_job``);
    ``queue_depth()``: broker queue length; ``echo(destination)``: C-ECHO check.
    """
    from service.api import audit, dashboard, destinations, jobs, metrics, previews, stats, users
    from service.previews import PreviewCache

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
        enqueue=enqueue or celery_enqueuer(settings),
        queue_depth=queue_depth or broker_queue_depth(settings),
        echo=echo or (lambda destination: c_echo(destination, settings)),
        previews=PreviewCache(),
    )

    @app.get("/health", response_model=HealthOut, tags=["health"], summary="Liveness (no auth)")
    def health() -> HealthOut:
        return HealthOut(status="ok", version=__version__)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi_schema(_: ViewerUser) -> JSONResponse:
        return JSONResponse(app.openapi())

    for module in (jobs, previews, stats, destinations, users, audit, metrics, dashboard):
        app.include_router(module.router)
    dashboard.mount_static(app)
    return app


def main(argv: list[str] | None = None) -> int:
    """``rtcontour api``: serve the API and dashboard with uvicorn."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="rtcontour api", description=__doc__)
    parser.add_argument("--host", help="bind address (default RTCONTOUR_API_HOST)")
    parser.add_argument("--port", type=int, help="port (default RTCONTOUR_API_PORT)")
    args = parser.parse_args(argv)
    settings = Settings.model_validate({})  # from the environment (RTCONTOUR_*)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.admin_token is None:
        logger.warning("using the development admin token (RTCONTOUR_ADMIN_TOKEN is not set)")
    app = create_app(settings)
    uvicorn.run(app, host=args.host or settings.api_host, port=args.port or settings.api_port)
    return 0
