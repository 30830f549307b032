"""watcher.syslog_listener: a real AF_UNIX datagram socket in tmp_path (no /dev/log needed)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from watcher.accesslog import parse_datagram
from watcher.syslog_listener import RECEIVE_BUFFER, LogSocketError, SyslogListener, any_sender

SSHD_LINE = b"<38>Nov 25 15:31:49 sshd[9823]: Connection from 127.0.0.1 port 56828 on 127.0.0.1 port 2299"


def send(path: Path, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        client.connect(str(path))
        for data in datagrams:
            client.send(data)


class Serving:
    """A listener's serve() running in a thread, collecting what it hands on."""

    def __init__(self, listener: SyslogListener, handler: Callable[[bytes], None] | None = None) -> None:
        self.received: list[bytes] = []
        self.sent_at: list[float] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._one = handler or self.received.append
        self._thread = threading.Thread(target=self._run, args=(listener,), daemon=True)
        self._thread.start()

    def _handler(self, data: bytes, sent_at: float) -> None:
        self.sent_at.append(sent_at)
        self._one(data)

    def _run(self, listener: SyslogListener) -> None:
        try:
            listener.serve(self._handler, self.stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def finish(self, timeout: float = 5.0) -> float:
        """Set stop, wait for serve() to return; the seconds that took."""
        started = time.monotonic()
        self.stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "serve() did not return after stop was set"
        return time.monotonic() - started


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "log"


@pytest.fixture
def listener(sock_path: Path) -> Iterator[SyslogListener]:
    listener = SyslogListener(sock_path, poll_interval=0.05, admit=any_sender)  # mechanics only
    yield listener
    listener.close()


def test_binds_a_world_writable_datagram_socket(listener: SyslogListener, sock_path: Path) -> None:
    info = os.stat(sock_path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o666
    assert listener.path == str(sock_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:  # a datagram socket only
        with pytest.raises(OSError):
            stream.connect(str(sock_path))


def test_mode_does_not_depend_on_umask(sock_path: Path) -> None:
    old = os.umask(0o077)
    try:
        with SyslogListener(sock_path):
            assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o666
    finally:
        os.umask(old)


def test_hands_on_datagrams_in_order_until_stopped(listener: SyslogListener, sock_path: Path) -> None:
    serving = Serving(listener)
    lines = [SSHD_LINE, b"<39>Nov 25 15:31:49 sshd[9846]: debug1: x", b"", b"\xff\x00binary"]
    send(sock_path, *lines)
    serving.wait_for(len(lines))
    serving.finish()
    assert serving.error is None
    assert serving.received == lines


def test_stop_is_noticed_without_traffic(listener: SyslogListener) -> None:
    serving = Serving(listener)
    time.sleep(0.2)
    assert serving.finish() < 1.0
    assert serving.error is None
    assert serving.received == []


def test_each_datagram_comes_with_the_time_the_kernel_queued_it(listener: SyslogListener,
                                                                sock_path: Path) -> None:
    """Not when it was read: lines that wait in the queue keep the time sshd sent them."""
    before = time.time()
    send(sock_path, b"first")
    time.sleep(0.3)  # read well after it was sent
    stop = threading.Event()
    stop.set()
    got: list[tuple[bytes, float]] = []
    listener.serve(lambda data, sent_at: got.append((data, sent_at)), stop)
    read_at = time.time()
    [(data, sent_at)] = got
    assert data == b"first" and before <= sent_at < read_at - 0.2


def test_what_is_queued_when_stop_is_set_is_still_handed_on(listener: SyslogListener, sock_path: Path) -> None:
    send(sock_path, b"one", b"two", b"three")
    stop = threading.Event()
    stop.set()
    received: list[bytes] = []
    listener.serve(lambda data, sent_at: received.append(data), stop)
    assert received == [b"one", b"two", b"three"]


def test_a_burst_from_a_blocking_sender_loses_nothing(listener: SyslogListener, sock_path: Path) -> None:
    count = 5000
    serving = Serving(listener)
    send(sock_path, *(b"<38>Nov 25 15:31:49 sshd[%d]: message %d" % (i, i) for i in range(1, count + 1)))
    serving.wait_for(count)
    serving.finish()
    assert len(serving.received) == count
    assert serving.received[0].endswith(b"message 1") and serving.received[-1].endswith(b"message 5000")


def test_handler_errors_propagate(listener: SyslogListener, sock_path: Path) -> None:
    def boom(data: bytes) -> None:
        raise RuntimeError(data.decode())

    serving = Serving(listener, boom)
    send(sock_path, b"bad")
    serving._thread.join(5)
    assert isinstance(serving.error, RuntimeError) and str(serving.error) == "bad"


def test_receive_buffer_is_enlarged(listener: SyslogListener, sock_path: Path) -> None:
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as plain:
        default = plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # The kernel reports twice what it granted; without CAP_NET_ADMIN it grants up to rmem_max.
    assert listener.receive_buffer >= 2 * min(RECEIVE_BUFFER, rmem_max)
    if rmem_max > default // 2 or os.geteuid() == 0:
        assert listener.receive_buffer > default


def test_a_stale_socket_file_is_replaced(sock_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays behind, as after a crash
    assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
    with SyslogListener(sock_path, poll_interval=0.05, admit=any_sender) as listener:
        serving = Serving(listener)
        send(sock_path, b"hello")
        serving.wait_for(1)
        serving.finish()
        assert serving.received == [b"hello"]


def test_any_other_file_at_the_path_is_left_alone(sock_path: Path) -> None:
    sock_path.write_text("keep me")
    with pytest.raises(LogSocketError, match="not a socket"):
        SyslogListener(sock_path)
    assert sock_path.read_text() == "keep me"


def test_close_removes_the_socket_file_and_is_idempotent(sock_path: Path) -> None:
    listener = SyslogListener(sock_path)
    assert sock_path.exists()
    listener.close()
    assert not sock_path.exists()
    listener.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        with pytest.raises(OSError):
            client.connect(str(sock_path))


def test_close_leaves_a_newer_listeners_socket(sock_path: Path) -> None:
    old = SyslogListener(sock_path)
    os.unlink(sock_path)  # a live listener's file is never taken over: another one made anew
    new = SyslogListener(sock_path, admit=any_sender)
    try:
        old.close()
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
        serving = Serving(new)
        send(sock_path, b"still here")
        serving.wait_for(1)
        serving.finish()
        assert serving.received == [b"still here"]
    finally:
        new.close()
    assert not sock_path.exists()


def test_serve_returns_when_closed_from_another_thread(sock_path: Path) -> None:
    listener = SyslogListener(sock_path, poll_interval=0.05, admit=any_sender)
    serving = Serving(listener)
    time.sleep(0.1)
    listener.close()
    serving._thread.join(5)
    assert not serving._thread.is_alive()
    assert serving.error is None


def test_stdlib_syslog_handler_lines_parse_as_sshd(listener: SyslogListener, sock_path: Path) -> None:
    """Python's own syslog datagrams (`<PRI>tag: msg` + NUL) reach parse_datagram intact."""
    handler = logging.handlers.SysLogHandler(address=str(sock_path), facility="auth")
    handler.setFormatter(logging.Formatter("sshd[4242]: %(message)s"))
    log = logging.getLogger("test_syslog_listener")
    log.propagate = False
    log.addHandler(handler)
    try:
        serving = Serving(listener)
        log.warning("Accepted publickey for limited-user from 10.0.0.1 port 1 ssh2: ED25519 SHA256:x")
        serving.wait_for(1)
        serving.finish()
    finally:
        log.removeHandler(handler)
        handler.close()
    assert serving.received == [
        b"<36>sshd[4242]: Accepted publickey for limited-user from 10.0.0.1 port 1 ssh2: ED25519 SHA256:x\x00"
    ]
    assert parse_datagram(serving.received[0]) == (
        4242, "Accepted publickey for limited-user from 10.0.0.1 port 1 ssh2: ED25519 SHA256:x"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_an_unprivileged_process_can_send() -> None:
    """sshd's post-auth child runs as the login user: the socket must take its datagrams."""
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)  # pytest's tmp_path sits in a 0700 directory
        sock_path = Path(directory) / "log"
        with SyslogListener(sock_path, poll_interval=0.05, admit=any_sender) as listener:
            received = _send_as_nobody(listener, sock_path)
    assert received == [b"from nobody"]


def _send_as_nobody(listener: SyslogListener, sock_path: Path) -> list[bytes]:
    serving = Serving(listener)
    pid = os.fork()
    if pid == 0:  # child: become nobody, send, report by exit status
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            send(sock_path, b"from nobody")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    serving.wait_for(1)
    serving.finish()
    assert os.waitstatus_to_exitcode(status) == 0
    return serving.received


# --- only sshd's own processes are heard -----------------------------------------------

from watcher.syslog_listener import Credentials, DropReport, SshdSenders  # noqa: E402

SSHD = "/usr/sbin/sshd"


def line_from(pid: int, message: str = "Connection from 10.0.0.1 port 1 on 10.0.0.2 port 22") -> bytes:
    return b"<38>Nov 25 15:31:49 sshd[%d]: %s" % (pid, message.encode())


def serve_once(listener: SyslogListener, sock_path: Path, *datagrams: bytes) -> list[bytes]:
    """Queue `datagrams`, then let serve() hand on what it admits (it drains the queue)."""
    send(sock_path, *datagrams)
    stop = threading.Event()
    stop.set()
    received: list[bytes] = []
    listener.serve(lambda data, sent_at: received.append(data), stop)
    return received


def test_each_datagram_comes_with_its_senders_credentials(sock_path: Path) -> None:
    seen: list[tuple[bytes, Credentials | None]] = []

    def admit(data: bytes, sender: Credentials | None) -> str | None:
        seen.append((data, sender))
        return None

    with SyslogListener(sock_path, admit=admit) as listener:
        assert serve_once(listener, sock_path, b"hello") == [b"hello"]
    assert seen == [(b"hello", Credentials(os.getpid(), os.getuid(), os.getgid()))]


@pytest.mark.skipif(not os.access(SSHD, os.X_OK), reason=f"{SSHD} not installed")
@pytest.mark.parametrize(("datagram", "reason"), [
    (line_from(os.getpid()), "not-sshd"),  # right pid, but this process is not sshd
    (line_from(os.getpid() + 1), "pid-mismatch"),  # another process's pid in the tag
    (line_from(1), "pid-mismatch"),
    (b"<38>Nov 25 15:31:49 notsshd[1]: x", "not-tagged-sshd"),
    (b"garbage", "not-tagged-sshd"),
])
def test_a_forged_sshd_line_is_dropped_and_counted(sock_path: Path, datagram: bytes, reason: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="watcher.syslog_listener")
    with SyslogListener(sock_path) as listener:  # the production rule
        assert serve_once(listener, sock_path, datagram, datagram) == []
        assert listener.dropped == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "watcher.syslog_listener"]
    assert warnings == [f"dropped 1 syslog datagrams not sent by sshd ({reason}=1); a process other "
                        "than sshd writes to the log socket"]  # the second one waits a minute


def test_the_sshd_binary_itself_is_heard(sock_path: Path) -> None:
    # This interpreter stands in for the sshd binary: same check, a binary we can run.
    with SyslogListener(sock_path, admit=SshdSenders(sshd_binary=sys.executable)) as listener:
        ours = line_from(os.getpid())
        assert serve_once(listener, sock_path, ours, line_from(os.getpid() + 1)) == [ours]
        assert listener.dropped == 1


def _send_and_exit(sock_path: Path, uid: int | None) -> bytes:
    """Fork a process that sends one sshd line under its own pid, then exits (reaped)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            send(sock_path, line_from(os.getpid()))
            os.write(write_fd, str(os.getpid()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        child = int(pipe.read() or b"0")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and child == pid
    assert not Path(f"/proc/{pid}").exists()
    return line_from(pid)


def test_a_sender_that_exited_is_heard_only_with_a_trusted_uid(sock_path: Path) -> None:
    with SyslogListener(sock_path, admit=SshdSenders(sys.executable, frozenset({os.getuid()}))) as listener:
        line = _send_and_exit(sock_path, None)
        assert serve_once(listener, sock_path) == [line]
    with SyslogListener(sock_path, admit=SshdSenders(sys.executable, frozenset({os.getuid() + 1}))) as listener:
        _send_and_exit(sock_path, None)
        assert serve_once(listener, sock_path) == []
        assert listener.dropped == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_an_unprivileged_sender_that_exited_is_dropped() -> None:
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)
        sock_path = Path(directory) / "log"
        with SyslogListener(sock_path) as listener:  # trusts root and limited-user only
            _send_and_exit(sock_path, 65534)
            assert serve_once(listener, sock_path) == []
            assert listener.dropped == 1


# The kernel hides /proc/PID/exe of processes that changed uid unless we hold CAP_SYS_PTRACE
# (Docker does not grant it): sshd's monitor after login and its post-auth child. A fake
# /proc gives the process tree of the proxy: watcher 1 > sshd listener 10 > monitor 20 >
# post-auth child 21 (limited-user, uid 999) > session command 30; monitor 20 > keys
# command 22 (nobody).

SSHD_FILE = (1, 100)
HIDDEN = PermissionError("hidden")


class FakeProc:
    def __init__(self, tree: dict[int, tuple[tuple[int, int] | BaseException, int]]) -> None:
        self.tree = tree  # pid -> (exe or what reading it raises, ppid)
        self.looks = 0

    def exe(self, pid: int) -> tuple[int, int]:
        if pid not in self.tree:
            raise FileNotFoundError(pid)
        exe = self.tree[pid][0]
        if isinstance(exe, BaseException):
            raise exe
        return exe

    def start_time(self, pid: int) -> int:
        if pid not in self.tree:
            raise FileNotFoundError(pid)
        self.looks += 1
        return 1000 + pid

    def ppid(self, pid: int) -> int:
        if pid not in self.tree:
            raise FileNotFoundError(pid)
        ppid = self.tree[pid][1]
        if isinstance(ppid, BaseException):
            raise ppid
        return ppid


PROXY_TREE = {
    1: ((1, 7), 0),  # the watcher (python)
    10: (SSHD_FILE, 1),  # sshd -D, started by the watcher
    20: (HIDDEN, 10),  # monitor, not dumpable since it changed uid for the keys command
    21: (HIDDEN, 20),  # post-auth child, uid 999
    22: (HIDDEN, 20),  # AuthorizedKeysCommand, nobody
    30: (HIDDEN, 21),  # the forced command of a session, uid 999
    40: (HIDDEN, 1),  # some other hidden process, root, child of the watcher
    50: ((1, 8), 1),  # not sshd, child of the watcher
    51: (HIDDEN, 50),  # hidden, under a process that is not sshd
    60: (HIDDEN, ProcessLookupError("exited between the two looks")),
    61: (ProcessLookupError("exiting"), 20),
    70: (HIDDEN, 71),  # an ancestor that exited
}


def senders(tree: dict = PROXY_TREE) -> SshdSenders:
    check = SshdSenders(sshd_binary=SSHD, trusted_uids=frozenset({0, 999}), proc=FakeProc(tree),
                        supervisor_pid=1)
    check._sshd_id = SSHD_FILE
    return check


@pytest.mark.parametrize(("pid", "uid", "reason"), [
    (10, 0, None),  # the listener: exe readable, sshd
    (20, 0, None),  # the monitor: hidden, root, child of the listener
    (21, 999, None),  # the post-auth child: hidden, limited-user, grandchild of the listener
    (22, 65534, "hidden-untrusted-uid"),  # the keys command runs as nobody
    (30, 999, "hidden-not-under-sshd"),  # a session's command is one generation too deep
    (40, 0, "hidden-not-under-sshd"),
    (51, 0, "hidden-not-under-sshd"),
    (50, 0, "not-sshd"),
    (1, 0, "not-sshd"),
    (99, 0, None),  # exited: root is sshd's uid
    (99, 999, None),  # exited: limited-user is sshd's uid
    (99, 65534, "exited-untrusted-uid"),
    (60, 0, None),  # races with the sender's exit: judged as exited
    (60, 65534, "hidden-untrusted-uid"),
    (61, 999, None),
    (61, 65534, "exited-untrusted-uid"),
    (70, 0, "hidden-not-under-sshd"),
])
def test_the_sender_rule(pid: int, uid: int, reason: str | None) -> None:
    assert senders()(line_from(pid), Credentials(pid, uid, uid)) == reason


def test_a_verdict_is_remembered_per_process_and_uid() -> None:
    tree = dict(PROXY_TREE)
    check = senders(tree)
    assert check(line_from(21), Credentials(21, 999, 999)) is None
    tree[21] = (HIDDEN, 1)  # (a change the cache does not look at again)
    assert check(line_from(21), Credentials(21, 999, 999)) is None
    assert check(line_from(21), Credentials(21, 65534, 65534)) == "hidden-untrusted-uid"  # another uid: looked at


def test_a_reused_pid_is_looked_at_again() -> None:
    tree = dict(PROXY_TREE)
    proc = FakeProc(tree)
    check = SshdSenders(sshd_binary=SSHD, trusted_uids=frozenset({0, 999}), proc=proc, supervisor_pid=1)
    check._sshd_id = SSHD_FILE
    assert check(line_from(21), Credentials(21, 999, 999)) is None
    proc.start_time = lambda pid: 5000  # type: ignore[method-assign]  # pid 21 is another process now
    tree[21] = (HIDDEN, 1)
    assert check(line_from(21), Credentials(21, 999, 999)) == "hidden-not-under-sshd"


def test_the_sender_rule_needs_credentials_and_a_matching_tag() -> None:
    assert senders()(line_from(20), None) == "no-credentials"
    assert senders()(line_from(21), Credentials(20, 0, 0)) == "pid-mismatch"
    assert senders()(b"<38>sshd-keygen[20]: x", Credentials(20, 0, 0)) == "not-tagged-sshd"


def test_drops_are_reported_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="watcher.syslog_listener")
    now = [1000.0]
    report = DropReport(interval=60.0, clock=lambda: now[0])
    report.report_if_due()  # nothing to say
    for reason in ("pid-mismatch", "not-sshd", "not-sshd"):
        report.drop(reason)
    now[0] += 59.0
    report.drop("pid-mismatch")
    report.report_if_due()
    now[0] += 1.0
    report.report_if_due()
    report.report_if_due()
    messages = [r.getMessage() for r in caplog.records if r.name == "watcher.syslog_listener"]
    assert messages == [
        "dropped 1 syslog datagrams not sent by sshd (pid-mismatch=1); a process other than sshd "
        "writes to the log socket",
        "dropped 3 syslog datagrams not sent by sshd (not-sshd=2 pid-mismatch=1); a process other "
        "than sshd writes to the log socket",
    ]
    assert report.total == 4


def test_a_failing_check_drops_the_datagram_and_keeps_serving(sock_path: Path) -> None:
    def broken(data: bytes, sender: Credentials | None) -> str | None:
        if data == b"bad":
            raise RuntimeError("boom")
        return None

    with SyslogListener(sock_path, admit=broken) as listener:
        assert serve_once(listener, sock_path, b"bad", b"good") == [b"good"]
        assert listener.dropped == 1


def test_without_the_sshd_binary_nothing_is_admitted(sock_path: Path, tmp_path: Path) -> None:
    check = SshdSenders(sshd_binary=str(tmp_path / "no-sshd"), trusted_uids=frozenset({os.getuid()}))
    with SyslogListener(sock_path, admit=check) as listener:
        _send_and_exit(sock_path, None)  # would be admitted by uid alone
        assert serve_once(listener, sock_path, line_from(os.getpid())) == []
        assert listener.dropped == 2
