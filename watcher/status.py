"""status.json on disk: written by the supervisor, read by `watcher status` and `watcher health`.

The document itself (typed value, JSON schema, health rules) is pure: watcher/snapshot.py.
The CLI never discovers on its own; it reads this file.
"""

from __future__ import annotations

from pathlib import Path

from .cache import atomic_write
from .snapshot import (STALE_AFTER, SnapshotError, StatusDocument, StatusJson, from_json,
                       health_problems, to_json)

__all__ = ["STALE_AFTER", "health_problems", "listening_ports", "read_status",
           "sshd_listening", "write_status"]


def write_status(path: Path, document: StatusDocument, render: StatusJson | None = None) -> None:
    """`render`: a StatusJson that keeps the targets' JSON between writes (the heartbeat);
    None: to_json. Not fsynced: it is a snapshot remade every 2 s, and a reader never sees a
    partial file either way (rename). At 100k targets an fsync of its ~48 MB every 2 s
    queued the index writes behind it on the same disk."""
    data = to_json(document).encode() if render is None else render.pieces(document)
    atomic_write(path, data, 0o644, durable=False)


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
