"""The SQLAlchemy engine, declarative base and column types shared by every table of rtcontour.

Tables live in ``common.jobstore``, ``common.audit`` and ``common.auth``; ``common.schema``
creates them.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import DateTime, Engine, TypeDecorator, create_engine, event, inspect, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase

from common.settings import Settings

logger = logging.getLogger(__name__)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every database (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the job store stores UTC only")
        value = value.astimezone(dt.UTC)
        # SQLite compares datetimes as text: store them all in one (naive UTC) form.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    """Declarative base of all rtcontour tables (jobs, users, tokens, audit)."""


def make_engine(settings: Settings) -> Engine:
    """Build the engine for ``settings``; SQLite (the embedded default) gets WAL and a timeout."""
    url = settings.effective_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def add_missing_columns(engine: Engine) -> list[str]:
    """Add nullable columns that a newer release defines but an existing table lacks.

    rtcontour's schema only ever grows by nullable columns, for which ``ALTER TABLE ... ADD
    COLUMN`` is the whole migration on SQLite and PostgreSQL alike (no Alembic needed).
    Returns ``table.column`` for each column added.
    """
    added = []
    inspector = inspect(engine)
    for table in Base.metadata.sorted_tables:
        existing = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in existing:
                continue
            if not column.nullable:
                raise RuntimeError(f"table {table.name} lacks the required column {column.name}")
            kind = column.type.compile(dialect=engine.dialect)
            try:
                with engine.begin() as connection:
                    connection.execute(
                        text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
                    )
            except DBAPIError:
                # another process starting at the same moment may have added it first
                now = {c["name"] for c in inspect(engine).get_columns(table.name)}
                if column.name not in now:
                    raise
                continue
            added.append(f"{table.name}.{column.name}")
            logger.warning("database upgraded: column %s.%s added", table.name, column.name)
    return added
