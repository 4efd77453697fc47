"""What the DICOM listener refused, kept where a person can find it.

An association refused (unknown calling or called AE title, too many associations, a TLS
handshake that failed), a presentation context refused (an MR series: rtcontour accepts CT
Image and RT Structure Set Storage only) and an instance answered with a failure status each
become a row, listed over the API (``GET /api/refusals``) and on the dashboard, so that a
physicist can tell a misconfigured TPS from a silent loss. Rows name AE titles, addresses and
UIDs, never a patient.
"""

from __future__ import annotations

import builtins
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, Integer, String, Text, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from rtcontour.common.db import Base, UtcDateTime, utcnow

logger = logging.getLogger(__name__)

__all__ = ["Refusal", "RefusalStore", "make_refusal_recorder"]


class Refusal(Base):
    """One thing the listener refused."""

    __tablename__ = "dicom_refusals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(16))  # association | context | instance
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    address: Mapped[str] = mapped_column(String(64), default="")
    what: Mapped[str] = mapped_column(Text)  # e.g. "MR Image Storage", "instance 1.2.3"
    why: Mapped[str] = mapped_column(Text)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer)  # the DICOM status answered

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at, "kind": self.kind, "calling_ae": self.calling_ae,
            "called_ae": self.called_ae, "address": self.address, "what": self.what,
            "why": self.why, "series_instance_uid": self.series_instance_uid,
            "status": self.status,
        }


class RefusalStore:
    """Typed access to ``dicom_refusals``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, **values: Any) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(Refusal(at=utcnow(), **values))

    def list(self, *, limit: int = 100, offset: int = 0,
             since: dt.datetime | None = None) -> builtins.list[Refusal]:
        query = select(Refusal)
        if since is not None:
            query = query.where(Refusal.at >= since)
        query = query.order_by(Refusal.at.desc(), Refusal.id.desc()).limit(limit).offset(offset)
        with Session(self.engine) as session:
            return builtins.list(session.scalars(query))

    def counts_by_kind(self) -> dict[str, int]:
        with Session(self.engine) as session:
            rows = session.execute(select(Refusal.kind, func.count(Refusal.id))
                                   .group_by(Refusal.kind))
            return {str(kind): int(n) for kind, n in rows}


def make_refusal_recorder(
    engine: Engine, notify: Callable[[dict[str, Any]], None] | None = None
) -> Callable[[dict[str, Any]], None]:
    """``record(detail)`` for the listener: a row per refusal; a database problem is logged,
    never raised into the association. ``notify(detail)`` (``common.notify.refusal_notifier``)
    queues the webhooks."""
    store = RefusalStore(engine)
    columns = {"kind", "calling_ae", "called_ae", "address", "what", "why",
               "series_instance_uid", "status"}

    def record(detail: dict[str, Any]) -> None:
        try:
            store.record(**{key: value for key, value in detail.items() if key in columns})
        except Exception:
            logger.exception("refusal could not be recorded: %s %s", detail.get("kind"),
                             detail.get("why"))
        if notify is not None:
            notify(detail)

    return record
