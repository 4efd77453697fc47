"""An embedded Celery broker that needs no server: message files in ``data_dir/broker``.

kombu's ``filesystem://`` transport is almost this, but it opens a message under its final
name and then writes it, so a polling worker can read a half-written (empty) file, fail with
JSONDecodeError and lose the message; it rewrites its exchange table in place the same way;
and it "moves" a claimed message to the system temp folder, which across filesystems is a
copy that two workers can both make. Here:

- a message is written to a hidden temp name, fsynced, and renamed to its final name;
- a worker claims a message by renaming it into ``claimed/`` (atomic: exactly one wins),
  then reads and deletes it;
- exchange tables are replaced the same way, under an exclusive lock file.

A message a worker claimed and then died holding is gone from the broker; the job store's
recovery sweep re-enqueues its job (see ``common.jobstore``), so the broker never has to be
durable on its own.

Use it with ``register()`` (idempotent) and the URL ``rtcfs://``, transport options from
``transport_options(folder)``.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport.filesystem import Channel as FilesystemChannel
from kombu.transport.filesystem import Transport as FilesystemTransport
from kombu.transport.filesystem import exchange_queue_t
from kombu.utils.json import dumps, loads

SCHEME = "rtcfs"

__all__ = ["SCHEME", "Channel", "Transport", "broker_url", "register", "transport_options"]


def register() -> None:
    """Make ``rtcfs://`` resolve to this transport (kombu looks transports up by scheme)."""
    TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"


def broker_url() -> str:
    return f"{SCHEME}://localhost//"


def transport_options(folder: Path, polling_interval_s: float = 0.2) -> dict[str, Any]:
    """Transport options putting every message and table under ``folder``."""
    folder = Path(folder).resolve()
    for sub in ("queue", "control", "claimed"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "control_folder": str(folder / "control"),
        "processed_folder": str(folder / "claimed"),
        "polling_interval": polling_interval_s,
    }


def _write_atomically(path: Path, payload: bytes) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(temp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


class Channel(FilesystemChannel):
    """A filesystem channel whose messages and tables are only ever seen whole."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{int(round(monotonic() * 1000)):015d}_{uuid.uuid4()}.{queue}.msg"
        try:
            _write_atomically(Path(self.data_folder_out) / name, dumps(payload).encode())
        except OSError as exc:
            raise ChannelError(f"cannot add message {name!r}: {exc}") from exc

    def _get(self, queue: str, timeout: Any = None) -> Any:
        suffix = f".{queue}.msg"
        folder_in = Path(self.data_folder_in)
        claimed = Path(self.processed_folder)
        for name in sorted(os.listdir(folder_in)):
            if name.startswith(".") or not name.endswith(suffix):
                continue
            if name.partition(".")[2] != suffix[1:]:
                continue  # a queue whose name ends like this one's
            target = claimed / f"{os.getpid()}-{name}"
            try:
                os.rename(folder_in / name, target)
            except FileNotFoundError:
                continue  # another worker claimed it first
            try:
                payload = target.read_bytes()
            finally:
                target.unlink(missing_ok=True)
            return loads(payload.decode())
        raise Empty()

    def _purge(self, queue: str) -> int:
        count = 0
        suffix = f".{queue}.msg"
        for name in os.listdir(self.data_folder_in):
            if not name.startswith(".") and name.partition(".")[2] == suffix[1:]:
                try:
                    os.remove(os.path.join(self.data_folder_in, name))
                    count += 1
                except FileNotFoundError:
                    pass
        return count

    def _size(self, queue: str) -> int:
        suffix = f".{queue}.msg"
        return sum(
            1
            for name in os.listdir(self.data_folder_in)
            if not name.startswith(".") and name.partition(".")[2] == suffix[1:]
        )

    # -- exchange tables: read whole, replaced whole under a lock file ------------------
    def get_table(self, exchange: str) -> list[Any]:
        file = self._exchange_file(exchange)
        try:
            table = loads(file.read_bytes().decode())
        except FileNotFoundError:
            return []
        return [exchange_queue_t(*binding) for binding in table]

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        binding = [routing_key or "", pattern or "", queue or ""]
        self._edit_table(exchange, add=binding)

    def _delete(
        self, queue: str, exchange: str, routing_key: str, pattern: str, *args: Any, **kwargs: Any
    ) -> None:
        virtual.Channel._delete(self, queue, exchange, routing_key, pattern, *args, **kwargs)
        self._edit_table(exchange, remove=[routing_key or "", pattern or "", queue or ""])

    def _edit_table(
        self, exchange: str, add: list[str] | None = None, remove: list[str] | None = None
    ) -> None:
        file = self._exchange_file(exchange)
        self.control_folder.mkdir(parents=True, exist_ok=True)
        with open(self.control_folder / ".tables.lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                try:
                    table = [list(b) for b in loads(file.read_bytes().decode())]
                except FileNotFoundError:
                    table = []
                changed = False
                if add is not None and add not in table:
                    table.insert(0, add)
                    changed = True
                if remove is not None and remove in table:
                    table.remove(remove)
                    changed = True
                if changed:
                    _write_atomically(file, dumps(table).encode())
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


class Transport(FilesystemTransport):
    """The filesystem transport with the atomic ``Channel`` above."""

    Channel = Channel
    global_state = virtual.BrokerState()
    driver_type = "rtcfs"
    driver_name = "rtcfs"
