"""Which targets are permitted, and which names/addresses each may be reached by. Pure.

A target's aliases become `permitopen="<alias>:<port>"` options on its key and entries in the
proxy's hosts block, so an alias is a grant: it must be unambiguous, must never name the proxy
or loopback, and must be well-formed enough to be written into an option and a hosts file.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
import socket
import string
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

from .config import Settings
from .model import ManualLine, Target
from .multimap import IdMultimap

# RFC 1123 labels plus '_' (Docker names and network aliases allow it). Always fullmatch:
# with re.match, `$` also matches before a final newline ("victim\n" would pass).
_NAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback",
                   "localhost4", "localhost6"}


@dataclass(frozen=True)
class ProxyIdentity:
    """Names and addresses of the proxy itself: never granted to a target."""

    names: frozenset[str] = frozenset()
    addresses: frozenset[str] = frozenset()
    container_id: str = ""


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def fold(name: str) -> str:
    """The form names are compared in: the resolver (/etc/hosts, DNS) ignores ASCII case,
    and only ASCII case (str.lower would also fold e.g. the Kelvin sign into 'k').
    A name already folded is returned as itself: the tables keyed by folded names then
    share the target's own string instead of holding a copy of each. An ASCII name (every
    valid one) is lowered by str.lower, which is ASCII folding there and 5-10x faster than
    translate: this runs for every name of every target a change touches."""
    folded = name.lower() if name.isascii() else name.translate(_ASCII_LOWER)
    return name if folded == name else folded


def valid_name(name: str) -> bool:
    """A host name we may write into a permitopen option or the hosts file: no whitespace,
    no control character, nothing but letters, digits, '_', '.' and inner '-'."""
    return _NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class Reservation:
    """A name already in use outside the permitted targets: granting it would hijack it."""

    reason: str  # for logs and the status snapshot
    hard: bool = False  # something's own name: refused even as a target's own (container) name
    addresses: frozenset[str] = frozenset()  # where it already resolves, when known: no
    # conflict for a target that owns every one of them (it leads there anyway)

    def blocks(self, target: Target, authoritative: bool) -> bool:
        if self.addresses and self.addresses <= {target.address, *target.addresses}:
            return False
        return self.hard or not authoritative


@dataclass(frozen=True)
class ReservedNames:
    """Names seen elsewhere, by folded name: built by the reconciler from what it sees
    (non-served containers, admin keys' permitopen hosts, the hosts file's other lines,
    the proxy's own names); resolve_aliases only reads it."""

    entries: Mapping[str, tuple[Reservation, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, Reservation]]) -> ReservedNames:
        return cls().with_(pairs)

    def with_(self, pairs: Iterable[tuple[str, Reservation]]) -> ReservedNames:
        """A copy with more reservations (this one is left as it is)."""
        entries = dict(self.entries)
        for name, reservation in pairs:
            key = fold(name)
            if reservation not in entries.get(key, ()):
                entries[key] = (*entries.get(key, ()), reservation)
        return ReservedNames(entries)

    def conflict(self, alias: str, target: Target, authoritative: bool) -> str:
        """Why `target` may not have `alias` because of a name seen elsewhere, or ""."""
        for reservation in self.entries.get(fold(alias), ()):
            if reservation.blocks(target, authoritative):
                return reservation.reason
        return ""


def container_reservations(others: Iterable[Target]) -> Iterator[tuple[str, Reservation]]:
    """Names of running containers the proxy can reach but does not serve. Their name, id
    and addresses are theirs alone; their hostname and network aliases are soft claims."""
    for other in sorted(others, key=lambda t: (t.name, t.id)):
        if not other.address:
            continue  # on no network the proxy shares: the proxy cannot resolve its names
        def why(kind: str) -> str:
            return f"{kind} of container {other.name}, which is not served"
        yield other.name, Reservation(why("name"), hard=True)
        yield other.short_id, Reservation(why("id"), hard=True)
        for ip in (other.address, *other.addresses):
            yield ip, Reservation(why("address"), hard=True)
        if other.hostname:
            yield other.hostname, Reservation(why("hostname"))
        for alias in other.aliases:
            yield alias, Reservation(why("network alias"))


def permitopen_hosts(options: Iterable[str]) -> Iterator[str]:
    """The hosts of `permitopen="host:port"` options (already validated by keys.py)."""
    for option in options:
        if not option.startswith('permitopen="') or not option.endswith('"'):
            continue
        value = option[len('permitopen="'):-1]
        if value.startswith("["):
            yield value[1:].partition("]")[0]
        else:
            yield value.rpartition(":")[0]


def permitopen_reservations(lines: Iterable[ManualLine]) -> Iterator[tuple[str, Reservation]]:
    """Hosts an admin's key may open: a target's soft name must not redirect them. One
    reservation per host (folded), citing the first line that names it."""
    yield from ManualReservations(lines).pairs()


class ManualReservations:
    """permitopen_reservations kept up to date edit by edit: a 100k-line key file is not
    scanned again when one line changes. Each host cites the first line naming it, by its
    origin as of now: lines move when lines above them come and go (see LineNumber)."""

    def __init__(self, lines: Iterable[ManualLine] = ()) -> None:
        self._lines: dict[str, dict[ManualLine, int]] = {}  # folded host -> lines naming it
        self._first: dict[str, ManualLine] = {}  # folded host -> the first of them
        self._reasons: dict[str, str] = {}  # folded host -> its reason as last given
        self.update((), lines)

    def update(self, removed: Iterable[ManualLine], added: Iterable[ManualLine]) -> set[str]:
        """Apply an edit; returns the folded hosts whose reservation changed: named or no
        longer named, or whose first line is another one or moved."""
        touched: dict[str, None] = {}  # in order: hosts are reserved in the order named
        for sign, lines in ((-1, removed), (1, added)):
            for line in lines:
                for host in permitopen_hosts(line.options):
                    key = fold(host)
                    touched[key] = None
                    counts = self._lines.setdefault(key, {})
                    count = counts.get(line, 0) + sign  # a line may name a host twice
                    if count > 0:
                        counts[line] = count
                    else:
                        counts.pop(line, None)
                    if not counts:
                        del self._lines[key]
        for key in touched:
            counts = self._lines.get(key)
            if counts:
                self._first[key] = min(counts, key=ManualLine.order)
            else:
                self._first.pop(key, None)
        # Every host: an edit above a host's first line moves it without touching it.
        reasons = {key: self._reason(key) for key in self._first}
        changed = {key for key in reasons.keys() | self._reasons.keys()
                   if reasons.get(key) != self._reasons.get(key)}
        self._reasons = reasons
        return changed

    def _reason(self, key: str) -> str:
        return f"host of a permitopen in {self._first[key].origin}"

    def pairs(self) -> Iterator[tuple[str, Reservation]]:
        for key in self._first:
            yield key, Reservation(self._reason(key))

    def reserved(self) -> ReservedNames:
        return ReservedNames({key: (Reservation(self._reason(key)),) for key in self._first})


def hosts_file_reservations(
        entries: Iterable[tuple[str, tuple[str, ...]]]) -> Iterator[tuple[str, Reservation]]:
    """`(address, names)` lines of the hosts file outside the managed block: a name there
    already resolves (first, and with `multi on` as well) to those addresses."""
    addresses: dict[str, set[str]] = {}
    for address, names in entries:
        for name in names:
            addresses.setdefault(fold(name), set()).add(address)
    for name, where in addresses.items():
        yield name, Reservation(
            f"in the hosts file outside the managed block (-> {', '.join(sorted(where))})",
            hard=True, addresses=frozenset(where))


def proxy_reservations(names: Iterable[str]) -> Iterator[tuple[str, Reservation]]:
    """The proxy's own names known locally (hostname, FQDN)."""
    for name in names:
        if name:
            yield name, Reservation("name of the proxy itself", hard=True)


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


# Pure, and asked again for the same names while contested names are re-decided. Small:
# at 100k targets there are ~300k names, which no cache holds (65,536 entries were ~10 MB
# for a hit rate of a half under churn, ~10 us of ~700 per event).
@functools.lru_cache(maxsize=1 << 12)
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
    if not valid_name(alias):
        return "not a valid host name"
    lowered = fold(alias)
    if lowered in _LOOPBACK_NAMES or lowered.endswith(".localhost"):
        return "loopback name"
    if lowered in {fold(n) for n in proxy.names}:
        return "name of the proxy itself"
    if re.fullmatch(r"[0-9.]+", alias) or _inet_aton_form(alias):
        # glibc resolves these numeric forms (e.g. 0x7f000001 = 127.0.0.1) before /etc/hosts.
        return "looks like an address but is not one"
    return ""


def _candidates(target: Target) -> list[tuple[str, bool]]:
    """(alias, authoritative) in priority order: name, id and IPs are the target's own;
    hostname and network aliases are whatever its owner chose (soft)."""
    out: list[tuple[str, bool]] = [(target.name, True), (target.short_id, True)]
    out.extend((ip, True) for ip in (target.address, *target.addresses) if ip)
    out.extend((a, False) for a in target.aliases)
    if target.hostname:
        out.append((target.hostname, False))
    return out


def resolve_aliases(targets: Iterable[Target], proxy: ProxyIdentity,
                    pin_names: bool = True,
                    reserved: ReservedNames = ReservedNames()) -> AliasPlan:
    """Give each target the aliases that are unambiguously its own.

    Names compare case-insensitively (folded), as the resolver compares them. A container
    name belongs to its container only; two containers whose names differ only in case
    both lose it (ambiguous). Other authoritative aliases (short id, own IPs) belong to
    their target when exactly one target has them; a soft alias (hostname, network alias)
    only when no one else claims it at all and it names nothing else the proxy can see
    (`reserved`). Anything contested is refused for every claimant, so one target can
    never borrow a name or address that leads to another. Without `pin_names` (no hosts
    block to pin names to addresses), soft aliases are refused: sshd would resolve them
    through DNS, where they may lead somewhere else.
    """
    book = AliasBook(proxy, pin_names, reserved)
    book.update({t.id: t for t in targets})
    return book.plan()


class AliasBook:
    """resolve_aliases kept up to date one target at a time (the reconciler's fast path).

    Holds every target's claims by folded name; `update` re-decides only the targets that
    claim a name some changed target claims (or claimed): no other target's outcome can
    depend on the change. The rules are resolve_aliases' (which is this, run once)."""

    def __init__(self, proxy: ProxyIdentity, pin_names: bool = True,
                 reserved: ReservedNames = ReservedNames()) -> None:
        self.proxy = proxy
        self.pin_names = pin_names
        self.reserved = reserved
        self.targets: dict[str, Target] = {}
        self.aliases: dict[str, tuple[str, ...]] = {}  # target id -> granted aliases
        self.refused: dict[str, tuple[tuple[str, str, str], ...]] = {}  # id -> refusals (if any)
        # folded name -> ids claiming it (100k targets have ~500k names), as their own
        # (name, id, IPs) or softly (hostname, network aliases): each claim in one table
        # (a name, id and IP in both were ~20 MB more at 100k targets)
        self._auth_claims = IdMultimap()
        self._soft_claims = IdMultimap()
        self._name_owners = IdMultimap()
        # While not None: each target's granted aliases before their first change since it
        # was set (None: it had none), for the revocation world of the reconciler's flush.
        self.aliases_before: dict[str, tuple[str, ...] | None] | None = None

    def granted_owner(self, key: str) -> str | None:
        """The id of the target a folded name is granted to (None: no one). A name is
        granted to one target at most, and only to one that claims it."""
        for claims in (self._auth_claims.get(key), self._soft_claims.get(key)):
            for tid in claims:
                if key in map(fold, self.aliases.get(tid, ())):
                    return tid
        return None

    def update(self, changed: Mapping[str, Target | None]) -> set[str]:
        """Apply changed targets (None: gone); returns the ids whose outcome was re-decided."""
        touched: set[str] = set()
        redo: set[str] = set()
        same: set[str] = set()
        for tid, target in changed.items():
            old = self.targets.get(tid)
            if old is not None and target is not None and _claim_view(old) == _claim_view(target):
                # e.g. restarted: its claims, and so its outcome, are what they were
                self.targets[tid] = target
                same.add(tid)
                continue
            self.targets.pop(tid, None)
            if old is not None:
                touched |= self._claim(old, add=False)
                self._note_aliases(tid)
                self.aliases.pop(tid, None)
                self.refused.pop(tid, None)
            if target is not None:
                self.targets[tid] = target
                touched |= self._claim(target, add=True)
        redo |= {tid for tid in changed if tid in self.targets and tid not in same}
        for key in touched:
            others = {*self._claimants(key), *self._name_owners.get(key)}
            if others <= redo or alias_problem(key, self.proxy):
                continue  # all re-decided anyway, or refused to every claimant (case-blind)
            redo |= others
        for tid in redo:
            self._decide(self.targets[tid])
        return redo

    def reserve(self, reserved: ReservedNames, names: Iterable[str]) -> set[str]:
        """New reservations, differing from the old only in `names` (folded): re-decides the
        targets that claim one of them; returns their ids."""
        self.reserved = reserved
        redo: set[str] = set()
        for key in names:
            redo.update(self._claimants(key), self._name_owners.get(key))
        for tid in redo:
            self._decide(self.targets[tid])
        return redo

    def plan(self) -> AliasPlan:
        order = sorted(self.targets.values(), key=lambda t: (t.name, t.id))
        return AliasPlan(aliases={t.id: self.aliases[t.id] for t in order},
                         refused=tuple(r for t in order for r in self.refused.get(t.id, ())))

    def _claim(self, t: Target, add: bool) -> set[str]:
        keys = {fold(t.name)}
        self._mark(self._name_owners, fold(t.name), t.id, add)
        for alias, auth in _candidates(t):
            key = fold(alias)
            keys.add(key)
            self._mark(self._auth_claims if auth else self._soft_claims, key, t.id, add)
        return keys

    def _claimants(self, key: str) -> set[str]:
        """Ids claiming a folded name, either way."""
        return {*self._auth_claims.get(key), *self._soft_claims.get(key)}

    @staticmethod
    def _mark(table: IdMultimap, key: str, tid: str, add: bool) -> None:
        if add:
            table.add(key, tid)
        else:
            table.discard(key, tid)

    def _listed(self, ids: Iterable[str]) -> str:
        return ", ".join(sorted(self.targets[i].name for i in ids))

    def _contest(self, alias: str, t: Target, auth: bool) -> str:
        if not auth and _ip(alias) is not None:
            # A hostname or network alias spelled as an address would open that address,
            # which may be any host: only the target's own IPs (from the engine) count.
            return "an address that is not the target's own"
        key = fold(alias)
        owners = set(self._name_owners.get(key))
        if t.id in owners and len(owners) > 1:
            return f"ambiguous: target {self._listed(owners - {t.id})} has the same name but for case"
        if owners:
            return "" if t.id in owners else f"belongs to target {self._listed(owners)}"
        others = self._claimants(key) - {t.id}
        auth_owners = set(self._auth_claims.get(key))
        if len(auth_owners) == 1 and t.id not in auth_owners:
            return f"belongs to target {self._listed(auth_owners)}"
        if len(auth_owners) > 1 or (not auth_owners and others):
            return f"also claimed by {self._listed(others)}"
        if not auth and not self.pin_names:
            return "hosts file not writable: only names that resolve by themselves"
        if not auth and not t.address:
            return "no address to pin the name to"
        return ""

    def _decide(self, t: Target) -> None:
        granted: list[str] = []
        refused: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        for alias, auth in _candidates(t):
            if fold(alias) in seen:
                continue  # the same name again (maybe in another case): granted once
            problem = (_bad_target_name(t) or alias_problem(alias, self.proxy)
                       or self.reserved.conflict(alias, t, auth) or self._contest(alias, t, auth))
            if problem:
                refused.append((t.name, alias, problem))
            else:
                granted.append(alias)
                seen.add(fold(alias))
        self._note_aliases(t.id)
        self.aliases[t.id] = tuple(granted)
        if refused:
            self.refused[t.id] = tuple(refused)
        else:  # most targets have none: no entry (a 100k-entry table is ~4 MB)
            self.refused.pop(t.id, None)


    def _note_aliases(self, tid: str) -> None:
        before = self.aliases_before
        if before is not None and tid not in before:
            before[tid] = self.aliases.get(tid)


class GrantedNames(Mapping[str, str]):
    """Folded name -> the id of the target it is granted to, read from an AliasBook's claims
    (what the hosts block pins and permitopen allows), not kept as a table of its own: at
    100k targets one was ~300k names, 7 MB."""

    def __init__(self, book: AliasBook) -> None:
        self.book = book

    def __getitem__(self, key: str) -> str:
        tid = self.book.granted_owner(key)
        if tid is None:
            raise KeyError(key)
        return tid

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        tid = self.book.granted_owner(key)
        return default if tid is None else tid

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.book.granted_owner(key) is not None

    def __iter__(self) -> Iterator[str]:
        for aliases in list(self.book.aliases.values()):
            yield from map(fold, aliases)  # a target's aliases differ folded (_decide)

    def __len__(self) -> int:
        return sum(map(len, self.book.aliases.values()))


def _claim_view(t: Target) -> tuple:
    """Everything about a target that its aliases' outcome depends on."""
    return (t.name, t.id, t.address, t.addresses, t.aliases, t.hostname)


def _bad_target_name(target: Target) -> str:
    # The name is written into key-line comments, logs and the access log: a name with
    # whitespace or control characters gets the target nothing at all.
    return "" if valid_name(target.name) else "the target's own name is not a valid host name"
