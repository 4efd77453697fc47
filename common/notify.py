"""Webhook notifications: when something needs a person, rtcontour POSTs JSON to URLs.

Events (``EVENTS``): a job ``failed``, ended ``send_failed`` or waits for a clinician's review
(``awaiting_review``), and the DICOM listener ``refused`` something. The URLs are the global
``RTCONTOUR_NOTIFY_WEBHOOKS`` plus the job's route's ``notify`` (looked up when the event
happens, so a corrected URL is used from then on).

Nothing here blocks the pipeline: ``NotificationStore.notify`` only adds one row per URL to the
``notifications`` table (an outbox); a ``NotificationDispatcher`` thread (started with the
worker's recovery sweep) POSTs the due rows, each claimed by a conditional update so that two
workers never deliver one row twice. A delivery answered 2xx is ``delivered``; anything else is
tried again after ``notify_backoff_s * 2**(attempt-1)`` seconds, until ``notify_attempts``
attempts, then ``failed`` (listed over ``GET /api/notifications`` and on the dashboard). Each
delivery and each final failure is audited (``notify.delivered``, ``notify.failed``).

The JSON names the event, job id, state, route, reason, calling AE and a link to the job's
page (``RTCONTOUR_PUBLIC_URL``); never the patient's name, ID or accession number unless
``RTCONTOUR_NOTIFY_INCLUDE_PATIENT`` is true. Example::

    {"event": "job.failed", "job_id": "3f...", "state": "failed", "route": "head-and-neck",
     "reason": "The series has a missing slice ...", "calling_ae": "TPS", "kind": "contour",
     "job_url": "https://rtcontour.clinic.local/#/jobs/3f...", "at": "2026-12-07T14:00:00Z"}
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import JSON, Engine, Integer, String, Text, func, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from rtcontour.common import audit
from rtcontour.common.db import Base, UtcDateTime, utcnow
from rtcontour.common.errors import ConfigurationError
from rtcontour.common.routes import load_routing
from rtcontour.common.settings import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "EVENTS",
    "Notification",
    "NotificationDispatcher",
    "NotificationStore",
    "job_payload",
    "post_json",
]

JOB_FAILED = "job.failed"
JOB_SEND_FAILED = "job.send_failed"
JOB_AWAITING_REVIEW = "job.awaiting_review"
DICOM_REFUSED = "dicom.refused"
EVENTS = (JOB_FAILED, JOB_SEND_FAILED, JOB_AWAITING_REVIEW, DICOM_REFUSED)
NOTIFY_DELIVERED = "notify.delivered"  # audit events
NOTIFY_FAILED = "notify.failed"

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
CLAIM_S = 60.0  # a claimed row is not due again for this long (a dispatcher died mid-POST)
REFUSAL_QUIET_S = 600.0  # one notification per kind of refusal and caller in this window
TIMEOUT_S = 10.0


class Notification(Base):
    """One webhook delivery: an event for one URL, with its attempts."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(32), index=True)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    # Refusals repeat (every instance of a refused series): one notification per key and window.
    dedupe_key: Mapped[str | None] = mapped_column(String(200), index=True)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "created_at": self.created_at, "event": self.event,
            "job_id": self.job_id, "url": redact_url(self.url), "state": self.state,
            "attempts": self.attempts, "next_attempt_at": self.next_attempt_at,
            "last_error": self.last_error, "delivered_at": self.delivered_at,
        }


def redact_url(url: str) -> str:
    """``url`` without a password (``https://user:secret@host`` -> ``https://user:***@host``)."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.partition("@")
    if sep and at and ":" in credentials:
        return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return url


class NotificationStore:
    """The outbox of webhook deliveries (``notifications``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def notify(
        self,
        event: str,
        payload: dict[str, Any],
        urls: Iterable[str],
        *,
        job_id: str | None = None,
        dedupe_key: str | None = None,
        quiet_s: float = REFUSAL_QUIET_S,
    ) -> int:
        """Queue ``payload`` for each URL (duplicates once); return how many rows were added.
        With ``dedupe_key``, nothing is queued if the same key was queued in ``quiet_s``."""
        if event not in EVENTS:
            raise ValueError(f"event {event!r} is not one of {', '.join(EVENTS)}")
        targets = list(dict.fromkeys(urls))
        if not targets:
            return 0
        now = utcnow()
        with Session(self.engine) as session, session.begin():
            if dedupe_key is not None:
                recent = session.scalar(
                    select(func.count(Notification.id)).where(
                        Notification.dedupe_key == dedupe_key,
                        Notification.created_at >= now - dt.timedelta(seconds=quiet_s)))
                if recent:
                    return 0
            for url in targets:
                session.add(Notification(created_at=now, event=event, job_id=job_id, url=url,
                                         payload=payload, state=PENDING, attempts=0,
                                         next_attempt_at=now, dedupe_key=dedupe_key))
        logger.info("notification %s%s queued for %d webhook(s)", event,
                    f" (job {job_id})" if job_id else "", len(targets))
        return len(targets)

    def claim_due(self, limit: int = 20) -> builtins.list[Notification]:
        """Pending rows whose time has come, each claimed for ``CLAIM_S`` by this caller."""
        now = utcnow()
        claimed = []
        with Session(self.engine) as session:
            due = builtins.list(session.scalars(
                select(Notification)
                .where(Notification.state == PENDING, Notification.next_attempt_at <= now)
                .order_by(Notification.next_attempt_at).limit(limit)))
        for row in due:
            with Session(self.engine) as session, session.begin():
                taken = session.execute(
                    update(Notification)
                    .where(Notification.id == row.id, Notification.state == PENDING,
                           Notification.next_attempt_at == row.next_attempt_at)
                    .values(next_attempt_at=now + dt.timedelta(seconds=CLAIM_S))
                    .execution_options(synchronize_session=False))
                if getattr(taken, "rowcount", 0) == 1:
                    claimed.append(row)
        return claimed

    def record_attempt(
        self, row_id: int, *, error: str | None, attempts_allowed: int, backoff_s: float
    ) -> str:
        """After one POST: delivered (``error`` None), pending with a later time, or failed
        after ``attempts_allowed`` attempts. Returns the new state."""
        now = utcnow()
        with Session(self.engine) as session, session.begin():
            row = session.get(Notification, row_id)
            if row is None:
                return FAILED
            row.attempts += 1
            if error is None:
                row.state, row.delivered_at, row.last_error = DELIVERED, now, None
            elif row.attempts >= attempts_allowed:
                row.state, row.last_error = FAILED, error
            else:
                wait_s = backoff_s * 2 ** (row.attempts - 1)
                row.last_error = error
                row.next_attempt_at = now + dt.timedelta(seconds=wait_s)
            return row.state

    def list(self, *, state: str | None = None, limit: int = 50) -> builtins.list[Notification]:
        query = select(Notification)
        if state is not None:
            query = query.where(Notification.state == state)
        query = query.order_by(Notification.created_at.desc(), Notification.id.desc())
        with Session(self.engine) as session:
            return builtins.list(session.scalars(query.limit(limit)))

    def counts_by_state(self) -> dict[str, int]:
        with Session(self.engine) as session:
            rows = session.execute(select(Notification.state, func.count(Notification.id))
                                   .group_by(Notification.state))
            return {str(state): int(n) for state, n in rows}


def job_payload(
    settings: Settings, job: Any, event: str, reason: str | None
) -> dict[str, Any]:
    """The JSON of a job's event (see the module docstring); ``job`` a ``jobstore.Job``."""
    payload: dict[str, Any] = {
        "event": event,
        "job_id": job.id,
        "state": event.removeprefix("job."),
        "route": job.route_name,
        "reason": reason,
        "calling_ae": job.calling_ae or None,
        "kind": job.kind or "contour",
        "job_url": job_url(settings, job.id),
        "at": utcnow().isoformat().replace("+00:00", "Z"),
    }
    if settings.notify_include_patient:
        payload.update(patient_id=job.patient_id, patient_name=job.patient_name,
                       accession_number=job.accession_number)
    return payload


def job_url(settings: Settings, job_id: str) -> str | None:
    """The job's page on the dashboard, when ``RTCONTOUR_PUBLIC_URL`` says where it is."""
    if not settings.public_url:
        return None
    return f"{settings.public_url.rstrip('/')}/#/jobs/{job_id}"


def post_json(url: str, payload: dict[str, Any], timeout_s: float = TIMEOUT_S) -> str | None:
    """POST ``payload`` as JSON; None when answered 2xx, else a sentence saying what went
    wrong (the status, or why nothing answered)."""
    body = json.dumps(payload, default=str).encode()
    request = urllib.request.Request(url, data=body, method="POST",  # noqa: S310 - http(s) only
                                     headers={"Content-Type": "application/json",
                                              "User-Agent": "rtcontour-notify"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            status = int(response.status)
    except urllib.error.HTTPError as error:
        return f"{redact_url(url)} answered HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        why = getattr(error, "reason", error)
        return f"{redact_url(url)} was not reachable ({why})"
    if 200 <= status < 300:
        return None
    return f"{redact_url(url)} answered HTTP {status}"


class NotificationDispatcher:
    """Delivers the outbox's due notifications every ``interval_s`` in a thread (see the
    module docstring). ``post(url, payload)`` is injectable for tests."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        interval_s: float = 1.0,
        post: Callable[[str, dict[str, Any]], str | None] = post_json,
    ) -> None:
        self.settings = settings
        self.store = NotificationStore(engine)
        self.engine = engine
        self.interval_s = interval_s
        self._post = post
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)

    def start(self) -> NotificationDispatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=TIMEOUT_S + 5)

    def deliver_due(self) -> int:
        """POST every due notification once; return how many were tried."""
        rows = self.store.claim_due()
        for row in rows:
            error = self._post(row.url, row.payload)
            state = self.store.record_attempt(
                row.id, error=error, attempts_allowed=self.settings.notify_attempts,
                backoff_s=self.settings.notify_backoff_s)
            detail = {"event": row.event, "url": redact_url(row.url), "attempt": row.attempts + 1,
                      "notification_id": row.id}
            if state == DELIVERED:
                audit.record(self.engine, NOTIFY_DELIVERED, "notifier", detail, job_id=row.job_id)
            elif state == FAILED:
                logger.warning("notification %d (%s) gave up: %s", row.id, row.event, error)
                audit.record(self.engine, NOTIFY_FAILED, "notifier", {**detail, "error": error},
                             job_id=row.job_id)
            else:
                logger.info("notification %d (%s) will be tried again: %s", row.id, row.event,
                            error)
        return len(rows)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:
                logger.exception("notification delivery failed (will retry)")
            self._stop.wait(self.interval_s)


def refusal_notifier(
    settings: Settings, engine: Engine
) -> Callable[[dict[str, Any]], None] | None:
    """For the listener's refusals recorder: queue a ``dicom.refused`` notification per kind
    of refusal and caller (once in ``REFUSAL_QUIET_S``); None without global webhooks."""
    if not settings.notify_webhooks:
        return None
    store = NotificationStore(engine)

    def notify(detail: dict[str, Any]) -> None:
        payload = {
            "event": DICOM_REFUSED,
            "kind": detail.get("kind"),
            "calling_ae": detail.get("calling_ae") or None,
            "address": detail.get("address") or None,
            "what": detail.get("what"),
            "reason": detail.get("why"),
            "series_instance_uid": detail.get("series_instance_uid"),
            "refusals_url": (f"{settings.public_url.rstrip('/')}/api/refusals"
                             if settings.public_url else None),
            "at": utcnow().isoformat().replace("+00:00", "Z"),
        }
        key = "|".join(str(detail.get(k) or "") for k in ("kind", "calling_ae", "why"))[:200]
        try:
            store.notify(DICOM_REFUSED, payload, settings.notify_webhooks, dedupe_key=key)
        except Exception:
            logger.exception("refusal notification could not be queued")

    return notify


def route_webhooks(settings: Settings, route_name: str | None) -> list[str]:
    """The ``notify`` URLs of the route named ``route_name`` in today's routes file."""
    if route_name is None or settings.routes_file is None:
        return []
    try:
        route = load_routing(settings).route(route_name)
    except ConfigurationError as error:
        logger.warning("route %s's webhooks unknown: %s", route_name, error)
        return []
    return list(route.notify or []) if route is not None else []


def notify_job(
    settings: Settings, engine: Engine, job: Any, event: str, reason: str | None,
    route_urls: Sequence[str] | None = None,
) -> int:
    """Queue ``event`` of ``job`` for the global webhooks and its route's (``route_urls``;
    None: looked up in the routes file); never raises (a notification must not change a
    job's outcome)."""
    try:
        urls = [*settings.notify_webhooks,
                *(route_webhooks(settings, job.route_name) if route_urls is None else route_urls)]
        if not urls:
            return 0
        return NotificationStore(engine).notify(
            event, job_payload(settings, job, event, reason), urls, job_id=job.id)
    except Exception:
        logger.exception("job %s: notification %s could not be queued", job.id, event)
        return 0
