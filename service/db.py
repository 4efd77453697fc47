"""The SQLAlchemy engine and declarative base shared by every table of rtcontour."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase

from service.settings import Settings


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


def create_schema(engine: Engine) -> None:
    """Create every table that does not exist yet (all modules defining tables imported first)."""
    import importlib.util

    import service.jobstore  # noqa: F401 - registers the tables on Base

    if importlib.util.find_spec("service.auth") is not None:  # written by the API work
        import service.auth  # noqa: F401

    Base.metadata.create_all(engine)
