"""The retention policy: files of finished jobs are deleted ``retention_days`` after they end.

A done or failed job keeps its CT instances (``spool/jobs/<job_id>/``) and archived outputs
(``archive/<job_id>/``) until then, so clinicians can download and administrators can retry;
afterwards both folders are deleted, the job row is marked ``purged_at`` and an audit entry
``job.files_purged`` is written. The job record, its timings and the audit trail stay.
``send_failed`` jobs are never purged: their RTSTRUCT still awaits delivery. A sweep cut
short between marking a job and deleting its folders is finished by the next one.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from rtcontour.common import audit
from rtcontour.common.jobstore import Job, JobStore, utcnow
from rtcontour.common.settings import Settings, job_folder

__all__ = ["PurgeReport", "purge_expired"]

logger = logging.getLogger(__name__)

# A job marked purged this long ago whose folders remain was left by an interrupted sweep.
RESUME_AFTER = dt.timedelta(minutes=30)
JOB_ID = re.compile(r"[0-9a-f]{32}")  # JobStore ids: uuid4().hex


@dataclass(frozen=True)
class PurgeReport:
    jobs: int
    bytes_freed: int


def _size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:  # deleted meanwhile by another sweep
            continue
    return total


def _job_folders(settings: Settings, job: Job) -> list[Path]:
    """The job's spool and archive folders, only where they lie inside rtcontour's own trees
    (a corrupted ``spool_dir`` value must never make the sweep delete anything else)."""
    candidates = [Path(job.spool_dir) if job.spool_dir else job_folder(settings, job.id),
                  settings.archive_dir / job.id]
    roots = [settings.spool_dir.resolve(), settings.archive_dir.resolve()]
    folders = []
    for folder in candidates:
        resolved = folder.resolve()
        if not any(resolved.is_relative_to(root) and resolved != root for root in roots):
            logger.error("job %s: %s is outside the spool and archive; not deleted", job.id, folder)
            continue
        folders.append(resolved)
    return folders


def _delete_job_files(
    settings: Settings, store: JobStore, job: Job, resumed: bool
) -> int | None:
    """Delete the folders of a job marked purged and audit it; returns the bytes freed, or
    ``None`` for a resumed deletion that removed nothing.

    A resumed deletion that removes no folder (one that cannot be deleted is logged as an
    error every sweep) writes no second audit entry."""
    job_bytes = removed = 0
    for folder in _job_folders(settings, job):
        if folder.exists():
            job_bytes += _size(folder)
            shutil.rmtree(folder, ignore_errors=True)
            if folder.exists():
                logger.error("job %s: %s could not be deleted entirely", job.id, folder)
            else:
                removed += 1
    if resumed and not removed:
        return None
    detail: dict[str, object] = {"bytes": job_bytes, "retention_days": settings.retention_days}
    if resumed:
        detail["resumed"] = True
    audit.record(store.engine, audit.JOB_FILES_PURGED, "retention", detail, job_id=job.id)
    return job_bytes


def _interrupted_purges(settings: Settings, store: JobStore, now: dt.datetime) -> list[Job]:
    """Jobs marked purged over ``RESUME_AFTER`` ago whose folders are still on disk: an
    earlier sweep stopped between marking and deleting (younger marks may belong to a sweep
    still running on another worker). Only folders present are looked up, so the cost follows
    the retention window, not the history."""
    names = {
        folder.name
        for root in (settings.spool_dir / "jobs", settings.archive_dir)
        if root.is_dir()
        for folder in root.iterdir()
        if folder.is_dir() and JOB_ID.fullmatch(folder.name)
    }
    return store.purged_among(names, marked_before=now - RESUME_AFTER) if names else []


def purge_expired(
    settings: Settings, store: JobStore, now: dt.datetime | None = None, batch: int = 100
) -> PurgeReport:
    """Delete the files of every done/failed job that finished over ``retention_days`` ago,
    and finish the deletions an interrupted sweep left behind."""
    if settings.retention_days <= 0:
        return PurgeReport(0, 0)
    cutoff = (now or utcnow()) - dt.timedelta(days=settings.retention_days)
    jobs = freed = 0
    try:
        for job in _interrupted_purges(settings, store, now or utcnow()):
            logger.warning("job %s: marked purged but its files remain; deleting them now",
                           job.id)
            job_bytes = _delete_job_files(settings, store, job, resumed=True)
            if job_bytes is not None:
                jobs, freed = jobs + 1, freed + job_bytes
    except Exception:  # the expired jobs below must still be purged
        logger.exception("retention: finishing interrupted deletions failed")
    while True:
        marked = store.mark_expired_for_purge(cutoff, limit=batch)
        for job in marked:
            freed += _delete_job_files(settings, store, job, resumed=False) or 0
            jobs += 1
        if len(marked) < batch:
            break
    if jobs:
        logger.info("retention: deleted the files of %d job(s) finished before %s (%.1f MB)",
                    jobs, cutoff.isoformat(timespec="seconds"), freed / 1e6)
    return PurgeReport(jobs, freed)
