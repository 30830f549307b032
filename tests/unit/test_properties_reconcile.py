"""Property test (hypothesis) of the reconciler: random event sequences, checked once settled.

Keys belong to a container (by id): a rename keeps them, a restart may change them; a
network disconnect leaves a container without an address on the proxy's network (not
served), a connect gives it one again, maybe another.
Ground truth is computed here, independently of watcher.render: the index serves exactly the
keys of the live targets that have an address (each has its short id and address as aliases,
so all are granted) plus the admin keys, each target's lines open its current address, and
every name in the hosts block leads to its own target under its current name.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings, strategies as st

from watcher.model import ManualLine, Target
from watcher.render import HOSTS_BEGIN, HOSTS_END

from test_reconcile import Harness, make_key, ok, target

KEYS = [make_key(n) for n in range(4)]
NAMES = ["web", "db", "Web", "api"]

OPS = st.one_of(
    st.tuples(st.just("upsert"), st.integers(0, 4), st.sampled_from(NAMES)),
    st.tuples(st.just("remove"), st.integers(0, 4)),
    st.tuples(st.just("replace_all"), st.dictionaries(st.integers(0, 4), st.sampled_from(NAMES), max_size=4)),
    st.tuples(st.just("keys"), st.integers(0, 4), st.sets(st.integers(0, 3), max_size=2)),
    st.tuples(st.just("manual"), st.sets(st.integers(0, 3), max_size=2)),
    st.tuples(st.just("rename"), st.integers(0, 4), st.sampled_from(NAMES)),
    st.tuples(st.just("disconnect"), st.integers(0, 4)),
    st.tuples(st.just("connect"), st.integers(0, 4), st.integers(1, 3)),
)


def _apply(h: Harness, live: dict[int, Target], keys_of: dict[int, frozenset[int]],
           op: tuple, restarts: list[int]) -> None:
    kind = op[0]
    if kind == "upsert":
        _, n, name = op
        live[n] = target(name, n)
        h.rec.upsert(live[n])
    elif kind == "remove":
        live.pop(op[1], None)
        h.rec.remove(target("x", op[1]).id)
    elif kind == "replace_all":
        live.clear()
        live.update({n: target(name, n) for n, name in op[1].items()})
        h.rec.replace_all(list(live.values()))
    elif kind == "keys":
        # New keys for a container (its own, whatever it is named): it restarts (a new
        # started_at), so it is fetched again; a rename alone keeps its keys.
        _, n, keys = op
        keys_of[n] = frozenset(keys)
        if n in live:
            restarts[0] += 1
            live[n] = replace(live[n], started_at=f"2025-01-01T00:{restarts[0]:05d}Z")
            h.rec.upsert(live[n])
    elif kind in ("rename", "disconnect", "connect"):
        # The same container (same id, same start), seen again by the source.
        n = op[1]
        if n not in live:
            return
        if kind == "rename":
            live[n] = replace(live[n], name=op[2])
        elif kind == "disconnect":
            live[n] = replace(live[n], address="")
        else:  # its address on a network it joins: unique per container
            live[n] = replace(live[n], address=f"172.18.{op[2]}.{n + 10}")
        h.rec.upsert(live[n])
    else:
        h.rec.set_manual([ManualLine.at(f"/keys/admin:{k}", (), KEYS[k]) for k in sorted(op[1])])


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=12))
def test_settled_index_and_hosts_match_ground_truth(ops: list[tuple]) -> None:
    h = Harness()
    live: dict[int, Target] = {}
    keys_of: dict[int, frozenset[int]] = {}
    number = {target("x", n).id: n for n in range(5)}  # the fake fetch serves keys per container
    h.fetch.default = lambda t: ok(*(KEYS[k] for k in sorted(keys_of.get(number[t.id], ()))))
    manual: set[int] = set()
    restarts = [0]
    try:
        for op in ops:
            _apply(h, live, keys_of, op, restarts)
            if op[0] == "manual":
                manual = set(op[1])
            h.rec.run_once_pending()
        h.settle()
        reachable = {n: t for n, t in live.items() if t.address}
        expected = {KEYS[k].fingerprint for n in reachable for k in keys_of.get(n, ())}
        expected |= {KEYS[k].fingerprint for k in manual}
        served = {line.split(" ", 1)[0] for line in h.last.index.splitlines()}
        assert served == expected
        for n, t in reachable.items():
            for k in keys_of.get(n, ()):
                lines = [line for line in h.last.index.splitlines()
                         if line.startswith(KEYS[k].fingerprint + " ")]
                assert any(f'permitopen="{t.address}:' in line for line in lines), (t, lines)

        lines = h.last.hosts_block.splitlines()
        assert lines[0] == HOSTS_BEGIN and lines[-1] == HOSTS_END
        by_address = {t.address: t for t in reachable.values()}
        for row in lines[1:-1]:
            address, names = row.split("\t")
            owner = by_address[address]  # only live targets are pinned
            for name in names.split(" "):
                assert name in (owner.name, owner.id[:12])
                # No other live target may claim the name (case-insensitively).
                assert not any(t is not owner and name.lower() in (t.name.lower(), t.id[:12])
                               for t in reachable.values())
    finally:
        h.rec.pool.shutdown(wait=True, cancel_futures=True)
