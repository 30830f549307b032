"""watcher.reconcile: the state machine driven synchronously, and the debounced loop."""

from __future__ import annotations

import base64
from dataclasses import replace
import hashlib
import itertools
import random
import struct
import threading
import time
from typing import Callable, Iterator

import pytest

from watcher.config import Settings, load_settings
from watcher.model import KeyState, ManualLine, PublicKey, Target
from watcher.pacing import CHEAP
from watcher.reconcile import PUBLISH_EVERY, Reconciler, Snapshot, _Fetched, retry_delay
from watcher.render import Rendered
from watcher.revocation import Revocation
from watcher.snapshot import IgnoredTarget, KeyStatus, SourceStatus, TargetStatus
from watcher.targets import ProxyIdentity

PROXY = ProxyIdentity(names=frozenset({"ssh-proxy"}), addresses=frozenset({"172.18.0.2"}))


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def make_key(seed: object) -> PublicKey:
    blob = _string(b"ssh-ed25519") + _string(hashlib.sha256(repr(seed).encode()).digest())
    fp = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return PublicKey("ssh-ed25519", base64.b64encode(blob).decode(), "", fp, 256)


def ok(*keys: PublicKey, via: str = "http") -> KeyState:
    return KeyState(keys=tuple(keys), status="ok", via=via)


def failed(error: str = "GET answered HTTP 404") -> KeyState:
    return KeyState(status="failed", error=error)


def target(name: str, n: int, started_at: str = "2024-01-01T00:00:00Z",
           address: str | None = None, labels: dict[str, str] | None = None) -> Target:
    return Target(id=f"{n:x}".rjust(64, "a"), name=name,
                  address=f"172.18.0.{n + 10}" if address is None else address,
                  labels=tuple(sorted((labels or {}).items())), started_at=started_at)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeFetch:
    """target name -> KeyState, or a callable(target) -> KeyState; records every call."""

    def __init__(self, default: KeyState | None = None) -> None:
        self.results: dict[str, KeyState | Callable[[Target], KeyState]] = {}
        self.default = default if default is not None else failed("no result configured")
        self.calls: list[Target] = []
        self.lock = threading.Lock()

    def __call__(self, t: Target) -> KeyState:
        with self.lock:
            self.calls.append(t)
        result = self.results.get(t.name, self.default)
        return result(t) if callable(result) else result

    def count(self, name: str) -> int:
        with self.lock:
            return sum(1 for c in self.calls if c.name == name)


class Harness:
    def __init__(self, settings: Settings = Settings(), pool_size: int = 4,
                 pin_names: bool = True, local_names: frozenset[str] = frozenset()) -> None:
        self.fetch = FakeFetch()
        self.clock = FakeClock()
        self.writes: list[Rendered] = []
        self.snapshots: list[Snapshot] = []
        self.hosts: tuple[tuple[str, tuple[str, ...]], ...] = ()  # unmanaged hosts lines
        self.hosts_reads = 0
        self.rec = Reconciler(settings, PROXY, self.fetch, self.write, self.snapshots.append,
                              pin_names=pin_names, pool_size=pool_size, clock=self.clock,
                              unmanaged_hosts=self.read_hosts, local_names=local_names)

    def read_hosts(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        self.hosts_reads += 1
        return self.hosts

    def write(self, rendered: Rendered) -> bool:
        self.writes.append(rendered)
        return True

    def settle(self, timeout: float = 5.0) -> None:
        """run_once_pending until no fetch is in flight and nothing is queued."""
        deadline = time.monotonic() + timeout
        while True:
            self.rec.run_once_pending()
            if self.rec.inbox.empty() and not any(e.fetching for e in self.rec.entries.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError("reconciler did not settle")
            time.sleep(0.002)

    def wait_for_message(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.rec.inbox.empty():
            if time.monotonic() > deadline:
                raise AssertionError("no message arrived")
            time.sleep(0.002)

    @property
    def last(self) -> Rendered:
        return self.writes[-1]

    @property
    def snapshot(self) -> Snapshot:
        return self.snapshots[-1]

    def index_lines(self) -> list[str]:
        return self.last.index.splitlines()


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.rec.pool.shutdown(wait=True, cancel_futures=True)


KA, KB, KC, KD = make_key("a"), make_key("b"), make_key("c"), make_key("d")


# --- basic flow ---------------------------------------------------------------------------

def test_upsert_fetch_render(h: Harness) -> None:
    web = target("web", 1)
    h.fetch.results["web"] = ok(KA)
    h.rec.upsert(web)
    h.settle()
    assert [c.id for c in h.fetch.calls] == [web.id]
    assert h.index_lines() == [
        f'{KA.fingerprint} restrict,port-forwarding,permitopen="web:*",'
        f'permitopen="{web.id[:12]}:*",permitopen="172.18.0.11:*" {KA.line()} web']
    assert h.last.hosts_block.splitlines()[1] == f"172.18.0.11\tweb {web.id[:12]}"
    assert h.rec.owners_of(KA.fingerprint) == ("web",)
    assert h.rec.owners_of(KB.fingerprint) == ()
    assert h.rec.alias_owner("web") == "web"
    assert h.rec.alias_owner("172.18.0.11") == "web"
    assert h.rec.alias_owner(web.id[:12]) == "web"
    assert h.rec.alias_owner("db") == ""
    [row] = h.snapshot.targets
    assert row == TargetStatus(id=web.id[:12], name="web", address="172.18.0.11",
                               aliases=("web", web.id[:12], "172.18.0.11"), key_status=KeyStatus.OK,
                               via="http", keys=(KA,),
                               since=row.since)
    assert h.snapshot.keys_served == 1
    assert h.snapshot.ignored == ()


def test_first_flush_has_no_key_until_fetched(h: Harness) -> None:
    gate = threading.Event()
    h.fetch.results["web"] = lambda t: (gate.wait(5), ok(KA))[1]
    h.rec.upsert(target("web", 1))
    h.rec.run_once_pending()
    assert len(h.writes) == 1
    assert h.last.index == ""
    assert h.snapshot.targets[0].key_status == KeyStatus.FETCHING
    gate.set()
    h.settle()
    assert h.index_lines()[0].startswith(KA.fingerprint + " ")


def test_ports_from_settings() -> None:
    harness = Harness(load_settings({"SSH_PERMIT_TARGET_PORT": "22,80"}))
    try:
        harness.fetch.results["web"] = ok(KA)
        harness.rec.upsert(target("web", 1))
        harness.settle()
        [line] = harness.index_lines()
        assert ('permitopen="web:22",permitopen="web:80",'
                f'permitopen="{target("web", 1).id[:12]}:22"') in line
    finally:
        harness.rec.pool.shutdown(wait=True)


def test_target_without_address_is_not_served() -> None:
    # A target that shares no network with the proxy (e.g. after `network disconnect`):
    # its names would resolve through DNS to whoever holds them now.
    harness = Harness(load_settings({}))
    try:
        harness.fetch.results["web"] = ok(KA)
        harness.rec.upsert(target("web", 1))
        harness.settle()
        assert len(harness.index_lines()) == 1
        harness.rec.upsert(target("web", 1, address=""))
        harness.settle()
        assert harness.index_lines() == []
        assert [row.reason for row in harness.snapshot.ignored] == [
            "no network shared with the proxy"]
    finally:
        harness.rec.pool.shutdown(wait=True)


def test_remove_drops_key(h: Harness) -> None:
    web, db = target("web", 1), target("db", 2)
    h.fetch.results.update(web=ok(KA), db=ok(KB))
    h.rec.upsert(web)
    h.rec.upsert(db)
    h.settle()
    assert len(h.index_lines()) == 2
    h.rec.remove(web.id)
    h.settle()
    assert [line.split()[0] for line in h.index_lines()] == [KB.fingerprint]
    assert h.rec.owners_of(KA.fingerprint) == ()
    assert h.rec.alias_owner("web") == ""
    assert [r.name for r in h.snapshot.targets] == ["db"]
    h.rec.remove("unknown-id")
    h.settle()
    assert [line.split()[0] for line in h.index_lines()] == [KB.fingerprint]


def test_replace_all_resync(h: Harness) -> None:
    a, b, c = target("a", 1), target("b", 2), target("c", 3)
    h.fetch.results.update(a=ok(KA), b=ok(KB), c=ok(KC))
    h.rec.replace_all([a, b])
    h.settle()
    assert {line.split()[0] for line in h.index_lines()} == {KA.fingerprint, KB.fingerprint}
    h.rec.replace_all([b, c])
    h.settle()
    assert {line.split()[0] for line in h.index_lines()} == {KB.fingerprint, KC.fingerprint}
    assert set(h.rec.entries) == {b.id, c.id}
    assert h.fetch.count("b") == 1  # unchanged target: not fetched again
    assert h.fetch.count("c") == 1
    h.rec.replace_all([])
    h.settle()
    assert h.last.index == ""
    assert h.snapshot.targets == ()


def test_a_resync_keeps_the_status_row_of_a_target_that_did_not_change(h: Harness) -> None:
    """The heartbeat re-encodes only rows that are new objects (~10 us each, 1 s at 100k)."""
    a, b = target("a", 1), target("b", 2)
    h.fetch.results.update(a=ok(KA), b=ok(KB), c=ok(KC))
    h.rec.replace_all([a, b])
    h.settle()
    before = {row.name: row for row in h.snapshot.targets}
    h.rec.replace_all([a, replace(b, name="c")])  # a full render; b renamed
    h.settle()
    after = {row.name: row for row in h.snapshot.targets}
    assert after["a"] is before["a"]
    assert set(after) == {"a", "c"} and after["c"].id == before["b"].id


def test_not_permitted_target_is_ignored() -> None:
    harness = Harness(load_settings({"SSH_PERMIT_TARGET_HOST": "web-*",
                                     "SSH_TARGET_LABELS": "proxy=on"}))
    try:
        web = target("web-1", 1, labels={"proxy": "on"})
        db = target("db", 2, labels={"proxy": "on"})
        off = target("web-2", 3)
        harness.fetch.results.update({"web-1": ok(KA), "db": ok(KB), "web-2": ok(KC)})
        for t in (web, db, off):
            harness.rec.upsert(t)
        harness.settle()
        assert [line.split()[0] for line in harness.index_lines()] == [KA.fingerprint]
        assert [c.name for c in harness.fetch.calls] == ["web-1"]
        assert harness.snapshot.ignored == (
            IgnoredTarget(db.id[:12], "db", "name does not match SSH_PERMIT_TARGET_HOST=web-*"),
            IgnoredTarget(off.id[:12], "web-2", "label 'proxy' missing (SSH_TARGET_LABELS)"),
        )
        # A served target whose label changes stops being served and is listed as ignored.
        harness.rec.upsert(target("web-1", 1, labels={"proxy": "off"}))
        harness.settle()
        assert harness.last.index == ""
        assert harness.snapshot.targets == ()
        assert {i.name for i in harness.snapshot.ignored} == {"db", "web-1", "web-2"}
        # A resync drops ignored targets that are gone.
        harness.rec.replace_all([db])
        harness.settle()
        assert [i.name for i in harness.snapshot.ignored] == ["db"]
        harness.rec.remove(db.id)
        harness.settle()
        assert harness.snapshot.ignored == ()
    finally:
        harness.rec.pool.shutdown(wait=True)


def test_refused_aliases_in_snapshot(h: Harness) -> None:
    a = target("db", 1)
    b = Target(id="b" * 64, name="evil", address="172.18.0.99", hostname="db", started_at="x")
    h.fetch.results.update(db=ok(KA), evil=ok(KB))
    h.rec.upsert(a)
    h.rec.upsert(b)
    h.settle()
    assert h.snapshot.refused_aliases == (("evil", "db", "belongs to target db"),)
    assert h.rec.alias_owner("db") == "db"


# --- names seen elsewhere (issue 15) ----------------------------------------------------

def own(name: str, n: int, **fields: object) -> Target:
    """target() with an id of its own digit (the default ids share their first 12)."""
    return replace(target(name, n), id=f"{n}c" * 32, **fields)


def refusals(h: Harness, name: str) -> dict[str, str]:
    return {alias: reason for t, alias, reason in h.snapshot.refused_aliases if t == name}


def test_alias_owner_ignores_case(h: Harness) -> None:
    h.fetch.results["Web"] = ok(KA)
    web = own("Web", 1)
    h.rec.upsert(web)
    h.settle()
    for spelling in ("Web", "web", "WEB"):
        assert h.rec.alias_owner(spelling) == "Web"
    assert h.rec.alias_owner(web.id[:12].upper()) == "Web"
    assert h.rec.alias_owner("web\n") == ""


def test_impostor_hostname_in_another_case_is_refused(h: Harness) -> None:
    victim = own("ws-a", 1)
    imp = own("imp", 2, hostname="WS-A")
    h.fetch.results.update({"ws-a": ok(KA), "imp": ok(KB)})
    h.rec.upsert(victim)
    h.rec.upsert(imp)
    h.settle()
    assert refusals(h, "imp") == {"WS-A": "belongs to target ws-a"}
    assert h.rec.alias_owner("WS-A") == "ws-a"
    block = h.last.hosts_block.lower()
    assert block.count("ws-a") == 1


def test_non_served_containers_names_reserved() -> None:
    harness = Harness(load_settings({"SSH_PERMIT_TARGET_HOST": "web-*"}))
    try:
        web = own("web-1", 1, hostname="db-1", aliases=("db-alias", "free"))
        db = own("db-1", 2, aliases=("db-alias",))
        unreachable = own("far", 3, address="", hostname="free")
        harness.fetch.results["web-1"] = ok(KA)
        for t in (web, db, unreachable):
            harness.rec.upsert(t)
        harness.settle()
        assert refusals(harness, "web-1") == {
            "db-1": "name of container db-1, which is not served",
            "db-alias": "network alias of container db-1, which is not served"}
        [row] = harness.snapshot.targets
        assert row.aliases == ("web-1", web.id[:12], web.address, "free")
        assert "db-1" not in harness.last.hosts_block
        # The container goes away: its names are free again.
        harness.rec.remove(db.id)
        harness.settle()
        assert refusals(harness, "web-1") == {}
        assert "db-1" in harness.last.hosts_block
    finally:
        harness.rec.pool.shutdown(wait=True)


def test_admin_permitopen_hosts_reserved(h: Harness) -> None:
    web = own("web", 1, hostname="DB-1")
    h.fetch.results["web"] = ok(KA)
    h.rec.upsert(web)
    h.rec.set_manual([ManualLine.at("/keys/admin:4", ('permitopen="db-1:5432"',), KD)])
    h.settle()
    assert refusals(h, "web") == {"DB-1": "host of a permitopen in /keys/admin:4"}
    h.rec.set_manual([])
    h.settle()
    assert refusals(h, "web") == {}


def test_admin_permitopen_hosts_reserved_for_targets_that_come_later(h: Harness) -> None:
    """Admin keys served before any target: the first targets are decided with their
    reservations too (a container whose hostname is an admin line's permitopen host must not
    take that name), and the reason names the line where it is after an edit above it."""
    from watcher.sources.manual import reparse

    data = b'permitopen="db-1:5432" ' + KD.line().encode() + b"\n"
    admin = reparse(None, data, "/keys/admin.pub")
    h.rec.set_manual(list(admin.lines))
    h.settle()
    web = own("web", 1, hostname="DB-1")
    h.fetch.results["web"] = ok(KA)
    h.rec.upsert(web)
    h.settle()
    assert refusals(h, "web") == {"DB-1": "host of a permitopen in /keys/admin.pub:1"}
    assert "DB-1" not in h.last.hosts_block
    h.rec.set_manual(list(reparse(admin, b"# the admins\n\n" + data, "/keys/admin.pub").lines))
    h.settle()
    assert refusals(h, "web") == {"DB-1": "host of a permitopen in /keys/admin.pub:3"}


def test_unmanaged_hosts_lines_reserved_and_not_pinned_twice(h: Harness) -> None:
    h.hosts = (("10.0.0.5", ("db-1",)), ("172.18.0.11", ("WEB",)))
    web = own("web", 1, hostname="db-1")
    h.fetch.results["web"] = ok(KA)
    h.rec.upsert(web)
    h.settle()
    assert refusals(h, "web") == {
        "db-1": "in the hosts file outside the managed block (-> 10.0.0.5)"}
    # `web` is granted (the line leads to web itself) but pinned there already, not again.
    assert h.rec.alias_owner("web") == "web"
    assert h.last.hosts_block.splitlines()[1] == f"172.18.0.11\t{web.id[:12]}"


def test_hosts_file_read_only_when_there_are_targets(h: Harness) -> None:
    h.rec.set_manual([ManualLine.at("/keys/admin:1", (), KD)])
    h.settle()
    assert h.hosts_reads == 0
    h.fetch.results["web"] = ok(KA)
    h.rec.upsert(own("web", 1))
    h.settle()
    assert h.hosts_reads > 0


def test_proxy_local_names_reserved() -> None:
    harness = Harness(local_names=frozenset({"proxy.example.org"}))
    try:
        harness.fetch.results["web"] = ok(KA)
        harness.rec.upsert(own("web", 1, hostname="PROXY.example.org"))
        harness.settle()
        assert refusals(harness, "web") == {"PROXY.example.org": "name of the proxy itself"}
    finally:
        harness.rec.pool.shutdown(wait=True)


def test_refusal_logged_once(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.fetch.results.update({"ws-a": ok(KA), "imp": ok(KB)})
    h.rec.upsert(own("ws-a", 1))
    h.rec.upsert(own("imp", 2, hostname="WS-A\n"))
    with caplog.at_level("WARNING", logger="watcher.reconcile"):
        h.settle()
        h.rec.upsert(own("other", 3))
        h.settle()
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused == ["target 'imp': alias 'WS-A\\n' refused: not a valid host name"]


# --- restarts and stale results -------------------------------------------------------

def test_restart_refetches_and_ignores_stale_result(h: Harness) -> None:
    old, new = target("web", 1, started_at="t1"), target("web", 1, started_at="t2")
    h.fetch.results["web"] = lambda t: ok(KA) if t.started_at == "t1" else ok(KB)
    h.rec.upsert(old)
    h.settle()
    assert h.index_lines()[0].split()[0] == KA.fingerprint
    first_generation = h.rec.entries[old.id].generation
    h.rec.upsert(new)
    h.rec.run_once_pending()
    assert h.rec.entries[new.id].generation != first_generation
    h.settle()
    assert [c.started_at for c in h.fetch.calls] == ["t1", "t2"]
    assert [line.split()[0] for line in h.index_lines()] == [KB.fingerprint]
    # A late result of the old generation changes nothing.
    h.rec.inbox.put(_Fetched(new.id, first_generation, ok(KA)))
    h.settle()
    assert [line.split()[0] for line in h.index_lines()] == [KB.fingerprint]
    # A result for a target that is gone changes nothing either.
    h.rec.inbox.put(_Fetched("f" * 64, h.rec.entries[new.id].generation, ok(KC)))
    h.settle()
    assert [line.split()[0] for line in h.index_lines()] == [KB.fingerprint]


class BlockedFetch:
    """A key fetch whose first call blocks (an old fetch still in flight, maybe sleeping
    between attempts) until released, then answers KA; every later call answers KB."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self._first = True
        self._lock = threading.Lock()

    def __call__(self, t: Target) -> KeyState:
        with self._lock:
            first, self._first = self._first, False
        if first:
            self.started.set()
            self.release.wait(5)
            return ok(KA)
        return ok(KB)


def release_and_expect_only_kb(harness: Harness, blocked: BlockedFetch) -> None:
    """The newer fetch served KB; the old fetch's late KA, released now, is dropped."""
    assert [line.split()[0] for line in harness.index_lines()] == [KB.fingerprint]
    blocked.release.set()
    harness.wait_for_message()
    harness.settle()
    assert [line.split()[0] for line in harness.index_lines()] == [KB.fingerprint]


def test_restart_while_old_fetch_in_flight() -> None:
    harness = Harness(pool_size=2)
    blocked = BlockedFetch()
    try:
        harness.fetch.results["web"] = blocked
        harness.rec.upsert(target("web", 1, started_at="t1"))
        harness.rec.run_once_pending()
        assert blocked.started.wait(5)
        harness.rec.upsert(target("web", 1, started_at="t2"))
        harness.settle()  # the new fetch is done; the old one is still blocked
        release_and_expect_only_kb(harness, blocked)
        assert harness.snapshot.targets[0].fingerprints == (KB.fingerprint,)
    finally:
        blocked.release.set()
        harness.rec.pool.shutdown(wait=True)


# Regression: a re-added entry used to start again at generation 0, like the old fetch.
def test_stale_result_from_before_remove_and_readd_is_ignored() -> None:
    harness = Harness(pool_size=2)
    blocked = BlockedFetch()
    try:
        harness.fetch.results["web"] = blocked
        web1 = target("web", 1, started_at="t1")
        harness.rec.upsert(web1)
        harness.rec.run_once_pending()
        assert blocked.started.wait(5)
        harness.rec.remove(web1.id)  # docker "die"
        harness.rec.run_once_pending()
        harness.rec.upsert(target("web", 1, started_at="t2"))  # docker "start"
        harness.settle()
        release_and_expect_only_kb(harness, blocked)
    finally:
        blocked.release.set()
        harness.rec.pool.shutdown(wait=True)


def test_address_change_refetches_rename_does_not(h: Harness) -> None:
    h.fetch.results["web"] = ok(KA)
    h.fetch.results["www"] = ok(KA)
    h.rec.upsert(target("web", 1))
    h.settle()
    h.rec.upsert(target("www", 1))  # renamed: same id, same start
    h.settle()
    assert len(h.fetch.calls) == 1
    assert 'permitopen="www:*"' in h.index_lines()[0]
    assert 'permitopen="web:*"' not in h.index_lines()[0]
    h.rec.upsert(target("www", 1, address="172.18.0.77"))
    h.settle()
    assert len(h.fetch.calls) == 2
    assert h.fetch.calls[-1].address == "172.18.0.77"
    assert 'permitopen="172.18.0.77:*"' in h.index_lines()[0]


# --- failures and retries ---------------------------------------------------------------

def test_retry_delay_schedule() -> None:
    assert [retry_delay(n) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert retry_delay(0) == 5
    assert retry_delay(1000) == 300


def test_failed_fetch_is_retried_with_growing_delay(h: Harness) -> None:
    h.fetch.results["web"] = failed("GET answered HTTP 503")
    web = target("web", 1)
    h.rec.upsert(web)
    h.settle()
    entry = h.rec.entries[web.id]
    assert h.fetch.count("web") == 1
    assert entry.failures == 1
    assert entry.retry_at == pytest.approx(h.clock.now + 5)
    assert h.snapshot.targets[0].key_status == KeyStatus.FAILED
    assert h.snapshot.targets[0].error == "GET answered HTTP 503"
    assert h.last.index == ""
    expected_delays = [10, 20, 40, 80, 160, 300, 300]
    delay = 5.0
    for n, following in enumerate(expected_delays, start=2):
        h.clock.now += delay - 0.01
        h.settle()
        assert h.fetch.count("web") == n - 1  # not yet due
        h.clock.now += 0.01
        h.settle()
        assert h.fetch.count("web") == n
        assert entry.failures == n
        assert entry.retry_at == pytest.approx(h.clock.now + following)
        delay = following
    # Then it works: the key is served and no more retries are scheduled.
    h.fetch.results["web"] = ok(KA)
    h.clock.now += 300
    h.settle()
    assert entry.failures == 0 and entry.retry_at is None
    assert h.index_lines()[0].split()[0] == KA.fingerprint
    calls = h.fetch.count("web")
    h.clock.now += 10_000
    h.settle()
    assert h.fetch.count("web") == calls


def test_ready_fetches_a_failed_target_now(h: Harness) -> None:
    """A target reported ready (Docker: healthy) is fetched at once, not at its next retry."""
    web = target("web", 1)
    h.fetch.results["web"] = failed("GET answered HTTP 503")
    h.rec.upsert(web)
    h.settle()
    entry = h.rec.entries[web.id]
    assert entry.retry_at == pytest.approx(h.clock.now + 5)
    h.fetch.results["web"] = ok(KA)
    h.rec.ready(web.id)
    h.settle()  # the fake clock has not moved: only the ready message can start a fetch
    assert h.fetch.count("web") == 2
    assert h.index_lines()[0].split()[0] == KA.fingerprint
    assert entry.retry_at is None and entry.failures == 0


def test_ready_of_a_served_or_unknown_target_fetches_nothing(h: Harness) -> None:
    web = target("web", 1)
    h.fetch.results["web"] = ok(KA)
    h.rec.upsert(web)
    h.settle()
    h.rec.ready(web.id)  # already served: its key is fetched once per start
    h.rec.ready("f" * 64)  # not a target (filtered out, or gone)
    h.settle()
    assert h.fetch.count("web") == 1
    assert h.rec.entries[web.id].retry_at is None
    assert set(h.rec.entries) == {web.id}


def test_ready_while_a_fetch_waits_between_attempts() -> None:
    """The fetch in flight may sleep seconds before its next attempt: ready starts a new one
    at once, and the old one's late answer is dropped."""
    harness = Harness(pool_size=2)
    blocked = BlockedFetch()
    try:
        harness.fetch.results["web"] = blocked
        web = target("web", 1)
        harness.rec.upsert(web)
        harness.rec.run_once_pending()
        assert blocked.started.wait(5)
        harness.rec.ready(web.id)
        harness.settle()  # the new fetch answered; the old one is still blocked
        assert harness.fetch.count("web") == 2
        release_and_expect_only_kb(harness, blocked)
    finally:
        blocked.release.set()
        harness.rec.pool.shutdown(wait=True)


def test_failure_keeps_already_served_keys(h: Harness) -> None:
    web = target("web", 1)
    h.fetch.results["web"] = ok(KA)
    h.rec.upsert(web)
    h.settle()
    h.rec.inbox.put(_Fetched(web.id, h.rec.entries[web.id].generation,
                             failed("connection refused")))
    h.settle()
    assert h.index_lines()[0].split()[0] == KA.fingerprint
    row = h.snapshot.targets[0]
    assert row.key_status == KeyStatus.OK
    assert row.error == "connection refused"
    assert row.fingerprints == (KA.fingerprint,)
    assert h.rec.entries[web.id].retry_at == pytest.approx(h.clock.now + 5)


def test_crashing_fetch_is_a_failure(h: Harness) -> None:
    def boom(t: Target) -> KeyState:
        raise RuntimeError("adapter bug")

    h.fetch.results["web"] = boom
    h.rec.upsert(target("web", 1))
    h.settle()
    row = h.snapshot.targets[0]
    assert row.key_status == KeyStatus.FAILED
    assert row.error == "internal error: adapter bug"
    assert h.rec.entries[target("web", 1).id].failures == 1


# --- owners, manual lines, source status ----------------------------------------------------

def test_owners_of_shared_key_and_alias_owner(h: Harness) -> None:
    h.fetch.results.update(web=ok(KA, KB), db=ok(KA))
    h.rec.upsert(target("web", 1))
    h.rec.upsert(target("db", 2))
    h.settle()
    assert h.rec.owners_of(KA.fingerprint) == ("db", "web")
    assert h.rec.owners_of(KB.fingerprint) == ("web",)
    assert h.rec.alias_owner("db") == "db"
    assert h.rec.alias_owner("172.18.0.12") == "db"
    assert h.rec.alias_owner("172.18.0.11") == "web"
    [shared] = [line for line in h.index_lines() if line.startswith(KA.fingerprint)]
    assert shared.endswith(" db,web")


def test_owners_of_answers_the_written_owners_while_a_render_is_being_written(h: Harness) -> None:
    """The access log asks who a key belongs to while the reconciler writes: until the index
    without a key's old owner is written, it names the old one (the renderer's owners are
    already new); after, the new ones. A resync (a full render) likewise, and for the target
    a name leads to."""
    h.fetch.results.update(web=ok(KA), db=ok(KB))
    h.rec.upsert(target("web", 1))
    h.rec.upsert(target("db", 2))
    h.settle()
    seen: list[tuple[tuple[str, ...], ...]] = []
    aliases: list[str] = []
    write = h.write

    def write_and_ask(rendered: Rendered) -> bool:
        seen.append(tuple(h.rec.owners_of(k.fingerprint) for k in (KA, KB)))
        aliases.append(h.rec.alias_owner("web"))
        return write(rendered)

    h.rec.write = write_and_ask
    h.fetch.results.update(web=ok(KB))  # web restarts with db's key: KA loses web
    h.rec.upsert(target("web", 1, started_at="2024-01-02T00:00:00Z"))
    h.settle()
    assert seen[0] == (("web",), ("db",)) and h.rec.owners_of(KA.fingerprint) == ()
    assert h.rec.owners_of(KB.fingerprint) == ("db", "web")
    seen.clear()
    h.rec.replace_all([target("db", 2)])  # web gone, by a resync
    h.rec._full = True  # as a resync that changed what every target's outcome depends on
    h.settle()
    assert seen[0] == ((), ("db", "web")) and h.rec.owners_of(KB.fingerprint) == ("db",)
    assert aliases[-1] == "web" and h.rec.alias_owner("web") == ""  # the old book, until written


def test_manual_lines_and_source_status(h: Harness) -> None:
    manual = ManualLine.at("/keys/admin:1", ('permitopen="db:22"',), KD)
    h.rec.set_manual([manual])
    h.rec.set_source_status({"kind": "docker", "connected": True})
    h.settle()
    assert h.index_lines() == [
        f'{KD.fingerprint} restrict,port-forwarding,permitopen="db:22" {KD.line()}']
    assert h.rec.owners_of(KD.fingerprint) == ("/keys/admin:1",)
    assert h.snapshot.source == SourceStatus(kind="docker", connected=True)
    assert h.snapshot.writes == len(h.writes)


def test_write_returning_false_is_not_counted() -> None:
    harness = Harness()
    harness.write = lambda rendered: False  # type: ignore[method-assign]
    harness.rec.write = harness.write
    try:
        harness.rec.run_once_pending()
        harness.rec.run_once_pending()
        assert harness.rec.writes == 0
        assert harness.snapshot.writes == 0
        assert harness.snapshot.last_write == 0.0
    finally:
        harness.rec.pool.shutdown(wait=True)


# --- bursts and the debounced loop ----------------------------------------------------------

def burst_targets(count: int) -> list[Target]:
    return [Target(id=f"{i:064x}", name=f"t{i:04d}", address=f"10.1.{i // 200}.{i % 200 + 1}",
                   started_at="s") for i in range(count)]


def test_burst_applied_then_one_flush_is_one_write(h: Harness) -> None:
    targets = burst_targets(500)
    keys = {t.name: make_key(t.name) for t in targets}
    h.fetch.default = ok()
    for t in targets:
        h.fetch.results[t.name] = ok(keys[t.name])
        h.rec.upsert(t)
    h.rec.run_once_pending()
    assert len(h.writes) == 1
    assert len(h.snapshot.targets) == 500
    h.settle(timeout=20)
    assert len(h.index_lines()) == 500
    assert h.fetch.count("t0000") == 1 and len(h.fetch.calls) == 500


def test_debounced_loop_coalesces_a_burst() -> None:
    fetch = FakeFetch()
    writes: list[Rendered] = []
    lock = threading.Lock()

    def write(rendered: Rendered) -> bool:
        with lock:
            writes.append(rendered)
        return True

    rec = Reconciler(Settings(), PROXY, fetch, write, pool_size=8, min_wait=0.05, max_wait=0.5)
    targets = burst_targets(500)
    for t in targets:
        fetch.results[t.name] = ok(make_key(t.name))
    stop = threading.Event()
    loop = threading.Thread(target=rec.run, args=(stop,), daemon=True)
    loop.start()
    try:
        for t in targets:
            rec.upsert(t)
        deadline = time.monotonic() + 15
        while True:
            with lock:
                done = bool(writes) and writes[-1].index.count("\n") == 500
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert done, "the 500 keys were never written"
        time.sleep(0.3)  # nothing left to do: no further writes
    finally:
        stop.set()
        loop.join(5)
    assert not loop.is_alive()
    assert 1 <= len(writes) <= 5
    assert writes[-1].index.count("\n") == 500
    assert rec.writes == len(writes)


def test_loop_retries_on_its_own() -> None:
    """run() starts a retry once it is due and renders what it fetched."""
    fetch = FakeFetch()
    results = iter([failed("boot"), ok(KA)])
    fetch.results["web"] = lambda t: next(results)
    writes: list[Rendered] = []
    rec = Reconciler(Settings(), PROXY, fetch, lambda r: writes.append(r) or True,
                     min_wait=0.01, max_wait=0.1)
    stop = threading.Event()
    loop = threading.Thread(target=rec.run, args=(stop,), daemon=True)
    loop.start()
    try:
        rec.upsert(target("web", 1))
        deadline = time.monotonic() + 3
        while fetch.count("web") < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.1)
        entry = rec.entries[target("web", 1).id]
        assert entry.failures == 1
        entry.retry_at = time.monotonic()  # due now instead of in 5 s
        rec.inbox.put(object())  # wake the loop (unknown messages are ignored)
        while not (writes and writes[-1].index) and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        stop.set()
        loop.join(5)
    assert fetch.count("web") == 2
    assert writes[-1].index.split()[0] == KA.fingerprint


def test_loop_gathers_a_stream_of_messages_not_an_isolated_event(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each wake-up of the loop costs CPU: under a stream (messages in a row that each came
    soon after the loop began to wait) it waits for more before draining, never past a
    flush falling due; an event after a quiet spell, and its key's answer, never wait."""
    pauses: list[float] = []
    monkeypatch.setattr("watcher.reconcile.time.sleep", pauses.append)
    rec = h.rec
    rec._gather(5.0)  # an event after a quiet spell
    rec._gather(0.002)  # its key's answer
    rec._gather(0.001)  # a readiness
    assert pauses == []
    rec._gather(0.001)  # a fourth in a row: a stream
    assert pauses == [rec.gather]
    rec._dirty()  # a flush is due in min_wait
    h.clock.now += rec.min_wait - 0.004
    rec._gather(0.0)
    assert pauses[-1] == pytest.approx(0.004)
    h.clock.now += 1.0  # the flush is overdue: no wait at all
    rec._gather(0.0)
    assert len(pauses) == 2
    rec._gather(0.5)  # a message after a wait longer than `gather` ends the stream
    rec._gather(0.001)
    rec._gather(0.001)
    rec._gather(0.001)
    assert len(pauses) == 2


def test_loop_never_gathers_while_fetches_wait_for_the_pool(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load (a start, a resync) hands the pool `fetch_limit` fetches per wake-up: the
    answers' stream must keep it fed, not wait between its rounds."""
    pauses: list[float] = []
    monkeypatch.setattr("watcher.reconcile.time.sleep", pauses.append)
    for n in range(h.rec.fetch_limit + 5):
        h.rec.upsert(target(f"t{n:04d}", n))
    while not h.rec.inbox.empty():
        h.rec._apply(h.rec.inbox.get_nowait())
    h.rec._start_due_fetches()  # the first fetch_limit go to the pool, 5 wait
    assert h.rec._fetch_queue
    for _ in range(5):
        h.rec._gather(0.001)
    assert pauses == []
    h.rec.pool.shutdown(wait=True, cancel_futures=True)


def test_costly_status_snapshots_under_a_stream_of_flushes_come_at_most_every_publish_every(
        h: Harness) -> None:
    """The snapshot is O(targets) and read every 2 s: once it is not cheap, a flush soon
    after the last snapshot leaves it to the loop, which takes it once PUBLISH_EVERY has
    passed; the first change after a quiet spell is published with its flush."""
    rec = h.rec
    rec.min_wait = 0.0  # flushes fall due at once on the fake clock
    cpu = itertools.count(0.0, 2 * CHEAP)  # each snapshot costs twice CHEAP of CPU
    rec._publish_pacer.cpu_clock = lambda: next(cpu)
    h.fetch.results["web"] = ok(KA)
    h.fetch.results["db"] = ok(KB)
    stop = threading.Event()
    loop = threading.Thread(target=rec.run, args=(stop,), daemon=True)

    def wait_for(what: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 5
        while not what():
            assert time.monotonic() < deadline, "the loop did not get there"
            time.sleep(0.005)

    def shown() -> set[str]:
        return {row.name for row in h.snapshots[-1].targets} if h.snapshots else set()

    loop.start()
    try:
        rec.upsert(target("web", 1))  # the first snapshot: at once
        wait_for(lambda: "web" in shown())
        wait_for(lambda: any(KA.fingerprint in r.index for r in h.writes))
        assert h.snapshots[-1].keys_served == 0  # its key came within PUBLISH_EVERY
        h.clock.now += PUBLISH_EVERY
        rec.inbox.put(object())  # wake the loop (unknown messages are ignored)
        wait_for(lambda: h.snapshots[-1].keys_served == 1)
        h.clock.now += PUBLISH_EVERY / 4
        rec.upsert(target("db", 2))
        wait_for(lambda: any(KB.fingerprint in r.index for r in h.writes))
        time.sleep(0.1)
        assert "db" not in shown()  # written to the index, not yet in a snapshot
        h.clock.now += PUBLISH_EVERY
        rec.inbox.put(object())
        wait_for(lambda: shown() == {"web", "db"} and h.snapshots[-1].keys_served == 2)
        h.clock.now += 5 * PUBLISH_EVERY  # a quiet spell: the next change is shown at once
        h.fetch.results["cache"] = ok(KC)
        rec.upsert(target("cache", 3))
        wait_for(lambda: "cache" in shown())
    finally:
        stop.set()
        loop.join(5)


def test_cheap_status_snapshots_come_with_every_flush(h: Harness) -> None:
    """Up to ~10k targets a snapshot is cheap: `watcher status` follows every flush."""
    rec = h.rec
    rec.min_wait = 0.0
    rec._publish_pacer.cpu_clock = lambda: 0.0  # no CPU at all
    h.fetch.results["web"] = ok(KA)
    h.fetch.results["db"] = ok(KB)
    stop = threading.Event()
    loop = threading.Thread(target=rec.run, args=(stop,), daemon=True)
    loop.start()
    try:
        for name, n in (("web", 1), ("db", 2)):
            rec.upsert(target(name, n))
            deadline = time.monotonic() + 5  # the fake clock never moves: no pacer falls due
            while not (h.snapshots and h.snapshots[-1].keys_served == n):
                assert time.monotonic() < deadline, f"{name} was not published with its flush"
                time.sleep(0.005)
    finally:
        stop.set()
        loop.join(5)


def test_proxy_identity_learned_later_is_applied(h: Harness) -> None:
    # The Docker socket may be unreachable when the watcher starts: the proxy's own names
    # arrive with the first connection and must then be refused as aliases.
    h.fetch.results["web"] = ok(KA)
    web = replace(target("web", 1), aliases=("gateway-name",))
    h.rec.upsert(web)
    h.settle()
    assert 'permitopen="gateway-name:*"' in h.index_lines()[0]
    h.rec.set_proxy_identity(ProxyIdentity(names=frozenset({"gateway-name"})))
    h.settle()
    assert 'gateway-name' not in h.index_lines()[0]
    assert ("web", "gateway-name", "name of the proxy itself") in h.snapshot.refused_aliases


# --- revocation: keys that lost a grant, handed on after the write --------------------------

class Revoked:
    """The reconciler's revoke callback: records each call with the index written before it."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.calls: list[tuple[list[Revocation], str]] = []

    def __call__(self, revocations: list[Revocation]) -> None:
        self.calls.append((revocations, self.harness.last.index))

    def reasons(self) -> list[tuple[str, str, tuple[str, ...]]]:
        return [(r.fingerprint, r.reason, r.targets) for call, _ in self.calls for r in call]


@pytest.fixture
def rv() -> Iterator[tuple[Harness, Revoked]]:
    harness = Harness(load_settings({"SSH_PERMIT_TARGET_HOST": "web*,db*"}))
    harness.rec.pool.shutdown(wait=True)
    revoked = Revoked(harness)
    harness.rec = Reconciler(harness.rec.settings, PROXY, harness.fetch, harness.write,
                             harness.snapshots.append, revoked, clock=harness.clock)
    harness.fetch.results.update({"web": ok(KA), "web2": ok(KA), "db": ok(KB), "db2": ok(KB)})
    yield harness, revoked
    harness.rec.pool.shutdown(wait=True, cancel_futures=True)


def test_removed_target_revoked_after_the_index_without_it_is_written(rv) -> None:
    h, revoked = rv
    h.rec.upsert(target("web", 1))
    h.rec.upsert(target("db", 2))
    h.settle()
    assert revoked.calls == []
    h.rec.remove(target("web", 1).id)
    h.settle()
    [(call, index_then)] = revoked.calls
    assert [(r.fingerprint, r.reason, r.targets) for r in call] == [(KA.fingerprint, "target-removed", ("web",))]
    assert KA.fingerprint not in index_then and KB.fingerprint in index_then
    assert call[0].at >= h.rec.last_write


@pytest.mark.parametrize("change, reason", [
    (lambda t: replace(t, name="web-renamed"), "target-renamed"),
    (lambda t: replace(t, address="172.18.0.99"), "target-readdressed"),
    (lambda t: replace(t, address=""), "target-disconnected"),
    (lambda t: replace(t, name="other"), "target-not-permitted"),  # SSH_PERMIT_TARGET_HOST=web*,db*
    (lambda t: replace(t, started_at="2024-02-02T00:00:00Z"), "target-restarted"),
])
def test_each_change_of_a_target_gives_its_reason(rv, change, reason) -> None:
    h, revoked = rv
    web = target("web", 1)
    h.rec.upsert(web)
    h.settle()
    h.fetch.results["web"] = failed()  # a refetch finds nothing: the change alone decides
    h.rec.upsert(change(web))
    h.settle()
    assert revoked.reasons() == [(KA.fingerprint, reason, ("web",))]


def test_a_name_that_moves_to_another_target_in_one_flush_is_explained_by_its_old_owner(rv) -> None:
    """The revocation world before a flush reads the names as they were granted: web's
    address, given to db in the same flush, still names web (the book notes what it
    changed; the live tables already say db)."""
    h, revoked = rv
    web, db = target("web", 1), target("db", 2)
    h.rec.upsert(web)
    h.rec.upsert(db)
    h.settle()
    h.fetch.results["db"] = failed()
    h.rec.remove(web.id)
    h.rec.upsert(replace(db, address=web.address))
    h.settle()
    assert h.rec.alias_owner(web.address) == "db"
    assert sorted(revoked.reasons()) == sorted([(KA.fingerprint, "target-removed", ("web",)),
                                                (KB.fingerprint, "target-readdressed", ("db",))])


def test_manual_line_removed_is_revoked(rv) -> None:
    h, revoked = rv
    h.rec.set_manual([ManualLine.at("admin.pub:1", ('permitopen="db-x:22"',), KC)])
    h.settle()
    h.rec.set_manual([])
    h.settle()
    assert revoked.reasons() == [(KC.fingerprint, "manual-line-removed", ("admin.pub:1",))]


def test_grants_that_grow_or_stay_revoke_nothing(rv) -> None:
    h, revoked = rv
    h.rec.upsert(target("web", 1))
    h.rec.upsert(target("db", 2))
    h.settle()
    h.rec.upsert(target("web2", 3))  # the same key now opens a second target too
    h.rec.set_manual([ManualLine.at("admin.pub:1", ('permitopen="db-x:22"',), KA)])
    h.settle()
    h.rec.remove(target("db", 2).id)  # another key's target
    h.settle()
    assert [fp for fp, _, _ in revoked.reasons()] == [KB.fingerprint]
    h.rec.remove(target("web2", 3).id)  # the shared key loses web2, keeps web
    h.settle()
    assert revoked.reasons()[1:] == [(KA.fingerprint, "target-removed", ("web2",))]


def test_snapshot_says_since_when_and_the_last_source_event(h: Harness,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    wall = [1000.0]
    monkeypatch.setattr("watcher.reconcile.time.time", lambda: wall[0])
    web = target("web", 1)
    h.fetch.results["web"] = ok(KA)
    h.rec.upsert(web)
    h.settle()
    assert h.snapshot.last_event == 1000.0
    assert h.snapshot.targets[0].since == 1000.0
    wall[0] = 2000.0  # the same keys again: the state did not change
    h.rec.inbox.put(_Fetched(web.id, h.rec.entries[web.id].generation, ok(KA)))
    h.settle()
    assert h.snapshot.targets[0].since == 1000.0 and h.snapshot.last_event == 1000.0
    wall[0] = 3000.0  # the key API fails: the keys stay served, with the error since now
    h.rec.inbox.put(_Fetched(web.id, h.rec.entries[web.id].generation, failed("HTTP 503")))
    h.settle()
    row = h.snapshot.targets[0]
    assert (row.key_status, row.error, row.since) == (KeyStatus.OK, "HTTP 503", 3000.0)
    wall[0] = 4000.0
    h.rec.upsert(target("web", 1, started_at="2024-01-02T00:00:00Z"))  # restarted
    h.settle()
    assert h.snapshot.last_event == 4000.0 and h.snapshot.targets[0].since == 4000.0


def test_a_batch_waits_at_most_as_long_as_the_last_flush_took(h: Harness) -> None:
    """Under a steady stream the batch is cut after BATCH_SHARE x the last flush's cost,
    within [min_wait, max_wait]: at 1k targets every min_wait, at 100k about every flush."""
    from watcher.reconcile import BATCH_SHARE
    rec = h.rec
    for cost, bound in ((0.0, rec.min_wait), (0.3, 0.3 * BATCH_SHARE), (1e6, rec.max_wait)):
        rec._flush_cost = cost
        assert rec._batch_bound() == pytest.approx(max(rec.min_wait, min(rec.max_wait, bound)))
    assert rec.min_wait < 0.3 * BATCH_SHARE < rec.max_wait


def test_fetches_are_handed_to_the_pool_a_few_at_a_time_and_all_get_done() -> None:
    """100k targets at once must not make 100k futures: at most `fetch_limit` fetches are
    in the pool at a time; the others wait their turn, in order, and each is fetched."""
    harness = Harness(pool_size=2)
    rec = harness.rec
    assert rec.fetch_limit == 4
    gate = threading.Semaphore(0)

    def fetch(t: Target) -> KeyState:
        gate.acquire(timeout=5)  # held until the test lets it answer
        return ok(make_key(("limit", t.name)))

    submitted: list[int] = []
    real_submit = rec.pool.submit

    def submit(fn, *args):
        submitted.append(len(rec._in_flight))  # this one included
        return real_submit(fn, *args)

    rec.pool.submit = submit  # type: ignore[method-assign]
    harness.fetch.default = fetch  # type: ignore[assignment]
    names = [f"web{n}" for n in range(20)]
    for n, name in enumerate(names):
        harness.fetch.results[name] = fetch
        rec.upsert(target(name, n + 1))
    rec.run_once_pending()
    assert len(submitted) == 4 and len(rec._fetch_queue) == 16
    for _ in range(20):
        gate.release()
    harness.settle()
    assert len(submitted) == 20 and max(submitted) == 4  # never more than 4 out at once
    assert sorted(row.name for row in harness.snapshot.targets if row.fingerprints) == sorted(names)
    rec.pool.shutdown(wait=True)


def test_status_rows_follow_renames_removals_and_re_adds_in_any_order() -> None:
    """The snapshot lists one row per target, sorted by (name, id), whatever happened to the
    targets between two snapshots: renamed, removed, re-added (before the snapshot took the
    old row out), restarted; in small batches (rows moved one by one) and after a resync
    (re-sorted at once)."""
    rng = random.Random(7)
    h = Harness()
    h.fetch.default = ok(KA)
    live: dict[int, Target] = {}
    for step in range(300):
        for _ in range(rng.randint(1, 6)):
            n = rng.randint(1, 40)
            op = rng.random()
            if n in live and op < 0.3:
                h.rec.remove(live.pop(n).id)
            elif n in live and op < 0.6:
                live[n] = replace(live[n], name=f"web-{rng.randint(1, 60)}")
                h.rec.upsert(live[n])
            elif n in live and op < 0.7:
                live[n] = replace(live[n], started_at=f"2024-01-01T00:00:{step % 60:02d}Z")
                h.rec.upsert(live[n])
            else:
                live[n] = target(f"web-{rng.randint(1, 60)}", n)
                h.rec.upsert(live[n])
        if step % 50 == 49:
            h.rec.replace_all(live.values())
        h.settle()
        rows = [(row.name, row.id) for row in h.snapshot.targets]
        assert rows == sorted((t.name, t.short_id) for t in live.values()), f"step {step}"
