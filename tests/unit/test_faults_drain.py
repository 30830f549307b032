"""Stop with open tunnels (issue 13 item 2): the drain waits for connections to end, up to
its limit, then cuts the rest; no open connection means no wait. Fake clock, fake /proc."""

from __future__ import annotations

import os
from pathlib import Path

from watcher.sessions import ProcFS
from watcher.sshd import DrainResult, drain, open_connections

from test_faults_docker_outage import FakeClock


def test_no_open_connection_returns_at_once() -> None:
    clock = FakeClock(start=50.0)
    cut: list[list[int]] = []
    result = drain(lambda: [], 8, cut.append, clock=clock, sleep=clock.sleep)
    assert result == DrainResult(open_at_start=0, cut=0)
    assert clock.sleeps == [] and cut == []


def test_connections_that_end_during_the_drain_are_not_cut() -> None:
    clock = FakeClock(start=50.0)
    open_now = {101, 202}

    def connections() -> list[int]:
        if clock.now >= 52:
            open_now.discard(101)
        if clock.now >= 53:
            open_now.discard(202)
        return sorted(open_now)

    cut: list[list[int]] = []
    result = drain(connections, 8, cut.append, clock=clock, sleep=clock.sleep)
    assert result == DrainResult(open_at_start=2, cut=0)
    assert cut == []
    assert clock.now < 50 + 8  # it stopped waiting when the last one ended


def test_connections_still_open_at_the_limit_are_cut() -> None:
    clock = FakeClock(start=50.0)
    cut: list[list[int]] = []
    result = drain(lambda: [7, 9], 8, cut.append, clock=clock, sleep=clock.sleep)
    assert result == DrainResult(open_at_start=2, cut=2)
    assert cut == [[7, 9]]
    assert clock.now >= 50 + 8


def test_zero_seconds_cuts_at_once() -> None:
    clock = FakeClock(start=50.0)
    cut: list[list[int]] = []
    assert drain(lambda: [3], 0, cut.append, clock=clock, sleep=clock.sleep).cut == 1
    assert clock.sleeps == [] and cut == [[3]]


def _process(root: Path, pid: int, comm: str, ppid: int, exe: Path | None, state: str = "S") -> None:
    directory = root / str(pid)
    directory.mkdir()
    fields = [state, str(ppid)] + ["0"] * 17 + ["100"] + ["0"] * 10
    (directory / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")
    if exe is not None:
        os.symlink(exe, directory / "exe")


def test_open_connections_are_the_sshd_processes_without_an_sshd_parent(tmp_path: Path) -> None:
    sshd = tmp_path / "sshd"
    sshd.write_text("")
    other = tmp_path / "python3"
    other.write_text("")
    root = tmp_path / "proc"
    root.mkdir()
    _process(root, 1, "watcher", 0, other)  # PID 1: the watcher, monitors reparented to it
    _process(root, 40, "sshd", 1, sshd)  # a logged-in connection's monitor
    _process(root, 41, "sshd", 40, sshd)  # its post-auth child: the same connection
    _process(root, 50, "sshd", 1, sshd)  # another connection (pre-auth or not)
    _process(root, 60, "sshd", 1, None)  # no exe (a kernel thread, a vanished process)
    _process(root, 61, "sshd", 1, sshd, state="Z")  # exited, not reaped yet
    _process(root, 70, "sh", 1, other)
    assert open_connections(ProcFS(root, sshd=str(sshd))) == [40, 50]
