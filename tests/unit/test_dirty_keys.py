"""DirtyKeys: marks coalesce, a key is with one worker at a time, and a key marked while a
worker has it comes back after `done`."""

from __future__ import annotations

import threading

from watcher.sources.dirty import DirtyKeys


def test_marks_coalesce_and_come_out_oldest_first() -> None:
    dirty = DirtyKeys()
    for key in ["a", "b", "a", "c", "b", "a"]:
        dirty.mark(key)
    assert dirty.pending() == 3
    assert [dirty.take(0), dirty.take(0), dirty.take(0)] == ["a", "b", "c"]
    assert dirty.take(0) is None  # nothing left: the timeout answers None


def test_a_taken_key_is_not_handed_out_twice() -> None:
    dirty = DirtyKeys()
    dirty.mark("a")
    assert dirty.take(0) == "a"
    dirty.mark("a")  # an event while the worker inspects
    dirty.mark("a")
    assert dirty.take(0) is None  # not to a second worker while the first has it
    assert dirty.pending() == 1
    dirty.done("a")
    assert dirty.take(0) == "a"  # once, after the first worker is done
    dirty.done("a")
    assert dirty.take(0) is None and dirty.pending() == 0


def test_done_without_a_new_mark_forgets_the_key() -> None:
    dirty = DirtyKeys()
    dirty.mark("a")
    dirty.mark("b")
    assert dirty.take(0) == "a"
    dirty.done("a")
    assert dirty.take(0) == "b"
    assert dirty.take(0) is None


def test_other_keys_go_on_while_one_is_busy() -> None:
    dirty = DirtyKeys()
    dirty.mark("a")
    assert dirty.take(0) == "a"
    dirty.mark("a")
    dirty.mark("b")
    assert dirty.take(0) == "b"


def test_close_wakes_waiting_workers() -> None:
    dirty = DirtyKeys()
    got: list[str | None] = []
    workers = [threading.Thread(target=lambda: got.append(dirty.take())) for _ in range(3)]
    for worker in workers:
        worker.start()
    dirty.close()
    for worker in workers:
        worker.join(5)
    assert got == [None, None, None]
    dirty.mark("a")
    assert dirty.take(0) is None  # closed: nothing is handed out any more


def test_a_mark_wakes_a_waiting_worker() -> None:
    dirty = DirtyKeys()
    got: list[str | None] = []
    worker = threading.Thread(target=lambda: got.append(dirty.take(5)))
    worker.start()
    dirty.mark("a")
    worker.join(5)
    assert got == ["a"]
