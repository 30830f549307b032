"""The state snapshot: written by the supervisor, read by `watcher status` and `watcher health`.

The CLI never discovers on its own; it reads this file.
"""

from __future__ import annotations

import json
import socket
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


def health_problems(doc: dict[str, Any], now: float, banner: str) -> list[str]:
    """Why the proxy is not healthy ([] = healthy). Pure: the caller gathers the inputs."""
    problems = []
    if now - float(doc.get("heartbeat", 0)) > STALE_AFTER:
        problems.append("watcher heartbeat is stale")
    if not doc.get("sshd_pid"):
        problems.append("sshd is not running")
    if not banner.startswith("SSH-2.0-"):
        problems.append("sshd does not answer on port 22")
    source = doc.get("source") or {}
    if doc.get("mode") == "docker" and not source.get("connected"):
        problems.append(f"docker events stream is down: {source.get('error') or 'connecting'}")
    return problems


def read_banner(host: str = "127.0.0.1", port: int = 22, timeout: float = 3.0) -> str:
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(256).decode(errors="replace")
    except OSError as exc:
        return f"error: {exc}"
