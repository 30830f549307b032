"""Pacing of work that grows with the state (cache, status snapshot)."""

from __future__ import annotations

import time

from watcher.pacing import Pacer, many


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cheap_work_is_always_due() -> None:
    pacer = Pacer(Clock())
    assert pacer.due()
    pacer.ran(time.perf_counter())  # ~0 s
    assert pacer.wait() == 0.0 and pacer.due()


def test_costly_work_waits_ten_times_its_cost() -> None:
    clock = Clock()
    pacer = Pacer(clock)
    pacer.ran(time.perf_counter() - 0.05)  # took 50 ms
    assert 0.5 <= pacer.wait() < 0.6
    assert not pacer.due()
    clock.now += 0.49
    assert not pacer.due()
    clock.now += 0.2
    assert pacer.due()


def test_many_changes() -> None:
    assert not many(256, 100)  # the floor
    assert many(257, 100)
    assert not many(1000, 8000) and many(1001, 8000)  # an eighth of the state
    assert many(2, 8, floor=1)
