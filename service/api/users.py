"""Users and tokens (admin), plus the caller's own identity and the dashboard's login."""

from __future__ import annotations

import datetime as dt
import logging
import math
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, status
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from rtcontour.common import audit
from rtcontour.common.auth import (
    Role,
    User,
    UserError,
    active_token_count,
    add_user,
    authenticate,
    get_user,
    issue_token,
    list_users,
    set_active,
    set_role,
)
from rtcontour.service.api.deps import (
    AdminUser,
    BearerCredentials,
    Context,
    DbSession,
    ViewerUser,
    too_many,
)

logger = logging.getLogger(__name__)

router = APIRouter(tags=["users"])

UserName = Annotated[str, Path(min_length=1, max_length=64)]


class UserCreate(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
    role: Role


class UserUpdate(BaseModel):
    role: Role | None = None
    active: bool | None = None


class UserOut(BaseModel):
    name: str
    role: Role
    active: bool
    created_at: dt.datetime | None = None
    active_tokens: int


class UserWithTokenOut(UserOut):
    token: str = Field(description="the new bearer token; shown once, store it now")


class TokenOut(BaseModel):
    name: str
    token: str = Field(description="the new bearer token; shown once, store it now")


class MeOut(BaseModel):
    name: str
    role: Role


def _out(session: DbSession, user: User) -> UserOut:
    return UserOut(
        name=user.name,
        role=Role(user.role),
        active=user.active,
        created_at=user.created_at,
        active_tokens=active_token_count(session, user.id),
    )


def _user_error(error: UserError) -> HTTPException:
    code = status.HTTP_404_NOT_FOUND if "does not exist" in str(error) else status.HTTP_409_CONFLICT
    return HTTPException(code, detail=str(error))


@router.get("/api/me", response_model=MeOut, summary="Who the token belongs to")
def me(principal: ViewerUser) -> MeOut:
    return MeOut(name=principal.name, role=principal.role)


@router.post(
    "/api/login",
    response_model=MeOut,
    summary="Check a token and audit the login (the dashboard's login form)",
    responses={401: {"description": "missing or invalid token"},
               429: {"description": "too many failed logins from the address, or logins of "
                                    "the user (Retry-After says when to try again)"}},
)
def login(
    request: Request, ctx: Context, session: DbSession, credentials: BearerCredentials
) -> MeOut:
    address = request.client.host if request.client else "unknown"
    failures, logins = ctx.login_failures, ctx.user_logins
    if failures is not None and (wait := failures.retry_after_s(address)) > 0:
        _throttled(session, "anonymous", address, "failed logins from this address", wait)
    token = credentials.credentials if credentials else ""
    principal = authenticate(session, token, ctx.settings.effective_admin_token)
    if principal is None:
        if failures is not None:
            failures.add(address)
        audit.record(session, audit.LOGIN_FAILED, "anonymous", {"address": address})
        session.commit()
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing, invalid, revoked or disabled token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if logins is not None:
        if (wait := logins.retry_after_s(principal.name)) > 0:
            _throttled(session, principal.name, address, "logins of this user", wait)
        logins.add(principal.name)
    audit.record(session, audit.LOGIN, principal.name, {"address": address})
    session.commit()
    return MeOut(name=principal.name, role=principal.role)


def _throttled(session: Session, actor: str, address: str, what: str, wait_s: float) -> None:
    """Audit the refusal and answer 429 with Retry-After (whole seconds)."""
    audit.record(session, audit.LOGIN_THROTTLED, actor, {"address": address, "limit": what})
    session.commit()
    logger.warning("login throttled (%s) from %s; retry in %d s", what, address,
                   max(1, math.ceil(wait_s)))
    raise too_many(what, wait_s)


@router.get("/api/users", response_model=list[UserOut], summary="All users")
def get_users(_: AdminUser, session: DbSession) -> list[UserOut]:
    return [_out(session, user) for user in list_users(session)]


@router.post(
    "/api/users",
    response_model=UserWithTokenOut,
    status_code=status.HTTP_201_CREATED,
    summary="Add a user; the answer holds its token (shown once)",
)
def create_user(body: UserCreate, principal: AdminUser, session: DbSession) -> UserWithTokenOut:
    try:
        user, token = add_user(session, body.name, body.role)
    except UserError as error:
        raise _user_error(error) from None
    audit.record(session, audit.USER_ADDED, principal.name, {"user": user.name, "role": user.role})
    session.commit()
    logger.info("user %s (%s) added by %s", user.name, user.role, principal.name)
    return UserWithTokenOut(**_out(session, user).model_dump(), token=token)


@router.patch("/api/users/{name}", response_model=UserOut, summary="Change a user's role or state")
def update_user(
    name: UserName, body: UserUpdate, principal: AdminUser, session: DbSession
) -> UserOut:
    try:
        if body.role is not None:
            set_role(session, name, body.role)
            audit.record(
                session, audit.USER_ROLE_CHANGED, principal.name, {"user": name, "role": body.role}
            )
        if body.active is not None:
            set_active(session, name, body.active)
            event = audit.USER_ENABLED if body.active else audit.USER_DISABLED
            audit.record(session, event, principal.name, {"user": name})
        user = get_user(session, name)
    except UserError as error:
        raise _user_error(error) from None
    session.commit()
    return _out(session, user)


@router.post(
    "/api/users/{name}/token",
    response_model=TokenOut,
    summary="Issue a new token for a user, revoking the previous ones",
)
def new_user_token(name: UserName, principal: AdminUser, session: DbSession) -> TokenOut:
    try:
        token = issue_token(session, name)
    except UserError as error:
        raise _user_error(error) from None
    audit.record(session, audit.TOKEN_ISSUED, principal.name, {"user": name})
    session.commit()
    return TokenOut(name=name, token=token)
