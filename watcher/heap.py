"""Keeping the cyclic garbage collector off the watcher's long-lived state.

At 100k targets the state is ~1.5M objects. A full collection scans every object it has not
been told to skip, and took ~1.8 s at 100k; under churn, each restart replaces a target's
objects with new ones, so full collections come back (0.2-0.3 s each after 20 s of 1,000
restarts/s, ~1.5 s once every object was replaced) and stall the loop. The state's objects
die by reference counting (they form no cycles), so they are frozen (gc.freeze) after every
flush: the collector then scans only what was made since. A frozen object that later dies in
a cycle would never be freed, so the frozen heap is watched: when it has grown by a quarter
since the last full collection (the threshold CPython itself uses for full collections), it
is unfrozen and collected once, then frozen again.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Callable, Protocol

log = logging.getLogger(__name__)


class Collector(Protocol):
    """What is used of the gc module (a fake in the unit tests)."""

    def freeze(self) -> None: ...
    def unfreeze(self) -> None: ...
    def collect(self) -> int: ...
    def get_freeze_count(self) -> int: ...


class StateFreezer:
    def __init__(self, from_size: int = 10_000, check_every: float = 30.0, growth: float = 1.25,
                 clock: Callable[[], float] = time.monotonic, collector: Collector = gc) -> None:
        self.from_size = from_size  # below this many targets and key lines, the default GC
        self.check_every = check_every  # seconds between counts of the frozen heap (O(n))
        self.growth = growth
        self.clock = clock
        self.gc = collector
        self._base: int | None = None  # frozen objects after the last full collection
        self._next_check = 0.0
        self.full_collections = 0

    def after_flush(self, size: int) -> None:
        """Freeze what the flush left (cheap: the collector's lists are moved, not walked);
        now and then, count the frozen heap and collect it in full if it grew too much."""
        if size < self.from_size:
            return
        self.gc.freeze()
        now = self.clock()
        if now < self._next_check:
            return
        self._next_check = now + self.check_every
        count = self.gc.get_freeze_count()
        if self._base is None or count < self._base:
            self._base = count  # first count, or the state shrank: compare with that
            return
        if count > self._base * self.growth:
            started, base = time.perf_counter(), self._base
            self.gc.unfreeze()
            freed = self.gc.collect()
            self.gc.freeze()
            self._base = self.gc.get_freeze_count()
            self.full_collections += 1
            log.debug("frozen heap grew from %d to %d objects: a full collection freed %d in %.2f s",
                      base, count, freed, time.perf_counter() - started)
