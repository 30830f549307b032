"""The state snapshot: written by the supervisor, read by `watcher status` and `watcher health`.

The CLI never discovers on its own; it reads this file.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .cache import atomic_write
from .reconcile import Snapshot

STALE_AFTER = 30.0  # seconds without a heartbeat: the supervisor is stuck or gone


def snapshot_document(snapshot: Snapshot | None, extra: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {"heartbeat": time.time(), **extra}
    if snapshot is not None:
        doc.update(asdict(snapshot))
    return doc


def write_status(path: Path, document: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(document, indent=1, sort_keys=True) + "\n").encode(), 0o644)


def read_status(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def health_problems(doc: dict[str, Any], now: float, listening: bool,
                    require_source: bool = True) -> list[str]:
    """Why the proxy is not healthy ([] = healthy). Pure: the caller gathers the inputs.

    `require_source`: a discovering mode's stream must be connected (readiness). Without it
    (liveness) only the watcher and sshd count: during a platform outage sshd keeps serving
    the last good keys, and restarting the proxy would not bring the platform back."""
    problems = []
    if now - float(doc.get("heartbeat", 0)) > STALE_AFTER:
        problems.append("watcher heartbeat is stale")
    if not doc.get("sshd_pid"):
        problems.append("sshd is not running")
    if not listening:
        problems.append("sshd does not listen on port 22")
    source = doc.get("source") or {}
    mode = doc.get("mode")
    if require_source and mode in ("docker", "kubernetes") and not source.get("connected"):
        state = (f"reconnecting (attempt {source.get('attempt')})"
                 if source.get("state") == "reconnecting" else "not connected")
        problems.append(f"{mode} source is {state}: {source.get('error') or 'connecting'}")
    return problems


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
