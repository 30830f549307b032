"""The pieces the fast path is built from: the edit span of two line lists, the
before-view of maps kept up to date in place, and manual permitopen reservations kept
edit by edit."""

from __future__ import annotations

import random

import pytest

from watcher.model import ManualLine
from watcher.render import changed_span, index_shard, SHARD_NAMES
from watcher.revocation import MISSING, Before, remember
from watcher.targets import ManualReservations, ReservedNames, permitopen_reservations

from test_reconcile import make_key


@pytest.mark.parametrize("old,new,span", [
    ((), (), (0, 0, 0)),
    ((1, 2, 3), (1, 2, 3), (3, 3, 3)),
    ((1, 2, 3), (1, 2, 3, 4), (3, 3, 4)),  # appended
    ((1, 2, 3), (0, 1, 2, 3), (0, 0, 1)),  # inserted at the top
    ((1, 2, 3), (1, 9, 3), (1, 2, 2)),  # replaced in the middle
    ((1, 2, 3), (1, 3), (1, 2, 1)),  # removed
    ((1, 1, 1), (1, 1), (2, 3, 2)),  # repeats: the prefix never overlaps the suffix
    ((1, 2), (), (0, 2, 0)),
])
def test_changed_span(old: tuple, new: tuple, span: tuple) -> None:
    assert changed_span(old, new) == span


def test_changed_span_rebuilds_new_from_old_on_random_edits() -> None:
    rng = random.Random(7)
    for _ in range(500):
        old = tuple(rng.randrange(4) for _ in range(rng.randrange(12)))
        new = list(old)
        for _ in range(rng.randrange(3)):
            at = rng.randrange(len(new) + 1)
            if new and rng.random() < 0.5:
                del new[min(at, len(new) - 1)]
            else:
                new.insert(at, rng.randrange(4))
        start, old_end, new_end = changed_span(old, tuple(new))
        assert old[:start] + tuple(new[start:new_end]) + old[old_end:] == tuple(new)
        assert start <= old_end and start <= new_end
        assert len(old) - old_end == len(new) - new_end


def test_index_shard_names_keep_fingerprint_order() -> None:
    assert len(SHARD_NAMES) == 64 == len(set(SHARD_NAMES))
    assert index_shard("SHA256:+abc") == "+" and index_shard("SHA256:/+bc") == ","
    assert index_shard("SHA256:a/bc") == "a" and index_shard("nocolon") == "n"
    assert list(SHARD_NAMES) == sorted(SHARD_NAMES)  # `cat *` in the C locale is in order
    fps = sorted(make_key(("shard", n)).fingerprint for n in range(3000))
    order = [SHARD_NAMES.index(index_shard(fp)) for fp in fps]
    assert order == sorted(order)  # shards joined in SHARD_NAMES order are sorted


def test_before_reads_old_values_of_changed_keys_only() -> None:
    live = {"a": 1, "b": 2}
    old: dict = {}
    before = Before(old, live)
    remember(old, live, "a")
    live["a"] = 10
    remember(old, live, "c")
    live["c"] = 3
    remember(old, live, "b")
    del live["b"]
    remember(old, live, "a")  # the first value noted wins
    live["a"] = 11
    assert old["c"] is MISSING
    assert dict(before) == {"a": 1, "b": 2}
    assert before.get("c") is None and before.get("a") == 1 and len(before) == 2
    assert before.get("c", "none") == "none" and before.get("d", 0) == 0 and before.get("b", 0) == 2
    assert "a" in before and "b" in before and "c" not in before and "d" not in before


def _line(origin: str, *hosts: str, n: int = 0) -> ManualLine:
    options = tuple(f'permitopen="{h}:22"' for h in hosts)
    return ManualLine.at(origin, options, make_key(("reserve", origin, n)))


def test_manual_reservations_follow_edits_and_cite_the_first_line() -> None:
    lines = [_line("/k/a.pub:1", "DB"), _line("/k/a.pub:2", "db", "web"), _line("/k/a.pub:10", "db")]
    book = ManualReservations(lines)
    assert book.reserved() == ReservedNames.of(permitopen_reservations(lines))
    assert book.reserved().entries["db"][0].reason == "host of a permitopen in /k/a.pub:1"
    # Removing the first line moves db's reason to line 2; web is unchanged.
    assert book.update([lines[0]], []) == {"db"}
    assert book.reserved().entries["db"][0].reason == "host of a permitopen in /k/a.pub:2"
    assert book.update([], [_line("/k/b.pub:1", "api")]) == {"api"}
    assert book.update([lines[1]], []) == {"db", "web"}
    assert set(book.reserved().entries) == {"db", "api"}
    assert book.update([lines[2]], [_line("/k/a.pub:3", "db")]) == {"db"}
    assert book.update([], [_line("/k/a.pub:9", "db")]) == set()  # not the first line


def test_manual_reservations_cite_the_first_line_where_it_is_now() -> None:
    """An edit above a host's first line moves it without touching it: the reason follows."""
    from watcher.sources.manual import reparse

    data = b"".join(b'permitopen="%s:22" ' % host + make_key(("moved", n)).line().encode() + b"\n"
                    for n, host in enumerate([b"web", b"db", b"web"]))
    parsed = reparse(None, data, "/k/a.pub")
    book = ManualReservations(parsed.lines)
    assert book.reserved().entries["db"][0].reason == "host of a permitopen in /k/a.pub:2"
    reparse(parsed, b"# a comment above\n" + data, "/k/a.pub")  # no line added or removed
    assert book.update([], []) == {"web", "db"}
    assert book.reserved().entries["db"][0].reason == "host of a permitopen in /k/a.pub:3"
    assert book.reserved().entries["web"][0].reason == "host of a permitopen in /k/a.pub:2"
    assert book.update([], []) == set()


def test_a_line_inserted_at_the_top_renders_only_that_key_and_owners_follow() -> None:
    """A key inserted at the top of a big file (as the source hands it over: every later
    line the same object, moved down) is one changed key, not a full render; the access
    log names every other key by its new line."""
    from test_reconcile import Harness
    from watcher.config import RunMode, Settings
    from watcher.sources.manual import reparse

    h = Harness(Settings(mode=RunMode.MANUAL))
    keys = [make_key(("top", n)) for n in range(300)]
    data = b"".join(k.line().encode() + b"\n" for k in keys)
    parsed = reparse(None, data, "/k/a.pub")
    h.rec.set_manual(list(parsed.lines))
    h.settle()
    assert h.last.changed is None and h.rec.owners_of(keys[149].fingerprint) == ("/k/a.pub:150",)
    new = make_key(("top", "new"))
    h.rec.set_manual(list(reparse(parsed, new.line().encode() + b"\n" + data, "/k/a.pub").lines))
    h.settle()
    assert h.last.changed == {new.fingerprint}
    assert h.last.index == h.rec.full_render().index and h.last.keys_served == 301
    assert h.rec.owners_of(keys[149].fingerprint) == ("/k/a.pub:151",)
    assert h.rec.owners_of(new.fingerprint) == ("/k/a.pub:1",)


def test_a_line_deleted_where_the_same_text_moves_up_is_told_apart() -> None:
    """P, K, X, K -> Q, K: the first K goes, the second moves up to its number. Alike as
    they are, the reconciler keeps the one still in the file, so deleting that one later
    revokes the key (lines are told apart by identity, not by text and number)."""
    from test_reconcile import Harness
    from watcher.config import RunMode, Settings
    from watcher.sources.manual import reparse

    h = Harness(Settings(mode=RunMode.MANUAL))
    p, q, x, k = (make_key(("twice", n)) for n in "pqxk")
    text = {key: key.line().encode() + b"\n" for key in (p, q, x, k)}
    parsed = reparse(None, text[p] + text[k] + text[x] + text[k], "/k/a.pub")
    h.rec.set_manual(list(parsed.lines))
    h.settle()
    moved = parsed.lines[3]
    h.rec.set_manual(list(reparse(parsed, text[q] + text[k], "/k/a.pub").lines))
    h.settle()
    assert parsed.lines[1] is moved and moved.origin == "/k/a.pub:2"
    assert h.rec.owners_of(k.fingerprint) == ("/k/a.pub:2",)
    assert h.last.index == h.rec.full_render().index
    h.rec.set_manual(list(reparse(parsed, text[q], "/k/a.pub").lines))
    h.settle()
    assert k.fingerprint not in h.last.index and h.rec.owners_of(k.fingerprint) == ()
    assert h.last.index == h.rec.full_render().index


def test_a_one_line_manual_edit_renders_only_that_key() -> None:
    """Editing one admin line of many: the render says only the edited keys changed (the
    rest of the index is not looked at again), and equals a full render."""
    from test_reconcile import Harness
    from watcher.config import RunMode, Settings

    h = Harness(Settings(mode=RunMode.MANUAL))
    lines = tuple(ManualLine.at(f"/k/a.pub:{n}", (), make_key(("edit", n))) for n in range(1, 301))
    h.rec.set_manual(lines)
    h.settle()
    assert h.last.changed is None and h.last.keys_served == 300
    edited = ManualLine.at("/k/a.pub:150", ('from="10.0.0.0/8"',), make_key(("edit", "new")))
    h.rec.set_manual(lines[:149] + (edited,) + lines[150:])
    h.settle()
    assert h.last.changed == {lines[149].key.fingerprint, edited.key.fingerprint}
    assert h.last.index == h.rec.full_render().index and h.last.keys_served == 300
    assert h.rec.owners_of(lines[149].key.fingerprint) == ()
    assert h.rec.owners_of(edited.key.fingerprint) == ("/k/a.pub:150",)


@pytest.mark.parametrize("chunk", [3, 64])
def test_hosts_block_kept_in_chunks_equals_a_full_render_through_inserts_renames_and_removals(
        chunk: int, monkeypatch) -> None:
    """Hundreds of targets (several chunks of rows; with chunks of 3, chunks split often):
    each step adds, removes, renames or changes the address of a few, or takes their keys
    away; the block kept chunk by chunk equals the one rendered from scratch."""
    from watcher import render as render_module
    from watcher.model import Target
    from watcher.render import IncrementalRender, ServedTarget, render

    monkeypatch.setattr(render_module, "HOSTS_CHUNK", chunk)

    rng = random.Random(11)
    keys = [make_key(("hosts-chunks", n)) for n in range(8)]
    served: dict[str, ServedTarget] = {}

    def item(n: int) -> ServedTarget:
        name = f"t{rng.randrange(1000):03d}-{n}"  # granted names are unique (resolve_aliases)
        address = rng.choice([f"172.18.{n // 250}.{n % 250 + 1}"] * 4 + ["", "fe80::1"])
        target = Target(id=f"{n:064x}", name=name, address=address)
        # Some keep their row through a rename (its names are not the target's name): the
        # row moves in the order without changing.
        aliases = (name, f"{name}-alias") if rng.random() < 0.5 else (f"fixed-{n}",)
        return ServedTarget(target, aliases, (rng.choice(keys),) if rng.random() < 0.9 else ())

    engine = IncrementalRender(("22",))
    for step in range(80):
        changed: dict[str, ServedTarget | None] = {}
        for _ in range(300 if step == 0 else rng.randrange(1, 12)):
            n = rng.randrange(400)
            tid = f"{n:064x}"
            changed[tid] = None if tid in served and rng.random() < 0.3 else item(n)
        for tid, new in changed.items():
            if new is None:
                served.pop(tid, None)
            else:
                served[tid] = new
        got = engine.update(changed).hosts_block
        assert got == render(list(served.values()), ("22",)).hosts_block, f"step {step}"
    # Nearly all go, a few at a time (groups empty and are dropped), then come back.
    for step, tids in enumerate([list(served)[at:at + 7] for at in range(0, len(served) - 5, 7)]):
        for tid in tids:
            del served[tid]
        got = engine.update(dict.fromkeys(tids)).hosts_block
        assert got == render(list(served.values()), ("22",)).hosts_block, f"removal {step}"
    for step in range(40):
        changed = {f"{n:064x}": item(n) for n in rng.sample(range(400), 9)}
        served.update(changed)
        got = engine.update(changed).hosts_block
        assert got == render(list(served.values()), ("22",)).hosts_block, f"return {step}"
