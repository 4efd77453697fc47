"""A sliding-window rate limit for the login route (per client address and per user).

Kept in the API process's memory (a restart forgets it; with several API processes each
counts its own share): a throttle against guessing tokens, not an accounting system.
Written by hand because the limit must see the outcome of each attempt (only failures count
per address), which the common request-rate middlewares do not offer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class SlidingWindowLimit:
    """At most ``limit`` events per key within ``window_s`` seconds."""

    def __init__(self, limit: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError(f"limit must be >= 1 and window_s > 0, got {limit}, {window_s}")
        self.limit, self.window_s, self._clock = limit, window_s, clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - self.window_s:
            events.popleft()
        return events

    def retry_after_s(self, key: str) -> float:
        """0 if another event is allowed now, else seconds until one is."""
        with self._lock:
            now = self._clock()
            events = self._recent(key, now)
            if len(events) < self.limit:
                return 0.0
            return max(0.0, events[0] + self.window_s - now)

    def add(self, key: str) -> None:
        with self._lock:
            now = self._clock()
            self._recent(key, now).append(now)
            if len(self._events) > 10_000:  # forget idle keys so memory stays bounded
                for stale in [k for k, v in self._events.items() if not v]:
                    del self._events[stale]
