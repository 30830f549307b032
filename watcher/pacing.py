"""How often to redo work whose cost grows with the state (the cache, the status snapshot)."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

CHEAP = 0.005  # seconds: work this cheap is done every time
SHARE = 10  # else at most once per SHARE times its last cost: a tenth of the loop's time


class Pacer:
    """Done at once while cheap (and `floor` seconds have passed since the last run); else
    at most so often that it takes 1/SHARE of the time, and `costly_floor` seconds apart.

    The cost is the CPU time the work took on its own thread, not the wall time: on a
    loaded machine (a CI run, 20 containers booting on 2 cores) a 1 ms status snapshot was
    seen to take 0.08 s of wall time and a flush 3.4 s, and ten times such a stall would
    keep `watcher status` a minute behind for no work of ours."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.thread_time, floor: float = 0.0,
                 costly_floor: float = 0.0) -> None:
        self.clock = clock
        self.cpu_clock = cpu_clock
        self.floor = floor  # seconds between two runs at least, however cheap
        self.costly_floor = costly_floor  # and once a run is not cheap
        self.cost = 0.0
        self.done_at = -1e9

    def wait(self) -> float:
        """Seconds after the last run before the next one is due."""
        return max(self.floor, 0.0 if self.cost < CHEAP else max(self.costly_floor, SHARE * self.cost))

    def due(self) -> bool:
        return self.until_due() <= 0

    def until_due(self) -> float:
        """Seconds until the next run is due (<= 0: it is)."""
        return self.done_at + self.wait() - self.clock()

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Runs the `with` body as the paced work: records its cost and when it ended."""
        started = self.cpu_clock()
        try:
            yield
        finally:
            self.cost = max(0.0, self.cpu_clock() - started)
            self.done_at = self.clock()


def many(changes: int, size: int, floor: int = 256) -> bool:
    """Whether `changes` to a state of `size` are many: then redoing it all at once (a
    re-sort, a full render, a snapshot now) costs less than change by change."""
    return changes > max(floor, size // 8)
