"""Pacing of work that grows with the state (cache, status snapshot)."""

from __future__ import annotations

import pytest

from watcher.pacing import Pacer, many


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _run(pacer: Pacer, wall: Clock, cpu: Clock, cpu_seconds: float, wall_seconds: float) -> None:
    """One paced run that used `cpu_seconds` of its thread's CPU over `wall_seconds`."""
    with pacer.timed():
        cpu.now += cpu_seconds
        wall.now += wall_seconds


def test_cheap_work_is_always_due() -> None:
    wall, cpu = Clock(), Clock()
    pacer = Pacer(wall, cpu)
    assert pacer.due()
    _run(pacer, wall, cpu, 0.001, 0.001)
    assert pacer.wait() == 0.0 and pacer.due()


def test_costly_work_waits_ten_times_its_cost() -> None:
    wall, cpu = Clock(), Clock()
    pacer = Pacer(wall, cpu)
    _run(pacer, wall, cpu, 0.05, 0.05)  # took 50 ms
    assert pacer.wait() == pytest.approx(0.5)
    assert not pacer.due()
    wall.now += 0.49
    assert not pacer.due()
    wall.now += 0.02
    assert pacer.due()


def test_a_floor_spaces_cheap_work_and_costly_work_waits_the_longer() -> None:
    wall, cpu = Clock(), Clock()
    pacer = Pacer(wall, cpu, floor=1.0)
    assert pacer.due()  # never run: due at once
    _run(pacer, wall, cpu, 0.001, 0.001)
    assert pacer.wait() == 1.0 and not pacer.due()
    wall.now += 0.99
    assert not pacer.due() and pacer.until_due() == pytest.approx(0.01)
    wall.now += 0.02
    assert pacer.due()
    _run(pacer, wall, cpu, 0.2, 0.2)  # 10 x 0.2 s is more than the floor
    assert pacer.wait() == pytest.approx(2.0)


def test_a_costly_floor_spaces_only_work_that_is_not_cheap() -> None:
    wall, cpu = Clock(), Clock()
    pacer = Pacer(wall, cpu, costly_floor=1.0)
    _run(pacer, wall, cpu, 0.001, 0.001)
    assert pacer.wait() == 0.0 and pacer.due()  # cheap: every time
    _run(pacer, wall, cpu, 0.006, 0.006)  # 10 x 6 ms is less than the floor
    assert pacer.wait() == 1.0 and not pacer.due()
    wall.now += 1.0
    assert pacer.due()
    _run(pacer, wall, cpu, 0.2, 0.2)
    assert pacer.wait() == pytest.approx(2.0)


def test_a_stalled_machine_does_not_defer_cheap_work() -> None:
    """A 1 ms snapshot that took 3 s of wall time on a loaded machine (seen under CI load:
    the thread waited for a core) costs 1 ms: the next one is due at once, not in 30 s."""
    wall, cpu = Clock(), Clock()
    pacer = Pacer(wall, cpu)
    _run(pacer, wall, cpu, 0.001, 3.0)
    assert pacer.cost == pytest.approx(0.001)
    assert pacer.due()


def test_the_cost_is_recorded_when_the_work_fails() -> None:
    wall, cpu = Clock(), Clock()
    pacer = Pacer(wall, cpu)
    with pytest.raises(OSError), pacer.timed():
        cpu.now += 0.2
        raise OSError("disk full")
    assert pacer.cost == pytest.approx(0.2) and pacer.done_at == wall.now
    assert pacer.until_due() == pytest.approx(2.0)


def test_the_default_cost_is_this_threads_cpu_time() -> None:
    """Sleeping (waiting for the disk, a lock or a core) is not cost."""
    import time
    pacer = Pacer()
    with pacer.timed():
        time.sleep(0.05)
    assert pacer.cost < 0.005 and pacer.due()


def test_many_changes() -> None:
    assert not many(256, 100)  # the floor
    assert many(257, 100)
    assert not many(1000, 8000) and many(1001, 8000)  # an eighth of the state
    assert many(2, 8, floor=1)
