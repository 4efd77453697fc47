"""The seam between the DICOM listener and the job queue: a complete series becomes a job.

``Intake`` (a ``SeriesSink``) turns each complete series into a job:

1. ``JobStore.create_or_merge_for_series``: a series re-sent while its job is received,
   queued or running merges into that job; once the job finished (done, failed,
   send_failed) a new job is made. If the series' latest job failed for missing instances
   (a missing slice, too few slices) and its files are still held, the new job starts with
   them (hard links), so a late slice completes the series instead of failing on its own.
2. Each instance file moves from the arrival folder into ``spool/jobs/<job_id>/`` with
   ``os.replace`` (atomic per file, same filesystem); files are named by SOP Instance UID,
   so an instance sent twice is stored once.
3. The job becomes ``queued`` and its id is enqueued.

Merging into a *running* job: the new files appear atomically in the job folder, and the
merge bumps ``Job.generation``; the worker compares it with the generation it loaded before
archiving and again after sending and, if it changed, runs the job's pipeline again from
loading (after sending: the delivery records are cleared so the rebuilt RTSTRUCT is sent
again), so the final RTSTRUCT references every instance received before the job ended.

A failed enqueue (broker down) is logged and left to the recovery sweep: the job is in the
store, so nothing is lost.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pydicom

from rtcontour.common.audit import make_recorder
from rtcontour.common.db import utcnow
from rtcontour.common.jobstore import JobState, JobStore
from rtcontour.common.pulls import PullStore
from rtcontour.common.queue import enqueue_job
from rtcontour.common.route_models import effective_models
from rtcontour.common.routes import (
    RouteDecision,
    RoutingTable,
    first_instance,
    match_keywords,
    series_attributes,
)
from rtcontour.common.settings import Settings, job_folder
from rtcontour.service.journal import fsync_dir

logger = logging.getLogger(__name__)

Enqueue = Callable[[str], None]
AuditRecorder = Callable[[str, dict[str, Any]], None]

JOB_CREATED_EVENT = "job.created"
JOB_IGNORED_EVENT = "job.ignored"
# A series' late instances merged with the instances of its job that failed for lacking them.
JOB_COMPLETED_LATE_EVENT = "job.completed_late"
JOB_PULLED_EVENT = "job.pulled"  # the job of a series a user pulled from the PACS


@dataclass(frozen=True)
class SeriesArrival:
    """A series the listener received completely, spooled in ``folder``.

    ``folder`` holds one ``<SOPInstanceUID>.dcm`` per instance; the identifiers are DICOM UIDs
    and AE titles only (no patient identifiers, so this value may be logged).
    """

    series_instance_uid: str
    study_instance_uid: str
    calling_ae: str
    modality: str
    series_description: str
    folder: Path
    n_instances: int
    called_ae: str = ""  # the AE title the sender addressed (routing rules may match it)
    # Seconds from the release of the last association that carried the series to this
    # hand-over (the quiet period as it was served); None when unknown (recovered at start).
    quiet_s: float | None = None
    # "" by C-STORE; "dicomweb" by STOW-RS, ``calling_ae`` then being the API user's name.
    origin: str = ""


class SeriesSink(Protocol):
    """Receives complete series from the listener; must return quickly (no inference here)."""

    def series_complete(self, arrival: SeriesArrival) -> None: ...


class Intake:
    """Creates or merges the job of each complete series and enqueues it.

    ``enqueue(job_id)`` publishes the job (default: ``common.queue.enqueue_job`` on
    ``settings``' broker); ``audit(event, detail)`` records "job.created"
    (default: ``common.audit.make_recorder`` on the store's engine).
    """

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        enqueue: Enqueue | None = None,
        audit: AuditRecorder | None = None,
        routing: RoutingTable | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.enqueue = enqueue or _default_enqueue(settings)
        self.audit = audit if audit is not None else _default_audit(store)
        self.routing = routing if routing is not None else RoutingTable.implicit()
        self.pulls = PullStore(store.engine)

    def decide(
        self, arrival: SeriesArrival, first: pydicom.Dataset | None = None
    ) -> RouteDecision:
        """The routing decision for ``arrival`` (from its first instance and AE titles)."""
        attributes = series_attributes(
            first,
            calling_ae=arrival.calling_ae,
            called_ae=arrival.called_ae,
            keywords=match_keywords(self.routing),
        )
        return self.routing.decide(attributes)

    def series_complete(self, arrival: SeriesArrival) -> None:
        started, now = time.perf_counter(), utcnow()
        released_at = (now - dt.timedelta(seconds=arrival.quiet_s)
                       if arrival.quiet_s is not None else None)
        first = first_instance(arrival.folder)
        decision = self.decide(arrival, first)
        route = decision.route
        contour = decision.action == "contour"
        # A structure set (from the TPS, approved) is a dose job; a CT series a contour job.
        dose = arrival.modality == "RTSTRUCT"
        # a contour route's model as an admin last switched it (common.route_models)
        model = ((route.dose_model if dose else effective_models(self.store.engine, route).model)
                 if route is not None else None)
        result = self.store.create_or_merge_for_series(
            series_instance_uid=arrival.series_instance_uid,
            study_instance_uid=arrival.study_instance_uid,
            calling_ae=arrival.calling_ae[:16],  # an API user's name may be longer
            modality=arrival.modality,
            series_description=arrival.series_description,
            n_instances=arrival.n_instances,
            route_name=decision.route_name,
            model_request=model if contour else None,
            destinations=route.destinations if route is not None and contour else None,
            requested_outputs=(route.outputs if route is not None and contour and not dose
                               else None),
            kind="dose" if dose else "contour",
            prescriptions_gy=route.prescriptions if route is not None and dose else None,
        )
        job = result.job
        # A job still "received" is one whose intake stopped half-way (the listener died while
        # moving its files; the journal re-armed the series): finish creating it, as if new.
        created = result.created or job.state == JobState.RECEIVED
        if created:
            self.store.record_identity(job.id, **_identity(first),
                                       review_required=bool(route and route.review == "required"
                                                            and contour and not dose))
        if created:
            self._record_origin(job.id, arrival)
        folder = job_folder(self.settings, job.id)
        if created and contour and not dose:  # before the move: what was just sent wins
            self._take_held_instances(job.id, arrival, folder)
        moved = _move_instances(arrival.folder, folder)
        n_instances = sum(1 for _ in folder.glob("*.dcm"))
        self.store.set_spool_dir(job.id, str(folder), n_instances)
        if created and not contour:
            self.store.transition(job.id, JobState.IGNORED, reason=decision.reason)
            logger.info(
                "job %s: series %s from %s ignored (%s); nothing is contoured or sent",
                job.id,
                arrival.series_instance_uid,
                arrival.calling_ae,
                decision.reason,
            )
            self._audit(
                JOB_IGNORED_EVENT,
                {
                    "job_id": job.id,
                    "series_instance_uid": arrival.series_instance_uid,
                    "calling_ae": arrival.calling_ae,
                    "route": decision.route_name,
                    "reason": decision.reason,
                },
            )
            return
        if created:
            logger.info(
                "job %s %s for series %s from %s (%d instances, route %s)",
                job.id,
                "created" if result.created else "finished after a restart",
                arrival.series_instance_uid,
                arrival.calling_ae,
                n_instances,
                decision.route_name,
            )
            self._audit(
                JOB_CREATED_EVENT,
                {
                    "job_id": job.id,
                    "series_instance_uid": arrival.series_instance_uid,
                    "calling_ae": arrival.calling_ae,
                    "n_instances": n_instances,
                },
            )
        else:
            # Bumped again now the files are in place: a worker that restarted on the first
            # bump and loaded a partial folder will see this and load again.
            self.store.bump_generation(job.id)
            logger.info(
                "series %s re-sent: %d instances merged into %s job %s (now %d instances)",
                arrival.series_instance_uid,
                moved,
                job.state,
                job.id,
                n_instances,
            )
        if created:
            self.store.record_arrival(job.id, released_at=released_at, quiet_s=arrival.quiet_s,
                                      intake_s=time.perf_counter() - started)
        if job.state == JobState.RECEIVED:
            self.store.mark_queued(job.id)
        self.store.touch(job.id)
        try:
            self.enqueue(job.id)
        except Exception:
            # The job is safe in the store; the recovery sweep enqueues it again.
            logger.exception(
                "job %s: enqueue failed; the recovery sweep will enqueue it again", job.id
            )

    def _record_origin(self, job_id: str, arrival: SeriesArrival) -> None:
        """A series sent by STOW-RS names its API user; one a user pulled from the PACS
        (``common.pulls``, whatever AE title the PACS sent it from) names who pulled it."""
        if arrival.origin == "dicomweb":
            self.store.record_origin(job_id, received_via="dicomweb",
                                     requested_by=arrival.calling_ae)
            return
        pull = self.pulls.claim(arrival.series_instance_uid, job_id)
        if pull is not None:
            self.store.record_origin(job_id, received_via="pull", requested_by=pull.requested_by)
            self._audit(JOB_PULLED_EVENT, {"job_id": job_id, "pull_id": pull.id,
                                           "series_instance_uid": arrival.series_instance_uid,
                                           "pulled_by": pull.requested_by})

    def _take_held_instances(self, job_id: str, arrival: SeriesArrival, folder: Path) -> None:
        """A series whose latest job failed for missing instances (a missing slice, too few
        slices) and whose files are still held: that job's instances join the new job (its
        own record stays as it ended), so a late slice, or the series sent again, completes
        it rather than failing alone. Any other failure is never merged: a corrected series
        sent again must not get back what was wrong with the first."""
        failed = self.store.held_incomplete(arrival.series_instance_uid, besides=job_id)
        if failed is None or failed.modality != arrival.modality or not failed.spool_dir:
            return
        linked = link_instances(Path(failed.spool_dir), folder)
        if not linked:
            return
        self.store.add_note(job_id, f"Completed with the {linked} instances held from job "
                                    f"{failed.id}, which failed for missing instances.")
        logger.info("job %s: %d instances of failed job %s (series %s, missing instances) "
                    "merged with the %d just received", job_id, linked, failed.id,
                    arrival.series_instance_uid, arrival.n_instances)
        self._audit(JOB_COMPLETED_LATE_EVENT, {"job_id": job_id, "failed_job_id": failed.id,
                                               "series_instance_uid": arrival.series_instance_uid,
                                               "n_held": linked})

    def _audit(self, event: str, detail: dict[str, Any]) -> None:
        if self.audit is None:
            return
        try:
            self.audit(event, detail)
        except Exception:
            logger.exception("audit record %s failed (job continues)", event)


def _default_enqueue(settings: Settings) -> Enqueue:
    def enqueue(job_id: str) -> None:
        enqueue_job(settings, job_id)

    return enqueue


def _default_audit(store: JobStore) -> AuditRecorder:
    return make_recorder(store.engine, actor="intake")


def _identity(first: pydicom.Dataset | None) -> dict[str, str | None]:
    """Who the patient is, from the series' first instance (stored, never logged)."""

    def text(keyword: str, limit: int) -> str | None:
        value = first.get(keyword) if first is not None else None
        return str(value).strip()[:limit] or None if value is not None else None

    return {
        "patient_name": text("PatientName", 64),
        "patient_id": text("PatientID", 64),
        "accession_number": text("AccessionNumber", 16),
        "study_date": text("StudyDate", 8),
        "study_description": text("StudyDescription", 64),
    }


def link_instances(source: Path, target: Path) -> int:
    """Hard-link (copy across file systems) each ``*.dcm`` of ``source`` missing from
    ``target`` into it; return how many. ``source`` is left as it was (its job's record and
    retention are its own; a link outlives the purge of ``source``)."""
    if not source.is_dir():
        return 0
    if not target.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        fsync_dir(target.parent)
    linked = 0
    for path in sorted(source.glob("*.dcm")):
        destination = target / path.name
        if destination.exists():
            continue
        try:
            os.link(path, destination)
        except FileExistsError:
            continue
        except OSError:
            partial = destination.with_suffix(".part")
            shutil.copy2(path, partial)
            os.replace(partial, destination)
        linked += 1
    fsync_dir(target)
    return linked


def _move_instances(source: Path, target: Path) -> int:
    """Move every ``*.dcm`` of ``source`` into ``target`` (atomic per file); return how many."""
    if not target.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        fsync_dir(target.parent)
    moved = 0
    for path in sorted(source.glob("*.dcm")):
        os.replace(path, target / path.name)
        moved += 1
    # The moves outlive a power cut before the journal forgets the series.
    fsync_dir(target)
    fsync_dir(source)
    try:
        source.rmdir()
    except OSError:
        logger.warning("arrival folder %s not empty after the move; left in place", source)
    return moved
