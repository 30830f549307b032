"""watcher.revocation (which keys lost a grant, and why), the access log's closing of their
sessions (app.AccessLog.revoke) and the session killer (watcher.sessions) on real processes."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from watcher.accesslog import Session
from watcher.app import AccessLog
from watcher.model import ManualLine, PublicKey, Target
from watcher.render import ANY_DEST, ServedTarget, render
from watcher.revocation import (GRANT_WITHDRAWN, MANUAL_LINE_REMOVED, TARGET_DISCONNECTED,
                                TARGET_NOT_PERMITTED, TARGET_READDRESSED, TARGET_REMOVED,
                                TARGET_RENAMED, TARGET_RESTARTED, RecentRevocations, Revocation,
                                World, lost_grants, revocations)
from watcher.sessions import ProcFS, SessionKiller


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def make_key(seed: object) -> PublicKey:
    blob = _string(b"ssh-ed25519") + _string(hashlib.sha256(repr(seed).encode()).digest())
    fp = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return PublicKey("ssh-ed25519", base64.b64encode(blob).decode(), "", fp, 256)


KA, KB = make_key("a"), make_key("b")
FROM = 'from="10.0.0.0/8"'


def served(name: str, idc: str, address: str, *keys: PublicKey) -> ServedTarget:
    return ServedTarget(Target(id=idc * 64, name=name, address=address), (name, address), keys)


def manual(key: PublicKey, *options: str, origin: str = "admin.pub:1") -> ManualLine:
    return ManualLine.at(origin=origin, options=tuple(options), key=key)


# --- the rule -----------------------------------------------------------------------------

def test_same_grants_lose_nothing() -> None:
    grants = {"fp": frozenset({((), "a:22"), ((), "b:22")})}
    assert lost_grants(grants, dict(grants)) == {}


def test_grants_that_only_grew_lose_nothing() -> None:
    old = {"fp": frozenset({((), "a:22")})}
    new = {"fp": frozenset({((), "a:22"), ((), "b:22"), ((FROM,), "a:22")}), "new": frozenset({((), "c:22")})}
    assert lost_grants(old, new) == {}


def test_one_destination_less_is_a_loss() -> None:
    old = {"fp": frozenset({((), "a:22"), ((), "b:22")}), "other": frozenset({((), "c:22")})}
    new = {"fp": frozenset({((), "a:22"), ((), "x:22")}), "other": frozenset({((), "c:22")})}
    assert lost_grants(old, new) == {"fp": frozenset({((), "b:22")})}


def test_a_key_gone_from_the_index_lost_everything() -> None:
    old = {"fp": frozenset({((), "a:22"), ((FROM,), "a:22")})}
    assert lost_grants(old, {}) == old


def test_same_destination_under_other_conditions_is_a_loss() -> None:
    # sshd applies the first line whose conditions hold: `from=` on the only line means a
    # client from elsewhere gets nothing now.
    old = {"fp": frozenset({((), "a:22")})}
    new = {"fp": frozenset({((FROM,), "a:22")})}
    assert lost_grants(old, new) == {"fp": frozenset({((), "a:22")})}


def test_unscoped_grant_is_its_own_element() -> None:
    named, anything = frozenset({((), "a:22")}), frozenset({((), ANY_DEST)})
    assert lost_grants({"fp": named}, {"fp": anything}) == {"fp": named}
    assert lost_grants({"fp": anything}, {"fp": named}) == {"fp": anything}


def test_a_key_that_could_open_nothing_loses_nothing() -> None:
    assert lost_grants({"fp": frozenset()}, {}) == {}


# --- grant sets as rendered -------------------------------------------------------------

def test_rendered_grants_per_fingerprint() -> None:
    rendered = render([served("web", "1", "172.18.0.11", KA)], ("22",),
                      [manual(KA, FROM, 'permitopen="db:5432"'), manual(KB)], scope_manual=True)
    assert rendered.grants[KA.fingerprint] == frozenset({
        ((), "web:22"), ((), "172.18.0.11:22"),
        # the conditional line carries the plain grants too (sshd stops at the first match)
        ((FROM,), "db:5432"), ((FROM,), "web:22"), ((FROM,), "172.18.0.11:22")})
    # an admin line without permitopen is scoped to the discovered targets
    assert rendered.grants[KB.fingerprint] == frozenset({((), "web:22"), ((), "172.18.0.11:22")})


def test_rendered_grants_unscoped_and_without_tunnels() -> None:
    assert render([], ("*",), [manual(KA)]).grants == {KA.fingerprint: frozenset({((), ANY_DEST)})}
    # with discovery and nothing discovered: logs in, opens nothing
    assert render([], ("*",), [manual(KA)], scope_manual=True).grants == {KA.fingerprint: frozenset()}


def test_same_grant_from_another_source_is_kept() -> None:
    web = served("web", "1", "172.18.0.11", KA)
    admin = manual(KA, 'permitopen="web:22"', 'permitopen="172.18.0.11:22"')
    both = render([web], ("22",), [admin])
    only_admin = render([], ("22",), [admin])
    assert lost_grants(both.grants, only_admin.grants) == {}
    assert lost_grants(both.grants, render([web], ("22",)).grants) == {}


def test_shared_key_loses_the_removed_target() -> None:
    one, two = served("one", "1", "172.18.0.11", KA), served("two", "2", "172.18.0.12", KA)
    before, after = render([one, two], ("22",)), render([one], ("22",))
    assert lost_grants(before.grants, after.grants) == {
        KA.fingerprint: frozenset({((), "two:22"), ((), "172.18.0.12:22")})}


# --- why --------------------------------------------------------------------------------

WEB = Target("id-web", "web", "172.18.0.11", started_at="t1")
BEFORE = World(targets={WEB.id: WEB}, hosts={"web": WEB.id, "172.18.0.11": WEB.id},
               owners={"fp": ("web",)})
LOST_WEB = ({"fp": frozenset({((), "web:22"), ((), "172.18.0.11:22")})}, {"fp": frozenset()})


@pytest.mark.parametrize("after, reason", [
    (World(), TARGET_REMOVED),
    (World(excluded={WEB.id: TARGET_NOT_PERMITTED}), TARGET_NOT_PERMITTED),
    (World(excluded={WEB.id: TARGET_DISCONNECTED}), TARGET_DISCONNECTED),
    (World(targets={WEB.id: Target(WEB.id, "web2", WEB.address, started_at="t1")}), TARGET_RENAMED),
    (World(targets={WEB.id: Target(WEB.id, "web", "172.18.0.99", started_at="t1")}), TARGET_READDRESSED),
    (World(targets={WEB.id: Target(WEB.id, "web", WEB.address, started_at="t2")}), TARGET_RESTARTED),
    (World(targets={WEB.id: WEB}), GRANT_WITHDRAWN),
])
def test_reason_follows_the_target_the_destination_belonged_to(after: World, reason: str) -> None:
    [revocation] = revocations(BEFORE, after, *LOST_WEB, at=5.0)
    assert revocation == Revocation("fp", reason, ("web",), 5.0)


def test_a_destination_is_found_whatever_its_case() -> None:
    # The reconciler keys the granted names by their folded form; a grant keeps the case the
    # target's name has.
    web = Target("id-web", "Web", "172.18.0.11", started_at="t1")
    before = World(targets={web.id: web}, hosts={"web": web.id})
    after = World(targets={web.id: Target(web.id, "Web2", web.address, started_at="t1")})
    [revocation] = revocations(before, after, {"fp": frozenset({((), "Web:22")})}, {})
    assert (revocation.reason, revocation.targets) == (TARGET_RENAMED, ("Web",))


def test_manual_line_removed() -> None:
    before = World(manual={"fp": frozenset({('permitopen="db:5432"',)})}, owners={"fp": ("admin.pub:1",)})
    [revocation] = revocations(before, World(), {"fp": frozenset({((), "db:5432")})}, {})
    assert (revocation.reason, revocation.targets) == (MANUAL_LINE_REMOVED, ("admin.pub:1",))


def test_manual_line_naming_a_target_removed_names_the_target() -> None:
    before = World(targets=BEFORE.targets, hosts=BEFORE.hosts, manual={"fp": frozenset({("x",)})})
    after = World(targets=BEFORE.targets, hosts=BEFORE.hosts)
    [revocation] = revocations(before, after, {"fp": frozenset({((), "web:22")})}, {"fp": frozenset()})
    assert (revocation.reason, revocation.targets) == (MANUAL_LINE_REMOVED, ("web",))


def test_several_reasons_are_all_given() -> None:
    db = Target("id-db", "db", "172.18.0.12", started_at="t1")
    before = World(targets={WEB.id: WEB, db.id: db}, hosts={"web": WEB.id, "db": db.id})
    after = World(targets={db.id: Target(db.id, "db2", db.address, started_at="t1")})
    [revocation] = revocations(before, after, {"fp": frozenset({((), "web:22"), ((), "db:22")})}, {})
    assert revocation.reason == f"{TARGET_REMOVED},{TARGET_RENAMED}"
    assert revocation.targets == ("db", "web")


def test_nothing_lost_nothing_revoked() -> None:
    grants = {"fp": frozenset({((), "web:22")})}
    assert revocations(BEFORE, World(), grants, grants) == []


# --- recent revocations (the login race) ----------------------------------------------------

def test_recent_revocation_applies_to_connections_begun_before_the_write() -> None:
    recent = RecentRevocations(window=60, lag=0)
    assert not recent
    revocation = Revocation("fp", TARGET_REMOVED, ("web",), at=100.0)
    recent.note(revocation, now=100.1)
    assert recent
    assert recent.for_login("fp", connected_at=99.5, now=100.2) == revocation
    assert recent.for_login("fp", connected_at=100.5, now=100.6) is None  # read the new index
    assert recent.for_login("other", connected_at=99.5, now=100.2) is None
    assert recent.for_login("fp", connected_at=99.5, now=161.0) is None  # forgotten
    assert not recent


def test_connection_seen_shortly_after_the_write_may_have_begun_before_it() -> None:
    # Its `Connection from` may have waited in /dev/log while the watcher was busy.
    recent = RecentRevocations(lag=2.0)
    revocation = Revocation("fp", TARGET_REMOVED, ("web",), at=100.0)
    recent.note(revocation, now=100.0)
    assert recent.for_login("fp", connected_at=101.9, now=102.0) == revocation
    assert recent.for_login("fp", connected_at=102.1, now=102.2) is None


def test_latest_revocation_of_a_key_wins() -> None:
    recent = RecentRevocations()
    recent.note(Revocation("fp", TARGET_REMOVED, (), at=100.0), now=100.0)
    recent.note(Revocation("fp", TARGET_RENAMED, (), at=110.0), now=110.0)
    assert recent.for_login("fp", connected_at=105.0, now=110.5).reason == TARGET_RENAMED


# --- the access log closes sessions ---------------------------------------------------------

FP = "SHA256:NooFWc0ljlloWEM4+IDMvhX35FoGF8TmLtxahuXmqck"
OTHER_FP = "SHA256:bEB9oC+SxE4imT7Yhr2QIQZkvo65aa8pssJ6dHXHmNk"


class FakeKiller:
    def __init__(self, result: bool | Exception = True) -> None:
        self.result = result
        self.closed: list[Session] = []

    def close(self, session: Session) -> bool:
        self.closed.append(session)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def datagram(pid: int, message: str) -> bytes:
    return f"<38>Nov 25 15:32:26 sshd[{pid}]: {message}".encode()


def connect(log: AccessLog, pid: int, port: int) -> None:
    log(datagram(pid, f'Connection from 10.0.0.1 port {port} on 10.0.0.2 port 22 rdomain ""'))


def accept(log: AccessLog, pid: int, port: int, fp: str = FP, child: int | None = None) -> None:
    log(datagram(pid, f"Accepted publickey for limited-user from 10.0.0.1 port {port} ssh2: ED25519 {fp}"))
    if child is not None:
        log(datagram(pid, f"User child is on pid {child}"))


@pytest.fixture
def access(tmp_path: Path):
    def make(killer: FakeKiller) -> tuple[AccessLog, io.StringIO]:
        out = io.StringIO()
        log = AccessLog(tmp_path / "access.log", lambda fp: ("web",), lambda alias: "",
                        stdout=out, killer=killer)
        made.append(log)
        return log, out
    made: list[AccessLog] = []
    yield make
    for log in made:
        log.close()


def lines(out: io.StringIO, event: str) -> list[str]:
    return [line for line in out.getvalue().splitlines() if f"event={event} " in line]


def test_revoke_closes_every_session_of_the_key_and_only_those(access) -> None:
    killer = FakeKiller()
    log, out = access(killer)
    for pid, port, fp in ((100, 5000, FP), (200, 5001, FP), (300, 5002, OTHER_FP)):
        connect(log, pid, port)
        accept(log, pid, port, fp, child=pid + 1)
    log.revoke([Revocation(FP, TARGET_REMOVED, ("web-gone",), at=time.time())])
    assert sorted((s.monitor, s.child) for s in killer.closed) == [(100, 101), (200, 201)]
    revoked = lines(out, "revoked")
    assert len(revoked) == 2
    assert all(f"fp={FP} key=ED25519 target=web-gone reason=target-removed" in line for line in revoked)
    assert {line.split(" client=")[1].split()[0] for line in revoked} == {"10.0.0.1:5000", "10.0.0.1:5001"}
    assert len(lines(out, "closed")) == 2  # the killed monitors log no end: closed for them
    assert (Path(log.path).read_text().splitlines()) == out.getvalue().splitlines()
    # Their sessions are forgotten; a second revocation finds nothing more to close.
    log.revoke([Revocation(FP, TARGET_REMOVED, ("web-gone",), at=time.time())])
    assert len(killer.closed) == 2


def test_login_that_read_the_old_index_is_closed_when_accepted(access) -> None:
    killer = FakeKiller()
    log, out = access(killer)
    log.recent = RecentRevocations(lag=0)  # exact: lines arrive at once here
    connect(log, 100, 5000)  # before the write: may read the old grants
    log.revoke([Revocation(FP, TARGET_REMOVED, ("web",), at=time.time())])
    assert killer.closed == []
    time.sleep(0.01)
    connect(log, 200, 5001)  # after the write: reads the new grants
    accept(log, 100, 5000)
    accept(log, 200, 5001)
    assert [s.monitor for s in killer.closed] == [100]
    assert len(lines(out, "revoked")) == 1


def test_a_session_that_ended_by_itself_is_not_reported(access) -> None:
    killer = FakeKiller(result=False)
    log, out = access(killer)
    connect(log, 100, 5000)
    accept(log, 100, 5000, child=101)
    log.revoke([Revocation(FP, TARGET_REMOVED, ("web",), at=time.time())])
    log(datagram(101, "debug1: channel 0: new direct-tcpip [direct-tcpip] (inactive timeout: 0)"))
    assert len(killer.closed) == 1  # tried once, not again on every line
    assert lines(out, "revoked") == [] and lines(out, "closed") == []


def test_an_old_session_that_could_not_be_killed_is_tried_once(access, monkeypatch) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    killer = FakeKiller(result=False)
    log, out = access(killer)
    connect(log, 100, 5000)
    accept(log, 100, 5000, child=101)
    clock[0] += 3600  # connected an hour before the revocation
    connect(log, 200, 5001)  # and a recent one (closing it must not forget the first)
    accept(log, 200, 5001, child=201)
    log.revoke([Revocation(FP, TARGET_REMOVED, ("web",), at=clock[0])])
    for _ in range(3):
        clock[0] += 1
        log(datagram(101, "debug1: channel 0: new direct-tcpip [direct-tcpip] (inactive timeout: 0)"))
    assert [s.monitor for s in killer.closed] == [100, 200]


def test_an_unwritable_log_does_not_raise(access) -> None:
    killer = FakeKiller()
    log, out = access(killer)
    for pid, port in ((100, 5000), (200, 5001)):
        connect(log, pid, port)
        accept(log, pid, port, child=pid + 1)
    def unwritable(line: str) -> None:
        raise ValueError("I/O operation on closed file")
    log.file.write = unwritable  # writing now raises
    log.revoke([Revocation(FP, TARGET_REMOVED, ("web",), at=time.time())])
    assert sorted(s.monitor for s in killer.closed) == [100, 200]  # closed all the same
    assert log.tracker.sessions_of(FP) == []


def test_a_failing_killer_does_not_raise(access) -> None:
    log, out = access(FakeKiller(result=PermissionError("denied")))
    connect(log, 100, 5000)
    accept(log, 100, 5000, child=101)
    log.revoke([Revocation(FP, TARGET_REMOVED, ("web",), at=time.time())])
    assert lines(out, "revoked") == []


# --- the killer, on real processes ----------------------------------------------------------

# A stand-in for a session: a "monitor" whose "child" runs the same binary (as sshd's do),
# both sleeping; it prints the child's pid.
MONITOR = ("import subprocess, sys, time\n"
           "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
           "print(child.pid, flush=True)\n"
           "time.sleep(120)\n")


@pytest.fixture
def session_processes():
    started: list[subprocess.Popen] = []

    def start() -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen([sys.executable, "-c", MONITOR], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout is not None
        return proc, int(proc.stdout.readline())

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def gone(pid: int) -> bool:
    """The process exited (a zombie of its parent counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pid: int, deadline: float = 10) -> bool:
    end = time.monotonic() + deadline
    while not gone(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def python_procfs() -> ProcFS:
    """`sshd` here is the Python interpreter the stand-ins run."""
    return ProcFS(sshd=os.path.realpath(sys.executable))


def test_killer_kills_the_monitor_and_its_children(session_processes) -> None:
    monitor, child = session_processes()
    session = Session(monitor.pid, None, "10.0.0.1:5000", FP, "ED25519", time.time() + 1)
    assert SessionKiller(python_procfs()).close(session)
    assert monitor.wait(timeout=10) == -signal.SIGKILL
    assert wait_gone(child)


def test_killer_never_signals_a_pid_reused_by_a_newer_process(session_processes) -> None:
    monitor, child = session_processes()
    # The session began long before this process: the pid must have been reused.
    session = Session(monitor.pid, child, "10.0.0.1:5000", FP, "ED25519", time.time() - 3600)
    assert not SessionKiller(python_procfs()).close(session)
    assert monitor.poll() is None and not gone(child)


def test_killer_never_signals_another_program(session_processes) -> None:
    monitor, child = session_processes()
    session = Session(monitor.pid, child, "10.0.0.1:5000", FP, "ED25519", time.time() + 1)
    assert not SessionKiller(ProcFS(sshd="/usr/sbin/sshd")).close(session)
    assert monitor.poll() is None and not gone(child)


def test_killer_skips_a_child_that_is_not_the_monitors(session_processes) -> None:
    monitor, _ = session_processes()
    stranger, stranger_child = session_processes()
    session = Session(monitor.pid, stranger.pid, "10.0.0.1:5000", FP, "ED25519", time.time() + 1)
    assert SessionKiller(python_procfs()).close(session)
    assert monitor.wait(timeout=10) == -signal.SIGKILL
    assert stranger.poll() is None and not gone(stranger_child)


def test_killer_on_a_process_already_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=10)
    session = Session(proc.pid, None, "10.0.0.1:5000", FP, "ED25519", time.time())
    assert not SessionKiller(python_procfs()).close(session)


def write_stat(root: Path, pid: int, comm: str, ppid: int) -> None:
    (root / str(pid)).mkdir()
    rest = " ".join(["0"] * 40)
    (root / str(pid) / "stat").write_text(f"{pid} ({comm}) S {ppid} {rest}\n")


def test_children_found_by_scanning_without_the_kernels_list(tmp_path: Path) -> None:
    write_stat(tmp_path, 100, "sshd", 1)
    write_stat(tmp_path, 101, "sshd", 100)
    write_stat(tmp_path, 102, "sshd) S 100 (", 1)  # a comm cannot fake its parent
    write_stat(tmp_path, 103, "bash", 100)
    (tmp_path / "self").mkdir()
    proc = ProcFS(root=tmp_path)
    assert sorted(proc.children(100)) == [101, 103]
    info = proc.info(102)
    assert info is not None and (info.comm, info.ppid) == ("sshd) S 100 (", 1)
    assert proc.info(999) is None
