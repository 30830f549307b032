"""Shared by the commands: ages, times, reading the access log's tail. Pure except `tail_lines`."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from rich.text import Text

from ..accesslog import LoggedEvent, logfmt_value, parse_line

ACCESS_LOG_PATH = Path("/etc/ssh/access.log")

# Exit codes of the reading commands (`watcher status`, `watcher logs`).
EXIT_OK, EXIT_UNHEALTHY, EXIT_NOT_RUNNING = 0, 1, 3

EVENT_STYLES = {"accepted": "green", "tunnel": "green", "closed": "dim",
                "denied": "red", "tunnel-denied": "red", "revoked": "red",
                "session-refused": "yellow", "forward-refused": "yellow"}


def age(seconds: float) -> str:
    """A short duration: 4s, 12m, 3h, 2d (negative clocks skew: 0s)."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def ago(when: float | None, now: float) -> str:
    return "never" if not when else f"{age(now - when)} ago"


def clock(when: float) -> str:
    """UTC wall time, to the second: 2026-12-04 17:01:02Z."""
    return f"{datetime.fromtimestamp(when, tz=timezone.utc):%Y-%m-%d %H:%M:%S}Z"


def safe(value: str) -> str:
    """A value from a file as one printable line, every non-printable character escaped:
    nothing a client or container chose can reach the terminal as a control sequence."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in value)


def field(value: str) -> str:
    """A log field's value as the log writes it (logfmt quoting and escapes)."""
    return logfmt_value(value)


def event_line(event: LoggedEvent) -> Text:
    """One access event, readable: time, event (coloured), then the other fields."""
    line = Text(clock(event.time) + "  ")
    line.append(f"{event.event:<15}", style=EVENT_STYLES.get(event.event, ""))
    rest = " ".join(f"{k}={field(v)}" for k, v in event.fields if k != "event")
    line.append(" " + rest)
    return line


def tail_lines(path: Path, count: int, block: int = 65536) -> list[str]:
    """The last `count` lines of `path` without reading all of a large log ([] if none)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            end = handle.tell()
            data = b""
            while end > 0 and data.count(b"\n") <= count:
                start = max(0, end - block)
                handle.seek(start)
                data = handle.read(end - start) + data
                end = start
    except FileNotFoundError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-count:]


def last_events(path: Path, count: int) -> list[LoggedEvent]:
    events = [parse_line(line) for line in tail_lines(path, count)]
    return [e for e in events if e is not None]
