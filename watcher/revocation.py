"""Which keys lost a grant between two renders, and why. Pure.

sshd fixes a key's grants (its `permitopen` options) when the key logs in: a connection
held open keeps them after the index no longer has them. So after every write of the
index the reconciler asks `revocations` which fingerprints lost something; the sessions
of those keys are then closed (see app.AccessLog.revoke). A key whose grants only grew,
or that keeps the same grants from another source, keeps its sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from .model import Owner, Target, owner_names
from .render import ANY_DEST, GrantElement
from .targets import fold

GrantSets = Mapping[str, frozenset[GrantElement]]

RACE_WINDOW = 60.0
"""Seconds a revocation is remembered for logins that read the index before it was
written: sshd's LoginGraceTime (30 s) bounds a login, twice that to be safe."""
LOG_LAG = 0.0
"""Seconds by which a connection seen after a revoking write is still taken to have begun
before it. None are needed: a connection's start is the kernel's stamp on sshd's
`Connection from` datagram (when sshd logged it, not when the watcher read it), and sshd
logs that line before it runs the AuthorizedKeysCommand, so a connection stamped after the
write can only have read the new index."""

# Reasons, most specific first: what became of the target a lost destination belonged to.
TARGET_REMOVED = "target-removed"  # stopped, died or removed
TARGET_RENAMED = "target-renamed"
TARGET_READDRESSED = "target-readdressed"
TARGET_RESTARTED = "target-restarted"  # its key is fetched again; not granted meanwhile
TARGET_NOT_PERMITTED = "target-not-permitted"
TARGET_DISCONNECTED = "target-disconnected"  # shares no network with the proxy any more
MANUAL_LINE_REMOVED = "manual-line-removed"  # removed or edited in authorized_keys.d
GRANT_WITHDRAWN = "grant-withdrawn"  # a granted name withdrawn, the key not published, ...


def lost_grants(old: GrantSets, new: GrantSets,
                fingerprints: Iterable[str] | None = None) -> dict[str, frozenset[GrantElement]]:
    """Fingerprint -> the grant elements it had in `old` and has not in `new`.

    The rule: a key loses a grant when the set of (conditions, permitopen destination)
    pairs sshd would now give its fingerprint is not a superset of the set it had.
    Conditions are a line's options other than permitopen (from=, expiry-time=, ...), as
    sshd applies the first line whose conditions hold; a line without permitopen (sshd_config's
    PermitOpen governs) counts as its own element (ANY_DEST), never as a superset of named
    destinations. A key whose grants only grew, or stayed the same whichever source now
    grants them, has lost nothing; a key no longer in the index lost all it had.
    `fingerprints`: the only ones that may differ between `old` and `new` (None: any), so
    that a render that changed one key is not compared key by key over the whole index.
    """
    lost: dict[str, frozenset[GrantElement]] = {}
    candidates = old.keys() if fingerprints is None else fingerprints
    for fp in candidates:
        gone = old.get(fp, frozenset()) - new.get(fp, frozenset())
        if gone:
            lost[fp] = frozenset(gone)
    return lost


@dataclass(frozen=True)
class World:
    """What a render was made from, as far as explaining a revocation needs."""

    targets: Mapping[str, Target] = field(default_factory=dict)  # id -> every target, as rendered
    hosts: Mapping[str, str] = field(default_factory=dict)  # granted alias (folded) -> target id
    excluded: Mapping[str, str] = field(default_factory=dict)  # target id -> reason (not served)
    manual: Mapping[str, frozenset[tuple[str, ...]]] = field(default_factory=dict)  # fp -> options
    owners: Mapping[str, tuple[Owner, ...]] = field(default_factory=dict)  # fp -> owners (access log)


MISSING: Any = object()
"""In a Before map: the key was absent."""


class Before(Mapping):
    """A map as it was before in-place changes: `old` holds the earlier value of every key
    changed since (MISSING: it was absent); other keys are read from `live`. The
    reconciler keeps its maps of 100k targets up to date in place; the last render's world
    is this view, not a copy."""

    def __init__(self, old: Mapping[Any, Any], live: Mapping[Any, Any]) -> None:
        self.old = old
        self.live = live

    def __getitem__(self, key: Any) -> Any:
        if key in self.old:
            value = self.old[key]
            if value is MISSING:
                raise KeyError(key)
            return value
        return self.live[key]

    def get(self, key: Any, default: Any = None) -> Any:
        # Mapping.get goes through __getitem__ and a KeyError per miss: this runs for every
        # destination of every key a flush revokes.
        if key in self.old:
            value = self.old[key]
            return default if value is MISSING else value
        return self.live.get(key, default)

    def __contains__(self, key: object) -> bool:
        if key in self.old:
            return self.old[key] is not MISSING
        return key in self.live

    def __iter__(self) -> Iterator[Any]:
        for key in self.live:
            if key not in self.old:
                yield key
        for key, value in self.old.items():
            if value is not MISSING:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)


def remember(old: dict[Any, Any], live: Mapping[Any, Any], key: Any) -> None:
    """Note `key`'s value in `live` before its first change since `old` was started."""
    if key not in old:
        old[key] = live.get(key, MISSING)


@dataclass(frozen=True)
class Revocation:
    """One key that lost grants; its sessions are to be closed."""

    fingerprint: str
    reason: str  # the reasons above, comma-separated when several apply
    targets: tuple[str, ...]  # names (as they were) of what the key lost, for the access log
    at: float = 0.0  # epoch seconds the index without the grant was written


def revocations(before: World, after: World, old: GrantSets, new: GrantSets,
                at: float = 0.0, fingerprints: Iterable[str] | None = None) -> list[Revocation]:
    """A Revocation per fingerprint that lost grants (lost_grants), sorted by fingerprint."""
    result = []
    for fp, gone in sorted(lost_grants(old, new, fingerprints).items()):
        reasons: set[str] = set()
        names: set[str] = set()
        for element in gone:
            reason, name = _explain(fp, element, before, after)
            reasons.add(reason)
            if name:
                names.add(name)
        targets = tuple(sorted(names)) or owner_names(before.owners.get(fp, ()))
        result.append(Revocation(fp, ",".join(sorted(reasons)), targets, at))
    return result


def _explain(fp: str, element: GrantElement, before: World, after: World) -> tuple[str, str]:
    """(reason, name of the target the destination belonged to or "") for one lost element."""
    _, dest = element
    tid = before.hosts.get(fold(dest.rsplit(":", 1)[0])) if dest != ANY_DEST else None
    was = before.targets.get(tid) if tid is not None else None
    name = was.name if was is not None else ""
    if was is not None:
        now = after.targets.get(was.id)
        if now is None:
            return after.excluded.get(was.id, TARGET_REMOVED), name
        if now.name != was.name:
            return TARGET_RENAMED, name
        if now.address != was.address:
            return TARGET_READDRESSED, name
        if now.started_at != was.started_at:
            return TARGET_RESTARTED, name
    if before.manual.get(fp, frozenset()) - after.manual.get(fp, frozenset()):
        return MANUAL_LINE_REMOVED, name
    return GRANT_WITHDRAWN, name


class RecentRevocations:
    """Revocations of the last RACE_WINDOW seconds, by fingerprint (the latest wins).

    A login may read the index just before a write that revokes its key and log `Accepted`
    just after: `for_login` finds the revocation such a login must be closed for.
    """

    def __init__(self, window: float = RACE_WINDOW, lag: float = LOG_LAG) -> None:
        self.window = window
        self.lag = lag
        self._by_fp: dict[str, tuple[Revocation, float]] = {}  # fp -> (revocation, noted at)

    def __bool__(self) -> bool:
        return bool(self._by_fp)

    def note(self, revocation: Revocation, now: float) -> None:
        self._by_fp[revocation.fingerprint] = (revocation, now)

    def for_login(self, fingerprint: str, connected_at: float, now: float) -> Revocation | None:
        """The revocation of `fingerprint` written after a connection began at `connected_at`
        (when sshd logged its `Connection from`: so its login may have read the old grants),
        or None."""
        self.prune(now)
        entry = self._by_fp.get(fingerprint)
        if entry is None or connected_at > entry[0].at + self.lag:
            return None
        return entry[0]

    def prune(self, now: float) -> None:
        for fp in [fp for fp, (_, noted) in self._by_fp.items() if now - noted > self.window]:
            del self._by_fp[fp]
