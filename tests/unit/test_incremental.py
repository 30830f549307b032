"""Property test (hypothesis): the reconciler's fast path renders what a full render would.

After every step of a random event sequence (targets added, renamed, re-addressed, given
contested names, restarted with other keys, removed, resynced; admin lines and the hosts
file's other lines changed), the files the incremental state wrote equal, byte for byte, a
from-scratch render (resolve_aliases + render) of the same state, and so do the owners and
grant sets the access log and the revocation diff read.
"""

from __future__ import annotations

from dataclasses import replace
from unittest import mock

from hypothesis import HealthCheck, example, given, settings, strategies as st

from watcher import render
from watcher.config import RunMode, Settings
from watcher.model import ManualLine, Target
from watcher.sources.manual import ParsedFile, reparse
from watcher.targets import ReservedNames, permitopen_reservations, resolve_aliases

from test_reconcile import Harness, make_key, ok, target
from test_shard_splice import assert_whole_keys_per_block

KEYS = [make_key(("incremental", n)) for n in range(5)]
NAMES = ["web", "db", "Web", "api", "cache"]
SOFT = ["shared", "web", "api", "db-alias", "10.9.9.9"]
ADDRESSES = ["", "172.18.0.50", "172.18.0.51", "fe80::1"]
MANUAL_OPTIONS = [(), ('permitopen="web:22"',), ('from="10.0.0.0/8"',),
                  ('from="10.0.0.0/8"', 'permitopen="api:80"'),
                  ('from="10.0.0.0/8,!10.1.0.0/16"', 'no-agent-forwarding')]

TARGET = st.tuples(st.integers(0, 5), st.sampled_from(NAMES), st.sampled_from(SOFT + [""]),
                   st.lists(st.sampled_from(SOFT), max_size=2), st.sampled_from([None, *ADDRESSES]))
OPS = st.one_of(
    st.tuples(st.just("upsert"), TARGET),
    st.tuples(st.just("remove"), st.integers(0, 5)),
    st.tuples(st.just("replace_all"), st.lists(TARGET, max_size=5)),
    st.tuples(st.just("keys"), st.integers(0, 5), st.sets(st.integers(0, 4), max_size=3)),
    st.tuples(st.just("manual"), st.lists(st.tuples(st.integers(0, 4),
                                                   st.sampled_from(MANUAL_OPTIONS)), max_size=3)),
    st.tuples(st.just("hosts"), st.lists(st.sampled_from(["shared", "API", "other"]), max_size=2)),
    # An admin file edited as the source hands it over (reparse): the lines after the edit
    # stay the same objects, moved to their new numbers in place.
    st.tuples(st.just("edit"), st.sampled_from(["insert", "delete", "replace", "join"]), st.integers(0, 8),
              st.one_of(st.just(None), st.tuples(st.integers(0, 4), st.sampled_from(MANUAL_OPTIONS)))),
)
ADMIN_FILE = "/keys/edited.pub"


def _edit_admin_file(parsed: ParsedFile | None, op: tuple) -> ParsedFile:
    """`op` applied to the file's lines (None: a comment line), parsed as the source does."""
    _, kind, at, line = op
    lines = parsed.data.decode().split("\n")[:-1] if parsed is not None else []
    text = "# a comment" if line is None else " ".join(
        ([",".join(line[1])] if line[1] else []) + [KEYS[line[0]].line()])
    at = min(at, len(lines))
    if kind == "insert":
        lines.insert(at, text)
    elif lines and kind == "delete":
        del lines[min(at, len(lines) - 1)]
    elif lines and kind == "join":  # two lines become one (the lines below move up by one)
        lines[min(at, len(lines) - 1):min(at, len(lines) - 1) + 2] = [text]
    elif lines:
        lines[min(at, len(lines) - 1)] = text
    return reparse(parsed, "".join(f"{l}\n" for l in lines).encode(), ADMIN_FILE)


def _target(spec: tuple, restarts: dict[int, int]) -> Target:
    n, name, hostname, aliases, address = spec
    base = target(name, n, started_at=f"2025-01-01T00:{restarts.get(n, 0):05d}Z", address=address)
    return replace(base, hostname=hostname, aliases=tuple(aliases))


def _check(h: Harness) -> None:
    full = h.rec.full_render()
    got = h.last
    # The writer's contract (index_recent): a key whose lines differ from the render before
    # is in `changed`, else the file of recent changes would miss it.
    for before, after in zip(h.writes, h.writes[1:]):
        if after.changed is not None:
            assert set(render.changed_parts(before.shards, after.shards)) <= after.changed
    assert got.index == full.index
    for shard in got.shards.values():
        assert_whole_keys_per_block(shard)
    assert got.cache == full.cache
    assert got.hosts_block == full.hosts_block
    assert got.owners == full.owners
    # Admin lines that moved (an edit above them): the reasons that cite them follow.
    hosts = h.rec.unmanaged_hosts() if h.rec.entries else ()
    reserved = h.rec._reserved_names(hosts, ReservedNames.of(permitopen_reservations(h.rec.manual)))
    plan = resolve_aliases([e.target for e in h.rec.entries.values()], h.rec.proxy,
                           pin_names=h.rec.pin_names, reserved=reserved)
    assert h.rec._book.plan().refused == plan.refused
    assert got.grants == full.grants
    # The status rows (kept in place, moved only when a name changes): every target, by name.
    if h.snapshots:
        rows = [(t.name, t.id) for t in h.snapshots[-1].targets]
        wanted = sorted((e.target.name, e.target.id) for e in h.rec.entries.values())
        assert rows == [(name, tid[:12]) for name, tid in wanted]
        # Each listed row is its target's current one (rows changed in place, not moved).
        assert all(row is h.rec.entries[tid].row for row, (_, tid) in zip(h.snapshots[-1].targets, wanted))


def _run(ops: list[tuple], mode: RunMode, permit_hosts: tuple[str, ...] | None = None) -> None:
    settings = Settings(mode=mode, permit_ports=("22", "80"))
    h = Harness(replace(settings, permit_hosts=permit_hosts) if permit_hosts else settings)
    keys_of: dict[int, frozenset[int]] = {}
    number = {target("x", n).id: n for n in range(6)}
    h.fetch.default = lambda t: ok(*(KEYS[k] for k in sorted(keys_of.get(number[t.id], ()))))
    restarts: dict[int, int] = {}
    live: dict[int, Target] = {}
    admin_file: ParsedFile | None = None
    try:
        for op in ops:
            kind = op[0]
            if kind == "upsert":
                live[op[1][0]] = _target(op[1], restarts)
                h.rec.upsert(live[op[1][0]])
            elif kind == "remove":
                live.pop(op[1], None)
                h.rec.remove(target("x", op[1]).id)
            elif kind == "replace_all":
                live = {spec[0]: _target(spec, restarts) for spec in op[1]}
                h.rec.replace_all(list(live.values()))
            elif kind == "keys":
                _, n, keys = op
                keys_of[n] = frozenset(keys)
                if n in live:  # a restart: fetched again
                    restarts[n] = restarts.get(n, 0) + 1
                    live[n] = replace(live[n], started_at=f"2025-01-01T00:{restarts[n]:05d}Z")
                    h.rec.upsert(live[n])
            elif kind == "manual":
                h.rec.set_manual([ManualLine.at(f"/keys/admin:{i}", options, KEYS[k])
                                  for i, (k, options) in enumerate(op[1], 1)])
            elif kind == "edit":
                admin_file = _edit_admin_file(admin_file, op)
                h.rec.set_manual(list(admin_file.lines))
            else:
                h.hosts = (("192.168.1.1", tuple(op[1])),) if op[1] else ()
            h.rec.run_once_pending()
            _check(h)
        h.settle()
        _check(h)
    finally:
        h.rec.pool.shutdown(wait=True, cancel_futures=True)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=15))
# A soft name first granted to one target, then claimed by a second: both must lose it.
@example([("keys", 0, {0}), ("keys", 1, {1}), ("upsert", (0, "web", "shared", [], None)),
          ("upsert", (1, "db", "", [], None)), ("upsert", (1, "db", "", ["shared"], None))])
def test_incremental_equals_full_render_with_discovery(ops: list[tuple]) -> None:
    _run(ops, RunMode.DOCKER)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=15))
# A target not permitted reserves its names; its going frees them for a served one.
@example([("keys", 0, {0}), ("upsert", (1, "api", "shared", [], None)),
          ("upsert", (0, "web", "shared", [], None)), ("remove", 1)])
def test_incremental_equals_full_render_with_targets_not_permitted(ops: list[tuple]) -> None:
    """"api" and "cache" are not permitted: ignored, their names, addresses and soft names
    reserved; they come, change and go without a render from scratch."""
    _run(ops, RunMode.DOCKER, permit_hosts=("web", "Web", "db"))


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=15))
def test_incremental_equals_full_render_in_manual_mode(ops: list[tuple]) -> None:
    _run(ops, RunMode.MANUAL)


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=15))
def test_incremental_equals_full_render_when_re_sorting_in_bulk(ops: list[tuple]) -> None:
    resync = lambda changes, size: changes > max(1, size // 8)  # noqa: E731  (a resync's path)
    with mock.patch.object(render, "many", resync):
        _run(ops, RunMode.DOCKER)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=15), st.sampled_from([1, 2, 3]))
def test_incremental_equals_full_render_with_hosts_rows_in_small_chunks(ops: list[tuple], size: int) -> None:
    """The hosts block re-joins only the chunks a change touched (HOSTS_CHUNK targets each): with
    chunks of 1-3 rows, the few targets here span many, so inserts, renames and removals
    shift rows across chunk borders."""
    with mock.patch.object(render, "HOSTS_CHUNK", size):
        _run(ops, RunMode.DOCKER)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=15), st.sampled_from([1, 200, 600]))
def test_incremental_equals_full_render_with_index_shards_in_small_blocks(ops: list[tuple], size: int) -> None:
    """A shard is kept in blocks of BLOCK_BYTES (16 KiB in use) and a change makes only its
    keys' blocks again: with blocks of a line or a few, the keys here span many, so splices
    split, merge and drop blocks."""
    with mock.patch.object(render, "BLOCK_BYTES", size):
        _run(ops, RunMode.DOCKER)
