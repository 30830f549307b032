"""Drain edge (issue 13): a login still in progress at SIGTERM (TCP connected, not
authenticated) is cut at once, not counted as an open tunnel that holds the drain for
SSH_PROXY_DRAIN_SECONDS. Fake /proc: a connection is a tunnel once its monitor has a child
running as the login user (the post-auth child); before that it is a login in progress."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from watcher.app import Supervisor
from watcher.config import Settings
from watcher.sessions import ProcFS
from watcher.sshd import split_connections

LOGIN_UID = 1001
PRIVSEP_UID = 101  # Debian's `sshd` user: the pre-auth child


def _process(root: Path, pid: int, comm: str, ppid: int, exe: Path | None, uid: int = 0) -> None:
    directory = root / str(pid)
    directory.mkdir()
    fields = ["S", str(ppid)] + ["0"] * 17 + ["100"] + ["0"] * 10
    (directory / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")
    (directory / "status").write_text(f"Name:\t{comm}\nPPid:\t{ppid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    if exe is not None:
        os.symlink(exe, directory / "exe")


@pytest.fixture
def proc(tmp_path: Path) -> ProcFS:
    sshd = tmp_path / "sshd"
    sshd.write_text("")
    other = tmp_path / "python3"
    other.write_text("")
    root = tmp_path / "proc"
    root.mkdir()
    _process(root, 1, "watcher", 0, other)
    _process(root, 40, "sshd", 1, sshd)  # a tunnel's monitor
    _process(root, 41, "sshd", 40, sshd, uid=LOGIN_UID)  # its post-auth child
    _process(root, 50, "sshd", 1, sshd)  # a login in progress: monitor ...
    _process(root, 51, "sshd", 50, sshd, uid=PRIVSEP_UID)  # ... and its pre-auth child
    _process(root, 60, "sshd", 1, sshd)  # just accepted: no child yet (banner only)
    return ProcFS(root, sshd=str(sshd))


def test_connections_split_into_tunnels_and_logins_in_progress(proc: ProcFS) -> None:
    assert split_connections(proc, [40, 50, 60], frozenset({LOGIN_UID})) == ([40], [50, 60])


def test_a_connection_gone_meanwhile_is_neither(proc: ProcFS) -> None:
    assert split_connections(proc, [40, 99], frozenset({LOGIN_UID})) == ([40], [])


def test_drain_cuts_logins_in_progress_at_once_and_waits_only_for_tunnels(
        proc: ProcFS, monkeypatch, caplog: pytest.LogCaptureFixture) -> None:
    cut: list[list[int]] = []
    open_now = {40, 50, 60}

    def fake_cut(pids: list[int], connections) -> None:
        cut.append(sorted(pids))
        open_now.difference_update(pids)

    monkeypatch.setattr("watcher.app.ProcFS", lambda: proc)
    monkeypatch.setattr("watcher.app.open_connections", lambda p: sorted(open_now))
    monkeypatch.setattr("watcher.app.cut_connections", fake_cut)
    monkeypatch.setattr("watcher.app.login_uids", lambda: frozenset({LOGIN_UID}))
    waited: list[float] = []

    def fake_drain(connections, seconds, cut):
        waited.append(seconds)
        assert connections() == [40], "a login in progress still holds the drain"
        open_now.discard(40)  # the tunnel ends by itself
        from watcher.sshd import DrainResult
        return DrainResult(open_at_start=1, cut=0)

    monkeypatch.setattr("watcher.app.drain", fake_drain)
    supervisor = Supervisor(Settings(drain_seconds=300))
    with caplog.at_level(logging.INFO, logger="watcher.app"):
        supervisor._drain()
    assert cut == [[50, 51, 60]]  # the pre-auth child too: orphaned, it would hold the drain
    assert waited == [300]
    messages = [r.getMessage() for r in caplog.records]
    assert any("cut 2 login(s) in progress" in m for m in messages), messages
    assert any("draining 1 open connection(s)" in m for m in messages), messages
