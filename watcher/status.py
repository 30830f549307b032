"""status.json on disk: written by the supervisor, read by `watcher status` and `watcher health`.

The document itself (typed value, JSON schema, health rules) is pure: watcher/snapshot.py.
The CLI never discovers on its own; it reads this file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Sequence

from .cache import atomic_write, replacing, write_all
from .snapshot import (STALE_AFTER, ArrayPlan, SnapshotError, StatusDocument, TargetStatus,
                       array_ends, from_json, health_problems, plan_array, status_frame, to_json)

__all__ = ["STALE_AFTER", "StatusWriter", "health_problems", "listening_ports", "read_status",
           "sshd_listening", "write_status"]


def write_status(path: Path, document: StatusDocument, writer: StatusWriter | None = None) -> None:
    """`writer`: a StatusWriter that copies unchanged target rows from its last file (the
    heartbeat); None: to_json. Not fsynced: it is a snapshot remade every 2 s, and a reader
    never sees a partial file either way (rename). At 100k targets an fsync of its ~45 MB
    every 2 s queued the index writes behind it on the same disk."""
    if writer is None:
        atomic_write(path, to_json(document).encode(), 0o644, durable=False)
    else:
        writer.write(path, document)


class StatusWriter:
    """status.json for the heartbeat (every 2 s): to_json's text, written with the target
    rows that did not change copied from the file it wrote last, in the kernel
    (copy_file_range). At 100k targets the rows are ~45 MB of JSON: encoding them all takes
    ~1 s of the GIL the reconciler needs, and keeping them in memory cost ~100 MiB more. It
    keeps the last file open, so a copy reads that very file even once it is replaced."""

    def __init__(self) -> None:
        self._targets: tuple[TargetStatus, ...] = ()
        self._ends: Sequence[int] = (0,)
        self._last: int | None = None  # fd of the file written last
        self._array_at = 0  # where its targets array starts

    def write(self, path: Path, document: StatusDocument) -> None:
        targets = document.state.targets
        if self._last is not None:
            try:
                self._write(path, document, plan_array(self._targets, self._ends, targets))
                return
            except _LastFileChanged:  # someone else wrote into it: every row made again
                pass
        self._write(path, document, plan_array((), (0,), targets))

    def close(self) -> None:
        if self._last is not None:
            os.close(self._last)
            self._last = None

    def _write(self, path: Path, document: StatusDocument, plan: ArrayPlan) -> None:
        head, tail = status_frame(document)
        with replacing(path, 0o644, durable=False) as fd:
            pending, size = [head], len(head)
            for part in plan.parts:
                if isinstance(part, bytes):
                    pending.append(part)
                    size += len(part)
                    if size < _PENDING_BYTES:
                        continue
                write_all(fd, b"".join(pending))
                pending, size = [], 0
                if isinstance(part, tuple):
                    self._copy(fd, self._array_at + part[0], part[1] - part[0])
            write_all(fd, b"".join([*pending, tail]))
        self.close()
        self._last, self._array_at = fd, len(head)
        self._targets, self._ends = document.state.targets, array_ends(plan.sizes)

    def _copy(self, fd: int, offset: int, count: int) -> None:
        assert self._last is not None
        while count:
            try:
                done = os.copy_file_range(self._last, fd, count, offset)
            except OSError as exc:  # not across these file systems: through this process
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                data = os.pread(self._last, count, offset)
                write_all(fd, data)
                done = len(data)
            if not done:
                raise _LastFileChanged
            offset, count = offset + done, count - done


_PENDING_BYTES = 1 << 20  # new rows are written in chunks of about this much


class _LastFileChanged(Exception):
    """The last file is shorter than this writer wrote it."""


def read_status(path: Path, targets: bool = True) -> StatusDocument:
    """The document at `path`; SnapshotError when it is missing or unreadable.
    targets=False: without the target rows (see from_json)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SnapshotError(f"the watcher is not running: {path} does not exist (run this "
                            "in the proxy's container, or pass --status PATH)") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return from_json(text, targets=targets)
    except SnapshotError as exc:
        raise SnapshotError(f"{path}: {exc}") from None


def listening_ports(proc_net_tcp: str) -> set[int]:
    """Local ports in LISTEN state (st 0A) from the text of /proc/net/tcp or tcp6. Pure."""
    ports = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def sshd_listening(port: int = 22) -> bool:
    """Whether something listens on `port`, without connecting: a probe connection would
    land in the access log as a denied login every time the health check runs."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            if port in listening_ports(Path(table).read_text()):
                return True
        except OSError:
            continue
    return False
