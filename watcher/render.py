"""Served targets + keys -> the bytes sshd and the resolver read. Pure.

Three outputs, always rendered together from the same state:
- the authorized_keys cache (the documented, human-readable file),
- the index sshd's AuthorizedKeysCommand searches: the same lines, each prefixed by the key's
  fingerprint and sorted, so one `look` (binary search) answers a login in O(log n),
- the hosts block that pins every granted name to the target's address.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .model import ManualLine, PublicKey, Target

BASE_OPTIONS = "restrict,port-forwarding"
HOSTS_BEGIN = "# BEGIN ssh-proxy targets (managed by the watcher; edits are overwritten)"
HOSTS_END = "# END ssh-proxy targets"


@dataclass(frozen=True)
class ServedTarget:
    """A permitted target whose keys are known, with its resolved aliases."""

    target: Target
    aliases: tuple[str, ...]
    keys: tuple[PublicKey, ...]


@dataclass(frozen=True)
class Rendered:
    cache: str
    index: str
    hosts_block: str
    # fingerprint -> names of the targets (or manual files) the key opens: for the access log.
    owners: dict[str, tuple[str, ...]] = field(default_factory=dict)


def permitopen_options(aliases: Iterable[str], ports: Iterable[str]) -> list[str]:
    return [f'permitopen="{alias}:{port}"' for alias in aliases for port in ports]


def _key_line(options: list[str], key: PublicKey, comment: str) -> str:
    return f"{','.join(options)} {key.line()} {comment}".rstrip()


def render_discovered(served: Iterable[ServedTarget], ports: tuple[str, ...]) -> list[tuple[str, str]]:
    """(fingerprint, line) per distinct key; a key shared by targets opens all of them."""
    by_blob: dict[str, tuple[PublicKey, list[ServedTarget]]] = {}
    for item in sorted(served, key=lambda s: (s.target.name, s.target.id)):
        if not item.aliases:
            continue
        for key in item.keys:
            by_blob.setdefault(key.blob_b64, (key, []))[1].append(item)
    lines = []
    for key, items in by_blob.values():
        aliases = [a for item in items for a in item.aliases]
        options = [BASE_OPTIONS, *permitopen_options(dict.fromkeys(aliases), ports)]
        comment = ",".join(item.target.name for item in items)
        lines.append((key.fingerprint, _key_line(options, key, comment)))
    return lines


def render_manual(lines: Iterable[ManualLine]) -> list[tuple[str, str]]:
    """Admin lines keep their own options; the proxy's base options always come first."""
    out = []
    for item in lines:
        options = [BASE_OPTIONS, *(o for o in item.options
                                   if o not in ("restrict", "port-forwarding"))]
        out.append((item.key.fingerprint, _key_line(options, item.key, item.key.comment)))
    return out


def render_hosts_block(served: Iterable[ServedTarget]) -> str:
    """`<address> <names...>` for each target with names; IP aliases need no entry."""
    rows = []
    for item in sorted(served, key=lambda s: (s.target.name, s.target.id)):
        names = [a for a in item.aliases if not _looks_like_ip(a)]
        if item.target.address and names and item.keys:
            rows.append(f"{item.target.address}\t{' '.join(names)}")
    return "\n".join([HOSTS_BEGIN, *rows, HOSTS_END]) + "\n"


def _looks_like_ip(text: str) -> bool:
    return all(part.isdigit() for part in text.split(".")) and text.count(".") == 3


def render(served: Iterable[ServedTarget], ports: tuple[str, ...],
           manual: Iterable[ManualLine] = ()) -> Rendered:
    served = list(served)
    manual = list(manual)
    discovered = render_discovered(served, ports)
    admin = render_manual(manual)
    header = "# ssh-proxy authorized keys: rendered by the watcher, do not edit\n"
    cache = header + "".join(line + "\n" for _, line in sorted(discovered, key=lambda p: p[1])
                             + admin)
    index = "".join(f"{fp} {line}\n" for fp, line in sorted(discovered + admin))
    owners: dict[str, list[str]] = {}
    for item in served:
        if item.aliases:
            for key in item.keys:
                owners.setdefault(key.fingerprint, []).append(item.target.name)
    for item in manual:
        owners.setdefault(item.key.fingerprint, []).append(item.origin)
    return Rendered(cache=cache, index=index, hosts_block=render_hosts_block(served),
                    owners={fp: tuple(sorted(set(v))) for fp, v in owners.items()})


def splice_hosts_block(hosts: str, block: str) -> str:
    """Replace (or append) the managed block in a hosts file, keeping every other line."""
    lines = hosts.splitlines(keepends=True)
    out: list[str] = []
    inside = False
    for line in lines:
        stripped = line.rstrip("\n")
        if stripped == HOSTS_BEGIN:
            inside = True
            continue
        if stripped == HOSTS_END and inside:
            inside = False
            continue
        if not inside:
            out.append(line)
    if out and not out[-1].endswith("\n"):
        out[-1] += "\n"
    return "".join(out) + block
