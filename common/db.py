"""The SQLAlchemy engine, declarative base and column types shared by every table of rtcontour.

Tables live in ``common.jobstore``, ``common.audit`` and ``common.auth``; ``common.schema``
creates them.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any

from sqlalchemy import URL, DateTime, Engine, TypeDecorator, create_engine, event, inspect, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase

from rtcontour.common.errors import ConfigurationError
from rtcontour.common.settings import Settings

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


def check_connection(engine: Engine) -> None:
    """Connect once, as every process does at start (``common.schema.create_schema``).

    A database that cannot be used as configured (missing, refusing the user, unreachable) is
    a ``ConfigurationError`` whose sentence says why and what to do, never with the password.
    """
    try:
        with engine.connect():
            pass
    except OperationalError as error:
        raise ConfigurationError(connection_problem(engine.url, error)) from error


def connection_problem(url: URL, error: Exception) -> str:
    """One sentence for a failed first connection to ``url`` (the password left out)."""
    message = str(getattr(error, "orig", None) or error)
    fatal = re.search(r"FATAL:\s+(.+)", message)
    first_line = message.splitlines()[0] if message else type(error).__name__
    detail = fatal.group(1).strip() if fatal else first_line.rsplit("failed: ", 1)[-1]
    if url.get_backend_name() == "sqlite":
        return (
            f"cannot open the SQLite database {url.database} ({detail}): is RTCONTOUR_DATA_DIR "
            "a folder this user may write?"
        )
    host, port, name = url.host or "localhost", url.port or 5432, url.database
    where = f"{host}:{port}"
    if re.search(r'database "[^"]+" does not exist', message):
        user = f" -U {url.username}" if url.username else ""
        return (
            f"database {name} does not exist on {where}: create it with "
            f"`createdb -h {host} -p {port}{user} {name}` (rtcontour creates its tables itself "
            "at start), or correct RTCONTOUR_DATABASE_URL"
        )
    if re.search(r'role "[^"]+" does not exist|password authentication failed|pg_hba', message):
        return (
            f"PostgreSQL on {where} refused the connection to database {name} ({detail}): "
            "check the user and password in RTCONTOUR_DATABASE_URL"
        )
    if re.search(r"refused|resolve host|translate host|timeout|timed out|No route", message):
        return (
            f"cannot reach PostgreSQL on {where} ({detail}): is it running there, and is "
            "RTCONTOUR_DATABASE_URL right?"
        )
    return f"cannot connect to {url.render_as_string(hide_password=True)}: {detail}"


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
