"""The audit log: who did what, stored in the database and read by admins over the API.

Entries name jobs, UIDs, AE titles and user names, never a patient name or ID: ``record``
drops detail keys that look like patient identifiers before writing.

Examples
--------
>>> record(engine, ASSOCIATION_REJECTED, "dicom-listener", {"calling_ae": "X", "address": "..."})
>>> recorder = make_recorder(engine)  # for the listener: recorder(event, detail)
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import JSON, Engine, Integer, String
from sqlalchemy.orm import Mapped, Session, mapped_column

from rtcontour.common.db import Base, UtcDateTime

logger = logging.getLogger(__name__)

# Event names (the ``event`` column); dotted, resource first.
RTSTRUCT_DOWNLOAD = "rtstruct.download"
LOGIN = "auth.login"
LOGIN_FAILED = "auth.login_failed"
LOGIN_THROTTLED = "auth.login_throttled"
USER_ADDED = "user.added"
USER_DISABLED = "user.disabled"
USER_ENABLED = "user.enabled"
USER_ROLE_CHANGED = "user.role_changed"
TOKEN_ISSUED = "user.token_issued"  # noqa: S105 - an event name
ASSOCIATION_REJECTED = "dicom.association_rejected"
CONTEXT_REFUSED = "dicom.context_refused"
INSTANCE_REFUSED = "dicom.instance_refused"
SERIES_REFUSED = "dicom.series_refused"  # a series' instances refused for their SOP Class
JOB_CREATED = "job.created"
JOB_SENT = "job.sent"
JOB_RETRIED = "job.retried"
JOB_APPROVED = "job.approved"
JOB_REJECTED = "job.rejected"
JOB_FILES_PURGED = "job.files_purged"

_PATIENT_KEYS = {
    "patientname",
    "patientid",
    "patient_name",
    "patient_id",
    "patient",
    "name_of_patient",
}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AuditEvent(Base):
    """One audited action."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=_now, index=True)
    event: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


def _clean(detail: Mapping[str, Any] | None) -> dict[str, Any]:
    cleaned: dict[str, Any] = {}
    for key, value in (detail or {}).items():
        if key.lower().replace("-", "_") in _PATIENT_KEYS:
            logger.warning(
                "audit detail key %r dropped: patient identifiers are never audited", key
            )
            continue
        cleaned[str(key)] = (
            value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        )
    return cleaned


def record(
    target: Engine | Session,
    event: str,
    actor: str,
    detail: Mapping[str, Any] | None = None,
    *,
    job_id: str | None = None,
) -> None:
    """Write one audit entry.

    ``target``: an Engine (the entry is committed in its own transaction) or a Session (the
    entry joins the caller's transaction and is committed with it). ``detail``: JSON-able
    scalars naming jobs, UIDs, AE titles, addresses; ``job_id`` may also be given in detail.
    """
    clean = _clean(detail)
    job = job_id or (str(clean["job_id"]) if clean.get("job_id") else None)
    entry = AuditEvent(at=_now(), event=event, actor=actor[:64], job_id=job, detail=clean)
    if isinstance(target, Session):
        target.add(entry)
        return
    with Session(target) as session, session.begin():
        session.add(entry)


def make_recorder(
    engine: Engine, actor: str = "dicom-listener"
) -> Callable[[str, dict[str, Any]], None]:
    """Return ``recorder(event, detail)`` for code without a session (the DICOM listener).

    The recorder never raises: a failing audit write is logged, so that it cannot break an
    association; ``detail["actor"]``, if given, overrides ``actor``.
    """

    def recorder(event: str, detail: dict[str, Any]) -> None:
        detail = dict(detail)
        who = str(detail.pop("actor", actor))
        try:
            record(engine, event, who, detail)
        except Exception:
            logger.exception("audit entry %s could not be written", event)

    return recorder


def download_event(kind: str) -> str:
    """The audit event of downloading a job's output of ``kind`` ("rtstruct.download", ...)."""
    return RTSTRUCT_DOWNLOAD if kind == "RTSTRUCT" else f"{kind.lower()}.download"
