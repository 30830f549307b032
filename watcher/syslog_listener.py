"""The watcher's `/dev/log`: a unix datagram socket that receives sshd's syslog(3) lines.

sshd (run without `-e`) and its per-connection processes send one datagram per message;
the post-auth child runs as the login user, so the socket is writable by everyone (0666).
glibc sends on a blocking socket: when the receive queue is full the sender waits (it
does not drop), so a slow handler slows sshd down. Keep the handler quick.

Anyone who can reach the socket could write a line that looks like sshd's, so only
datagrams that sshd's own processes sent are handed on. The kernel stamps every datagram
with its sender's pid, uid and gid (`SO_PASSCRED` -> `SCM_CREDENTIALS`; only a process with
CAP_SYS_ADMIN / CAP_SETUID can claim another pid / uid). The rule (`SshdSenders`):

1. the datagram is tagged `sshd[PID]:` and PID is the sender's pid (credentials);
2. the sender is an sshd process: `/proc/PID/exe` is the sshd binary (same file);
3. where the kernel hides `exe` (a process that changed uid is not dumpable, and without
   CAP_SYS_PTRACE, which Docker does not grant, root may not read its `exe`: sshd's
   monitor after login and its post-auth child), the sender's uid must be root or
   limited-user's (the uids sshd logs as) and its parent or grandparent must be the sshd
   listener: a process whose `exe` is the sshd binary and whose parent is this watcher;
4. a sender that has already exited (its datagram waited in the queue) cannot be looked
   at: it is accepted only when its uid is root or limited-user's, sshd's own processes.

Anything else is dropped and counted; the counts are logged at most once a minute.
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import stat
import struct
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

from .accesslog import parse_datagram
from .errors import WatcherError, explain_os_error

log = logging.getLogger(__name__)

RECEIVE_BUFFER = 4 * 1024 * 1024
"""Asked-for SO_RCVBUF in bytes (the kernel may cap it at net.core.rmem_max)."""
MAX_DATAGRAM = 65536
"""Longer datagrams are cut to this (sshd's own messages stay under 1 KiB)."""
POLL_INTERVAL = 0.2
"""Seconds `serve` waits for a datagram before it looks at `stop` again."""
DRAIN_LIMIT = 10_000
"""At most this many queued datagrams are still handed on once `stop` is set."""
DROP_REPORT_INTERVAL = 60.0
"""Seconds between two log lines about dropped datagrams, at least."""
SSHD_BINARY = "/usr/sbin/sshd"
SSHD_USERS = ("root", "limited-user")
"""The accounts sshd's logging processes run as: the listener and monitors (root), the
post-auth child (the login user). The pre-auth child logs through its monitor."""

_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_TIMEVAL = struct.Struct("@ll")  # struct timeval: time_t tv_sec; suseconds_t tv_usec
_SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29)  # Linux; Python names it on 3.13+ only
Handler = Callable[[bytes, float], None]
"""Called with each admitted datagram and the time (epoch seconds) the kernel queued it,
i.e. when sshd logged it, however long the datagram then waited to be read."""


@dataclass(frozen=True)
class Credentials:
    """Who sent a datagram, as the kernel saw it (pid in our pid namespace; 0 if unmapped)."""

    pid: int
    uid: int
    gid: int


SenderCheck = Callable[[bytes, "Credentials | None"], "str | None"]
"""(datagram, sender) -> None to hand it on, else the reason it is dropped."""


class ProcView(Protocol):
    """What `SshdSenders` reads about a process (from /proc in production)."""

    def exe(self, pid: int) -> tuple[int, int]:
        """(st_dev, st_ino) of the process's executable. FileNotFoundError: the process is
        gone (or a zombie); PermissionError: the kernel does not show it."""

    def ppid(self, pid: int) -> int:
        """The parent's pid. FileNotFoundError: the process is gone."""

    def start_time(self, pid: int) -> int:
        """When the process started (clock ticks since boot): with the pid, it names one
        process, whatever pids are reused. FileNotFoundError: the process is gone."""


class Proc:
    """ProcView over a procfs mount."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self._root = root

    def exe(self, pid: int) -> tuple[int, int]:
        info = os.stat(self._root / str(pid) / "exe")
        return info.st_dev, info.st_ino

    def ppid(self, pid: int) -> int:
        with open(self._root / str(pid) / "status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
        raise FileNotFoundError(f"no PPid in {self._root / str(pid) / 'status'}")

    def start_time(self, pid: int) -> int:
        with open(self._root / str(pid) / "stat", encoding="ascii", errors="replace") as stat_file:
            fields = stat_file.read().rsplit(")", 1)[-1].split()
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3 (state)


def uids_of(users: Iterable[str]) -> frozenset[int]:
    """The uids of the accounts that exist among `users`."""
    uids = set()
    for user in users:
        try:
            uids.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            pass
    return frozenset(uids)


KNOWN_SENDERS = 4096
"""Verdicts remembered, per (pid, uid, start time), so a busy connection's lines cost one
read of /proc/PID/stat each instead of a walk up its ancestry."""


class SshdSenders:
    """A SenderCheck: admits what sshd's own processes sent (the module docstring's rule).

    A verdict is remembered while the process keeps its pid, start time and uid. That is
    sound for sshd's process tree: its processes run another program only after changing
    uid (the AuthorizedKeysCommand) or three generations below the listener (a session's
    command), which is never admitted.
    """

    def __init__(self, sshd_binary: str = SSHD_BINARY, trusted_uids: frozenset[int] | None = None,
                 proc: ProcView | None = None, supervisor_pid: int | None = None) -> None:
        self._sshd_binary = sshd_binary
        self._sshd_id: tuple[int, int] | None = None
        self._trusted_uids = uids_of(SSHD_USERS) | {0} if trusted_uids is None else trusted_uids
        self._proc = proc if proc is not None else Proc()
        self._supervisor = os.getpid() if supervisor_pid is None else supervisor_pid
        self._known: OrderedDict[tuple[int, int, int], str | None] = OrderedDict()

    def __call__(self, data: bytes, sender: Credentials | None) -> str | None:
        if sender is None:
            return "no-credentials"
        parsed = parse_datagram(data)
        if parsed is None:
            return "not-tagged-sshd"
        if parsed[0] != sender.pid:
            return "pid-mismatch"
        return self._process_problem(sender)

    def _process_problem(self, sender: Credentials) -> str | None:
        sshd = self._sshd_file()  # no sshd binary to compare with: raises, nothing is admitted
        try:
            key = (sender.pid, sender.uid, self._proc.start_time(sender.pid))
        except (OSError, ValueError, IndexError):  # gone (or unreadable): judged by uid
            return self._exited(sender)
        if key in self._known:
            self._known.move_to_end(key)
            return self._known[key]
        problem = self._look_at(sender, sshd)
        self._known[key] = problem
        if len(self._known) > KNOWN_SENDERS:
            self._known.popitem(last=False)
        return problem

    def _look_at(self, sender: Credentials, sshd: tuple[int, int]) -> str | None:
        try:
            return None if self._proc.exe(sender.pid) == sshd else "not-sshd"
        except PermissionError:
            pass  # hidden: judged by uid and ancestry below
        except OSError:  # gone (or a zombie): only its uid is left to judge by
            return self._exited(sender)
        if sender.uid not in self._trusted_uids:
            return "hidden-untrusted-uid"
        try:
            parent = self._proc.ppid(sender.pid)
        except OSError:  # exited between the two looks
            return self._exited(sender)
        return None if self._listener_at_or_above(parent) else "hidden-not-under-sshd"

    def _exited(self, sender: Credentials) -> str | None:
        return None if sender.uid in self._trusted_uids else "exited-untrusted-uid"

    def _is_sshd(self, pid: int) -> bool:
        return self._proc.exe(pid) == self._sshd_file()

    def _sshd_file(self) -> tuple[int, int]:
        if self._sshd_id is None:  # once: the binary does not change under a running sshd
            info = os.stat(self._sshd_binary)
            self._sshd_id = (info.st_dev, info.st_ino)
        return self._sshd_id

    def _listener_at_or_above(self, parent: int) -> bool:
        """Is `parent`, or its parent, the sshd listener this watcher runs?"""
        try:
            candidate = parent
            for _ in range(2):
                if candidate <= 1:  # init / the watcher as PID 1: an orphan is nobody's child
                    return False
                grandparent = self._proc.ppid(candidate)
                if grandparent == self._supervisor:
                    return self._is_sshd(candidate)
                candidate = grandparent
        except (OSError, ValueError):
            return False
        return False


def any_sender(data: bytes, sender: Credentials | None) -> str | None:
    """A SenderCheck that admits everything (tests, tools reading a recording)."""
    return None


class DropReport:
    """Counts dropped datagrams by reason; logs the counts at most once per `interval`."""

    def __init__(self, interval: float = DROP_REPORT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._pending: Counter[str] = Counter()
        self._last_report: float | None = None
        self.total = 0

    def drop(self, reason: str) -> None:
        self._pending[reason] += 1
        self.total += 1
        self.report_if_due()

    def report_if_due(self) -> None:
        if not self._pending:
            return
        now = self._clock()
        if self._last_report is not None and now - self._last_report < self._interval:
            return
        counts = " ".join(f"{reason}={count}" for reason, count in sorted(self._pending.items()))
        log.warning("dropped %d syslog datagrams not sent by sshd (%s); a process other than "
                    "sshd writes to the log socket", sum(self._pending.values()), counts)
        self._pending.clear()
        self._last_report = now


class SyslogListener:
    """Binds an AF_UNIX SOCK_DGRAM socket at `path` (mode 0666) and hands on what `admit`s.

    A stale socket file at `path` (nobody receives on it) is replaced; a socket another
    process receives on (another syslog daemon), or any other kind of file, is left alone
    and `LogSocketError` is raised, as for any other failure to bind. `close()` closes the socket and removes the
    file, if it is still the one this listener made.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        admit: SenderCheck | None = None,
        receive_buffer: int = RECEIVE_BUFFER,
        poll_interval: float = POLL_INTERVAL,
        max_datagram: int = MAX_DATAGRAM,
        drops: DropReport | None = None,
    ) -> None:
        self._path = os.fspath(path)
        self._admit = admit if admit is not None else SshdSenders()
        self._drops = drops if drops is not None else DropReport()
        self._poll_interval = poll_interval
        self._max_datagram = max_datagram
        self._inode: tuple[int, int] | None = None
        self._closed = False
        try:
            _remove_stale_socket(self._path)
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError as exc:
            raise LogSocketError(f"cannot listen on {self._path} for sshd's log lines: "
                                 f"{explain_os_error(exc)}") from None
        try:
            # Before bind: every datagram that can arrive carries its sender's credentials.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMP, 1)
            _set_receive_buffer(self._sock, receive_buffer)
            self._sock.bind(self._path)
            os.chmod(self._path, 0o666)
            info = os.stat(self._path)
            self._inode = (info.st_dev, info.st_ino)
        except BaseException as exc:
            self._sock.close()
            self._closed = True
            if isinstance(exc, OSError):
                raise LogSocketError(f"cannot listen on {self._path} for sshd's log lines: "
                                     f"{explain_os_error(exc)}") from None
            raise

    @property
    def path(self) -> str:
        return self._path

    @property
    def dropped(self) -> int:
        """Datagrams dropped so far because `admit` refused them."""
        return self._drops.total

    @property
    def receive_buffer(self) -> int:
        """SO_RCVBUF as the kernel reports it (twice what it granted, by its convention)."""
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def serve(self, handler: Handler, stop: threading.Event) -> None:
        """Call `handler` with each admitted datagram and the time it was sent, in arrival
        order, until `stop` is set.

        Looks at `stop` at least every `poll_interval` seconds; once it is set, the
        datagrams already queued (at most DRAIN_LIMIT) are still handed on, then it
        returns. An exception from `handler` ends the loop and propagates.
        """
        self._sock.settimeout(self._poll_interval)
        while not stop.is_set():
            try:
                data, sender, sent_at = self._receive()
            except (TimeoutError, InterruptedError):
                self._drops.report_if_due()
                continue
            except OSError:
                if self._closed:
                    return
                raise
            self._hand_on(handler, data, sender, sent_at)
        self._drain(handler)

    def _receive(self) -> tuple[bytes, Credentials | None, float]:
        data, ancillary, _flags, _address = self._sock.recvmsg(
            self._max_datagram, socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(_TIMEVAL.size))
        sender = None
        sent_at = 0.0
        for level, kind, payload in ancillary:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                sender = Credentials(*_UCRED.unpack_from(payload))
            elif kind == _SO_TIMESTAMP and len(payload) >= _TIMEVAL.size:
                seconds, micros = _TIMEVAL.unpack_from(payload)
                sent_at = seconds + micros / 1e6
        return data, sender, sent_at or time.time()

    def _hand_on(self, handler: Handler, data: bytes, sender: Credentials | None,
                 sent_at: float) -> None:
        try:
            problem = self._admit(data, sender)
        except Exception:  # noqa: BLE001 - a failed look at /proc must not stop the access log
            problem = "check-failed"
        if problem is None:
            handler(data, sent_at)
        else:
            log.debug("dropped %r from %s: %s", data[:200], sender, problem)
            self._drops.drop(problem)

    def _drain(self, handler: Handler) -> None:
        try:
            self._sock.setblocking(False)
        except OSError:
            if self._closed:
                return
            raise
        for _ in range(DRAIN_LIMIT):
            try:
                data, sender, sent_at = self._receive()
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:
                if self._closed:
                    return
                raise
            self._hand_on(handler, data, sender, sent_at)

    def close(self) -> None:
        """Close the socket and remove its file (only if it is still ours). Idempotent."""
        if not self._closed:
            self._closed = True
            self._sock.close()
        if self._inode is not None:
            inode, self._inode = self._inode, None
            try:
                info = os.lstat(self._path)
                if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == inode:
                    os.unlink(self._path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> SyslogListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogSocketError(WatcherError):
    """The log socket's path cannot be had; the message says why and what to do."""


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file left by a process that is gone; refuse to take a live one."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise LogSocketError(f"{path} exists and is not a socket: not replacing it; remove it "
                             "(or do not mount a file there), the watcher makes its own")
    if _someone_receives_on(path):
        raise LogSocketError(f"{path} is taken: another process (a syslog daemon?) receives on "
                             "it; sshd's log lines must reach the watcher: do not run another "
                             "syslog daemon in the container, nor mount the host's /dev/log")
    os.unlink(path)


def _someone_receives_on(path: str) -> bool:
    """connect(2) to a datagram socket file succeeds only while a process has it bound."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return False  # stale: its process is gone
    except OSError:
        return False  # not a datagram socket, or not ours to reach: replaced as before
    finally:
        probe.close()
    return True


def _set_receive_buffer(sock: socket.socket, size: int) -> None:
    """SO_RCVBUFFORCE (past rmem_max, needs CAP_NET_ADMIN) if allowed, else SO_RCVBUF."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    if force is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
            return
        except PermissionError:
            pass
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
