"""Dependencies shared by the routers: the database session, the caller, role checks.

Every route except ``/health`` and the dashboard's static files depends on one of the role
aliases (``ViewerUser``, ``ClinicianUser``, ``AdminUser``); without a valid bearer token it
answers 401, with a role below the route's it answers 403.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from rtcontour.common import audit
from rtcontour.common.auth import Principal, Role, authenticate
from rtcontour.common.jobstore import JobStore
from rtcontour.common.routes import RoutingTable
from rtcontour.common.settings import Destination, Settings
from rtcontour.service.api.ratelimit import SlidingWindowLimit
from rtcontour.service.ingest import InstanceReceiver
from rtcontour.service.previews import PreviewCache

logger = logging.getLogger(__name__)

bearer = HTTPBearer(auto_error=False, description="An rtcontour API token")


@dataclass
class AppContext:
    """What the routers need, built once by ``create_app`` and kept on ``app.state.ctx``."""

    settings: Settings
    engine: Engine
    store: JobStore
    enqueue: Callable[[str], None]
    queue_depth: Callable[[], int | None]
    echo: Callable[[Destination], tuple[bool, str]]
    previews: PreviewCache
    routing: RoutingTable = field(default_factory=RoutingTable.implicit)
    # POST /api/login throttles (built from the settings by create_app).
    login_failures: SlidingWindowLimit | None = None
    user_logins: SlidingWindowLimit | None = None
    # The in-process DICOM listener's spool and tracker (``rtcontour serve``), for STOW-RS in
    # and C-GET pulls; None in a standalone ``rtcontour api``.
    receiver: InstanceReceiver | None = None


def get_context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


Context = Annotated[AppContext, Depends(get_context)]


def get_session(ctx: Context) -> Iterator[Session]:
    with Session(ctx.engine) as session:
        yield session


DbSession = Annotated[Session, Depends(get_session)]
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=message, headers={"WWW-Authenticate": "Bearer"}
    )


def get_principal(
    request: Request, ctx: Context, session: DbSession, credentials: BearerCredentials
) -> Principal:
    """The caller identified by the ``Authorization: Bearer <token>`` header, or 401.

    A wrong token counts against the caller's address on every route, as on ``/api/login``
    (whose lockout it feeds); past ``RTCONTOUR_LOGIN_FAILURES_PER_ADDRESS`` in the window the
    address's wrong tokens get 429 and the lockout is audited once, when it starts. Valid
    tokens keep working (colleagues behind the same NAT or proxy are not locked out; tokens
    are 256-bit random or, in production, a bootstrap secret of 32+ characters).
    """
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("missing bearer token")
    principal = authenticate(session, credentials.credentials, ctx.settings.effective_admin_token)
    if principal is not None:
        return principal
    failures = ctx.login_failures
    if failures is None:
        raise _unauthorized("invalid, revoked or disabled token")
    address = request.client.host if request.client else "unknown"
    was_locked = failures.retry_after_s(address) > 0
    failures.add(address)
    wait = failures.retry_after_s(address)
    if wait <= 0:
        raise _unauthorized("invalid, revoked or disabled token")
    if not was_locked:
        audit.record(session, audit.LOGIN_THROTTLED, "anonymous",
                     {"address": address, "limit": "failed logins from this address"})
        session.commit()
        logger.warning("wrong tokens from %s: throttled for %d s", address,
                       max(1, math.ceil(wait)))
    raise too_many("failed logins from this address", wait)


def too_many(what: str, wait_s: float) -> HTTPException:
    """429 with Retry-After in whole seconds."""
    retry = max(1, math.ceil(wait_s))
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        detail=f"too many {what}; try again in {retry} s",
        headers={"Retry-After": str(retry)},
    )


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def require(role: Role) -> Callable[[Principal], Principal]:
    """A dependency that passes callers with at least ``role`` and answers 403 to others."""

    def check(principal: CurrentPrincipal) -> Principal:
        if not principal.role.allows(role):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, detail=f"this needs the {role.value} role"
            )
        return principal

    check.__name__ = f"require_{role.value}"
    return check


ViewerUser = Annotated[Principal, Depends(require(Role.viewer))]
ClinicianUser = Annotated[Principal, Depends(require(Role.clinician))]
AdminUser = Annotated[Principal, Depends(require(Role.admin))]
