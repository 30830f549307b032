"""Kill one sshd session (its monitor and the monitor's children), never a stranger.

A session is the per-connection sshd (the monitor, root) and its children: the post-auth
child (runs as limited-user, serves the channels) or, just after `Accepted`, the pre-auth
child. Both hold the client's socket, so both must go. Order: freeze the monitor (SIGSTOP:
it can fork no new child), kill every child of it, then kill it. SIGKILL, because the
child's own SIGTERM handling waits for its event loop; the watcher (PID 1) reaps the
orphaned zombies.

A pid is signalled only while it is provably the session's process:
- it is an sshd: `/proc/<pid>/exe` is the sshd binary; sshd's processes are not dumpable,
  so without CAP_SYS_PTRACE (Docker's default) even root cannot read that link, and then
  the kernel's `comm` (set at exec, not by setproctitle) must be `sshd`;
- the monitor started no later than its `Connection from` arrived: a pid reused by a newer
  process is never taken for it; a child's parent is that verified monitor;
- the signal goes through a pidfd opened before the checks, so the pid cannot be reused
  between check and signal.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .accesslog import Session

log = logging.getLogger(__name__)

START_SLACK = 1.0
"""Seconds a monitor's start may seem to follow its `Connection from`: clock ticks and a
wall clock slewed meanwhile. A pid is reused only after the pid space wrapped: not so fast."""


@dataclass(frozen=True)
class ProcInfo:
    """What /proc tells about a process, read without ptrace rights."""

    pid: int
    comm: str
    ppid: int
    started: float  # epoch seconds


class ProcFS:
    """Reads /proc (a directory argument, for tests)."""

    def __init__(self, root: Path = Path("/proc"), sshd: str = "/usr/sbin/sshd") -> None:
        self.root = root
        self.sshd = os.path.realpath(sshd)
        self._ticks = os.sysconf("SC_CLK_TCK")

    def info(self, pid: int) -> ProcInfo | None:
        try:
            stat = (self.root / str(pid) / "stat").read_text()
        except OSError:
            return None
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        # Started (boot clock) -> epoch: now minus how long ago it started.
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / self._ticks
        return ProcInfo(pid, comm, int(fields[1]), time.time() - age)

    def uid(self, pid: int) -> int | None:
        """The real uid (`Uid:` in /proc/PID/status, readable without ptrace rights)."""
        try:
            with open(self.root / str(pid) / "status", encoding="ascii", errors="replace") as status:
                for line in status:
                    if line.startswith("Uid:"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def is_sshd(self, info: ProcInfo) -> bool:
        try:
            return os.path.realpath(os.readlink(self.root / str(info.pid) / "exe")) == self.sshd
        except PermissionError:  # not dumpable and no CAP_SYS_PTRACE: the kernel's name
            return info.comm == os.path.basename(self.sshd)
        except OSError:
            return False

    def children(self, pid: int) -> list[int]:
        try:  # the kernel's list (CONFIG_PROC_CHILDREN); sshd is single-threaded
            return [int(c) for c in (self.root / str(pid) / "task" / str(pid) / "children").read_text().split()]
        except OSError:
            pass
        found = []
        for entry in self.root.iterdir():
            if entry.name.isdigit():
                info = self.info(int(entry.name))
                if info is not None and info.ppid == pid:
                    found.append(info.pid)
        return found


class SessionKiller:
    """Closes sessions: `close(session)` -> whether the monitor was killed."""

    def __init__(self, proc: ProcFS | None = None) -> None:
        self.proc = proc or ProcFS()

    def close(self, session: Session) -> bool:
        monitor = _PidHandle(session.monitor)
        try:
            info = self.proc.info(session.monitor)
            if (info is None or not self.proc.is_sshd(info)
                    or info.started > session.start + START_SLACK):
                log.info("session of %s: sshd pid %d has exited (or is another process now); "
                         "nothing to close", session.client, session.monitor)
                return False
            if not monitor.send(signal.SIGSTOP):
                return False
            try:
                known = [session.child] if session.child else []
                for pid in {*self.proc.children(session.monitor), *known}:
                    self._kill_child(pid, session.monitor)
            finally:  # never leave a monitor stopped
                killed = monitor.send(signal.SIGKILL)
            return killed
        finally:
            monitor.close()

    def _kill_child(self, pid: int, monitor: int) -> None:
        child = _PidHandle(pid)
        try:
            info = self.proc.info(pid)
            if info is not None and info.ppid == monitor and self.proc.is_sshd(info):
                child.send(signal.SIGKILL)
        finally:
            child.close()


class _PidHandle:
    """A pidfd when the kernel has them (signals can then never hit a reused pid)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None
        self.gone = False
        try:
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.gone = True
        except (AttributeError, OSError):  # no pidfd here: plain kill(2)
            pass

    def send(self, sig: signal.Signals) -> bool:
        if self.gone:
            return False
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, sig)
            else:
                os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
