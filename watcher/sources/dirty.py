"""Keys (container ids) to look at again, coalesced, each handed to one worker at a time.

An events reader marks the key of every event and goes back to the stream at once; workers
take keys and re-read the object they name. Ten events about one container waiting here
are one re-read. A key marked while a worker has it is handed out again once that worker
is `done`, so the last re-read of a key always starts after its last event: whatever
order the workers finish in, the last word on a key is its newest state.
"""

from __future__ import annotations

import threading


class DirtyKeys:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: dict[str, None] = {}  # insertion-ordered: the oldest mark goes first
        self._busy: set[str] = set()
        self._again: set[str] = set()  # marked while busy
        self._closed = False

    def mark(self, key: str) -> None:
        with self._cond:
            if key in self._busy:
                self._again.add(key)
            elif key not in self._ready:
                self._ready[key] = None
                self._cond.notify()

    def take(self, timeout: float | None = None) -> str | None:
        """The oldest marked key that no worker has (it is now this caller's until `done`);
        None once closed, or when none came within `timeout`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready or self._closed, timeout):
                return None
            if self._closed:
                return None
            key = next(iter(self._ready))
            del self._ready[key]
            self._busy.add(key)
            return key

    def done(self, key: str) -> None:
        with self._cond:
            self._busy.discard(key)
            if key in self._again:
                self._again.discard(key)
                self._ready[key] = None
                self._cond.notify()

    def close(self) -> None:
        """Wake every waiting worker with None; marks after this are kept but never taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def pending(self) -> int:
        """Keys waiting or being re-read (for status and tests)."""
        with self._cond:
            return len(self._ready) + len(self._busy)
