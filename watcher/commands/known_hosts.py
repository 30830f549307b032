"""`watcher known-hosts`: the proxy's and the targets' host keys, as a known_hosts file.

Reads files only (the targets' keys the watcher learned, the proxy's own `.pub` host keys,
status.json to tell whether the watcher runs): it never scans or discovers by itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterable, TextIO

from rich.console import Console

from ..errors import KeyRejected
from ..hostkeys import HEADER, HOST_KEYS_PATH
from ..keys import parse_public_key
from ..snapshot import STATUS_PATH, SnapshotError
from ..sshd import SshdPaths
from ..status import read_status
from ..targets import fold, valid_name
from .common import EXIT_NOT_RUNNING, EXIT_OK
from .status import not_running

PROXY_ALIAS = "ssh-proxy"
"""The name the proxy's own host keys are listed under: `watcher ssh-config` writes it as
the proxy's `Host` and `HostKeyAlias`, so the keys match whatever address reaches it."""
HOST_KEY_DIR = SshdPaths().host_key_dir


# --- rendering: pure -----------------------------------------------------------------------


def proxy_lines(alias: str, public_keys: Iterable[str]) -> list[str]:
    """The proxy's host keys (`.pub` texts) as known_hosts lines on `alias`."""
    lines = []
    for text in public_keys:
        try:
            key = parse_public_key(text.strip())
        except KeyRejected:
            continue  # not a key sshd could serve either
        lines.append(f"{alias} {key.line()}")
    return sorted(set(lines))


def target_lines(text: str, alias: str) -> list[str]:
    """The learned file's lines, less any target name equal to the proxy's alias: no target
    can have its key trusted for the proxy hop (a line left without a name goes)."""
    out = []
    for line in text.removeprefix(HEADER).splitlines():
        if not line.strip() or line.startswith("#"):
            out.append(line)
            continue
        hosts, _, key = line.partition(" ")
        kept = [h for h in hosts.split(",") if fold(_bare(h)) != fold(alias)]
        if kept:
            out.append(f"{','.join(kept)} {key}")
    return out


def _bare(host: str) -> str:
    """`[name]:port` -> name."""
    return host[1:].rsplit("]:", 1)[0] if host.startswith("[") else host


def render(alias: str, proxy: list[str], targets: list[str], key_dir: Path = HOST_KEY_DIR) -> str:
    head = [f"# ssh-proxy host keys (`watcher known-hosts`): the proxy as {alias!r}, then "
            "the targets", "# (learned by the proxy from each target; keyed by its names)."]
    if not proxy:
        head.append(f"# The proxy's own host keys: none found (no .pub file in {key_dir}).")
    return "\n".join(head + proxy + targets) + "\n"


# --- reading: the adapter ------------------------------------------------------------------


def read_proxy_keys(directory: Path) -> list[str]:
    try:
        return [p.read_text(errors="replace") for p in sorted(directory.glob("*.pub"))]
    except OSError:
        return []


def run(args: argparse.Namespace, console: Console, errors: TextIO | None = None) -> int:
    errors = errors or sys.stderr
    try:
        doc = read_status(Path(args.status))
    except SnapshotError as exc:
        print(f"ssh-proxy: {exc}", file=errors)
        return EXIT_NOT_RUNNING
    stale = not_running(doc, time.time())
    if stale:
        print(f"ssh-proxy: {stale}; the host keys in {args.file} may be out of date",
              file=errors)
        return EXIT_NOT_RUNNING
    path = Path(args.file)
    try:
        learned = path.read_text(errors="replace")
    except FileNotFoundError:
        print(f"ssh-proxy: {path} does not exist yet: the watcher writes it within seconds of "
              "starting; try again (or see `watcher status`)", file=errors)
        return EXIT_NOT_RUNNING
    except OSError as exc:
        print(f"ssh-proxy: cannot read {path}: {exc.strerror}", file=errors)
        return EXIT_NOT_RUNNING
    key_dir = Path(args.host_keys)
    text = render(args.proxy_alias, proxy_lines(args.proxy_alias, read_proxy_keys(key_dir)),
                  target_lines(learned, args.proxy_alias), key_dir)
    console.file.write(text)  # a file format: never wrapped, coloured or highlighted
    console.file.flush()
    return EXIT_OK


def alias_name(value: str) -> str:
    if not valid_name(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a host name (letters, digits, "
                                         "'.', '-', '_')")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "known-hosts", help="print the host keys of the proxy and its targets (known_hosts)",
        description="Print a known_hosts file: the proxy's own host keys on the name "
                    f"--proxy-alias (default {PROXY_ALIAS}, as `watcher ssh-config` uses it), "
                    "then each target's host keys on every name the proxy grants it "
                    "(`[name]:port` when the targets' SSH port is not 22). The watcher "
                    "learns target keys itself (ssh-keyscan over the network it shares with "
                    "the target); this command only reads its files. Save the output where "
                    "`watcher ssh-config --known-hosts-file` points. Exit 0, or 3 (one line "
                    "on stderr) when the watcher is not running or has not written the keys yet.")
    parser.add_argument("--proxy-alias", default=PROXY_ALIAS, type=alias_name, metavar="NAME",
                        help=f"the name the proxy's keys are listed under (default {PROXY_ALIAS})")
    parser.add_argument("--file", default=str(HOST_KEYS_PATH), metavar="PATH",
                        help=f"the targets' learned host keys (default {HOST_KEYS_PATH})")
    parser.add_argument("--host-keys", default=str(HOST_KEY_DIR), metavar="DIR",
                        help=f"the proxy's host keys, *.pub (default {HOST_KEY_DIR})")
    parser.add_argument("--status", default=str(STATUS_PATH), metavar="PATH",
                        help=f"the status snapshot (default {STATUS_PATH})")
    parser.set_defaults(func=run, needs_console=True)
