"""Property test (hypothesis) of the reconciler: random event sequences, checked once settled.

Keys belong to a container (by id): a rename keeps them, a restart may change them.
Ground truth is computed here, independently of watcher.render: the index serves exactly the
keys of the live targets (each has its short id and address as aliases, so all are granted)
plus the admin keys, and every name in the hosts block leads to its own target.
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
    else:
        h.rec.set_manual([ManualLine(f"/keys/admin:{k}", (), KEYS[k]) for k in sorted(op[1])])


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
        expected = {KEYS[k].fingerprint for n in live for k in keys_of.get(n, ())}
        expected |= {KEYS[k].fingerprint for k in manual}
        served = {line.split(" ", 1)[0] for line in h.last.index.splitlines()}
        assert served == expected

        lines = h.last.hosts_block.splitlines()
        assert lines[0] == HOSTS_BEGIN and lines[-1] == HOSTS_END
        by_address = {t.address: t for t in live.values()}
        for row in lines[1:-1]:
            address, names = row.split("\t")
            owner = by_address[address]  # only live targets are pinned
            for name in names.split(" "):
                assert name in (owner.name, owner.id[:12])
                # No other live target may claim the name (case-insensitively).
                assert not any(t is not owner and name.lower() in (t.name.lower(), t.id[:12])
                               for t in live.values())
    finally:
        h.rec.pool.shutdown(wait=True, cancel_futures=True)
