"""`watcher ssh-config`: ~/.ssh/config entries for the proxy and every target it serves.

With them (and `watcher known-hosts` saved where --known-hosts-file points), `ssh <target>`,
scp, rsync, sftp and VS Code Remote-SSH go through the proxy with strict host-key checking:
no key is ever trusted on first use. Reads status.json only (the targets and their names).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rich.console import Console

from ..hostkeys import DEFAULT_SSH_PORT, is_address, known_host_names, ssh_port
from ..snapshot import STATUS_PATH, SnapshotError, StatusDocument
from ..status import read_status
from ..targets import fold, valid_name
from .common import EXIT_NOT_RUNNING, EXIT_OK
from .known_hosts import PROXY_ALIAS, alias_name
from .status import not_running

PROXY_USER = "limited-user"
DEFAULT_PROXY_HOST = "localhost"
DEFAULT_PROXY_PORT = 8091  # the published port of the README's quick start
DEFAULT_IDENTITY = "~/.ssh/id_ed25519"
DEFAULT_KNOWN_HOSTS = "~/.ssh/ssh-proxy_known_hosts"
DEFAULT_USER = "root"

_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
# No control character, quote or backslash: ssh_config would read them as syntax.
_PATH = re.compile(r"[^\x00-\x1f\x7f\"\\]{1,1024}")


@dataclass(frozen=True)
class ClientOptions:
    """What the user's side looks like (the proxy cannot know its published address)."""

    proxy_host: str = DEFAULT_PROXY_HOST
    proxy_port: int = DEFAULT_PROXY_PORT
    identity_file: str = DEFAULT_IDENTITY
    user: str = DEFAULT_USER
    known_hosts_file: str = DEFAULT_KNOWN_HOSTS
    proxy_alias: str = PROXY_ALIAS
    defaults_used: tuple[str, ...] = ()  # which of the proxy's host and port were not given


@dataclass(frozen=True)
class TargetEntry:
    name: str
    hosts: tuple[str, ...]  # the names the Host line matches


# --- rendering: pure -----------------------------------------------------------------------


def host_names(aliases: tuple[str, ...], proxy_alias: str) -> tuple[str, ...]:
    """The granted names a Host line may carry: valid host names only (no space, glob,
    '!' or ',' could widen the entry), never an address (a laptop's own networks may use
    the same one), never the proxy's alias."""
    return tuple(a for a in known_host_names(aliases)
                 if not is_address(a) and fold(a) != fold(proxy_alias))


def entries(doc: StatusDocument, proxy_alias: str) -> tuple[list[TargetEntry], int]:
    """(a Host entry per target with a usable name, how many targets had none)."""
    out, left_out = [], 0
    for target in sorted(doc.state.targets, key=lambda t: (t.name, t.id)):
        hosts = host_names(target.aliases, proxy_alias)
        if hosts:
            out.append(TargetEntry(target.name, hosts))
        else:
            left_out += 1
    return out, left_out


def quoted(path: str) -> str:
    return f'"{path}"' if any(c in path for c in " \t#=") else path


def render(opts: ClientOptions, targets: list[TargetEntry], port: int, left_out: int = 0) -> str:
    identity, known = quoted(opts.identity_file), quoted(opts.known_hosts_file)
    strict = [f"    UserKnownHostsFile {known}", "    StrictHostKeyChecking yes"]
    lines = ["# ssh-proxy: written by `watcher ssh-config`; the host keys these entries trust:",
             f"#   docker exec <proxy> watcher known-hosts > {opts.known_hosts_file}"]
    if opts.defaults_used:
        lines.append(f"# The proxy's {' and '.join(opts.defaults_used)} are the defaults "
                     f"({opts.proxy_host}:{opts.proxy_port}): pass --proxy-host/--proxy-port "
                     "for its published address.")
    lines += ["", f"Host {opts.proxy_alias}", f"    HostName {opts.proxy_host}",
              f"    Port {opts.proxy_port}", f"    User {PROXY_USER}",
              f"    IdentityFile {identity}", "    IdentitiesOnly yes",
              f"    HostKeyAlias {opts.proxy_alias}", *strict]
    for target in targets:
        lines += ["", f"Host {' '.join(target.hosts)}", f"    ProxyJump {opts.proxy_alias}",
                  f"    User {opts.user}"]
        if port != DEFAULT_SSH_PORT:
            lines.append(f"    Port {port}")
        lines += [f"    IdentityFile {identity}", "    IdentitiesOnly yes", *strict]
    if not targets:
        lines += ["", "# No target is served yet (see `watcher status`)."]
    if left_out:
        lines += ["", f"# {left_out} target(s) left out: no name usable in a Host line."]
    return "\n".join(lines) + "\n"


# --- arguments and reading: the adapter ---------------------------------------------------


def proxy_host(value: str) -> str:
    if not (valid_name(value) or is_address(value)):
        raise argparse.ArgumentTypeError(f"{value!r} is not a host name or IP address")
    return value


def port_number(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port 1-65535")
    return int(value)


def user_name(value: str) -> str:
    if not _USER.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a user name (letters, digits, "
                                         "'.', '-', '_')")
    return value


def path_text(value: str) -> str:
    if not _PATH.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r}: a path without quotes, backslashes or "
                                         "control characters")
    return value


def client_options(args: argparse.Namespace) -> ClientOptions:
    defaults = tuple(what for what, value in (("host", args.proxy_host), ("port", args.proxy_port))
                     if value is None)
    return ClientOptions(
        proxy_host=args.proxy_host or DEFAULT_PROXY_HOST,
        proxy_port=args.proxy_port or DEFAULT_PROXY_PORT,
        identity_file=args.identity_file, user=args.user,
        known_hosts_file=args.known_hosts_file, proxy_alias=args.proxy_alias,
        defaults_used=defaults)


def run(args: argparse.Namespace, console: Console, errors: TextIO | None = None) -> int:
    errors = errors or sys.stderr
    try:
        doc = read_status(Path(args.status))
    except SnapshotError as exc:
        print(f"ssh-proxy: {exc}", file=errors)
        return EXIT_NOT_RUNNING
    stale = not_running(doc, time.time())
    if stale:
        print(f"ssh-proxy: {stale}", file=errors)
        return EXIT_NOT_RUNNING
    opts = client_options(args)
    targets, left_out = entries(doc, opts.proxy_alias)
    console.file.write(render(opts, targets, ssh_port(doc.settings.permit_ports), left_out))
    console.file.flush()  # a file format: never wrapped, coloured or highlighted
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "ssh-config", help="print ~/.ssh/config entries for the proxy and its targets",
        description="Print ~/.ssh/config entries: a Host for the proxy (--proxy-alias, "
                    f"User {PROXY_USER}) and one per served target (its granted names) with "
                    "ProxyJump to the proxy, all with StrictHostKeyChecking yes and "
                    "UserKnownHostsFile --known-hosts-file (save `watcher known-hosts` "
                    "there). The proxy cannot know the address it is published at: pass "
                    f"--proxy-host/--proxy-port (defaults {DEFAULT_PROXY_HOST} and "
                    f"{DEFAULT_PROXY_PORT}, the quick start's). Targets get `Port N` when "
                    "SSH_PERMIT_TARGET_PORT is the single port N. Exit 0, or 3 (one line "
                    "on stderr) when the watcher is not running.")
    parser.add_argument("--proxy-host", type=proxy_host, metavar="H",
                        help=f"the proxy's address as your machine reaches it "
                             f"(default {DEFAULT_PROXY_HOST})")
    parser.add_argument("--proxy-port", type=port_number, metavar="P",
                        help=f"its published SSH port (default {DEFAULT_PROXY_PORT})")
    parser.add_argument("--identity-file", type=path_text, default=DEFAULT_IDENTITY, metavar="F",
                        help=f"your private key, for the proxy and the targets "
                             f"(default {DEFAULT_IDENTITY})")
    parser.add_argument("--user", type=user_name, default=DEFAULT_USER, metavar="U",
                        help=f"the user on the targets (default {DEFAULT_USER})")
    parser.add_argument("--known-hosts-file", type=path_text, default=DEFAULT_KNOWN_HOSTS,
                        metavar="PATH", help="where you save `watcher known-hosts` "
                                             f"(default {DEFAULT_KNOWN_HOSTS})")
    parser.add_argument("--proxy-alias", type=alias_name, default=PROXY_ALIAS, metavar="NAME",
                        help=f"the proxy's Host name in the config (default {PROXY_ALIAS}; "
                             "the same as `watcher known-hosts --proxy-alias`)")
    parser.add_argument("--status", default=str(STATUS_PATH), metavar="PATH",
                        help=f"the status snapshot (default {STATUS_PATH})")
    parser.set_defaults(func=run, needs_console=True)
