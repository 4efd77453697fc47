"""The series journal: what the listener acknowledged, on disk, so a restart can finish it.

Success on C-STORE means rtcontour took responsibility for the instance. The instance file is
on disk (``InstanceSpool``, fsync'd) before that answer; this journal records, as durably,
which associations carried each series and how each ended, so that a listener killed inside a
series' quiet period (a power cut, SIGKILL, OOM) can, when it starts again, turn every series
whose associations were all released into its job. Layout::

    <spool_dir>/journal/<SeriesInstanceUID>/<carrier>.open       association still open
                                           /<carrier>.released   released after storing
                                           /<carrier>.aborted    aborted (or cut by a restart)
                                           /<carrier>.taking     handed to the intake

``<carrier>`` names one association of one listener run (``<run id>-<serial>``). A marker
holds the series' UIDs, modality, description and the AE titles as JSON (no patient
identifiers). It is written before the first instance of the series on that association is
answered, renamed when the association ends (on the release request, before the reply), renamed
``.taking`` when the series is handed to the intake, and removed once the intake took it.
The journal lives beside ``incoming/`` (not in it), so series folders hold instances only.

Written by hand (no library keeps a crash-safe directory of markers): each change is a write
to a temporary file, fsync, ``os.replace`` and an fsync of the folder, the usual POSIX recipe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rtcontour.common.errors import ConfigurationError

logger = logging.getLogger(__name__)

OPEN, RELEASED, ABORTED, TAKING = "open", "released", "aborted", "taking"
_OUTCOMES = (OPEN, RELEASED, ABORTED, TAKING)
_TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class JournalledSeries:
    """One series found in the journal at start-up (see ``SeriesJournal.recover``)."""

    series_instance_uid: str
    record: dict[str, str]  # the first marker's content: UIDs, modality, description, AEs
    released: tuple[str, ...]  # carriers whose association was released
    aborted: tuple[str, ...]  # carriers aborted, or still open when the listener stopped
    taking: tuple[str, ...] = ()  # carriers of a batch the intake was taking when it stopped

    @property
    def carriers(self) -> tuple[str, ...]:
        return (*self.taking, *self.released, *self.aborted)


class SeriesJournal:
    """Markers of which association carried which series, and how it ended (module docs).

    ``durable``: fsync each change (the default; off only where the file system's own
    guarantees are enough, e.g. a RAM disk in tests, since without it a power cut may lose
    what was acknowledged).
    """

    def __init__(self, spool_dir: Path, *, durable: bool = True) -> None:
        self.journal_dir = Path(spool_dir) / "journal"
        self.durable = durable
        self.run_id = uuid.uuid4().hex[:12]
        if not self.journal_dir.is_dir():
            self.journal_dir.mkdir(parents=True, exist_ok=True)
            self._sync_dir(self.journal_dir.parent)
        # One listener per spool: a second one's recover() would abort the first's open
        # associations. The lock goes with the process (a killed listener holds none).
        self._lock_fd: int | None = os.open(self.journal_dir / ".lock", os.O_RDWR | os.O_CREAT,
                                            0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise ConfigurationError(
                f"another rtcontour listener uses the spool {Path(spool_dir)}: run one listener "
                "per RTCONTOUR_DATA_DIR (stop the other, or give this one its own folder)"
            ) from None

    def close(self) -> None:
        """Release the spool for another listener (at shutdown)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def carrier(self, serial: int) -> str:
        """The marker name of this run's association ``serial``."""
        return f"{self.run_id}-{serial}"

    # -- changes (called by the tracker, under its lock) -------------------------------------
    def opened(self, series_instance_uid: str, carrier: str, record: dict[str, str]) -> None:
        """``carrier`` stored its first instance of the series: write ``<carrier>.open``."""
        folder = self.journal_dir / series_instance_uid
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            self._sync_dir(self.journal_dir)
        temp = folder / f".{carrier}{_TEMP_SUFFIX}"
        with open(temp, "wb") as stream:
            stream.write(json.dumps(record, sort_keys=True).encode())
            if self.durable:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(temp, folder / f"{carrier}.{OPEN}")
        self._sync_dir(folder)

    def ended(self, series_instance_uid: str, carrier: str, outcome: str) -> None:
        """The association ended: ``<carrier>.open`` becomes ``.released`` or ``.aborted``."""
        folder = self.journal_dir / series_instance_uid
        try:
            os.replace(folder / f"{carrier}.{OPEN}", folder / f"{carrier}.{outcome}")
        except FileNotFoundError:
            return  # nothing open for it (already ended, or the series was taken)
        self._sync_dir(folder)

    def taking(self, series_instance_uid: str, carriers: Iterable[str]) -> None:
        """The series (these carriers' batch) goes to the intake: ``.released`` -> ``.taking``,
        so that a later batch's open or aborted association cannot make a restart drop it."""
        folder = self.journal_dir / series_instance_uid
        for carrier in carriers:
            with contextlib.suppress(FileNotFoundError):
                os.replace(folder / f"{carrier}.{RELEASED}", folder / f"{carrier}.{TAKING}")
        self._sync_dir(folder)

    def forget_aborted(self, series_instance_uid: str) -> None:
        """The series was sent again after an abort: the later sender decides, as in memory."""
        folder = self.journal_dir / series_instance_uid
        removed = False
        for marker in folder.glob(f"*.{ABORTED}"):
            marker.unlink(missing_ok=True)
            removed = True
        if removed:
            self._sync_dir(folder)

    def taken(self, series_instance_uid: str, carriers: Iterable[str]) -> None:
        """The intake took the series: remove the markers of ``carriers`` (others may have
        started carrying it again meanwhile) and the folder once empty."""
        folder = self.journal_dir / series_instance_uid
        for carrier in carriers:
            for outcome in _OUTCOMES:
                (folder / f"{carrier}.{outcome}").unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # another association carries it now, or gone
            folder.rmdir()
        self._sync_dir(folder if folder.exists() else self.journal_dir)

    def drop(self, series_instance_uid: str) -> None:
        """Forget the series entirely (interrupted: its files wait to be re-sent or swept)."""
        shutil.rmtree(self.journal_dir / series_instance_uid, ignore_errors=True)
        self._sync_dir(self.journal_dir)

    # -- start-up -------------------------------------------------------------------------
    def recover(self) -> list[JournalledSeries]:
        """What an earlier run left: every marker still ``.open`` becomes ``.aborted`` (its
        association died with that run), temporary files go; one entry per series."""
        found: list[JournalledSeries] = []
        for folder in sorted(p for p in self.journal_dir.iterdir() if p.is_dir()):
            try:
                entry = self._recover_one(folder)
            except OSError:  # kept for the next start; the listener serves meanwhile
                logger.exception("series journal: %s could not be read; left as it is",
                                 folder.name)
                continue
            if entry is not None:
                found.append(entry)
        return found

    def _recover_one(self, folder: Path) -> JournalledSeries | None:
        for temp in folder.glob(f".*{_TEMP_SUFFIX}"):
            temp.unlink(missing_ok=True)
        for marker in folder.glob(f"*.{OPEN}"):
            os.replace(marker, marker.with_suffix(f".{ABORTED}"))
        self._sync_dir(folder)

        def carriers(outcome: str) -> tuple[str, ...]:
            return tuple(sorted(p.stem for p in folder.glob(f"*.{outcome}")))

        released, aborted, taking = carriers(RELEASED), carriers(ABORTED), carriers(TAKING)
        if not (released or aborted or taking):
            shutil.rmtree(folder, ignore_errors=True)
            return None
        record = self._read_record(folder, (*taking, *released, *aborted))
        return JournalledSeries(folder.name, record, released, aborted, taking)

    def _read_record(self, folder: Path, carriers: Iterable[str]) -> dict[str, str]:
        for carrier in carriers:
            for outcome in (TAKING, RELEASED, ABORTED):
                try:
                    value = json.loads((folder / f"{carrier}.{outcome}").read_text())
                except (OSError, ValueError):
                    continue
                if isinstance(value, dict):
                    return {str(k): str(v) for k, v in value.items()}
        logger.warning("journal of series %s has no readable marker", folder.name)
        return {"series_instance_uid": folder.name}

    def _sync_dir(self, folder: Path) -> None:
        if self.durable:
            fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so that a file created, renamed or removed in it outlives a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "ABORTED", "OPEN", "RELEASED", "TAKING", "JournalledSeries", "SeriesJournal", "fsync_dir",
]
