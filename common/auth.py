"""API users, their hashed bearer tokens and roles.

Roles are ordered: ``viewer`` (job status only) < ``clinician`` (jobs, previews, RTSTRUCT
downloads, retry) < ``admin`` (everything, including users, audit, metrics, destinations).

Tokens are 256-bit random strings shown once; only their SHA-256 is stored. A fast hash is
enough because a token has far more entropy than any brute force can cover (a slow KDF
protects low-entropy passwords, which these are not) and it allows an indexed lookup.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import Boolean, ForeignKey, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from rtcontour.common.db import Base, UtcDateTime

TOKEN_PREFIX = "rtc_"  # noqa: S105 - a visible marker of rtcontour tokens, not a secret
BOOTSTRAP_ADMIN = "bootstrap-admin"


class Role(enum.StrEnum):
    """What a user may do; each role includes the rights of the roles below it."""

    viewer = "viewer"
    clinician = "clinician"
    admin = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, required: Role) -> bool:
        """True if this role has at least the rights of ``required``."""
        return self.rank >= required.rank


_RANK = {Role.viewer: 0, Role.clinician: 1, Role.admin: 2}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class User(Base):
    """A person or system that calls the API."""

    __tablename__ = "api_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=_now)


class ApiToken(Base):
    """A bearer token of a user, stored as the SHA-256 hex digest of the token."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("api_users.id"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    hint: Mapped[str] = mapped_column(String(16))  # first characters, to tell tokens apart
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=_now)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user name (never a patient identifier) and a role."""

    name: str
    role: Role
    user_id: int | None = None


class UserError(ValueError):
    """A user operation that cannot be done (unknown user, duplicate name, bad role)."""


def new_token() -> str:
    """Return a fresh random bearer token (256 bits, URL-safe)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 hex digest of ``token`` (what the database stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def authenticate(session: Session, token: str, admin_token: str | None) -> Principal | None:
    """Return the principal owning ``token``, or None for an unknown, revoked or disabled one.

    ``admin_token`` is the bootstrap admin token from the settings (compared in constant time).
    """
    if not token:
        return None
    if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
        return Principal(BOOTSTRAP_ADMIN, Role.admin)
    digest = hash_token(token)
    row = session.execute(
        select(ApiToken, User)
        .join(User, User.id == ApiToken.user_id)
        .where(ApiToken.token_sha256 == digest)
    ).first()
    if row is None:
        return None
    api_token, user = row
    if not hmac.compare_digest(api_token.token_sha256, digest):
        return None
    if api_token.revoked_at is not None or not user.active:
        return None
    return Principal(user.name, Role(user.role), user.id)


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise UserError(
            f"role {text!r} is unknown; choose one of {', '.join(r.value for r in Role)}"
        ) from None


def _issue(session: Session, user: User) -> str:
    token = new_token()
    session.add(ApiToken(user_id=user.id, token_sha256=hash_token(token), hint=token[:8]))
    return token


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise UserError(f"user {name!r} does not exist")
    return user


def add_user(session: Session, name: str, role: Role) -> tuple[User, str]:
    """Create an active user with one token; return the user and the token (shown once)."""
    name = name.strip()
    if not name or len(name) > 64 or name == BOOTSTRAP_ADMIN:
        raise UserError(f"user name {name!r} is invalid: 1 to 64 characters, not reserved")
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise UserError(f"user {name!r} already exists")
    user = User(name=name, role=Role(role).value, active=True)
    session.add(user)
    session.flush()
    return user, _issue(session, user)


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))


def set_active(session: Session, name: str, active: bool) -> User:
    """Enable or disable a user (a disabled user's tokens stop working at once)."""
    user = get_user(session, name)
    user.active = active
    return user


def set_role(session: Session, name: str, role: Role) -> User:
    user = get_user(session, name)
    user.role = Role(role).value
    return user


def issue_token(session: Session, name: str, *, revoke_others: bool = True) -> str:
    """Give ``name`` a new token (revoking the previous ones unless told not to); return it."""
    user = get_user(session, name)
    if revoke_others:
        for api_token in session.scalars(
            select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
        ):
            api_token.revoked_at = _now()
    session.flush()
    return _issue(session, user)


def active_token_count(session: Session, user_id: int) -> int:
    return len(
        list(
            session.scalars(
                select(ApiToken.id).where(
                    ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None)
                )
            )
        )
    )
