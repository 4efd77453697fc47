"""Creates and upgrades rtcontour's tables (every module that defines tables imported here).

Schema changes are additive: missing tables are created, missing nullable columns added
(``common.db.add_missing_columns``), and data that moved to a new table is copied once
(``migrate_rtstruct_columns``: the RTSTRUCT columns of ``jobs`` became ``job_outputs`` rows).
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, inspect, text

from rtcontour.common import (  # noqa: F401 - each registers its tables
    audit,
    auth,
    jobstore,
    notify,
    pulls,
    refusals,
    route_models,
)
from rtcontour.common.db import Base, add_missing_columns, check_connection

logger = logging.getLogger(__name__)

__all__ = ["create_schema", "migrate_rtstruct_columns"]


def create_schema(engine: Engine) -> None:
    """Create every table that does not exist yet and bring existing ones up to date.

    The database itself must exist: one that is missing or cannot be reached is a
    ``ConfigurationError`` with a sentence (``common.db.check_connection``).
    """
    check_connection(engine)
    Base.metadata.create_all(engine)
    add_missing_columns(engine)
    migrate_rtstruct_columns(engine)


def migrate_rtstruct_columns(engine: Engine) -> int:
    """Copy the RTSTRUCT of jobs written before ``job_outputs`` existed into that table.

    Databases of earlier releases kept one RTSTRUCT per job in ``jobs.rtstruct_path``,
    ``rtstruct_sop_instance_uid`` and ``structures``; those columns stay (schema changes are
    additive) but are no longer read. Idempotent; returns how many rows were copied.
    """
    columns = {column["name"] for column in inspect(engine).get_columns("jobs")}
    if "rtstruct_path" not in columns:
        return 0
    summary = "j.structures" if "structures" in columns else "NULL"
    # The only interpolation is one of two fixed expressions (no outside value reaches the SQL).
    statement = text(
        "INSERT INTO job_outputs (job_id, kind, sop_instance_uid, path, summary, created_at) "  # noqa: S608, E501
        f"SELECT j.id, 'RTSTRUCT', j.rtstruct_sop_instance_uid, j.rtstruct_path, {summary}, "
        "COALESCE(j.finished_at, j.updated_at, j.created_at) FROM jobs j "
        "WHERE j.rtstruct_path IS NOT NULL AND j.rtstruct_sop_instance_uid IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM job_outputs o WHERE o.job_id = j.id "
        "AND o.kind = 'RTSTRUCT')"
    )
    with engine.begin() as connection:
        copied = int(connection.execute(statement).rowcount or 0)
    if copied:
        logger.warning("database upgraded: %d RTSTRUCT record(s) moved to job_outputs", copied)
    return copied
