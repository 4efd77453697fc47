"""Pulls: series a user asked rtcontour to retrieve from the PACS (``POST /api/pull``,
``rtcontour pull``), kept so that the job the retrieved series becomes says who pulled it.

A pull row is written before the retrieve starts, naming the series chosen; the intake
(``service.intake``), when that series becomes a job, ``claim``s the row: the job records
``received_via="pull"`` and ``requested_by``, the row the job's id. Rows hold the query a user
typed (a patient ID or accession number: the database holds patients anyway, logs never do).
"""

from __future__ import annotations

import builtins
import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import JSON, Engine, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from rtcontour.common.db import Base, UtcDateTime, utcnow

__all__ = ["CLAIM_WINDOW", "Pull", "PullState", "PullStore"]

# A retrieved series becomes a job after the listener's quiet period; a pull older than this
# that never became one is not claimed by a later, unrelated arrival of the same series.
CLAIM_WINDOW = dt.timedelta(hours=24)


class PullState(enum.StrEnum):
    RETRIEVING = "retrieving"
    RETRIEVED = "retrieved"  # the PACS sent every instance; the job follows the quiet period
    FAILED = "failed"


class Pull(Base):
    """One retrieve of one series from the PACS, on a user's request."""

    __tablename__ = "pulls"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    requested_by: Mapped[str] = mapped_column(String(64))
    query: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # what the user asked
    pacs: Mapped[str] = mapped_column(String(128))  # AET@host:port
    retrieve: Mapped[str] = mapped_column(String(8))  # move | get
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=PullState.RETRIEVING.value)
    retrieved_instances: Mapped[int | None] = mapped_column(Integer)
    failed_instances: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    job_id: Mapped[str | None] = mapped_column(String(32), index=True)


class PullStore:
    """Typed access to ``pulls``; every method is one short transaction; returned rows are
    detached snapshots."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, *, requested_by: str, query: dict[str, Any], pacs: str, retrieve: str,
               study_instance_uid: str, series_instance_uid: str, series_description: str,
               expected_instances: int | None) -> Pull:
        pull = Pull(id=uuid.uuid4().hex, created_at=utcnow(), requested_by=requested_by[:64],
                    query=query, pacs=pacs[:128], retrieve=retrieve,
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                    series_description=series_description[:64],
                    expected_instances=expected_instances, state=PullState.RETRIEVING.value)
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            session.add(pull)
        return pull

    def finish(self, pull_id: str, *, retrieved: int, failed: int, reason: str | None) -> None:
        """The retrieve ended: ``retrieved`` if ``reason`` is None, else failed with it."""
        state = PullState.RETRIEVED if reason is None else PullState.FAILED
        with Session(self.engine) as session, session.begin():
            session.execute(update(Pull).where(Pull.id == pull_id).values(
                state=state.value, retrieved_instances=retrieved, failed_instances=failed,
                reason=reason, finished_at=utcnow()))

    def claim(self, series_instance_uid: str, job_id: str) -> Pull | None:
        """The newest recent pull of the series not yet linked to a job, now linked to
        ``job_id``; None when the series was not pulled (pushed by a TPS)."""
        since = utcnow() - CLAIM_WINDOW
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            pull = session.scalar(
                select(Pull).where(Pull.series_instance_uid == series_instance_uid,
                                   Pull.job_id.is_(None), Pull.created_at >= since)
                .order_by(Pull.created_at.desc()).limit(1).with_for_update())
            if pull is None:
                return None
            pull.job_id = job_id
            return pull

    def get(self, pull_id: str) -> Pull | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.get(Pull, pull_id)

    def list(self, *, limit: int = 50) -> builtins.list[Pull]:
        with Session(self.engine, expire_on_commit=False) as session:
            return builtins.list(session.scalars(
                select(Pull).order_by(Pull.created_at.desc()).limit(limit)))
