"""watcher.syslog_listener: a real AF_UNIX datagram socket in tmp_path (no /dev/log needed)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from watcher.accesslog import parse_datagram
from watcher.syslog_listener import RECEIVE_BUFFER, SyslogListener

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
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._handler = handler or self.received.append
        self._thread = threading.Thread(target=self._run, args=(listener,), daemon=True)
        self._thread.start()

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
    listener = SyslogListener(sock_path, poll_interval=0.05)
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


def test_what_is_queued_when_stop_is_set_is_still_handed_on(listener: SyslogListener, sock_path: Path) -> None:
    send(sock_path, b"one", b"two", b"three")
    stop = threading.Event()
    stop.set()
    received: list[bytes] = []
    listener.serve(received.append, stop)
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
    with SyslogListener(sock_path, poll_interval=0.05) as listener:
        serving = Serving(listener)
        send(sock_path, b"hello")
        serving.wait_for(1)
        serving.finish()
        assert serving.received == [b"hello"]


def test_any_other_file_at_the_path_is_left_alone(sock_path: Path) -> None:
    sock_path.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
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
    new = SyslogListener(sock_path)  # replaces old's file, as a restarted watcher would
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
    listener = SyslogListener(sock_path, poll_interval=0.05)
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
        with SyslogListener(sock_path, poll_interval=0.05) as listener:
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
