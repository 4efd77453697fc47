"""``GET /metrics``: Prometheus text format, for admins or the dedicated metrics token.

A scraper should not hold an admin token (it could read the audit log and manage users), so
``RTCONTOUR_METRICS_TOKEN`` is a bearer token valid for ``/metrics`` only.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from rtcontour.common.auth import Role
from rtcontour.service.api.deps import BearerCredentials, Context, DbSession, get_principal
from rtcontour.service.metrics import JobStoreCollector
from rtcontour.service.qa_trends import site_qa_trends

router = APIRouter(tags=["metrics"])


def metrics_reader(
    request: Request, ctx: Context, session: DbSession, credentials: BearerCredentials
) -> str:
    """The metrics token, or an admin's bearer token (401 without a token, 403 for others)."""
    metrics_token = ctx.settings.metrics_token
    if credentials is not None and metrics_token is not None:
        expected = metrics_token.get_secret_value().encode()
        if hmac.compare_digest(credentials.credentials.encode(), expected):
            return "metrics-token"
    principal = get_principal(request, ctx, session, credentials)
    if not principal.role.allows(Role.admin):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="this needs the admin role")
    return principal.name


MetricsReader = Annotated[str, Depends(metrics_reader)]


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics (admin or metrics token)",
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(_: MetricsReader, ctx: Context) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobStoreCollector(
        ctx.store, ctx.queue_depth,
        qa_trends=lambda: site_qa_trends(ctx.store, ctx.settings)))
    body = generate_latest(REGISTRY) + generate_latest(registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
