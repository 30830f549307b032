"""Desired state and the single writer loop.

Sources and key fetches only post messages; one thread applies them to the state and,
debounced (quiet for `min_wait`, or at the latest `max_wait` after the first change, less
while flushes are cheap: `_batch_bound`),
renders and writes what changed. Level-triggered: a lost or duplicated event cannot leave a
stale key, and a resync is just "replace the state". The render is incremental (only the
targets and keys changed since the last flush are re-decided and re-rendered) and equal,
byte for byte, to a render of the whole state (`full_render`; tests/unit/test_incremental.py).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import operator
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping

import tenacity

from . import backoff
from .config import Settings
from .allocator import HeapTrimmer
from .heap import StateFreezer
from .model import KeyState, ManualLine, Owner, Target, owner_names
from .render import (IncrementalRender, Rendered, ServedTarget, Shard, changed_parts,
                     changed_span, grants_of_parts, render)
from .revocation import MISSING, Before, Revocation, World, remember, revocations
from .revocation import TARGET_DISCONNECTED, TARGET_NOT_PERMITTED
from .snapshot import (MANUAL_KEYS_LISTED, IgnoredTarget, KeyStatus, ManualKey,
                       ManualStatus, RefusedName, SourceStatus, TargetStatus, WatcherState)
from .pacing import Pacer, many
from .targets import (AliasBook, GrantedNames, ManualReservations, ProxyIdentity, ReservedNames,
                      container_reservations, fold, hosts_file_reservations, is_permitted,
                      permitopen_reservations, proxy_reservations, resolve_aliases)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TargetEntry:
    target: Target
    keys: KeyState = field(default_factory=KeyState)
    generation: int = 0
    fetching: bool = False
    failures: int = 0
    retry_at: float | None = None
    since: float = field(default_factory=time.time)  # when the key state last changed
    row: TargetStatus | None = None  # its row in the last status snapshot


Snapshot = WatcherState  # what the reconciler publishes (watcher/snapshot.py)


# Messages (posted by any thread, applied by the loop thread only).
@dataclass(frozen=True)
class _Upsert:
    target: Target


@dataclass(frozen=True)
class _Remove:
    target_id: str


@dataclass(frozen=True)
class _Ready:
    target_id: str


@dataclass(frozen=True)
class _ReplaceAll:
    targets: tuple[Target, ...]


@dataclass(frozen=True)
class _Fetched:
    target_id: str
    generation: int
    keys: KeyState


@dataclass(frozen=True)
class _Manual:
    lines: tuple[ManualLine, ...]


@dataclass(frozen=True)
class _Status:
    part: str  # "source" (discovery) or "manual" (key files)
    status: dict


@dataclass(frozen=True)
class _Identity:
    proxy: ProxyIdentity


HostsEntries = tuple[tuple[str, tuple[str, ...]], ...]  # (address, names) per hosts line


_RETRY_WAIT = tenacity.wait_exponential(multiplier=5, min=5, max=300)


def retry_delay(failures: int) -> float:
    """Seconds before fetching a failed target's key again: 5, 10, 20 ... 300 (tenacity)."""
    return backoff.delay(_RETRY_WAIT, failures)


class Reconciler:
    def __init__(self, settings: Settings, proxy: ProxyIdentity,
                 fetch: Callable[[Target], KeyState],
                 write: Callable[[Rendered], bool],
                 publish: Callable[[Snapshot], None] = lambda s: None,
                 revoke: Callable[[list[Revocation]], None] = lambda r: None,
                 pin_names: bool = True, pool_size: int = 16,
                 min_wait: float = 0.1, max_wait: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, gather: float = 0.01,
                 unmanaged_hosts: Callable[[], HostsEntries] = lambda: (),
                 local_names: frozenset[str] = frozenset(),
                 observe: Callable[[str], None] = lambda event: None) -> None:
        self.settings = settings
        self.observe = observe  # told "applied" per source event applied (metrics)
        self.proxy = proxy
        self.fetch = fetch
        self.write = write
        self.publish = publish
        self.revoke = revoke  # keys that lost grants, after the index without them is written
        self.pin_names = pin_names
        self.min_wait = min_wait
        self.gather = gather  # seconds a stream of messages gathers per wake-up (_gather)
        self._streak = 0  # messages in a row that came within `gather` of the loop's wait
        self.max_wait = max_wait
        self._flush_cost = max_wait  # seconds the last flush took (none yet: batch fully)
        self.clock = clock
        self.unmanaged_hosts = unmanaged_hosts  # hosts-file lines outside the managed block
        self.local_names = local_names  # the proxy's own names from its resolver (FQDN)
        # permitopen hosts of the manual lines, kept up to date edit by edit (100k lines
        # take a third of a second to scan: not on every render).
        self._manual_reservations = ManualReservations()
        self._manual_reserved = ReservedNames()
        # Key fetches wait on the network, not the CPU: 16 at once, so that targets slow to
        # answer (each bounded by the fetch deadline) do not hold the others behind them
        # (B5: 10 targets answering after 2 s held fast ones 2-4 s with 8 workers).
        self.pool = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="keyfetch")
        # Fetches handed to the pool at a time: enough to keep every worker busy. The rest
        # wait in `_fetch_queue`, as ids: 100k targets at once (a cold start, a resync) made
        # 100k futures and as many results queued at once, and the small objects they left
        # behind between the state's were ~25 MB of the heap (bench/ANALYSIS.md, round 16).
        self.fetch_limit = 2 * pool_size
        self._in_flight: set[tuple[str, int]] = set()  # (id, generation) handed to the pool
        self._fetch_queue: collections.deque[str] = collections.deque()  # ids due now, in order
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # C: a tenth of Queue's cost per message
        self.entries: dict[str, TargetEntry] = {}
        self.ignored: dict[str, tuple[Target, str]] = {}
        self.manual: tuple[ManualLine, ...] = ()
        self.status: dict[str, dict] = {"source": {}, "manual": {}}
        self.writes = 0
        self.last_write = 0.0
        self.last_event = 0.0  # wall clock of the source's last change (for `watcher status`)
        self._generations = itertools.count(1)  # global: a re-added target never reuses one
        self._first_dirty: float | None = None
        self._last_dirty = 0.0
        self._shards_seen: Mapping[str, Shard] = {}  # the last render's index shards
        # The fast path: what changed since the last flush, and the state kept up to date
        # from it (aliases, rendered lines, revocation world, status rows). Anything that
        # may change every target's outcome (manual lines, reserved names, the proxy's
        # identity) sets `_full`: then everything is rebuilt, as on the first flush.
        self._full = True
        self._changed_targets: set[str] = set()  # target (name, address ...) changed or gone
        self._changed_keys: set[str] = set()  # key state changed
        self._status_dirty: set[str] = set()  # status row to redo
        self._waiting: set[str] = set()  # ids whose fetch is retried later (backoff)
        self._context: tuple = ()  # inputs of the reserved names of the last flush
        # Names (folded) an ignored target reserves that may have changed since the last
        # flush: the targets claiming them are decided again (see _ignored_changed).
        self._ignored_names: set[str] = set()
        self._book = AliasBook(proxy, pin_names)
        self._engine = IncrementalRender(settings.permit_ports, settings.mode.discovers)
        # The revocation world's targets and granted names are the alias book's (targets
        # as last rendered, GrantedNames); what changed in a flush is noted as it changes:
        self._book_before = self._book  # the last written render's book (during a full one: the old)
        self._targets_before: dict[str, object] = {}  # id -> its target before (MISSING: none)
        self._engine_manual: tuple[ManualLine, ...] = ()  # the admin lines the engine has
        self._manual_fps: set[str] = set()  # keys whose admin lines this flush edited
        # The revocation world, kept up to date in place (see _worlds).
        self._manual_options: dict[str, frozenset[tuple[str, ...]]] = {}
        self._excluded: dict[str, str] = {}
        self._owners_seen: Mapping[str, tuple[Owner, ...]] = {}  # the last render's owners
        # The status snapshot costs O(targets): paced (see pacing.Pacer), and once it is not
        # cheap taken at most every PUBLISH_EVERY seconds under a stream of flushes.
        self._publish_pacer = Pacer(clock, costly_floor=PUBLISH_EVERY)
        self._unpublished: Rendered | None = None
        self._status_full = True
        # Rows live on their entries (a table of 100k rows by id was ~4-7 MB); a removed
        # entry's row waits here until the next snapshot takes it out of the order.
        self._gone_rows: dict[str, TargetStatus] = {}
        # The ids of the rows, sorted by (name, id): a list of ids, not of (name, id, row)
        # tuples (~140 bytes per target at 100k); bisected through _row_key.
        self._row_order: list[str] = []
        self._refused_rows: dict[str, tuple[RefusedName, ...]] = {}
        self.freezer = StateFreezer()
        self.trimmer = HeapTrimmer(clock=clock)

    # ---- inputs: safe from any thread -------------------------------------------------
    def upsert(self, target: Target) -> None:
        self.inbox.put(_Upsert(target))

    def remove(self, target_id: str) -> None:
        self.inbox.put(_Remove(target_id))

    def replace_all(self, targets: Iterable[Target]) -> None:
        self.inbox.put(_ReplaceAll(tuple(targets)))

    def ready(self, target_id: str) -> None:
        """The platform says the target is ready now (Docker: its health check passed)."""
        self.inbox.put(_Ready(target_id))

    def set_manual(self, lines: Iterable[ManualLine]) -> None:
        self.inbox.put(_Manual(tuple(lines)))

    def set_source_status(self, status: dict) -> None:
        self.inbox.put(_Status("source", dict(status)))

    def set_proxy_identity(self, proxy: ProxyIdentity) -> None:
        """The proxy's own names/addresses, refreshed by the source on every (re)connect."""
        self.inbox.put(_Identity(proxy))

    def set_manual_status(self, status: dict) -> None:
        self.inbox.put(_Status("manual", dict(status)))

    def owners_of(self, fingerprint: str) -> tuple[str, ...]:
        """Names of the targets and admin lines ("file:line") a key opens, as of now."""
        # The owners of the last render written, except the keys a render under way changed:
        # those read as they were until it is written. In this order: the renderer notes a
        # key's owners before it changes them, so a change seen in the first read is noted
        # by the second. (No copy of the owners is kept: 100k keys, ~4 MB.)
        owners = self._owners_seen.get(fingerprint, ())
        before = self._engine.owners_in_flight()
        if fingerprint in before:
            owners = before[fingerprint]
        return owner_names(owners)

    def alias_owner(self, alias: str) -> str:
        """The name of the target a granted alias leads to ("" if none), as of the last
        render written (the book's tables are read whole by one lookup each: safe from any
        thread). While a full render fills a new book, the book before it answers."""
        book = self._book_before
        target = book.targets.get(book.granted_owner(fold(alias)) or "")
        return target.name if target is not None else ""

    # ---- the loop -----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                timeout = self._next_wakeup()
                waiting_since = time.monotonic()
                try:
                    message = self.inbox.get(timeout=timeout)
                except queue.Empty:
                    message = None
                    self._streak = 0
                if message is not None:
                    self._gather(time.monotonic() - waiting_since)
                    self._apply(message)
                    # Drain what is already queued before deciding to render.
                    while True:
                        try:
                            self._apply(self.inbox.get_nowait())
                        except queue.Empty:
                            break
                self._start_due_fetches()
                if self._due():
                    self.flush()
                elif self._unpublished is not None and self._publish_pacer.due():
                    self._publish()
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            # A cancelled fetch never answers: a pool made for a next run() starts empty.
            self._in_flight.clear()

    def _gather(self, waited: float) -> None:
        """Under a stream of messages, let the next ones gather before draining them.

        Each wake-up of this thread costs ~25 us of CPU, and so does each pool worker woken
        by a fetch handed on alone: at 1,000 events/s, one wake-up per message was a third
        of the watcher's CPU. After GATHER_AFTER messages in a row that each came within
        `gather` of the loop's wait, it waits `gather` first: at most 1/gather wake-ups a
        second. An isolated event (a message, its key fetch's answer) is applied at once, and
        a flush falling due cuts the wait short. Nor does it wait while fetches queue for the
        pool: each wake-up hands it at most `fetch_limit`, and a load of 100k targets took
        59 s instead of 14.5 when the pool was fed 32 fetches per wait (bench/ANALYSIS.md,
        round 18)."""
        self._streak = self._streak + 1 if waited < self.gather else 0
        if self._streak >= GATHER_AFTER and not self._fetch_queue:
            pause = min(self.gather, self._until_due())
            if pause > 0:
                time.sleep(pause)

    def _until_due(self) -> float:
        """Seconds until the pending flush is due (a long time: none pending)."""
        if self._first_dirty is None:
            return 1.0
        due = min(self._last_dirty + self.min_wait, self._first_dirty + self._batch_bound())
        return due - self.clock()

    def run_once_pending(self) -> None:
        """Apply every queued message and render now (for tests and start-up)."""
        while True:
            try:
                self._apply(self.inbox.get_nowait())
            except queue.Empty:
                break
        self._start_due_fetches()
        self.flush()
        if self._unpublished is not None:
            self._publish()

    def _next_wakeup(self) -> float:
        now = self.clock()
        wake = 1.0
        if self._first_dirty is not None:
            wake = min(wake, max(0.0, self._until_due()))
        if self._unpublished is not None:
            pacer = self._publish_pacer
            wake = min(wake, max(0.0, pacer.done_at + pacer.wait() - now))
        retries = [e.retry_at for e in map(self.entries.get, self._waiting)
                   if e is not None and e.retry_at is not None]
        if retries:
            wake = min(wake, max(0.0, min(retries) - now))
        if self._fetch_queue and len(self._in_flight) < self.fetch_limit:
            wake = 0.0
        return wake

    def _due(self) -> bool:
        return self._first_dirty is not None and self._until_due() <= 0

    def _batch_bound(self) -> float:
        """How long a batch may keep growing under a steady stream of changes: max_wait,
        shortened to BATCH_SHARE times what the last flush cost (never below min_wait). At
        1k targets a flush costs milliseconds and changes go out every min_wait; at 100k,
        flushing takes at most about half of the loop's time."""
        return min(self.max_wait, max(self.min_wait, BATCH_SHARE * self._flush_cost))

    def _dirty(self) -> None:
        now = self.clock()
        if self._first_dirty is None:
            self._first_dirty = now
        self._last_dirty = now

    def _apply(self, message: object) -> None:
        if isinstance(message, (_Upsert, _Remove, _ReplaceAll)):
            self.last_event = time.time()
            self.observe("applied")
        if isinstance(message, _Upsert):
            self._upsert(message.target)
        elif isinstance(message, _Remove):
            self._remove(message.target_id)
        elif isinstance(message, _ReplaceAll):
            self._replace_all(message.targets)
        elif isinstance(message, _Fetched):
            self._fetched(message)
        elif isinstance(message, _Ready):
            self._ready(message.target_id)
        elif isinstance(message, _Manual):
            self.manual = message.lines  # rendered as an edit of the last lines (_render_changes)
        elif isinstance(message, _Status):
            self.status[message.part] = message.status
        elif isinstance(message, _Identity):
            if message.proxy != self.proxy:
                self._full = True
            self.proxy = message.proxy
        self._dirty()

    def _upsert(self, target: Target) -> None:
        reason = is_permitted(target, self.settings)
        if not reason and not target.address:
            # Unreachable from here, and its names would resolve through DNS to whoever
            # holds them now: not served until it shares a network again.
            reason = "no network shared with the proxy"
        if reason:
            if target.id in self.entries:
                log.info("target no longer permitted: %s (%s)", target.name, reason)
            self._remove(target.id, quiet=True)
            old = self.ignored.get(target.id)
            if old != (target, reason):
                self._ignored_changed(old, target)
            self.ignored[target.id] = (target, reason)
            return
        old = self.ignored.pop(target.id, None)
        if old is not None:
            self._ignored_changed(old, None)
        entry = self.entries.get(target.id)
        self._status_dirty.add(target.id)
        if entry is None:
            log.info("target added: %s address=%s", target.name, target.address or "-")
            self.entries[target.id] = TargetEntry(target=target, retry_at=self.clock(),
                                                  generation=next(self._generations))
            self._fetch_queue.append(target.id)
            self._changed_targets.add(target.id)
            return
        refetch = (entry.target.started_at != target.started_at
                   or entry.target.address != target.address)
        if entry.target.name != target.name:
            log.info("target renamed: %s -> %s", entry.target.name, target.name)
        if entry.target != target:
            self._changed_targets.add(target.id)
        entry.target = target
        if refetch:
            entry.generation = next(self._generations)
            entry.fetching = False
            entry.failures = 0
            if entry.keys.keys:
                self._changed_keys.add(target.id)
            entry.keys = KeyState()
            entry.retry_at = self.clock()
            self._fetch_queue.append(target.id)
            entry.since = time.time()

    def _ready(self, target_id: str) -> None:
        """A target that just became ready and has no key yet is fetched now, instead of at
        its next retry (up to minutes away after a slow boot). A fetch still in flight may be
        sleeping between its own attempts: a new generation asks at once, and the old
        fetch's answer is dropped when it comes."""
        entry = self.entries.get(target_id)
        if entry is None or entry.keys.keys:
            return  # not a target, or already served: the key is fetched once per start
        if entry.fetching:
            entry.generation = next(self._generations)
            entry.fetching = False
        entry.retry_at = self.clock()
        self._fetch_queue.append(target_id)
        self._status_dirty.add(target_id)

    def _ignored_changed(self, old: tuple[Target, str] | None, new: Target | None) -> None:
        """An ignored target came, went or changed: the names it reserves, before and after.
        A full render for it cost 3.9 s at 100k targets, and `docker stop` makes one (its
        target first loses its network, then goes; bench/ANALYSIS.md, round 19)."""
        targets = [t for t in (old[0] if old is not None else None, new) if t is not None]
        self._ignored_names.update(fold(name) for name, _ in container_reservations(targets))

    def _remove(self, target_id: str, quiet: bool = False) -> None:
        old = self.ignored.pop(target_id, None)
        if old is not None:
            self._ignored_changed(old, None)
        entry = self.entries.pop(target_id, None)
        if entry is not None:
            if entry.row is not None:
                self._gone_rows[target_id] = entry.row
            self._changed_targets.add(target_id)
            self._status_dirty.add(target_id)
            if not quiet:
                log.info("target removed: %s", entry.target.name)

    def _replace_all(self, targets: tuple[Target, ...]) -> None:
        wanted = {t.id for t in targets}
        for target_id in [i for i in self.entries if i not in wanted]:
            self._remove(target_id)
        for target_id in [i for i in self.ignored if i not in wanted]:
            self._remove(target_id)
        for target in targets:
            self._upsert(target)

    def _fetched(self, message: _Fetched) -> None:
        self._in_flight.discard((message.target_id, message.generation))
        entry = self.entries.get(message.target_id)
        if entry is None or entry.generation != message.generation:
            return  # the target went away or restarted meanwhile: a newer fetch decides
        entry.fetching = False
        self._status_dirty.add(message.target_id)
        keys = message.keys
        before = (entry.keys.status, entry.keys.keys, entry.keys.error)
        for reason in keys.rejected:
            log.warning("target %s: key line rejected: %s", entry.target.name, reason)
        if keys.status == "ok":
            if entry.keys.keys != keys.keys:
                log.info("target %s: %d key(s) via %s", entry.target.name, len(keys.keys), keys.via)
            entry.keys = keys
            entry.failures = 0
            entry.retry_at = None
        else:
            entry.failures += 1
            delay = retry_delay(entry.failures)
            entry.retry_at = self.clock() + delay
            self._waiting.add(message.target_id)
            # Keys already served stay served until the target stops: a flaky key API
            # must not lock users out of a running target.
            entry.keys = replace(entry.keys, status="failed" if not entry.keys.keys else "ok",
                                 error=keys.error)
            log.warning("target %s: no key (%s); retrying in %.0fs",
                        entry.target.name, keys.error, delay)
        if (entry.keys.status, entry.keys.keys, entry.keys.error) != before:
            entry.since = time.time()
        if entry.keys.keys != before[1]:
            self._changed_keys.add(message.target_id)

    def _start_due_fetches(self) -> None:
        now = self.clock()
        if self._waiting:
            still: set[str] = set()
            for tid in self._waiting:
                entry = self.entries.get(tid)
                if entry is None or entry.retry_at is None:
                    continue
                if entry.fetching or entry.retry_at > now:
                    still.add(tid)
                else:
                    self._fetch_queue.append(tid)
            # A new set, not discards: a set never shrinks, and iterating one that once held
            # 100k ids walks its whole table on every loop turn (half the loop's time in churn).
            self._waiting = still
        while self._fetch_queue and len(self._in_flight) < self.fetch_limit:
            tid = self._fetch_queue.popleft()
            entry = self.entries.get(tid)
            # Stale when gone, fetched or started since it was queued (queued twice).
            if entry is None or entry.retry_at is None or entry.fetching or entry.retry_at > now:
                continue
            entry.fetching = True
            entry.retry_at = None
            self._status_dirty.add(tid)
            self._in_flight.add((tid, entry.generation))
            self.pool.submit(self._fetch_job, entry.target, entry.generation)

    def _fetch_job(self, target: Target, generation: int) -> None:
        keys = KeyState(status="failed", error="internal error: the key fetch did not finish")
        try:
            keys = self.fetch(target)
        except BaseException as exc:  # a bug in an adapter must not kill the pool thread
            log.error("key fetch for %s crashed (%s: %s); retried with backoff", target.name,
                      type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            keys = KeyState(status="failed", error=f"internal error: {exc}")
            if not isinstance(exc, Exception):
                raise
        finally:  # whatever ends the fetch, the loop hears of it: never `fetching` forever
            self.inbox.put(_Fetched(target.id, generation, keys))

    # ---- output -------------------------------------------------------------------------
    def flush(self) -> None:
        started = time.perf_counter()
        try:
            self._flush()
        finally:
            self._flush_cost = time.perf_counter() - started
        # What the flush left is long-lived: out of the cyclic GC's view (watcher/heap.py).
        self.freezer.after_flush(len(self.entries) + len(self.manual))
        self.trimmer.after_flush()  # and what it freed goes back to the system

    def _flush(self) -> None:
        self._first_dirty = None
        hosts = self.unmanaged_hosts() if self.entries else ()
        pinned = frozenset(fold(n) for _, names in hosts for n in names)
        context = (self.proxy, pinned, hosts)
        span = self._manual_span()
        if self._full or context != self._context or span is None:
            redo, rendered = self._render_all(hosts, pinned)
        else:
            redo, rendered = self._render_changes(hosts, span)
        self._ignored_names.clear()
        self._full = False
        self._context = context
        self._changed_targets.clear()
        self._changed_keys.clear()
        self._log_refused(redo)
        if self.write(rendered):
            self.writes += 1
            self.last_write = time.time()
        # Only now: a login from here on reads the new index, so closing the sessions
        # that lost grants cannot race a login that still sees them.
        written_at = time.time()
        before, after = self._worlds(rendered)
        parts = (changed_parts(self._shards_seen, rendered.shards) if rendered.changed is None
                 else rendered.parts_changed)
        old_grants, new_grants = grants_of_parts(parts)
        revoked = revocations(before, after, old_grants, new_grants, written_at,
                              fingerprints=old_grants)
        self._shards_seen, self._owners_seen = rendered.shards, rendered.owners
        if revoked:
            self.revoke(revoked)
        self._engine.forget_owners_before()  # owners_of answers the new owners from now on
        self._status_dirty |= redo
        self._status_full = self._status_full or rendered.changed is None
        self._unpublished = rendered
        # A snapshot of many changed rows costs as much as the render that changed them
        # (1.5 s for 100k rows): taken now, with that render, not later in the middle of
        # some small change.
        if (self._publish_pacer.due() or self._status_full
                or many(len(self._status_dirty), len(self._row_order))):
            self._publish()

    def full_render(self) -> Rendered:
        """The current state rendered from scratch (what the fast path must equal)."""
        targets = [e.target for e in self.entries.values()]
        hosts = self.unmanaged_hosts() if targets else ()
        reserved = self._reserved_names(hosts, ReservedNames.of(permitopen_reservations(self.manual)))
        plan = resolve_aliases(targets, self.proxy, pin_names=self.pin_names, reserved=reserved)
        served = [ServedTarget(e.target, plan.aliases.get(e.target.id, ()), e.keys.keys)
                  for e in self.entries.values() if e.keys.keys]
        return render(served, self.settings.permit_ports, self.manual,
                      scope_manual=self.settings.mode.discovers,
                      pinned_elsewhere=frozenset(fold(n) for _, names in hosts for n in names))

    def _render_all(self, hosts: HostsEntries, pinned: frozenset[str]) -> tuple[set[str], Rendered]:
        """Rebuild the aliases and every rendered line from the whole state."""
        self._manual_reservations = ManualReservations(self.manual)
        self._manual_reserved = self._manual_reservations.reserved()
        self._book_before = self._book
        self._book = AliasBook(self.proxy, self.pin_names, self._reserved_names(hosts))
        redo = self._book.update({tid: e.target for tid, e in self.entries.items()})
        # With discovery, an admin line without permitopen reaches the discovered targets only.
        self._engine.reset(self.manual, pinned)
        self._engine_manual = self.manual
        rendered = self._engine.update({tid: self._served(tid) for tid in self.entries})
        gone = set(self._book_before.targets) - set(self.entries)
        return redo | gone, replace(rendered, changed=None, parts_changed={})

    def _manual_span(self) -> tuple[int, int, int] | None:
        """Where the admin lines changed since the engine saw them (see changed_span);
        None when so many changed (an insert at the top of a file renumbers every line
        after it) that rendering everything again costs less than edit by edit."""
        old, new = self._engine_manual, self.manual
        if old is new:
            return (len(new), len(new), len(new))
        start, old_end, new_end = changed_span(old, new)
        if many((old_end - start) + (new_end - start), len(new)):
            return None
        return start, old_end, new_end

    def _render_changes(self, hosts: HostsEntries,
                        span: tuple[int, int, int]) -> tuple[set[str], Rendered]:
        """Only what the changed targets and admin lines touch: their claims'
        co-claimants, their keys."""
        book = self._book
        self._targets_before = {tid: book.targets.get(tid, MISSING) for tid in self._changed_targets}
        book.aliases_before = {}
        redo = self._book.update({tid: self.entries[tid].target if tid in self.entries else None
                                  for tid in self._changed_targets})
        redo |= self._changed_targets
        if self.manual is not self._engine_manual:
            redo |= self._edit_manual(hosts, span)
        if self._ignored_names:
            redo |= self._book.reserve(self._reserved_names(hosts), self._ignored_names)
        rendered = self._engine.update({tid: self._served(tid)
                                        for tid in redo | self._changed_keys})
        return redo, rendered

    def _edit_manual(self, hosts: HostsEntries, span: tuple[int, int, int]) -> set[str]:
        """Hand the engine the admin lines that changed since it last saw them (one span:
        an edit of one file); returns the targets whose aliases it re-decided."""
        old, new = self._engine_manual, self.manual
        start, old_end, new_end = span
        removed, added = old[start:old_end], new[start:new_end]
        self._engine.change_manual(removed, added, new)
        self._engine_manual = new
        self._manual_fps = {line.key.fingerprint for line in (*removed, *added)}
        names = self._manual_reservations.update(removed, added)
        if not names:
            return set()
        self._manual_reserved = self._manual_reservations.reserved()
        return self._book.reserve(self._reserved_names(hosts), names)

    def _served(self, tid: str) -> ServedTarget | None:
        entry = self.entries.get(tid)
        if entry is None or not entry.keys.keys:
            return None
        return ServedTarget(entry.target, self._book.aliases.get(tid, ()), entry.keys.keys)

    def _reserved_names(self, hosts: HostsEntries,
                        manual: ReservedNames | None = None) -> ReservedNames:
        """Names a target's soft alias would take from someone else: other containers the
        proxy reaches (served or not), hosts of admin keys' permitopen, the hosts file's
        other lines, the proxy's own names. Made with no targets too: the book made then
        decides the first targets that come."""
        return (self._manual_reserved if manual is None else manual).with_(itertools.chain(
            container_reservations(t for t, _ in self.ignored.values()),
            hosts_file_reservations(hosts),
            proxy_reservations(self.local_names)))

    def _log_refused(self, redo: set[str]) -> None:
        """Each refusal once, when it first appears (the same state renders many times)."""
        for tid in redo:
            refused = self._book.refused.get(tid, ())
            was = {(r.target, r.alias, r.reason) for r in self._refused_rows.get(tid, ())}
            for name, alias, reason in refused:
                if (name, alias, reason) not in was:
                    log.warning("target %r: alias %r refused: %s", name, alias, reason)

    def _worlds(self, rendered: Rendered) -> tuple[World, World]:
        """The revocation worlds (before, after) of this flush: the alias book's targets and
        granted names now, and as they were through what the flush changed in them (a full
        render made a new book: the old one is `before`)."""
        excluded = {tid: TARGET_NOT_PERMITTED if is_permitted(t, self.settings) else TARGET_DISCONNECTED
                    for tid, (t, _) in self.ignored.items()}
        book = self._book
        old_manual: dict = {}
        if rendered.changed is None:
            old = self._book_before
            before = World(targets=old.targets, hosts=GrantedNames(old), excluded=self._excluded,
                           manual=self._manual_options, owners=self._owners_seen)
            self._manual_options = {}
            manual_fps: Iterable[str] = self._engine.manual_fingerprints()
        else:
            before = World(targets=Before(self._targets_before, book.targets),
                           hosts=Before(_names_before(book), GrantedNames(book)),
                           excluded=self._excluded, manual=Before(old_manual, self._manual_options),
                           owners=rendered.owners_before)
            manual_fps = self._manual_fps
        self._book_before = book
        self._targets_before = {}
        book.aliases_before = None
        for fp in manual_fps:
            remember(old_manual, self._manual_options, fp)
            options = frozenset(line.options for line in self._engine.manual_lines(fp))
            if options:
                self._manual_options[fp] = options
            else:
                self._manual_options.pop(fp, None)
        self._excluded = excluded
        self._manual_fps = set()
        after = World(targets=book.targets, hosts=GrantedNames(book), excluded=excluded,
                      manual=self._manual_options, owners=rendered.owners)
        return before, after

    def _publish(self) -> None:
        rendered = self._unpublished
        assert rendered is not None
        with self._publish_pacer.timed():
            self.publish(self._snapshot(rendered))
        self._unpublished = None

    def _row_key(self, tid: str) -> tuple[str, str]:
        """Where a listed row stands in the order: by the row's name (a renamed target's
        row stands under its old name until the snapshot moves it)."""
        row = self._gone_rows.get(tid)
        if row is None:
            row = self.entries[tid].row
        assert row is not None
        return row.name, tid

    def _snapshot(self, rendered: Rendered) -> Snapshot:
        full = self._status_full
        dirty = set(self.entries) | set(self._gone_rows) if full else self._status_dirty
        self._status_dirty = set()
        self._status_full = False
        bulk = many(len(dirty), len(self._row_order))  # re-sort once, not insert each
        for tid in dirty:
            entry = self.entries.get(tid)
            gone = self._gone_rows.get(tid)  # listed for an entry removed since (maybe re-added)
            old = gone if gone is not None else entry.row if entry is not None else None
            # The order moves only for a new, gone or renamed row (a shift of 100k entries).
            moved = entry is None or old is None or entry.target.name != old.name
            if old is not None and not bulk and moved:
                self._row_order.pop(bisect.bisect_left(self._row_order, (old.name, tid), key=self._row_key))
            self._gone_rows.pop(tid, None)
            self._refused_rows.pop(tid, None)
            if entry is None:
                continue
            row = _target_status(entry, self._book.aliases.get(tid, ()))
            # An equal row stays the same object: the heartbeat copies a row it has already
            # encoded by identity (after a full render at 100k: ~1 s of encoding saved).
            entry.row = old if row == old else row
            refused = tuple(RefusedName(*r) for r in self._book.refused.get(tid, ()))
            if refused:  # only these: most targets have none, and 100k empty ones cost a pass
                self._refused_rows[tid] = refused
            if moved and not bulk:
                bisect.insort(self._row_order, tid, key=self._row_key)
        if bulk:
            self._row_order = sorted((tid for tid, e in self.entries.items() if e.row is not None),
                                     key=self._row_key)
        refused_rows = sorted(self._refused_rows, key=self._row_key)
        ignored = tuple(IgnoredTarget(t.short_id, t.name, r)
                        for t, r in sorted(self.ignored.values(), key=lambda v: v[0].name))
        manual_keys = tuple(ManualKey(m.origin, m.key.key_type, m.key.fingerprint, m.options)
                            for m in self.manual[:MANUAL_KEYS_LISTED])
        rows = map(_ROW, map(self.entries.__getitem__, self._row_order))
        return Snapshot(targets=tuple(rows), ignored=ignored,
                        refused_aliases=tuple(itertools.chain.from_iterable(
                            self._refused_rows[tid] for tid in refused_rows)),
                        manual_keys=manual_keys, keys_served=rendered.keys_served,
                        writes=self.writes, last_write=self.last_write,
                        last_event=self.last_event,
                        source=source_status(self.status["source"]),
                        manual=manual_status(self.status["manual"]))


_ROW = operator.attrgetter("row")

# The status snapshot's readers take it every 2 s (status.json) or scan the targets it names
# (the host key learner, an O(targets) pass per snapshot): under churn at 100k targets, ~12
# snapshots a second were ~0.05 ms of CPU per event, and all but one every 2 s unread
# (bench/ANALYSIS.md, round 19). A cheap snapshot (pacing.CHEAP: up to ~10k targets) is still
# taken with every flush; a costly one after a quiet second at once.
PUBLISH_EVERY = 1.0

# Messages in a row, each within `gather` of the loop's wait, that make a stream (_gather):
# more than follow an isolated event (its key's answer, a readiness).
GATHER_AFTER = 3

# A batch waits at most this many times the last flush's cost (_batch_bound). At 100k
# targets a flush under churn rewrites every shard whatever the batch holds (~0.3 s): a
# share of 2 made the p50 of 1,000 events/s 0.6 s, 1 makes it 0.4 s (p99 1.2 -> 1.07 s),
# for ~3% more CPU (bench/ANALYSIS.md, round 7).
BATCH_SHARE = 1


def _names_before(book: AliasBook) -> dict[str, object]:
    """Folded name -> the id it was granted to before the flush (MISSING: no one), for the
    names whose grant the flush changed (the book noted their targets' aliases before)."""
    before: dict[str, object] = {}
    noted = book.aliases_before or {}
    for tid, aliases in noted.items():
        for alias in aliases or ():
            before[fold(alias)] = tid
    for tid in noted:
        for alias in book.aliases.get(tid, ()):
            before.setdefault(fold(alias), MISSING)
    return before


def _target_status(entry: TargetEntry, aliases: tuple[str, ...]) -> TargetStatus:
    keys = entry.keys
    state = KeyStatus(keys.status)
    if state is KeyStatus.PENDING and entry.fetching:
        state = KeyStatus.FETCHING
    return TargetStatus(
        id=entry.target.short_id, name=entry.target.name, address=entry.target.address,
        aliases=tuple(aliases), key_status=state, via=keys.via,
        keys=keys.keys,
        error=keys.error, rejected=tuple(keys.rejected), since=entry.since)


def source_status(status: dict) -> SourceStatus:
    """The sources' status message (a dict across the source boundary) as the typed value."""
    since = status.get("since")
    return SourceStatus(kind=str(status.get("kind", "")), connected=bool(status.get("connected")),
                        error=str(status.get("error") or ""),
                        reconnects=int(status.get("reconnects", 0)),
                        since=float(since) if since is not None else None,
                        namespace=str(status.get("namespace", "")),
                        state=str(status.get("state", "")),
                        attempt=int(status.get("attempt", 0)),
                        outage_seconds=float(status.get("outage_seconds", 0.0)),
                        gives_up_after=float(status.get("gives_up_after", 0.0)))


def manual_status(status: dict) -> ManualStatus:
    return ManualStatus(files=int(status.get("files", 0)), keys=int(status.get("keys", 0)),
                        errors=tuple(str(e) for e in status.get("errors", ())))
