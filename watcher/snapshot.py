"""The status snapshot as a typed value, and its JSON form (schema 1). Pure: no I/O.

The supervisor writes it to STATUS_PATH every 2 s; `watcher status`, `watcher health` and
anything else that shows the proxy's state read it back with `from_json`. The JSON form is
documented by JSON_SCHEMA; fields are only ever added within one schema number, and a
change that breaks a reader bumps `schema` (readers refuse a number they do not know).

Compatibility: the field names of the unversioned document the e2e helpers and operators
already read (`targets[].key_status`, `fingerprints`, `refused_aliases` as
[target, alias, reason] triples, ...) are kept.
"""

from __future__ import annotations

import json
import time
from array import array
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import accumulate, compress, count, repeat
from operator import add, attrgetter, is_not, ne, sub
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Protocol, Sequence

from .errors import WatcherError

SCHEMA_VERSION = 1
STATUS_PATH = Path("/run/ssh-proxy/status.json")
STALE_AFTER = 30.0  # seconds without a heartbeat: the supervisor is stuck or gone
MANUAL_KEYS_LISTED = 50  # admin lines listed one by one; `manual.keys` counts them all


class SnapshotError(WatcherError):
    """status.json cannot be read as a schema-1 document."""


class KeyStatus(StrEnum):
    PENDING = "pending"  # not fetched yet
    FETCHING = "fetching"  # first fetch under way
    OK = "ok"  # keys served
    FAILED = "failed"  # no key; `error` says why, retried with backoff


class KeyFacts(Protocol):
    """What a status row says of a key: a KeyInfo (read from status.json), or the served
    PublicKey itself (the reconciler's rows share the key state's tuple: at 100k targets a
    KeyInfo and a tuple per target were ~10 MB)."""

    @property
    def key_type(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def bits(self) -> int: ...


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_type: str  # "ssh-ed25519", ...
    fingerprint: str  # "SHA256:..."
    bits: int = 0


@dataclass(frozen=True, slots=True)
class TargetStatus:
    id: str  # 12 characters
    name: str
    address: str = ""
    aliases: tuple[str, ...] = ()  # names granted (after conflict resolution)
    key_status: KeyStatus = KeyStatus.PENDING
    via: str = ""  # "http" (the key API) or "exec"
    keys: tuple[KeyFacts, ...] = ()
    error: str = ""
    rejected: tuple[str, ...] = ()  # reasons for key lines refused
    since: float = 0.0  # epoch seconds of the last change of key_status

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(k.fingerprint for k in self.keys)


@dataclass(frozen=True)
class IgnoredTarget:
    id: str
    name: str
    reason: str


class RefusedName(NamedTuple):
    """A name a target asked for and did not get (a tuple: JSON [target, alias, reason])."""

    target: str
    alias: str
    reason: str


@dataclass(frozen=True)
class ManualKey:
    origin: str  # "file:line"
    key_type: str
    fingerprint: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceStatus:
    """The platform connection; kind "" in manual mode (nothing to connect to)."""

    kind: str = ""
    connected: bool = False
    error: str = ""  # the last error while not connected
    reconnects: int = 0  # attempts after a lost stream
    since: float | None = None  # epoch seconds connected at
    namespace: str = ""
    state: str = ""  # "connected" | "reconnecting" | "" (not reported)
    attempt: int = 0  # reconnect attempts in the current outage
    outage_seconds: float = 0.0  # how long the current outage has lasted
    gives_up_after: float = 0.0  # seconds of outage after which the proxy exits; 0 never


@dataclass(frozen=True)
class ManualStatus:
    files: int = 0
    keys: int = 0
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class WatcherState:
    """What the reconciler knows, published after every render."""

    targets: tuple[TargetStatus, ...] = ()
    ignored: tuple[IgnoredTarget, ...] = ()
    refused_aliases: tuple[RefusedName, ...] = ()
    manual_keys: tuple[ManualKey, ...] = ()  # the first MANUAL_KEYS_LISTED admin lines
    keys_served: int = 0  # lines in the index
    writes: int = 0
    last_write: float = 0.0  # epoch seconds of the last write that changed a file; 0 never
    last_event: float = 0.0  # epoch seconds the source last reported a change; 0 never
    source: SourceStatus = field(default_factory=SourceStatus)
    manual: ManualStatus = field(default_factory=ManualStatus)


@dataclass(frozen=True)
class SettingsView:
    permit_hosts: tuple[str, ...] = ()
    permit_ports: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()

    @property
    def port_rule(self) -> str:
        return "any port" if "*" in self.permit_ports else ",".join(self.permit_ports)


@dataclass(frozen=True)
class WriteErrors:
    """Why the rendered key files or access.log could not be written lately ("" = fine)."""

    rendered: str = ""
    access_log: str = ""


@dataclass(frozen=True)
class StatusDocument:
    """status.json: the supervisor's facts around the reconciler's state."""

    heartbeat: float  # epoch seconds of this write
    mode: str  # "docker" | "kubernetes" | "manual"
    sshd_pid: int | None = None
    sshd_restarts: int = 0
    settings: SettingsView = field(default_factory=SettingsView)
    state: WatcherState = field(default_factory=WatcherState)
    write_errors: WriteErrors = field(default_factory=WriteErrors)
    schema: int = SCHEMA_VERSION


# --- JSON -------------------------------------------------------------------------------


def to_json(doc: StatusDocument) -> str:
    """The schema-1 JSON text (state fields at the top level, beside the supervisor's): the
    document indented, keys sorted, each target's row on one line of its own."""
    head, tail = status_frame(doc)
    plan = plan_array((), (0,), doc.state.targets)
    return b"".join([head, *plan.parts, tail]).decode()  # a plan from nothing has no copies


_TARGETS_SLOT = "ssh-proxy: the targets array goes here"
_OPEN, _SEPARATOR, _CLOSE = b"[\n  ", b",\n  ", b"\n ]"  # both separators are 4 bytes
# After a load every row is new (~1 s at 100k): this many rows (~0.6 ms), then the GIL is
# handed over. Without it a thread that waits for the GIL (the reconciler, back from each
# write of a flush) waits the whole switch interval (5 ms) each time.
_ROWS_PER_TURN = 64
# Same count, and fewer than 1 in this many rows are other objects: rows are compared in
# place (one C pass, ~3 ms at 100k) instead of looked up by identity (~50 ms, held GIL).
_IN_PLACE_SHARE = 8
_encode_row = json.JSONEncoder().encode  # the C encoder (no indent); _target_json sorts keys


def status_frame(doc: StatusDocument) -> tuple[bytes, bytes]:
    """The document's text before the targets array (up to and with `"targets": `) and
    after it."""
    text = json.dumps(_document(doc, _TARGETS_SLOT), indent=1, sort_keys=True) + "\n"
    # The key and its value as JSON writes them: inside any string value, quotes are
    # escaped, so this sequence is only ever the slot itself. ASCII (ensure_ascii).
    head, _, tail = text.partition(f'"targets": "{_TARGETS_SLOT}"')
    return (head + '"targets": ').encode(), tail.encode()


def _row(t: TargetStatus) -> bytes:
    return _encode_row(_target_json(t)).encode()


class ArrayPlan(NamedTuple):
    """The targets array as text to write (bytes) and ranges to copy from the last array
    ((start, end) byte offsets in it), in order, made as they are taken (after a load at
    100k the new rows are ~45 MB: written as they come, never all held); and each row's
    size with its separator, complete once `parts` is exhausted."""
    parts: Iterator[bytes | tuple[int, int]]
    sizes: Offsets


Offsets = array  # of "q": a machine integer per row, where a list held an int object (~36 bytes)
"""Byte counts and offsets per row of the targets array: at 100k rows a list of them was
~3.5 MB kept and ~7 MB more made by every write of the heartbeat."""


def offsets(values: Iterable[int]) -> Offsets:
    return array("q", values)


def array_ends(sizes: Iterable[int]) -> Offsets:
    """Where each row's separator starts in the array, then where its closing "\\n ]" does."""
    return offsets(accumulate(sizes, initial=0))


def plan_array(last: tuple[TargetStatus, ...], last_ends: Sequence[int],
               targets: tuple[TargetStatus, ...]) -> ArrayPlan:
    """The targets array ("[\\n  " row ",\\n  " row ... "\\n ]", or "[]"), given the last
    array (of the rows `last`, array_ends `last_ends`): only rows that are new objects are
    encoded (the reconciler keeps a target's row object while it is unchanged); runs of rows
    that stand in the same order as in the last array become one copy each. The bookkeeping
    per row runs in C (map, zip, compress, accumulate): a Python loop over 100k rows per
    snapshot held the GIL for ~0.45 s."""
    if not targets:
        return ArrayPlan(iter([b"[]"]), offsets(()))
    last_sizes = offsets(map(sub, last_ends[1:], last_ends))
    if len(last) == len(targets):  # restarts and key changes: most rows stay in place
        moved = list(compress(count(), map(is_not, last, targets)))
        if len(moved) * _IN_PLACE_SHARE < len(targets):
            at = offsets(range(len(targets)))
            for i in moved:
                at[i] = -2  # made again, even if it only moved
            starts = sorted({*moved, *map((1).__add__, moved)} - {0, len(targets)})
            return ArrayPlan(_array_parts(targets, at, starts, last_ends, last_sizes), last_sizes)
    # The last array's place of each row, by identity: the caller still holds the last
    # tuple, so an id found there is that very object. A new row is -2: it starts a run.
    where = dict(zip(map(id, last), count()))
    at = offsets(map(where.get, map(id, targets), repeat(-2)))
    last_sizes.extend((0, 0))  # at -2: a new row, sized below
    sizes = offsets(map(last_sizes.__getitem__, at))
    starts = list(compress(count(1), map(ne, at[1:], map(add, at[:-1], repeat(1)))))
    return ArrayPlan(_array_parts(targets, at, starts, last_ends, sizes), sizes)


def _array_parts(targets: tuple[TargetStatus, ...], at: Sequence[int], starts: list[int],
                 last_ends: Sequence[int], sizes: Offsets) -> Iterator[bytes | tuple[int, int]]:
    made = 0
    for first, stop in zip([0, *starts], [*starts, len(at)]):
        yield _SEPARATOR if first else _OPEN
        if at[first] == -2:
            row = _row(targets[first])
            sizes[first] = len(row) + 4
            yield row
            made += 1
            if not made % _ROWS_PER_TURN:
                time.sleep(0)  # hands the GIL to a thread that waits for it
        else:  # last rows at[first] .. at[first] + (stop - first) - 1, with their separators
            yield last_ends[at[first]] + 4, last_ends[at[first] + stop - first]
    yield _CLOSE


def _document(doc: StatusDocument, targets: object) -> dict[str, Any]:
    s = doc.state
    data = {
        "schema": doc.schema, "heartbeat": doc.heartbeat, "mode": doc.mode,
        "sshd_pid": doc.sshd_pid, "sshd_restarts": doc.sshd_restarts,
        "settings": {"permit_hosts": list(doc.settings.permit_hosts),
                     "permit_ports": list(doc.settings.permit_ports),
                     "labels": list(doc.settings.labels)},
        "source": {"kind": s.source.kind, "connected": s.source.connected,
                   "error": s.source.error, "reconnects": s.source.reconnects,
                   "since": s.source.since, "namespace": s.source.namespace,
                   "state": s.source.state, "attempt": s.source.attempt,
                   "outage_seconds": s.source.outage_seconds,
                   "gives_up_after": s.source.gives_up_after},
        "write_errors": {"rendered": doc.write_errors.rendered,
                         "access_log": doc.write_errors.access_log},
        "manual": {"files": s.manual.files, "keys": s.manual.keys,
                   "errors": list(s.manual.errors)},
        "targets": targets,
        "ignored": [{"id": i.id, "name": i.name, "reason": i.reason} for i in s.ignored],
        "refused_aliases": [list(r) for r in s.refused_aliases],
        "manual_keys": [{"origin": m.origin, "key_type": m.key_type,
                         "fingerprint": m.fingerprint, "options": list(m.options)}
                        for m in s.manual_keys],
        "keys_served": s.keys_served, "writes": s.writes, "last_write": s.last_write,
        "last_event": s.last_event,
    }
    return data


def _target_json(t: TargetStatus) -> dict[str, Any]:
    """Keys in sorted order, as the rest of the document (the row is encoded on its own, by
    the C encoder, ~4x faster than json's indenting one). Tuples are written as arrays."""
    keys = t.keys
    return {"address": t.address, "aliases": t.aliases, "error": t.error,
            "fingerprints": tuple(map(_FINGERPRINT, keys)),  # kept for readers of the first format
            "id": t.id, "key_status": t.key_status.value, "keys": tuple(map(_key_json, keys)),
            "name": t.name, "rejected": t.rejected, "since": t.since, "via": t.via}


def _key_json(k: KeyFacts) -> dict[str, Any]:
    return {"bits": k.bits, "fingerprint": k.fingerprint, "key_type": k.key_type}


_FINGERPRINT = attrgetter("fingerprint")


def from_json(text: str, targets: bool = True) -> StatusDocument:
    """Parse and check a schema-1 document; SnapshotError says what is wrong.
    targets=False: the document without its target rows (`targets` is empty), neither
    built nor checked: what `watcher health` reads, fast at 100k targets."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SnapshotError(f"status is not JSON: {exc}") from None
    r = _Reader(data, "status")
    schema = r.integer("schema")
    if schema != SCHEMA_VERSION:
        raise SnapshotError(f"status schema {schema} is not supported (this watcher reads "
                            f"{SCHEMA_VERSION}): run the same version of `watcher` as the proxy")
    settings, source, manual = r.obj("settings"), r.obj("source"), r.obj("manual")
    write_errors = r.obj("write_errors")
    return StatusDocument(
        schema=schema, heartbeat=r.number("heartbeat"), mode=r.text("mode"),
        sshd_pid=r.opt_integer("sshd_pid"), sshd_restarts=r.integer("sshd_restarts"),
        settings=SettingsView(settings.strs("permit_hosts"), settings.strs("permit_ports"),
                              settings.strs("labels")),
        state=WatcherState(
            targets=tuple(_target(t) for t in r.objs("targets")) if targets else (),
            ignored=tuple(IgnoredTarget(i.text("id"), i.text("name"), i.text("reason"))
                          for i in r.objs("ignored")),
            refused_aliases=tuple(_refused(x, r.where) for x in r.array("refused_aliases")),
            manual_keys=tuple(ManualKey(m.text("origin"), m.text("key_type"), m.text("fingerprint"),
                                        m.strs("options")) for m in r.objs("manual_keys")),
            keys_served=r.integer("keys_served"), writes=r.integer("writes"),
            last_write=r.number("last_write"), last_event=r.number("last_event"),
            source=SourceStatus(source.text("kind"), source.flag("connected"), source.text("error"),
                                source.integer("reconnects"), source.opt_number("since"),
                                source.text("namespace"), source.text("state"),
                                source.integer("attempt"), source.number("outage_seconds"),
                                source.number("gives_up_after")),
            manual=ManualStatus(manual.integer("files"), manual.integer("keys"), manual.strs("errors"))),
        write_errors=WriteErrors(write_errors.text("rendered"), write_errors.text("access_log")))


def _target(t: _Reader) -> TargetStatus:
    status = t.text("key_status")
    try:
        key_status = KeyStatus(status)
    except ValueError:
        raise SnapshotError(f"{t.where}.key_status: unknown state {status!r}") from None
    return TargetStatus(
        id=t.text("id"), name=t.text("name"), address=t.text("address"), aliases=t.strs("aliases"),
        key_status=key_status, via=t.text("via"),
        keys=tuple(KeyInfo(k.text("key_type"), k.text("fingerprint"), k.integer("bits"))
                   for k in t.objs("keys")),
        error=t.text("error"), rejected=t.strs("rejected"), since=t.number("since"))


def _refused(value: Any, where: str) -> RefusedName:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
        raise SnapshotError(f"{where}.refused_aliases: expected [target, alias, reason], got {value!r}")
    return RefusedName(*value)


class _Reader:
    """Typed access to one JSON object: a missing or mistyped field is a SnapshotError."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise SnapshotError(f"{where}: expected an object, got {type(data).__name__}")
        self.data = data
        self.where = where

    def _get(self, key: str, *types: type) -> Any:
        if key not in self.data:
            raise SnapshotError(f"{self.where}.{key} is missing")
        value = self.data[key]
        # bool is an int in Python: never accept one for the other.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise SnapshotError(f"{self.where}.{key}: expected "
                                f"{'/'.join(t.__name__ for t in types)}, got {value!r}")
        return value

    def text(self, key: str) -> str:
        return self._get(key, str)

    def flag(self, key: str) -> bool:
        return self._get(key, bool)

    def integer(self, key: str) -> int:
        return self._get(key, int)

    def number(self, key: str) -> float:
        return float(self._get(key, int, float))

    def opt_integer(self, key: str) -> int | None:
        return self._get(key, int, type(None))

    def opt_number(self, key: str) -> float | None:
        value = self._get(key, int, float, type(None))
        return None if value is None else float(value)

    def array(self, key: str) -> list[Any]:
        return self._get(key, list)

    def strs(self, key: str) -> tuple[str, ...]:
        values = self.array(key)
        if not all(isinstance(v, str) for v in values):
            raise SnapshotError(f"{self.where}.{key}: expected a list of strings")
        return tuple(values)

    def obj(self, key: str) -> _Reader:
        return _Reader(self._get(key, dict), f"{self.where}.{key}")

    def objs(self, key: str) -> list[_Reader]:
        return [_Reader(v, f"{self.where}.{key}[{i}]") for i, v in enumerate(self.array(key))]


# --- the JSON Schema of the document (draft 2020-12), for consumers and the tests ----------

_STR = {"type": "string"}
_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STRS = {"type": "array", "items": _STR}


def _object(**props: Any) -> dict[str, Any]:
    return {"type": "object", "required": sorted(props), "properties": props}


JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ssh-proxy status.json, schema 1",
    **_object(
        schema={"const": SCHEMA_VERSION}, heartbeat=_NUM,
        mode={"enum": ["docker", "kubernetes", "manual"]},
        sshd_pid={"type": ["integer", "null"]}, sshd_restarts=_INT,
        settings=_object(permit_hosts=_STRS, permit_ports=_STRS, labels=_STRS),
        source=_object(kind={"enum": ["", "docker", "kubernetes"]}, connected={"type": "boolean"},
                       error=_STR, reconnects=_INT, since={"type": ["number", "null"]},
                       namespace=_STR, state={"enum": ["", "connected", "reconnecting"]},
                       attempt=_INT, outage_seconds=_NUM, gives_up_after=_NUM),
        write_errors=_object(rendered=_STR, access_log=_STR),
        manual=_object(files=_INT, keys=_INT, errors=_STRS),
        targets={"type": "array", "items": _object(
            id=_STR, name=_STR, address=_STR, aliases=_STRS,
            key_status={"enum": [s.value for s in KeyStatus]}, via=_STR,
            keys={"type": "array", "items": _object(key_type=_STR, fingerprint=_STR, bits=_INT)},
            fingerprints=_STRS, error=_STR, rejected=_STRS, since=_NUM)},
        ignored={"type": "array", "items": _object(id=_STR, name=_STR, reason=_STR)},
        refused_aliases={"type": "array",
                         "items": {"type": "array", "items": _STR, "minItems": 3, "maxItems": 3}},
        manual_keys={"type": "array", "items": _object(origin=_STR, key_type=_STR,
                                                       fingerprint=_STR, options=_STRS)},
        keys_served=_INT, writes=_INT, last_write=_NUM, last_event=_NUM),
}


# --- questions every reader asks ----------------------------------------------------------


def health_problems(doc: StatusDocument, now: float, listening: bool,
                    require_source: bool = True, port: int = 22) -> list[str]:
    """Why the proxy is not healthy ([] = healthy). Pure: the caller gathers the inputs.

    `require_source`: a discovering mode's stream must be connected (readiness). Without it
    (liveness) only the watcher and sshd count: during a platform outage sshd keeps serving
    the last good keys, and restarting the proxy would not bring the platform back."""
    problems = []
    if now - doc.heartbeat > STALE_AFTER:
        problems.append("watcher heartbeat is stale")
    if not doc.sshd_pid:
        problems.append("sshd is not running")
    if not listening:
        problems.append(f"sshd does not listen on port {port}")
    source = doc.state.source
    if require_source and doc.mode in ("docker", "kubernetes") and not source.connected:
        state = (f"reconnecting (attempt {source.attempt})" if source.state == "reconnecting"
                 else "not connected")
        problems.append(f"{doc.mode} source is {state}: {source.error or 'connecting'}")
    return problems
