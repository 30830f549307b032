"""The watcher's `/dev/log`: a unix datagram socket that receives sshd's syslog(3) lines.

sshd (run without `-e`) and its per-connection processes send one datagram per message;
the post-auth child runs as the login user, so the socket is made writable by everyone.
glibc sends on a blocking socket: when the receive queue is full the sender waits (it
does not drop), so a slow handler slows sshd down. Keep the handler quick.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from typing import Callable

RECEIVE_BUFFER = 4 * 1024 * 1024
"""Asked-for SO_RCVBUF in bytes (the kernel may cap it at net.core.rmem_max)."""
MAX_DATAGRAM = 65536
"""Longer datagrams are cut to this (sshd's own messages stay under 1 KiB)."""
POLL_INTERVAL = 0.2
"""Seconds `serve` waits for a datagram before it looks at `stop` again."""
DRAIN_LIMIT = 10_000
"""At most this many queued datagrams are still handed on once `stop` is set."""


class SyslogListener:
    """Binds an AF_UNIX SOCK_DGRAM socket at `path` (mode 0666) and hands on what arrives.

    A stale socket file at `path` is removed first; any other kind of file there is left
    alone and `FileExistsError` is raised. `close()` closes the socket and removes the
    file, if it is still the one this listener made.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        receive_buffer: int = RECEIVE_BUFFER,
        poll_interval: float = POLL_INTERVAL,
        max_datagram: int = MAX_DATAGRAM,
    ) -> None:
        self._path = os.fspath(path)
        self._poll_interval = poll_interval
        self._max_datagram = max_datagram
        self._inode: tuple[int, int] | None = None
        self._closed = False
        _remove_stale_socket(self._path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            _set_receive_buffer(self._sock, receive_buffer)
            self._sock.bind(self._path)
            os.chmod(self._path, 0o666)
            info = os.stat(self._path)
            self._inode = (info.st_dev, info.st_ino)
        except BaseException:
            self._sock.close()
            self._closed = True
            raise

    @property
    def path(self) -> str:
        return self._path

    @property
    def receive_buffer(self) -> int:
        """SO_RCVBUF as the kernel reports it (twice what it granted, by its convention)."""
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def serve(self, handler: Callable[[bytes], None], stop: threading.Event) -> None:
        """Call `handler` with each datagram, in arrival order, until `stop` is set.

        Looks at `stop` at least every `poll_interval` seconds; once it is set, the
        datagrams already queued (at most DRAIN_LIMIT) are still handed on, then it
        returns. An exception from `handler` ends the loop and propagates.
        """
        self._sock.settimeout(self._poll_interval)
        while not stop.is_set():
            try:
                data = self._sock.recv(self._max_datagram)
            except (TimeoutError, InterruptedError):
                continue
            except OSError:
                if self._closed:
                    return
                raise
            handler(data)
        self._drain(handler)

    def _drain(self, handler: Callable[[bytes], None]) -> None:
        try:
            self._sock.setblocking(False)
        except OSError:
            if self._closed:
                return
            raise
        for _ in range(DRAIN_LIMIT):
            try:
                data = self._sock.recv(self._max_datagram)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:
                if self._closed:
                    return
                raise
            handler(data)

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


def _remove_stale_socket(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; not replacing it")
    os.unlink(path)


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
