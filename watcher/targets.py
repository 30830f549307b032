"""Which targets are permitted, and which names/addresses each may be reached by. Pure.

A target's aliases become `permitopen="<alias>:<port>"` options on its key and entries in the
proxy's hosts block, so an alias is a grant: it must be unambiguous, must never name the proxy
or loopback, and must be well-formed enough to be written into an option and a hosts file.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Iterable

from .config import Settings
from .model import Target

# RFC 1123 labels plus '_' (Docker names and network aliases allow it).
_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback",
                   "localhost4", "localhost6"}


@dataclass(frozen=True)
class ProxyIdentity:
    """Names and addresses of the proxy itself: never granted to a target."""

    names: frozenset[str] = frozenset()
    addresses: frozenset[str] = frozenset()
    container_id: str = ""


@dataclass(frozen=True)
class AliasPlan:
    """The outcome of alias resolution over all targets."""

    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # target id -> aliases
    refused: tuple[tuple[str, str, str], ...] = ()  # (target name, alias, reason)


def is_permitted(target: Target, settings: Settings) -> str:
    """"" when the target is served, else the reason it is not (for logs and status)."""
    if not settings.any_host and not any(
            fnmatch.fnmatchcase(target.name, pattern) for pattern in settings.permit_hosts):
        return f"name does not match SSH_PERMIT_TARGET_HOST={','.join(settings.permit_hosts)}"
    labels = target.label_dict()
    for key, value in settings.labels:
        if key not in labels:
            return f"label {key!r} missing (SSH_TARGET_LABELS)"
        if value is not None and labels[key] != value:
            return f"label {key}={labels[key]!r} is not {value!r} (SSH_TARGET_LABELS)"
    return ""


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _inet_aton_form(text: str) -> bool:
    try:
        socket.inet_aton(text)
    except OSError:
        return False
    return True


def alias_problem(alias: str, proxy: ProxyIdentity) -> str:
    """Why an alias may not be granted, or "" when it may."""
    ip = _ip(alias)
    if ip is not None:
        if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local:
            return "loopback, unspecified, multicast or link-local address"
        if ip.version == 6:
            return "IPv6 addresses are not granted (containers here have IPv4 only)"
        if alias in proxy.addresses:
            return "address of the proxy itself"
        return ""
    if not _NAME.match(alias):
        return "not a valid host name"
    lowered = alias.lower()
    if lowered in _LOOPBACK_NAMES or lowered.endswith(".localhost"):
        return "loopback name"
    if lowered in {n.lower() for n in proxy.names}:
        return "name of the proxy itself"
    if re.fullmatch(r"[0-9.]+", alias) or _inet_aton_form(alias):
        # glibc resolves these numeric forms (e.g. 0x7f000001 = 127.0.0.1) before /etc/hosts.
        return "looks like an address but is not one"
    return ""


def _candidates(target: Target) -> list[tuple[str, bool]]:
    """(alias, authoritative) in priority order: name, id and IPs are the target's own;
    hostname and network aliases are whatever its owner chose (soft)."""
    out: list[tuple[str, bool]] = [(target.name, True), (target.id[:12], True)]
    out.extend((ip, True) for ip in (target.address, *target.addresses) if ip)
    out.extend((a, False) for a in target.aliases)
    if target.hostname:
        out.append((target.hostname, False))
    return out


def resolve_aliases(targets: Iterable[Target], proxy: ProxyIdentity,
                    pin_names: bool = True) -> AliasPlan:
    """Give each target the aliases that are unambiguously its own.

    A container name belongs to its container only. Other authoritative aliases (short id,
    own IPs) belong to their target when exactly one target has them; a soft alias
    (hostname, network alias) only when no one else claims it at all. Anything contested is
    refused for every claimant, so one target can never borrow a name or address that leads
    to another. Without `pin_names` (no hosts block to pin names to addresses), soft aliases
    are refused: sshd would resolve them through DNS, where they may lead somewhere else.
    """
    targets = sorted(targets, key=lambda t: (t.name, t.id))
    claims: dict[str, set[str]] = {}
    auth_claims: dict[str, set[str]] = {}
    name_owner: dict[str, str] = {}
    for t in targets:
        name_owner.setdefault(t.name, t.id)
        for alias, auth in _candidates(t):
            claims.setdefault(alias, set()).add(t.id)
            if auth:
                auth_claims.setdefault(alias, set()).add(t.id)
    names = {t.id: t.name for t in targets}
    addresses = {t.id: t.address for t in targets}

    def contest(alias: str, target_id: str, auth: bool) -> str:
        if not auth and _ip(alias) is not None:
            # A hostname or network alias spelled as an address would open that address,
            # which may be any host: only the target's own IPs (from the engine) count.
            return "an address that is not the target's own"
        owner = name_owner.get(alias)
        if owner is not None:
            return "" if owner == target_id else f"belongs to target {names[owner]}"
        others = sorted(names[o] for o in claims[alias] if o != target_id)
        auth_owners = auth_claims.get(alias, set())
        if len(auth_owners) == 1 and target_id not in auth_owners:
            return f"belongs to target {names[next(iter(auth_owners))]}"
        if len(auth_owners) > 1:
            return f"also claimed by {', '.join(others)}"
        if not auth_owners and others:
            return f"also claimed by {', '.join(others)}"
        if not auth and not pin_names:
            return "hosts file not writable: only names that resolve by themselves"
        if not auth and not addresses.get(target_id):
            return "no address to pin the name to"
        return ""

    result: dict[str, tuple[str, ...]] = {}
    refused: list[tuple[str, str, str]] = []
    for t in targets:
        granted: list[str] = []
        for alias, auth in _candidates(t):
            if alias in granted:
                continue
            problem = alias_problem(alias, proxy) or contest(alias, t.id, auth)
            if problem:
                refused.append((t.name, alias, problem))
            else:
                granted.append(alias)
        result[t.id] = tuple(granted)
    return AliasPlan(aliases=result, refused=tuple(refused))
