"""`watcher logs`: the access log, readable and filtered (the file itself stays logfmt,
one line per event, for `tail -f` and grep)."""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

from rich.console import Console

from ..accesslog import EVENTS, LoggedEvent, format_timestamp, parse_line
from ..errors import WatcherError
from .common import ACCESS_LOG_PATH, EXIT_OK, event_line

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class LogsError(WatcherError):
    """The access log cannot be read, or a filter is malformed."""


def parse_duration(text: str) -> float:
    """`90s`, `10m`, `2h`, `1d`, `1h30m` -> seconds."""
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30s, 10m, 2h or 1d")
    return float(sum(int(n) * _UNITS[u] for n, u in parts))


@dataclass(frozen=True)
class Filter:
    target: str = ""  # the event's target list holds it
    events: frozenset[str] = frozenset()  # empty: every event
    since: float = 0.0  # epoch seconds; 0: from the start

    def __call__(self, event: LoggedEvent) -> bool:
        return ((not self.target or self.target in event.targets)
                and (not self.events or event.event in self.events)
                and event.time >= self.since)


def select(lines: Iterable[str], keep: Filter) -> Iterator[LoggedEvent]:
    """The events among `lines` that pass `keep` (lines that are not events are skipped)."""
    for line in lines:
        event = parse_line(line)
        if event is not None and keep(event):
            yield event


def as_json(event: LoggedEvent) -> str:
    """One JSON object per event (JSON Lines): time, then every field as logged."""
    return json.dumps({"time": format_timestamp(event.time), **dict(event.fields)})


def follow(handle: TextIO, stop: threading.Event, poll: float = 0.5) -> Iterator[str]:
    """Lines appended to `handle` from its current position until `stop`. Starts over when the
    file is truncated (rotation by copytruncate)."""
    partial = ""
    while not stop.is_set():
        chunk = handle.readline()
        if chunk:
            partial += chunk
            if partial.endswith("\n"):
                yield partial
                partial = ""
            continue
        try:
            size = Path(handle.name).stat().st_size
        except OSError:
            size = handle.tell()
        if size < handle.tell():
            handle.seek(0)
            partial = ""
        stop.wait(poll)


def run(args: argparse.Namespace, console: Console,
        stop: threading.Event | None = None, now: Callable[[], float] = time.time) -> int:
    keep = Filter(target=args.target or "", events=frozenset(args.event or ()),
                  since=now() - args.since if args.since else 0.0)
    path = Path(args.access_log)
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise LogsError(f"cannot read {path}: {exc.strerror} (is this the proxy container? "
                        "pass --access-log PATH otherwise)") from None
    with handle:
        show = _printer(args.json, console)
        for event in select(handle, keep):
            show(event)
        if args.follow:
            try:
                for event in select(follow(handle, stop or threading.Event()), keep):
                    show(event)
            except KeyboardInterrupt:
                pass
    return EXIT_OK


def _printer(json_lines: bool, console: Console) -> Callable[[LoggedEvent], None]:
    if json_lines:
        def write(event: LoggedEvent) -> None:
            console.file.write(as_json(event) + "\n")
            console.file.flush()
        return write
    return lambda event: console.print(event_line(event), soft_wrap=True)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "logs", help="show the access log, readable and filtered",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show the access log (who logged in, opened which tunnel, was refused),\n"
                    "one event a line, coloured on a terminal. An event is shown when it\n"
                    "passes every filter given. The file itself stays logfmt for tail -f and grep.",
        epilog="examples:\n"
               "  docker exec ssh-proxy watcher logs --event denied --since 10m\n"
               "  docker exec ssh-proxy watcher logs -f --target workspace-a\n"
               "  docker exec ssh-proxy watcher logs --json --since 1h")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="keep printing new events until Ctrl-C")
    parser.add_argument("--target", metavar="NAME",
                        help="only events of this target (its name as the log gives it; "
                             "'-' for keys the proxy does not know)")
    parser.add_argument("--event", action="append", choices=EVENTS, metavar="EVENT",
                        help=f"only these events (repeatable): {', '.join(EVENTS)}")
    parser.add_argument("--since", type=parse_duration, metavar="DURATION",
                        help="only events of the last DURATION: 30s, 10m, 2h, 1d")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per event (JSON Lines) instead")
    parser.add_argument("--access-log", default=str(ACCESS_LOG_PATH), metavar="PATH",
                        help=f"the access log (default {ACCESS_LOG_PATH})")
    parser.set_defaults(func=run, needs_console=True)
