"""Admin-maintained key files, hot-reloaded: watchdog events, plus a stat poll as fallback.

Inputs (authorized_keys format): every `*.pub`, `*.keys` and `authorized_keys*` file in the
keys directory (a ConfigMap/Secret mount or a bind-mounted directory), and in manual mode
the seed-compatible single file. Each line goes through the same strict validator as
discovered keys; a bad line is reported once with `file:line` and skipped, every other line
keeps working. A file that cannot be read keeps serving its last good content; a deleted
file revokes its keys.

Level-triggered like the rest: any relevant event (create, modify, move, delete, the
ConfigMap `..data` symlink swap) just triggers a rescan (a file whose inode, size and times are
unchanged is not read again: a one-line edit parses one file). The poll catches what inotify
cannot see, e.g. a host-side write to a single bind-mounted file.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from ..errors import KeyRejected
from ..keys import parse_authorized_keys_line
from ..model import ManualLine

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 1024 * 1024  # 100,000 keys with options fit many times over


# ---- pure ------------------------------------------------------------------------------------
def parse_key_file(data: bytes, origin: str, known: dict[str, Any] | None = None,
                   seen: dict[str, Any] | None = None) -> tuple[list[ManualLine], list[str]]:
    """Valid lines of one file, and `origin:line: reason` for each rejected one.

    `known` maps line text to its earlier parse result, so re-reading a 100,000-line file
    after a one-line edit validates one line, not all; every result lands in `seen`.
    """
    lines: list[ManualLine] = []
    errors: list[str] = []
    # Decoded once (a bad byte becomes U+FFFD, which the validator rejects on its line).
    for number, raw in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
        if raw.endswith("\r"):
            raw = raw[:-1]
        text = raw.strip(" \t")
        if not text or text.startswith("#"):
            continue
        result = known.get(text) if known is not None else None
        if result is None:
            try:
                result = parse_authorized_keys_line(text)
            except KeyRejected as exc:
                result = str(exc)
        if seen is not None:
            seen[text] = result
        if isinstance(result, str):
            errors.append(f"{origin}:{number}: {result}")
        else:
            options, key = result
            lines.append(ManualLine(origin=f"{origin}:{number}", options=options, key=key))
    return lines, errors


def is_key_file_name(name: str) -> bool:
    """Hidden names are skipped: ConfigMap mounts keep their real files under `..data`."""
    if name.startswith("."):
        return False
    return name.endswith((".pub", ".keys")) or name.startswith("authorized_keys")


# ---- adapter ---------------------------------------------------------------------------------
@dataclass
class _FileState:
    lines: list[ManualLine] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stamp: tuple | None = None  # the file as parsed (None: not read, try again)
    known: dict[str, Any] = field(default_factory=dict)  # line text -> parse result


class _Trigger(FileSystemEventHandler):
    def __init__(self, relevant: Any, fired: threading.Event) -> None:
        self.relevant = relevant
        self.fired = fired

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # our own reads: counting them would rescan forever
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        if any(p and self.relevant(os.fsdecode(p)) for p in paths):
            self.fired.set()


class ManualKeySource:
    """Feeds the reconciler's manual lines from the key directory (and the seed file)."""

    def __init__(self, sink: Any, keys_dir: Path, seed_file: Path | None = None,
                 poll_interval: float = 0.5, settle: float = 0.1) -> None:
        self.sink = sink
        self.keys_dir = keys_dir
        self.seed_file = seed_file
        self.poll_interval = poll_interval
        self.settle = settle
        self._files: dict[Path, _FileState] = {}
        self._reported: set[str] = set()
        self._fired = threading.Event()
        self._signature: tuple = ()

    def files(self) -> list[Path]:
        found: list[Path] = []
        if self.seed_file is not None and self.seed_file.is_file():
            found.append(self.seed_file)
        try:
            entries = sorted(os.scandir(self.keys_dir), key=lambda e: e.name)
        except OSError:
            entries = []
        for entry in entries:
            if is_key_file_name(entry.name) and Path(entry.path).is_file():
                found.append(Path(entry.path))
        return found

    def signature(self) -> tuple:
        """What changes when any input changes: names, inodes, sizes, mtimes (symlinks
        followed, so a ConfigMap swap shows up too)."""
        sig = []
        for path in self.files():
            try:
                st = path.stat()
            except OSError:
                continue
            sig.append((str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(sig)

    def scan(self) -> list[ManualLine]:
        """Re-read every input; returns all valid lines (and logs new errors once)."""
        current: dict[Path, _FileState] = {}
        for path in self.files():
            previous = self._files.get(path)
            stamp = _stamp(path)
            if previous is not None and stamp is not None and previous.stamp == stamp:
                current[path] = previous  # unchanged since parsed: only edited files are read
                continue
            try:
                data = _read_capped(path)
            except OSError as exc:
                state = _FileState(previous.lines if previous else [],
                                   [f"{path}: cannot read ({exc.strerror or exc}); "
                                    "serving its last good content"])
            else:
                # Its own earlier lines as the memo: a one-line edit validates one line;
                # only lines still present are kept, so the memo never outgrows the file.
                seen: dict[str, Any] = {}
                lines, errors = parse_key_file(data, str(path), previous.known if previous else {},
                                               seen)
                state = _FileState(lines, errors, stamp, seen)
            current[path] = state
        self._files = current
        errors = [e for s in current.values() for e in s.errors]
        for error in errors:
            if error not in self._reported:
                log.warning("manual key line rejected: %s", error)
        self._reported = set(errors)
        return [line for s in current.values() for line in s.lines]

    def errors(self) -> list[str]:
        return sorted(self._reported)

    def load(self) -> None:
        """Scan now and hand the lines to the sink (start-up, and after every change)."""
        self._signature = self.signature()
        lines = self.scan()
        self.sink.set_manual(lines)
        self.sink.set_manual_status({"files": len(self._files), "keys": len(lines),
                                     "errors": self.errors()})

    def _relevant(self, path: str) -> bool:
        p = Path(path)
        return (p == self.seed_file or p == self.keys_dir or self.keys_dir in p.parents)

    def run(self, stop: threading.Event) -> None:
        observer = Observer()
        handler = _Trigger(self._relevant, self._fired)
        watched = {self.keys_dir.parent}
        if self.seed_file is not None:
            watched.add(self.seed_file.parent)
        for directory in sorted(watched):
            try:
                # Recursive on the parent: deleting and re-creating the key directory,
                # or a ConfigMap swapping its `..data` link, is seen without re-arming.
                observer.schedule(handler, str(directory), recursive=True)
            except OSError as exc:
                log.warning("cannot watch %s (%s): falling back to polling", directory, exc)
        observer.start()
        try:
            while not stop.is_set():
                fired = self._fired.wait(self.poll_interval)
                if fired:
                    self._settle(stop)
                if fired or self.signature() != self._signature:
                    self.load()
        finally:
            observer.stop()
            observer.join(timeout=5)

    def _settle(self, stop: threading.Event) -> None:
        """Let a burst of events (an editor's save, a ConfigMap swap) finish first."""
        deadline = time.monotonic() + 5 * self.settle
        while time.monotonic() < deadline and not stop.is_set():
            self._fired.clear()
            if not self._fired.wait(self.settle):
                return


def _stamp(path: Path) -> tuple | None:
    """What changes when a file's content may have (symlinks followed)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read_capped(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(f"larger than {MAX_FILE_BYTES} bytes")
    return data
