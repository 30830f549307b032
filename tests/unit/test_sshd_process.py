"""SshdProcess: sshd as a child, restarted with backoff when it dies, stopped on request."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from watcher.sshd import SshdPaths, SshdProcess


def fake_sshd(tmp_path: Path, body: str) -> SshdPaths:
    script = tmp_path / "sshd"
    script.write_text(f"#!/bin/sh\necho started >> {tmp_path}/starts\n{body}\n")
    script.chmod(0o755)
    return SshdPaths(sshd=str(script), config=tmp_path / "sshd_config")


def starts(tmp_path: Path) -> int:
    path = tmp_path / "starts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_dying_sshd_is_restarted(tmp_path: Path) -> None:
    process = SshdProcess(fake_sshd(tmp_path, "exit 3"))
    process.start()
    stop = threading.Event()
    supervisor = threading.Thread(target=process.supervise, args=(stop,), daemon=True)
    supervisor.start()
    deadline = time.monotonic() + 10
    while starts(tmp_path) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    supervisor.join(5)
    assert starts(tmp_path) >= 3  # first start, then restarts after 0.5 s and 1 s of backoff
    assert process.restarts >= 2
    assert not supervisor.is_alive()


def test_stop_terminates_a_running_sshd(tmp_path: Path) -> None:
    process = SshdProcess(fake_sshd(tmp_path, "exec sleep 30"))
    process.start()
    assert process.pid is not None
    started = time.monotonic()
    process.stop()
    assert time.monotonic() - started < 5
    assert process.pid is None
    assert process.process is not None and process.process.returncode is not None
