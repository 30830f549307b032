"""`watcher status`: what the proxy knows and does, at a glance (or as JSON, or live)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..accesslog import LoggedEvent
from ..snapshot import (STALE_AFTER, STATUS_PATH, KeyStatus, ManualKey, SnapshotError,
                        StatusDocument, TargetStatus, health_problems, to_json)
from ..status import read_status, sshd_listening
from .common import (ACCESS_LOG_PATH, EXIT_NOT_RUNNING, EXIT_OK, EXIT_UNHEALTHY, ago, event_line,
                     last_events, safe)

RECENT_EVENTS = 10
STATE_STYLES = {KeyStatus.OK: "green", KeyStatus.FETCHING: "yellow",
                KeyStatus.PENDING: "yellow", KeyStatus.FAILED: "red"}
VIA_NAMES = {"http": "api", "exec": "exec"}


@dataclass(frozen=True)
class View:
    """Everything one rendering shows (gathered by `gather`, rendered by `render`)."""

    doc: StatusDocument
    events: tuple[LoggedEvent, ...]
    problems: tuple[str, ...]
    now: float
    events_error: str = ""


# --- rendering: pure -----------------------------------------------------------------------


WIDE = 120  # columns from which a fingerprint is never folded


def render(view: View, width: int = WIDE, with_verdict: bool = True) -> RenderableType:
    doc, now = view.doc, view.now
    parts: list[RenderableType] = [_summary(doc, now), _targets_table(doc, now, width >= WIDE)]
    refused = _refused_table(doc)
    if refused is not None:
        parts.append(refused)
    parts.append(_events(view))
    if with_verdict:
        parts.append(verdict(view))
    return Group(*parts)


def verdict(view: View) -> Text:
    """The last line: `healthy`, or `unhealthy: ` and every problem (one line, for scripts)."""
    if view.problems:
        return Text("unhealthy: " + "; ".join(safe(p) for p in view.problems), style="bold red")
    return Text("healthy", style="green")


def _summary(doc: StatusDocument, now: float) -> Table:
    s = doc.state
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("mode", doc.mode)
    grid.add_row("source", _source(doc, now))
    grid.add_row("last event", ago(s.last_event, now))
    grid.add_row("targets", f"{len(s.targets)} served, {len(s.ignored)} ignored; "
                            f"{s.keys_served} key line(s) in the index")
    if s.manual.files or s.manual.errors:
        manual = Text(f"{s.manual.keys} key(s) from {s.manual.files} file(s)")
        for error in s.manual.errors:
            manual.append(f"\n{safe(error)}", style="red")
        grid.add_row("admin keys", manual)
    grid.add_row("cache written", ago(s.last_write, now))
    sshd = (Text(f"pid {doc.sshd_pid}") if doc.sshd_pid else Text("not running", style="red"))
    sshd.append(f", {doc.sshd_restarts} restart(s)")
    grid.add_row("sshd", sshd)
    grid.add_row("status written", ago(doc.heartbeat, now))
    return grid


def _source(doc: StatusDocument, now: float) -> Text:
    source = doc.state.source
    if doc.mode == "manual":
        return Text("none (manual mode: keys from files only)")
    if source.connected:
        text = Text("connected", style="green")
        text.append(f" since {ago(source.since, now)}")
        if source.reconnects:
            text.append(f" ({source.reconnects} reconnect(s))")
        return text
    text = Text("reconnecting" if source.kind else "connecting", style="bold red")
    if source.reconnects:
        text.append(f" (attempt {source.reconnects})")
    if source.error:
        text.append(f": {safe(source.error)}")
    return text


def _targets_table(doc: StatusDocument, now: float, wide: bool) -> Table:
    table = Table(title="targets", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    # Narrow terminals fold every cell (the fingerprint too) rather than squeeze one column.
    # Free text wraps first, so a fingerprint stays on one line where the width allows.
    for column, width, most in (("target", 8, 30), ("names granted", 8, 30), ("ports", 4, 12),
                                ("key", 5, 12), ("fingerprint", 12, None), ("from", 4, 50),
                                ("state, since", 8, 32)):
        table.add_column(column, overflow="fold", min_width=width, max_width=most,
                         no_wrap=wide and column == "fingerprint")
    port_rule = doc.settings.port_rule
    for target in doc.state.targets:
        table.add_row(safe(target.name), "\n".join(safe(a) for a in target.aliases) or "-",
                      port_rule, *_keys(target), VIA_NAMES.get(target.via, target.via or "-"),
                      _state(target, now))
    for key in doc.state.manual_keys:
        hosts, ports = _permits(key)
        table.add_row("admin key", hosts, ports, _key_type(key.key_type), key.fingerprint,
                      f"manual {safe(key.origin)}", Text("ok", style="green"))
    if doc.state.manual.keys > len(doc.state.manual_keys):
        more = doc.state.manual.keys - len(doc.state.manual_keys)
        table.add_row(f"... {more} more admin key(s)")
    if not table.rows:
        table.add_row("(none)")
    return table


def _keys(target: TargetStatus) -> tuple[str, str]:
    """Key types and fingerprints, one key a line."""
    if not target.keys:
        return "-", "-"
    return ("\n".join(_key_type(k.key_type) for k in target.keys),
            "\n".join(k.fingerprint for k in target.keys))


def _key_type(key_type: str) -> str:
    """As sshd logs it: ED25519, RSA, NISTP256, SK-ED25519@OPENSSH.COM ..."""
    return safe(key_type.removeprefix("ssh-").removeprefix("ecdsa-sha2-").upper())


def _state(target: TargetStatus, now: float) -> Text:
    text = Text(target.key_status.value, style=STATE_STYLES[target.key_status])
    if target.error:
        text.append(f": {safe(target.error)}")
    text.append(f", {ago(target.since, now)}" if target.since else "")
    for reason in target.rejected:
        text.append(f"\nrejected: {safe(reason)}", style="yellow")
    return text


def _permits(key: ManualKey) -> tuple[str, str]:
    """An admin line's reach from its permitopen options (none: the discovered targets)."""
    opens = [o.split("=", 1)[1].strip('"') for o in key.options if o.startswith("permitopen=")]
    if not opens:
        return "discovered targets", "target ports"
    hosts = sorted({o.rsplit(":", 1)[0] for o in opens})
    ports = sorted({o.rsplit(":", 1)[1] for o in opens if ":" in o})
    return "\n".join(safe(h) for h in hosts), ",".join(safe(p) for p in ports)


def _refused_table(doc: StatusDocument) -> Table | None:
    refused = doc.state.refused_aliases
    ignored = doc.state.ignored
    if not refused and not ignored:
        return None
    table = Table(title="refused", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("target", "name", "why"):
        table.add_column(column, overflow="fold")
    for item in refused:
        table.add_row(safe(item.target), safe(item.alias), safe(item.reason))
    for target in ignored:
        table.add_row(safe(target.name), "(whole target)", safe(target.reason))
    return table


def _events(view: View) -> RenderableType:
    title = Text(f"last {RECENT_EVENTS} access events", style="bold")
    if view.events_error:
        return Group(title, Text(view.events_error, style="red"))
    if not view.events:
        return Group(title, Text("(none yet)"))
    return Group(title, *(event_line(e) for e in view.events))


# --- gathering: the adapter --------------------------------------------------------------


def not_running(doc: StatusDocument, now: float) -> str:
    """Why the watcher counts as not running ("" if it runs)."""
    if now - doc.heartbeat > STALE_AFTER:
        return (f"the watcher is not running: its status was last written {ago(doc.heartbeat, now)}"
                " (the container is stopped or the watcher is stuck; see its logs)")
    return ""


def gather(status_path: Path, access_log: Path, listening: Callable[[], bool],
           now: float) -> View:
    doc = read_status(status_path)
    try:
        events, error = tuple(last_events(access_log, RECENT_EVENTS)), ""
    except OSError as exc:
        events, error = (), f"cannot read {access_log}: {exc.strerror}"
    problems = tuple(health_problems(doc, now, listening()))
    return View(doc, events, problems, now, error)


def run(args: argparse.Namespace, console: Console,
        listening: Callable[[], bool] = sshd_listening) -> int:
    try:
        view = gather(Path(args.status), Path(args.access_log), listening, time.time())
    except SnapshotError as exc:
        console.print(Text(str(exc)), soft_wrap=True)
        return EXIT_NOT_RUNNING
    stale = not_running(view.doc, view.now)
    if stale:
        console.print(Text(stale), soft_wrap=True)
        return EXIT_NOT_RUNNING
    if args.json:
        console.file.write(to_json(view.doc))
    elif args.watch:
        return watch(args, console, listening)
    else:
        console.print(render(view, console.width, with_verdict=False))
        console.print(verdict(view), soft_wrap=True)
    return EXIT_UNHEALTHY if view.problems else EXIT_OK


def watch(args: argparse.Namespace, console: Console, listening: Callable[[], bool],
          interval: float = 2.0) -> int:
    """Redraw every `interval` s (status.json is rewritten every 2 s) until Ctrl-C."""
    def current() -> RenderableType:
        try:
            view = gather(Path(args.status), Path(args.access_log), listening, time.time())
        except SnapshotError as exc:
            return Text(str(exc), style="bold red")
        stale = not_running(view.doc, view.now)
        return Text(stale, style="bold red") if stale else render(view, console.width)

    with Live(current(), console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(current(), refresh=True)
        except KeyboardInterrupt:
            return EXIT_OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "status", help="show what the watcher knows: source, targets, keys, recent access",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show the watcher's state from its status snapshot and the last access\n"
                    "events: the source, each target's names, ports, keys and state, names\n"
                    "refused and why. Exit 0 when healthy, 1 when unhealthy (the last line\n"
                    "says why), 3 when the watcher is not running (no, stale or unreadable\n"
                    "snapshot). Colour on a terminal only; NO_COLOR=1 turns it off; piped\n"
                    "output is 200 columns wide (COLUMNS overrides).",
        epilog="examples:\n"
               "  docker exec ssh-proxy watcher status\n"
               "  docker exec -it ssh-proxy watcher status --watch\n"
               "  docker exec ssh-proxy watcher status --json | jq '.targets[].name'")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="print the status document (JSON, schema 1; see README) instead")
    output.add_argument("--watch", action="store_true",
                        help="redraw every 2 s until Ctrl-C")
    parser.add_argument("--status", default=str(STATUS_PATH), metavar="PATH",
                        help=f"the status snapshot (default {STATUS_PATH})")
    parser.add_argument("--access-log", default=str(ACCESS_LOG_PATH), metavar="PATH",
                        help=f"the access log (default {ACCESS_LOG_PATH})")
    parser.set_defaults(func=run, needs_console=True)
