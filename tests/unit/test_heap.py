"""watcher/heap.py: the state is frozen after each flush at scale, and collected in full once
the frozen heap has grown by a quarter (so a cycle that died frozen is freed after all)."""

from __future__ import annotations

import gc
import weakref

from watcher.heap import StateFreezer


class FakeGC:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.frozen = 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def collect(self) -> int:
        self.calls.append("collect")
        self.frozen = int(self.frozen * 0.8)  # what died in cycles is freed
        return 0

    def get_freeze_count(self) -> int:
        return self.frozen


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _freezer(fake: FakeGC, clock: Clock) -> StateFreezer:
    return StateFreezer(from_size=100, check_every=30.0, clock=clock, collector=fake)


def test_a_small_state_is_left_to_the_default_collector() -> None:
    fake, clock = FakeGC(), Clock()
    _freezer(fake, clock).after_flush(99)
    assert fake.calls == []


def test_every_flush_at_scale_freezes_and_none_collects_while_the_heap_stays() -> None:
    fake, clock = FakeGC(), Clock()
    freezer = _freezer(fake, clock)
    fake.frozen = 1000
    for step in range(10):
        clock.now = step * 31.0
        freezer.after_flush(100)
    assert fake.calls == ["freeze"] * 10
    assert freezer.full_collections == 0


def test_a_quarter_more_frozen_objects_is_one_full_collection_then_frozen_again() -> None:
    fake, clock = FakeGC(), Clock()
    freezer = _freezer(fake, clock)
    fake.frozen = 1000
    freezer.after_flush(100)  # the first count: the base
    fake.frozen = 1300
    clock.now = 10.0
    freezer.after_flush(100)  # not counted yet: counting walks the heap
    assert fake.calls == ["freeze", "freeze"]
    clock.now = 31.0
    freezer.after_flush(100)
    assert fake.calls[2:] == ["freeze", "unfreeze", "collect", "freeze"]
    assert freezer.full_collections == 1
    fake.frozen = 1100  # 1040 after the collection: +6%, no second one
    clock.now = 62.0
    freezer.after_flush(100)
    assert freezer.full_collections == 1


def test_a_shrunk_state_is_the_new_base() -> None:
    fake, clock = FakeGC(), Clock()
    freezer = _freezer(fake, clock)
    fake.frozen = 1000
    freezer.after_flush(100)
    fake.frozen, clock.now = 500, 31.0  # targets went away
    freezer.after_flush(100)
    fake.frozen, clock.now = 700, 62.0  # +40% of 500
    freezer.after_flush(100)
    assert freezer.full_collections == 1


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_a_cycle_that_dies_frozen_is_freed_by_the_full_collection() -> None:
    """With the real collector: a frozen cycle outlives gc.collect(), until the frozen heap
    has grown enough for the freezer to collect it in full."""
    clock = Clock()
    freezer = StateFreezer(from_size=0, check_every=1.0, clock=clock)
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        dead = weakref.ref(a)
        freezer.after_flush(0)  # frozen, and counted: the base
        del a, b
        gc.collect()
        assert dead() is not None  # frozen: the collector does not see it
        growth = [[] for _ in range(freezer.gc.get_freeze_count() // 2 + 1)]  # +50% frozen
        clock.now = 2.0
        freezer.after_flush(0)
        assert freezer.full_collections == 1
        assert dead() is None
        del growth
    finally:
        gc.unfreeze()
