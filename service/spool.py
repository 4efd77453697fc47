"""The listener's spool: atomic instance files, and the tracker that turns them into series.

Layout (docs/ARCHITECTURE.md, "Listener -> intake seam")::

    <spool_dir>/incoming/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

An instance is written to a hidden temporary file in its series folder and renamed into place
with ``os.replace``, so a reader never sees a partial ``.dcm`` file; a re-sent SOP Instance UID
replaces the earlier file atomically. UIDs are validated before they become path components.

``SeriesTracker`` remembers, for every series, each association (by a serial number the listener
assigns) that carried it. A series becomes one ``SeriesArrival`` once every such association was
released and no instance of it arrived for ``quiet_period_s``; an association that aborted marks
its series interrupted (no arrival), unless another association stores an instance of the series
afterwards and is released. With a ``SeriesJournal`` it writes down what it knows before the
instance is answered, and ``recover`` at start-up re-arms every series an earlier run had
acknowledged completely (all its associations released), so a killed listener loses none.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pydicom.uid import UID

from rtcontour.common.errors import InsufficientStorage, InvalidInstance
from rtcontour.common.routes import first_instance
from rtcontour.service.intake import SeriesArrival, SeriesSink
from rtcontour.service.journal import ABORTED, RELEASED, SeriesJournal, fsync_dir

logger = logging.getLogger(__name__)

_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")  # PS3.5 9.1
_PARTIAL_SUFFIX = ".part"
_FREE_SPACE_TTL_S = 1.0
_FREE_MARGIN = 256 * 1024 * 1024  # re-ask the file system when within this of the minimum


def checked_uid(value: object, name: str) -> str:
    """Return ``value`` as a UID string safe to use as a file name, or raise InvalidInstance."""
    text = str(value).strip("\x00 ") if value is not None else ""
    if len(text) > 64 or not _UID_PATTERN.match(text) or not UID(text).is_valid:
        raise InvalidInstance(f"{name} {text[:80]!r} is not a valid UID")
    return text


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of a received instance that the listener needs (UIDs only, no PHI)."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_description: str


class InstanceSpool:
    """Writes received instances atomically under ``<spool_dir>/incoming``.

    ``min_free_disk_bytes``: an instance is refused (``InsufficientStorage``) when writing it
    would leave less than this many bytes free on the spool's file system. ``durable``: the
    file and its folder entry are fsync'd before ``write`` returns, so an instance answered
    with Success survives a power cut (~2 ms per instance on the development machine's disk).
    """

    def __init__(
        self, spool_dir: Path, *, min_free_disk_bytes: int, durable: bool = True
    ) -> None:
        self.spool_dir = Path(spool_dir)
        self.incoming_dir = self.spool_dir / "incoming"
        self.min_free_disk_bytes = min_free_disk_bytes
        self.durable = durable
        self._folder_lock = threading.Lock()
        if not self.incoming_dir.is_dir():
            self.incoming_dir.mkdir(parents=True, exist_ok=True)
            self._sync_dir(self.spool_dir)
        self._free_lock = threading.Lock()
        self._free_estimate = 0
        self._free_checked_at = -_FREE_SPACE_TTL_S

    def series_folder(self, series_instance_uid: str) -> Path:
        return self.incoming_dir / checked_uid(series_instance_uid, "SeriesInstanceUID")

    def write(
        self, series_instance_uid: str, sop_instance_uid: str, parts: Iterable[bytes | memoryview]
    ) -> Path:
        """Write the concatenated ``parts`` as ``<series>/<sop>.dcm`` atomically; return its path.

        Raises ``InsufficientStorage`` (nothing written) when the disk is too full.
        """
        parts = list(parts)
        size = sum(len(part) for part in parts)
        folder = self.series_folder(series_instance_uid)
        final = folder / f"{checked_uid(sop_instance_uid, 'SOPInstanceUID')}.dcm"
        self._reserve(size)
        temp_name = folder / f".{final.stem}.{uuid.uuid4().hex[:12]}{_PARTIAL_SUFFIX}"
        try:
            fd = self._create(folder, temp_name)
            with open(fd, "wb", buffering=0) as stream:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        view = view[stream.write(view) :]
                if self.durable:
                    os.fsync(stream.fileno())
            os.replace(temp_name, final)
            self._sync_dir(folder)
        except OSError as exc:
            temp_name.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage(f"spool file system is full: {exc}") from exc
            raise
        except BaseException:
            temp_name.unlink(missing_ok=True)
            raise
        return final

    def _create(self, folder: Path, temp_name: Path) -> int:
        """Open ``temp_name`` for writing, creating its series folder if need be (also when the
        intake removed the folder, emptied, a moment ago)."""
        for _ in range(3):
            if not folder.is_dir():
                with self._folder_lock:  # no thread answers before the new name is synced
                    if not folder.is_dir():
                        folder.mkdir()
                        self._sync_dir(self.incoming_dir)
            try:
                return os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:
                continue  # the folder went between the check and the open: make it again
        return os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def _sync_dir(self, folder: Path) -> None:
        if self.durable:
            fsync_dir(folder)

    def _reserve(self, size: int) -> None:
        """Raise InsufficientStorage unless ``size`` bytes leave the minimum free.

        statvfs is asked at most every ``_FREE_SPACE_TTL_S`` (and whenever the estimate gets
        close to the minimum); in between, the bytes written are subtracted from its answer.
        """
        with self._free_lock:
            now = time.monotonic()
            near_minimum = self._free_estimate - size < self.min_free_disk_bytes + _FREE_MARGIN
            if near_minimum or now - self._free_checked_at > _FREE_SPACE_TTL_S:
                self._free_estimate = shutil.disk_usage(self.incoming_dir).free
                self._free_checked_at = now
            free = self._free_estimate
            if free - size < self.min_free_disk_bytes:
                raise InsufficientStorage(
                    f"spool has {free} bytes free; storing {size} more would go below the "
                    f"minimum of {self.min_free_disk_bytes}"
                )
            self._free_estimate -= size

    def sweep_partials(self) -> int:
        """Remove temporary files left by a killed listener; return how many were removed."""
        removed = 0
        for leftover in self.incoming_dir.glob(f"*/.*{_PARTIAL_SUFFIX}"):
            leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            logger.warning("removed %d partial files left in %s", removed, self.incoming_dir)
        return removed


    def sweep_stale_series(self, older_than_s: float, *, keep: frozenset[str]) -> int:
        """Delete incoming series folders (not in ``keep``) with nothing newer than
        ``older_than_s`` seconds: what aborted associations or a killed listener left behind.
        Return how many folders were deleted."""
        cutoff = time.time() - older_than_s
        deleted = 0
        for folder in self.incoming_dir.iterdir():
            if folder.name in keep or not folder.is_dir():
                continue
            try:
                newest = max(
                    [folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())]
                )
            except FileNotFoundError:
                continue
            if newest < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                logger.warning("deleted stale incomplete series %s from the spool", folder.name)
                deleted += 1
        return deleted


def _recovered_header(uid: str, folder: Path, record: dict[str, str]) -> InstanceHeader:
    """The series' header at recovery: from its first instance on disk (what decides a contour
    or a dose job), else from the journal's record."""
    ds = first_instance(folder)

    def value(keyword: str) -> str:
        found = ds.get(keyword) if ds is not None else None
        return str(found).strip() if found is not None else record.get(_RECORD_KEYS[keyword], "")

    return InstanceHeader(
        sop_instance_uid="",
        series_instance_uid=uid,
        study_instance_uid=value("StudyInstanceUID"),
        modality=value("Modality"),
        series_description=value("SeriesDescription"),
    )


_RECORD_KEYS = {"StudyInstanceUID": "study_instance_uid", "Modality": "modality",
                "SeriesDescription": "series_description"}


def count_instances(folder: Path) -> int:
    """Number of complete instance files in a series folder."""
    return sum(1 for _ in folder.glob("*.dcm"))


@dataclass
class _Association:
    """What the tracker knows of one association; ``outcome`` is None while it is open."""

    outcome: str | None = None  # "released" or "aborted"
    outcome_at: float = 0.0
    closed_at: float | None = None


@dataclass
class _Series:
    header: InstanceHeader
    calling_ae: str
    called_ae: str = ""
    carriers: set[int] = field(default_factory=set)
    last_instance_at: float = 0.0
    interrupted: bool = False
    journalled: set[str] = field(default_factory=set)  # journal markers naming its carriers
    quiet_s: float | None = None  # release of its last carrier -> hand-over (when handed over)
    origin: str = ""  # "" a C-STORE; "dicomweb" STOW-RS (calling_ae: the API user)

    def record(self) -> dict[str, str]:
        """What the journal keeps of the series (UIDs and AE titles, and "origin" for a series
        not sent by C-STORE: nothing identifies the patient)."""
        return {
            "series_instance_uid": self.header.series_instance_uid,
            "study_instance_uid": self.header.study_instance_uid,
            "modality": self.header.modality,
            "series_description": self.header.series_description,
            "calling_ae": self.calling_ae,
            "called_ae": self.called_ae,
            **({"origin": self.origin} if self.origin else {}),
        }


class SeriesTracker:
    """Groups stored instances into series and hands complete series to a ``SeriesSink``.

    Thread-safe: the listener's association threads report instances and association outcomes;
    a background thread (``start``) calls ``poll`` to emit series whose quiet period is over.
    ``outcome_grace_s``: how long after a connection closed without a release or abort having
    been reported the association is taken as aborted (pynetdicom may report the release after
    the close; lesson (a) of the design notes). ``journal``: where what the tracker knows is
    kept durably (module docs of ``service.journal``); without one a restart forgets it.
    ``release_ends_quiet``: calling AE titles (``"*"``: any) whose series are handed over as
    soon as every association that carried them was released, without waiting for the quiet
    period (``RTCONTOUR_RELEASE_ENDS_QUIET_PERIOD``; only for senders that send a whole
    series in one association, see the README).
    """

    def __init__(
        self,
        sink: SeriesSink,
        spool: InstanceSpool,
        *,
        quiet_period_s: float,
        outcome_grace_s: float = 10.0,
        retention_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        journal: SeriesJournal | None = None,
        release_ends_quiet: frozenset[str] = frozenset(),
    ) -> None:
        self._sink = sink
        self._release_ends_quiet = release_ends_quiet
        self._wake = threading.Event()  # a release that may end a quiet period: poll now
        self._journal = journal
        self._recovered_serials = itertools.count(-1, -1)  # never a serial the listener gives
        self._spool = spool
        self._quiet_period_s = quiet_period_s
        self._outcome_grace_s = outcome_grace_s
        self._clock = clock
        self._retention_s = retention_s
        self._lock = threading.Lock()
        self._associations: dict[int, _Association] = {}
        self._series: dict[str, _Series] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reports from association threads -------------------------------------------------
    def instance_stored(
        self, association: int, header: InstanceHeader, calling_ae: str, called_ae: str = "",
        origin: str = "",
    ) -> None:
        """An instance of ``header.series_instance_uid`` is in the spool (file in place).
        ``origin``: how it came when not by C-STORE ("dicomweb"; ``association`` is then one
        HTTP request, ``calling_ae`` the API user); the series' first sender decides."""
        uid = header.series_instance_uid
        with self._lock:
            series = self._series.get(uid)
            fresh = series or _Series(header=header, calling_ae=calling_ae, called_ae=called_ae,
                                      origin=origin)
            if self._journal is not None and association not in fresh.carriers:
                # On disk before the instance is answered; raising here answers a failure.
                carrier = self._journal.carrier(association)
                self._journal.opened(uid, carrier, fresh.record())
                fresh.journalled.add(carrier)
            if series is None:
                series = self._series[uid] = fresh
            self._associations.setdefault(association, _Association())
            series.carriers.add(association)
            series.last_instance_at = self._clock()
            if series.interrupted and self._journal is not None:
                journal = self._journal
                self._journaled("forgetting its aborts", uid, partial(journal.forget_aborted, uid))
            series.interrupted = False  # re-sent after an abort: the later sender decides

    def association_released(self, association: int) -> None:
        self._set_outcome(association, "released")

    def association_aborted(self, association: int) -> None:
        self._set_outcome(association, "aborted")

    def connection_closed(self, association: int) -> None:
        """The TCP connection closed; the outcome may be reported before or after this."""
        with self._lock:
            record = self._associations.get(association)
            if record is not None:
                record.closed_at = self._clock()

    def _set_outcome(self, association: int, outcome: str) -> None:
        with self._lock:
            self._set_outcome_locked(association, outcome, self._clock())

    def _set_outcome_locked(self, association: int, outcome: str, now: float) -> None:
        # Associations that stored nothing have no record and need none.
        record = self._associations.get(association)
        if record is None or record.outcome is not None:
            return
        record.outcome, record.outcome_at = outcome, now
        for uid, series in self._series.items():
            if association not in series.carriers:
                continue
            if self._journal is not None and association >= 0:
                journal, carrier = self._journal, self._journal.carrier(association)
                marker = RELEASED if outcome == "released" else ABORTED
                self._journaled(f"marking {carrier} {marker}", uid,
                                partial(journal.ended, uid, carrier, marker))
            if outcome == "aborted":
                series.carriers.discard(association)
                series.interrupted = True
            elif self._ends_quiet_on_release(series):
                self._wake.set()

    def _ends_quiet_on_release(self, series: _Series) -> bool:
        allowed = self._release_ends_quiet
        return "*" in allowed or series.calling_ae in allowed

    @staticmethod
    def _journaled(what: str, uid: str, change: Callable[[], None]) -> None:
        """A journal change after the answer was given: a failure is logged (the marker left
        behind is the state before the change)."""
        try:
            change()
        except OSError:
            logger.exception("series journal: %s for series %s failed", what, uid)

    # -- emission ------------------------------------------------------------------------
    @property
    def pending_series(self) -> int:
        with self._lock:
            return len(self._series)

    @property
    def tracked_associations(self) -> int:
        with self._lock:
            return len(self._associations)

    def poll(self, *, flush: bool = False) -> list[SeriesArrival]:
        """Emit every complete series to the sink; return the arrivals emitted.

        ``flush``: ignore the quiet period (used at shutdown, so that complete series are not
        lost with the tracker's memory).
        """
        now = self._clock()
        due: list[_Series] = []
        with self._lock:
            for serial, record in list(self._associations.items()):
                closed_long_ago = (
                    record.closed_at is not None
                    and now - record.closed_at >= self._outcome_grace_s
                )
                if record.outcome is None and closed_long_ago:
                    logger.warning("association #%d closed without release or abort", serial)
                    self._set_outcome_locked(serial, "aborted", now)
            for uid, series in list(self._series.items()):
                if any(self._associations[s].outcome is None for s in series.carriers):
                    continue
                if series.interrupted:
                    logger.warning("series %s was interrupted (association aborted); no job", uid)
                    del self._series[uid]
                    if self._journal is not None:
                        journal = self._journal
                        self._journaled("dropping it", uid, partial(journal.drop, uid))
                    continue
                if (flush or now - series.last_instance_at >= self._quiet_period_s
                        or self._ends_quiet_on_release(series)):
                    series.quiet_s = self._quiet_served(series, now)
                    due.append(series)
                    del self._series[uid]
                    if self._journal is not None:
                        journal, names = self._journal, sorted(series.journalled)
                        self._journaled("handing it over", uid,
                                        partial(journal.taking, uid, names))
            self._forget_finished_associations(now)
        arrivals = []
        for series in due:
            arrival = self._arrival(series)
            try:
                self._sink.series_complete(arrival)
            except Exception:
                logger.exception(
                    "intake failed for series %s; retrying after the quiet period",
                    arrival.series_instance_uid,
                )
                self._retry_later(series)
                continue
            if self._journal is not None:
                self._journal_taken(arrival.series_instance_uid, frozenset(series.journalled))
            logger.info(
                "series %s complete: %d instances from %s",
                arrival.series_instance_uid,
                arrival.n_instances,
                arrival.calling_ae,
            )
            arrivals.append(arrival)
        return arrivals

    def _quiet_served(self, series: _Series, now: float) -> float | None:
        """Seconds since the last of the series' associations was released (None for a series
        recovered at start: its release time was not kept)."""
        if any(serial < 0 for serial in series.carriers):
            return None
        released = [self._associations[serial].outcome_at for serial in series.carriers
                    if serial in self._associations]
        return max(0.0, now - max(released)) if released else None

    def _retry_later(self, series: _Series) -> None:
        with self._lock:
            uid = series.header.series_instance_uid
            current = self._series.get(uid)
            if current is None:
                series.last_instance_at = self._clock()
                series.carriers = {s for s in series.carriers if s in self._associations}
                self._series[uid] = series
            else:
                current.carriers |= {s for s in series.carriers if s in self._associations}
                current.journalled |= series.journalled

    def _journal_taken(self, uid: str, carriers: frozenset[str]) -> None:
        journal = self._journal
        if journal is None:
            return
        with self._lock:  # never while instance_stored writes a marker of the same series
            try:
                journal.taken(uid, carriers)
            except OSError:  # left behind, the markers are forgotten at the next start
                logger.exception("series journal: removing the markers of %s failed", uid)

    # -- start-up ------------------------------------------------------------------------
    def recover(self) -> int:
        """Re-arm what an earlier run acknowledged; return how many series were re-armed.

        Call before the listener accepts associations. A series handed to the intake when that
        run ended, or whose journalled associations were all released, becomes an arrival
        after the quiet period (as if just received) with what ``incoming/`` holds of it; one
        that an association still open or aborted then had carried (and no handed-over batch)
        stays interrupted: its files wait to be sent again or swept after the retention. One
        that the intake had wholly moved is forgotten.
        """
        if self._journal is None:
            return 0
        rearmed = 0
        now = self._clock()
        for entry in self._journal.recover():
            uid = entry.series_instance_uid
            try:
                folder = self._spool.series_folder(uid)
            except InvalidInstance:
                logger.warning("series journal: %r is not a series UID; removed", uid[:80])
                self._journal.drop(uid)
                continue
            n_instances = count_instances(folder) if folder.is_dir() else 0
            if entry.aborted and not entry.taking:
                logger.warning(
                    "series %s: %d association(s) that carried it were not released when the "
                    "listener stopped; its %d instances stay interrupted until it is sent again",
                    uid, len(entry.aborted), n_instances,
                )
                self._journal.drop(uid)
                continue
            if n_instances == 0:
                logger.info("series %s: taken by the intake before the restart", uid)
                self._journal.drop(uid)
                continue
            series = _Series(
                header=_recovered_header(uid, folder, entry.record),
                calling_ae=entry.record.get("calling_ae", ""),
                called_ae=entry.record.get("called_ae", ""),
                origin=entry.record.get("origin", ""),
                last_instance_at=now,
                journalled=set(entry.carriers),
            )
            with self._lock:
                for _ in (*entry.taking, *entry.released):
                    serial = next(self._recovered_serials)
                    self._associations[serial] = _Association("released", now, closed_at=now)
                    series.carriers.add(serial)
                self._series[uid] = series
            rearmed += 1
            logger.warning(
                "series %s: acknowledged before the restart (%d instances%s); it becomes a job "
                "after the quiet period", uid, n_instances,
                ", the intake had begun taking it" if entry.taking else
                ", every association released",
            )
        return rearmed

    def _forget_finished_associations(self, now: float) -> None:
        carrying = set().union(*(series.carriers for series in self._series.values()))
        horizon = self._outcome_grace_s + self._quiet_period_s
        for serial in list(self._associations):
            record = self._associations[serial]
            if serial in carrying or record.outcome is None:
                continue
            # Keep a released record until its close is seen too (either order), or for a while.
            if record.closed_at is not None or now - record.outcome_at > horizon:
                del self._associations[serial]

    def _arrival(self, series: _Series) -> SeriesArrival:
        folder = self._spool.series_folder(series.header.series_instance_uid)
        return SeriesArrival(
            series_instance_uid=series.header.series_instance_uid,
            study_instance_uid=series.header.study_instance_uid,
            calling_ae=series.calling_ae,
            called_ae=series.called_ae,
            modality=series.header.modality,
            series_description=series.header.series_description,
            folder=folder,
            n_instances=count_instances(folder),
            quiet_s=series.quiet_s,
            origin=series.origin,
        )

    # -- background thread ---------------------------------------------------------------
    def start(self, interval_s: float | None = None) -> None:
        """Poll in a daemon thread every ``interval_s`` (default: a quarter of the quiet period,
        at most 0.5 s)."""
        interval = interval_s or min(0.5, self._quiet_period_s / 4)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(interval,), name="rtcontour-series-tracker", daemon=True
        )
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        next_sweep = 0.0
        while not self._stop.is_set():
            self._wake.wait(interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.poll()
                if self._retention_s is not None and time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + min(3600.0, self._retention_s / 10)
                    self.sweep_stale()
            except Exception:  # the timer must survive anything a sink or the disk does
                logger.exception("series tracker poll failed")

    def sweep_stale(self) -> int:
        """Delete incoming folders of series older than the retention that are not pending."""
        if self._retention_s is None:
            return 0
        with self._lock:
            keep = frozenset(self._series)
        return self._spool.sweep_stale_series(self._retention_s, keep=keep)

    def stop(self, *, flush: bool = True) -> list[SeriesArrival]:
        """Stop the background thread; with ``flush``, emit every series already complete;
        release the journal's spool for another listener."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        arrivals = self.poll(flush=True) if flush else []
        if self._journal is not None:
            self._journal.close()
        return arrivals
