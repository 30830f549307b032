"""The supervisor: wires sources, the reconciler, sshd and the access log; PID 1 in the image."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

from .accesslog import (AccessEvent, AccessTracker, Session, format_event, parse_datagram,
                        revoked_event)
from .allocator import fix_mmap_threshold
from .cache import (ShardFiles, atomic_write, file_stamp, holds, read_unmanaged_hosts,
                    shrink_in_place, update_hosts_block, write_if_changed)
from .config import RunMode, Settings
from .errors import WatcherError, explain_os_error
from .fetch import KeyFetcher
from .hostkeys import HOST_KEYS_PATH, HostKeyLearner, ssh_port
from .index_layout import group_count, groups, index_bytes
from .index_recent import RECENT_NAME, RECENT_QUIET, RecentLines, key_bytes
from .metrics import CountingSink, Metrics, Observed
from .model import KeyState
from .pacing import CHEAP, Pacer
from .platforms import platform_for
from .reconcile import Reconciler, Snapshot
from .render import EMPTY_SHARD, SHARD_NAMES, HostsBlock, Rendered, Shard, index_shard, part_bytes
from .revocation import RecentRevocations, Revocation
from .sessions import ProcFS, SessionKiller
from .sources.manual import ManualKeySource
from .sshd import (SshdPaths, SshdProcess, check_config, cut_connections, drain,
                   ensure_host_keys, open_connections, render_sshd_config, split_connections)
from .snapshot import (STATUS_PATH, SettingsView, StatusDocument, WatcherState,
                       WriteErrors)
from .status import StatusWriter, write_status
from .syslog_listener import SyslogListener, uids_of
from .targets import ProxyIdentity

log = logging.getLogger(__name__)

CACHE_EVERY = 1.0  # seconds: the human-readable cache is written at most this often


@dataclass(frozen=True)
class Paths:
    cache: Path = Path("/etc/ssh/authorized_keys_cache")
    hosts: Path = Path("/etc/hosts")
    access_log: Path = Path("/etc/ssh/access.log")
    status: Path = STATUS_PATH
    syslog_socket: Path = Path("/dev/log")
    keys_dir: Path = Path("/etc/ssh/authorized_keys.d")
    known_hosts: Path = HOST_KEYS_PATH  # the targets' host keys
    sshd: SshdPaths = field(default_factory=SshdPaths)


class OutputWriter:
    """The reconciler's single write path: hosts block, then the index shards, then the cache.

    A write that fails (disk full, read-only) leaves the previous files whole (atomic
    renames) and served; the error is logged once, shown in the status, and the newest
    render is written again by `retry` (the supervisor's heartbeat) until it goes through.
    The cache (for people; sshd reads the index) follows the index, never ahead of it: at
    once while writing it is cheap, else at most so often that it takes a tenth of the
    time (100k keys are ~15 MB), by a thread of its own, so that the next index write never
    waits behind it (under churn at 100k it was ~0.1 s of every third flush: p99 +0.3 s);
    `retry` and `close` write what is still due.
    """

    def __init__(self, paths: Paths, mode: RunMode, pin_names: bool,
                 on_result: Callable[[str, bool], None] = lambda result, fresh: None) -> None:
        self.paths = paths
        # (ok | unchanged | failed, fresh = a new render rather than a retry): for metrics
        self.on_result = on_result
        self.pin_names = pin_names
        self.write_cache = mode.discovers  # without discovery the cache is the admin's input
        self.error = ""  # why the newest render is not on disk yet ("" = it is)
        self._pending: Rendered | None = None
        self._cache_due: Rendered | None = None  # written to the index, not yet to the cache
        # The cache is for people: at most once a second. Written at every flush while
        # cheap, it was ~15% of the loop's CPU under churn at 1k keys (ANALYSIS, round 17).
        self._cache_pacer = Pacer(floor=CACHE_EVERY)
        self._index_ready = False
        self._shard_files = ShardFiles(paths.sshd.index_dir)
        # The shards the group files were last written from whole: a shard object that is
        # still the same is not looked at again (no stat per shard per flush).
        self._shards_on_disk: Mapping[str, Shard] = {}
        # The keys changed since the group files were written (index_recent); None: what the
        # files hold is not known (none written yet, a write failed), so all are written.
        self._recent: RecentLines | None = None
        self._recent_on_disk = True  # whether RECENT_NAME may exist (an earlier run's too)
        self._index_shards: Mapping[str, Shard] = {}  # of the render last written to the index
        self._index_written_at = 0.0  # time.monotonic() of that write
        self._hosts_head: bytes | None = None  # what precedes the block it last wrote
        self._lock = threading.Lock()  # the reconciler and `retry` never write at once
        self._cache_lock = threading.Lock()  # one cache write at a time (the cache thread's too)
        self._due_lock = threading.Lock()  # _cache_due, briefly: never held while writing
        self._cache_wake = threading.Event()
        self._cache_thread: threading.Thread | None = None
        self._closing = threading.Event()
        # What this writer last put in each file, with the file's stamp right after: an
        # unchanged render is not compared against the disk again.
        self._written: dict[Path, tuple[tuple[int, ...] | None, object]] = {}

    def __call__(self, rendered: Rendered) -> bool:
        with self._lock:
            self._pending = rendered
            return self._write_pending(fresh=True)

    def retry(self) -> None:
        """Write the newest render if an earlier attempt failed, the group files once the
        index has been quiet for RECENT_QUIET seconds, and a cache still due."""
        with self._lock:
            if self._pending is not None:
                self._write_pending(fresh=False)
                return
            if self._recent and time.monotonic() - self._index_written_at >= RECENT_QUIET:
                self._fold_recent()
            if self._cache_due is not None:
                try:
                    self._write_cache(force=True)
                except OSError as exc:  # the index is written: only the copy for people waits
                    log.warning("cannot write %s (%s): tried again in 2 s", self.paths.cache, exc)

    def close(self) -> None:
        """At stop: the cache as the index is."""
        self._closing.set()
        self._cache_wake.set()
        if self._cache_thread is not None:
            self._cache_thread.join()
        self.retry()

    def _write_pending(self, fresh: bool) -> bool:
        assert self._pending is not None
        try:
            changed = self._write(self._pending)
        except OSError as exc:
            self.on_result("failed", fresh)
            if not self.error:
                log.error("cannot write the rendered keys (%s): sshd keeps serving the previous "
                          "%s, less any grant withdrawn since; free space in %s, writing is "
                          "retried every 2 s", exc, self.paths.sshd.index_dir,
                          self.paths.sshd.index_dir.parent)
            self.error = str(exc)
            self._withdraw_in_place(self._pending)
            return False
        except BaseException:
            self._recent = None  # this render's changes may be unnoted: every group next time
            raise
        self.on_result("ok" if changed else "unchanged", fresh)
        if changed:  # a stage of bench/propagation.py's breakdown (at WATCHER_LOG_LEVEL=debug)
            log.debug("rendered keys written")
        if self.error:
            log.info("rendered keys written again (the earlier error was: %s)", self.error)
            self.error = ""
        self._pending = None
        return changed

    def _withdraw_in_place(self, rendered: Rendered) -> None:
        """A revocation must not wait for disk space: drop from each index file on disk
        every line the newest render no longer has (in place: no new blocks needed). The
        file of recent changes first, as its keys are answered from it alone (a key whose
        lines went, its GONE line too, is then answered from its group, shrunk next); then
        the files the shard names lead to: the layout last linked, or each shard's own file."""
        directory = self.paths.sshd.index_dir
        self._recent = None  # the files are not what this writer wrote any more
        _withdraw(directory / RECENT_NAME, b"".join(shard.data for shard in rendered.shards.values()))
        count = self._shard_files.count
        files = groups(count) if count is not None else tuple((name, (name,)) for name in SHARD_NAMES)
        for name, names in files:
            _withdraw(directory / name, b"".join(rendered.shards.get(shard, EMPTY_SHARD).data for shard in names))

    def _write(self, rendered: Rendered) -> bool:
        changed = False
        if self.pin_names:
            # Names first, so a newly granted name resolves by the time sshd allows it.
            changed |= self._once(self.paths.hosts, rendered.hosts, self._write_hosts(rendered.hosts))
        changed |= self._write_index(rendered)
        if self.write_cache:
            with self._due_lock:
                self._cache_due = rendered
            if self._cache_pacer.cost < CHEAP and self._cache_pacer.due():
                changed |= self._write_cache(force=False)
            else:  # written by the cache thread once due
                self._wake_cache_writer()
        return changed

    def _wake_cache_writer(self) -> None:
        if self._cache_thread is None:
            self._cache_thread = threading.Thread(target=self._cache_loop, name="cache-writer", daemon=True)
            self._cache_thread.start()
        self._cache_wake.set()

    def _cache_loop(self) -> None:
        """Writes the newest due cache once the pacer allows, until close()."""
        while True:
            self._cache_wake.wait()
            self._cache_wake.clear()
            while not self._closing.is_set() and not self._cache_pacer.due():
                self._closing.wait(max(0.01, self._cache_pacer.until_due()))
            if self._closing.is_set():
                return  # close() writes what is due
            try:
                self._write_cache(force=True)
            except OSError as exc:  # the index is written: only the copy for people waits
                log.warning("cannot write %s (%s): tried again in 2 s", self.paths.cache, exc)
            except Exception:  # never silently: the cache would stop following the index
                log.exception("writing %s failed; tried again in 2 s", self.paths.cache)

    def _write_hosts(self, block: HostsBlock) -> Callable[[bool], bool]:
        def write(known: bool) -> bool:
            # The file holds what this writer last wrote: its head need not be read again.
            head, self._hosts_head = self._hosts_head if known else None, None  # unknown until written
            changed, self._hosts_head = update_hosts_block(self.paths.hosts, block, head)
            return changed
        return write

    def _write_index(self, rendered: Rendered) -> bool:
        """The keys that changed into the file of recent changes; the group files when it
        is full (index_recent), or when what they hold is not known."""
        files = self._shard_files
        if not self._index_ready:
            files.prepare()
            self._index_ready = True
        shards = rendered.shards
        size = index_bytes(shards)
        count = group_count(size, files.count)
        recent, self._recent = self._recent, None  # unknown until written
        self._index_shards, self._index_written_at = shards, time.monotonic()
        if recent is None or rendered.changed is None or count != files.count:
            changed = self._write_groups(shards, count, None)
            self._recent = RecentLines()
            return changed
        if not rendered.changed:
            self._recent = recent
            return False
        self._shards_on_disk = {}  # the groups fall behind the shards: never compared by identity
        per_key = key_bytes(size, sum(shard.lines for shard in shards.values()))
        if not recent.full(size, len(rendered.changed), per_key):  # else not looked up at all
            for fp in rendered.changed:
                recent.note(fp, part_bytes(shards.get(index_shard(fp), EMPTY_SHARD), fp))
            if not recent.full(size):
                files.write(RECENT_NAME, recent.data())
                self._recent_on_disk = True
                self._recent = recent
                return True
        changed = self._fold(recent, shards, count, set(map(index_shard, rendered.changed)))
        self._recent = recent
        return changed

    def _fold_recent(self) -> None:
        """The keys of the file of recent changes taken into the group files, and the file
        removed: a quiet index is looked up with one `look`."""
        recent, self._recent = self._recent, None  # unknown until written
        assert recent is not None and self._shard_files.count is not None
        try:
            self._fold(recent, self._index_shards, self._shard_files.count, set())
        except OSError as exc:  # the next write writes every group; the file still answers
            log.warning("cannot fold the index's recent changes into its group files (%s): "
                        "tried again with the next write", exc)
            return
        self._recent = recent

    def _fold(self, recent: RecentLines, shards: Mapping[str, Shard], count: int, more: set[str]) -> bool:
        """The groups holding a shard of `recent`'s keys or of `more` written again, the file
        of recent changes removed, and `recent` emptied."""
        changed = self._write_groups(shards, count, recent.shards() | more)
        recent.clear()
        return changed

    def _write_groups(self, shards: Mapping[str, Shard], count: int, only: set[str] | None) -> bool:
        """The group files of layout `count` that hold a shard of `only` (None: every one
        whose lines differ from the file's), then the file of recent changes removed: a
        reader that looked there first finds its key's lines in the new groups."""
        files = self._shard_files
        directory = files.directory
        on_disk, self._shards_on_disk = self._shards_on_disk, {}  # unknown until written
        if count != files.count or only is not None:
            on_disk = {}
        changed = False
        for group, names in groups(count):
            if only is not None and only.isdisjoint(names):
                continue
            parts = [shards.get(name, EMPTY_SHARD) for name in names]
            if on_disk and all(on_disk.get(name) is part for name, part in zip(names, parts)):
                continue
            blocks = tuple(itertools.chain.from_iterable(part.blocks for part in parts))
            if only is None and holds(directory / group, blocks):
                continue
            files.write(group, blocks)
            changed = True
        files.use(count)  # the shard names link to these groups (same lines: no change)
        if self._recent_on_disk:
            changed |= files.remove(RECENT_NAME)
            self._recent_on_disk = False
        if only is None:
            self._shards_on_disk = shards
        return changed

    def _write_cache(self, force: bool) -> bool:
        """The cache of the render last written to the index, when it is due."""
        with self._cache_lock:
            with self._due_lock:
                rendered = self._cache_due
            if rendered is None:
                return False
            if not force and not self._cache_pacer.due():
                return False
            with self._cache_pacer.timed():
                # Remembered by its shards' line counts and block hashes, not their text: the
                # same shards make the same text, and neither the cache (~18 MB at 100k keys)
                # nor the index it is made from (~23 MB, a generation behind under churn) is
                # kept between writes. A bytes object keeps its hash: only a new block is
                # hashed (~20 ms for all at 100k keys).
                shards = tuple((shard.lines, hash(shard.blocks)) for shard in
                               (rendered.shards.get(name, EMPTY_SHARD) for name in SHARD_NAMES))
                changed = self._once(self.paths.cache, shards, lambda known: _write_cache_file(
                    self.paths.cache, rendered, known))
            with self._due_lock:
                if self._cache_due is rendered:  # else a newer render became due meanwhile
                    self._cache_due = None
            return changed

    def _once(self, path: Path, content: object, write: Callable[[bool], bool]) -> bool:
        """`write(known)` unless this writer already wrote `content` (the text, or what it
        is made of) to `path` and the file has not changed since (anyone else's write to it
        is seen, and overwritten).
        known: the file holds what this writer last wrote (no need to read it first)."""
        stamp = file_stamp(path)
        done = self._written.get(path)
        known = done is not None and stamp is not None and done[0] == stamp
        if known and done is not None and done[1] == content:
            return False
        self._written.pop(path, None)
        changed = write(known)
        self._written[path] = (file_stamp(path), content)
        return changed


def _withdraw(path: Path, allowed: bytes) -> None:
    """`path` keeps only lines `allowed` has (a missing file: nothing to do); if that fails,
    it is emptied (fail closed: no login beats a stale grant; an empty file holds no keys)."""
    try:
        if shrink_in_place(path, allowed):
            log.warning("withdrew revoked grants from %s in place while the disk is full", path)
    except OSError as exc:
        log.error("cannot withdraw revoked grants from %s (%s): emptying it", path, exc)
        try:
            os.truncate(path, 0)
        except OSError:
            log.exception("cannot empty %s", path)


def _write_cache_file(path: Path, rendered: Rendered, known: bool) -> bool:
    """The cache: atomic, not fsynced. Like the index shards it is written again from the
    state at every start, before sshd starts, so a flush to disk would buy nothing after a
    crash; readers see a whole file either way (rename). Streamed shard by shard when the
    file holds what this writer last wrote (no need to compare: the 100k keys' cache is
    then never one string)."""
    if known:
        atomic_write(path, rendered.cache_chunks(), durable=False)
        return True
    return write_if_changed(path, b"".join(rendered.cache_chunks()), durable=False)


def hosts_writable(path: Path) -> bool:
    return path.exists() and os.access(path, os.W_OK)


class RotatingFile:
    """access.log: appended a line at a time, rotated by size (`.1` is the newest backup).

    A failed write (disk full) is logged once, not per line; the events still reach stdout,
    and the file resumes with the first line that fits again."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.error = ""  # why the last line did not reach the file ("" = it did)
        self._partial = False  # the last write stopped mid-line: start the next one afresh
        self._handle: Any = None
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "ab", buffering=0)
        os.chmod(self.path, 0o644)

    def write(self, line: str) -> None:
        data = (b"\n" if self._partial else b"") + line.encode() + b"\n"
        try:
            if self._handle is None:
                self._open()
            size = os.fstat(self._handle.fileno()).st_size
            if size and size + len(data) > self.max_bytes:
                self._rotate()
            written = self._handle.write(data) or 0
            if written < len(data):
                self._partial = written > 0 or self._partial
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            if not self.error:
                log.error("cannot write %s (%s): access events still go to stdout; the file "
                          "resumes when it can be written (free space in %s)",
                          self.path, exc, self.path.parent)
            self.error = str(exc)
            return
        self._partial = False
        if self.error:
            log.info("writing %s again (the earlier error was: %s)", self.path, self.error)
            self.error = ""

    def _rotate(self) -> None:
        """access.log -> .1 -> .2 ... (renames need no free space); the oldest is dropped."""
        self._handle.close()
        self._handle = None
        if self.backups == 0:
            self.path.write_bytes(b"")
        else:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class AccessLog:
    """sshd syslog datagrams -> access events -> access.log and stdout; closes the sessions
    of revoked keys.

    Fed on the syslog thread, told of revocations on the reconcile thread: one lock around
    the tracker, the recent revocations and the output.
    """

    def __init__(self, path: Path, owners: Callable[[str], tuple[str, ...]],
                 alias_owner: Callable[[str], str], stdout: TextIO = sys.stdout,
                 killer: SessionKiller | None = None, max_bytes: int = 10 * 1024 * 1024,
                 backups: int = 5,
                 observe: Callable[[AccessEvent], None] = lambda event: None) -> None:
        self.path = path
        self.observe = observe  # each event as it is logged (metrics)
        self.owners = owners
        self.alias_owner = alias_owner
        self.stdout = stdout
        self.killer = killer or SessionKiller()
        # Tunnels may stay open for days; the pid cap bounds memory anyway.
        self.tracker = AccessTracker(max_idle=7 * 86400)
        self.recent = RecentRevocations()
        # monitor pid -> (start, when) of each session closed lately: closed once only
        self.closing: dict[int, tuple[float, float]] = {}
        self.lock = threading.Lock()
        self.file = RotatingFile(path, max_bytes, backups)

    def __call__(self, datagram: bytes, sent_at: float | None = None) -> None:
        try:
            self._handle(datagram, sent_at)
        except Exception:  # one odd line must not take the access log (or the proxy) down
            log.exception("access log: cannot handle sshd line %r", datagram[:200])

    def _handle(self, datagram: bytes, sent_at: float | None) -> None:
        parsed = parse_datagram(datagram)
        if parsed is None:
            return
        pid, message = parsed
        with self.lock:
            # When sshd logged the line (the kernel's stamp), not when it was read: a
            # connection's start is then exact for the login race (see revocation.py).
            now = sent_at if sent_at is not None else time.time()
            for event in self.tracker.feed(pid, message, now):
                self.observe(event)
                self._write(format_event(event, self.target_of(event)))
            if self.recent:
                self._close_late_login(pid, now)

    def revoke(self, revocations: list[Revocation]) -> None:
        """Close every session of each revoked key, and remember the revocations for logins
        that read the index before it changed (the reconcile thread calls this)."""
        try:
            self._revoke(revocations)
        except Exception:  # the access log must not take the reconciler down
            log.exception("access log: cannot handle the revocation of %d key(s)", len(revocations))

    def _revoke(self, revocations: list[Revocation]) -> None:
        with self.lock:
            now = time.time()
            by_fp = {r.fingerprint: r for r in revocations}
            for revocation in revocations:
                self.recent.note(revocation, now)
            for session in self.tracker.sessions_of(*by_fp):
                self._close(session, by_fp[session.fingerprint], now)

    def _close_late_login(self, pid: int, now: float) -> None:
        """A login accepted after a revocation of its key, from a connection that began before
        the revoking write (it may have read the old grants): closed like the others."""
        session = self.tracker.session_of(pid)
        if session is None or self.closing.get(session.monitor, (None,))[0] == session.start:
            return
        revocation = self.recent.for_login(session.fingerprint, session.start, now)
        if revocation is not None:
            self._close(session, revocation, now)

    def _close(self, session: Session, revocation: Revocation, now: float) -> None:
        self.closing = {m: c for m, c in self.closing.items() if now - c[1] < self.recent.window}
        self.closing[session.monitor] = (session.start, now)
        try:
            killed = self.killer.close(session)
        except Exception:  # never take the reconciler (or the syslog thread) down
            log.exception("cannot close the session of %s (sshd pid %d): it stays open until "
                          "it ends", session.client, session.monitor)
            return
        if not killed:
            return
        events = [revoked_event(session, now, revocation.reason),
                  *self.tracker.end_session(session.monitor, now)]
        try:
            for event in events:
                self.observe(event)
            self._write(format_event(events[0], ",".join(revocation.targets) or "-"))
            for event in events[1:]:
                self._write(format_event(event, self.target_of(event)))
        except Exception:  # closed all the same; the next session must be closed too
            log.exception("access log: cannot write the revocation of %s's session", session.client)

    def _write(self, line: str) -> None:
        self.file.write(line)
        self.stdout.write(line + "\n")
        self.stdout.flush()

    def target_of(self, event: AccessEvent) -> str:
        if event.dest:
            host = event.dest.rsplit(":", 1)[0]
            owner = self.alias_owner(host)
            if owner:
                return owner
        if not event.fingerprint:
            return ""
        return ",".join(self.owners(event.fingerprint)) or "-"

    def close(self) -> None:
        with self.lock:
            self.file.close()


class Supervisor:
    def __init__(self, settings: Settings, paths: Paths = Paths()) -> None:
        self.settings = settings
        self.paths = paths
        self.stop = threading.Event()
        self._status_writer = StatusWriter()  # copies unchanged rows from its last file
        self.snapshot: Snapshot | None = None
        self.sshd = SshdProcess(paths.sshd)
        self.threads: list[threading.Thread] = []
        self.failed = False  # a component crashed: exit non-zero so a restart policy acts
        self.writer: OutputWriter | None = None  # set by run; their write errors go in the status
        self.access: AccessLog | None = None
        self.hostkeys: HostKeyLearner | None = None  # fed every published snapshot
        self.metrics = Metrics(lambda: Observed(self.snapshot or WatcherState(),
                                                self.sshd.restarts))

    def _thread(self, target: Callable[..., Any], *args: Any, name: str) -> None:
        def guarded() -> None:
            try:
                target(*args)
            except WatcherError as exc:  # says what failed and what to do: no traceback
                log.error("%s failed; stopping: %s", name, exc)
                self.failed = True
                self.stop.set()
            except Exception as exc:  # a bug: one line; the traceback at debug level
                log.error("%s crashed (%s: %s): stopping sshd; the proxy exits 1 so its "
                          "restart policy starts it again", name, type(exc).__name__, exc)
                log.debug("%s crash", name, exc_info=True)
                self.failed = True
                self.stop.set()
        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def run(self) -> int:
        """Start everything, serve until stopped; exit code 1 when a component failed.
        A file-system error at start-up is one line naming the path (WatcherError)."""
        try:
            return self._run()
        except OSError as exc:
            raise WatcherError(explain_os_error(exc)) from None

    def _run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        fix_mmap_threshold()
        mode = self.settings.mode
        platform = platform_for(mode)
        # A fresh container makes its host keys (RSA: 1-2 s) while the platform's client
        # library is imported and the first render made; sshd waits for them below.
        keygen = ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-keys")
        host_keys = keygen.submit(ensure_host_keys, self.paths.sshd.host_key_dir)
        keygen.shutdown(wait=False)
        client = platform.make_client(self.settings) if platform else None
        pin_names = False
        if client is None:
            if self.settings.labels:
                log.warning("SSH_TARGET_LABELS has no effect with MANUAL_AUTH_FILE=true "
                            "(there is no discovery to select targets)")
            fetch = _no_fetch
        else:
            pin_names = hosts_writable(self.paths.hosts)
            if not pin_names:
                log.warning("%s is not writable: only target names, ids and IPs are granted",
                            self.paths.hosts)
            fetch = self.metrics.counting_fetch(KeyFetcher(
                self.settings.publickey_api_port, self.settings.key_path, client.exec_read,
                sources=self.settings.key_sources).fetch)
        # The reconciler tells the access log of revoked keys; the access log asks it who
        # owns a key (looked up when a line arrives, after both exist).
        access = AccessLog(self.paths.access_log, lambda fp: reconciler.owners_of(fp),
                           lambda alias: reconciler.alias_owner(alias),
                           max_bytes=self.settings.access_log_max_bytes,
                           backups=self.settings.access_log_backups,
                           observe=self.metrics.access_event)
        writer = OutputWriter(self.paths, mode, pin_names, on_result=self.metrics.write_result)
        self.hostkeys = HostKeyLearner(self.paths.known_hosts,
                                       ssh_port(self.settings.permit_ports))
        self.writer, self.access = writer, access
        # The proxy's own names and addresses come from the platform's watcher on every
        # (re)connect, ahead of the first targets it lists.
        reconciler = Reconciler(self.settings, ProxyIdentity(), fetch,
                                writer,
                                self._publish, access.revoke, pin_names=pin_names,
                                unmanaged_hosts=lambda: read_unmanaged_hosts(self.paths.hosts),
                                local_names=local_names() if mode.discovers else frozenset(),
                                observe=self.metrics.applied)
        keys = ManualKeySource(reconciler, self.paths.keys_dir,
                               seed_file=None if mode.discovers else self.paths.cache)
        keys.load()
        reconciler.run_once_pending()  # the index exists before sshd starts

        if self.settings.metrics_port is not None:
            self.metrics.serve(self.settings.metrics_port)
            log.info("metrics on port %d (/metrics)", self.settings.metrics_port)
        listener = SyslogListener(str(self.paths.syslog_socket))
        # Its own stop: sshd's lines about tunnels that end during the drain still count.
        syslog_stop = threading.Event()
        self._thread(listener.serve, access, syslog_stop, name="syslog")
        # Targets are listed and their keys fetched while the host keys are still being
        # made: after a cold start the index is complete that much sooner.
        self._thread(reconciler.run, self.stop, name="reconcile")
        if platform is not None and client is not None:
            source = platform.make_watcher(client, CountingSink(reconciler, self.metrics),
                                           self.settings)
            self._thread(source.run, self.stop, name=f"{mode.value}-source")
        try:
            self._start_sshd(host_keys)
        except BaseException:
            self.stop.set()  # the source and the reconciler (its fetches cancelled) end too
            raise
        self._thread(keys.run, self.stop, name="manual-keys")
        self._thread(self.hostkeys.run, self.stop, name="hostkeys")
        self._thread(self.sshd.supervise, self.stop, name="sshd")
        try:
            # Health can answer from the first second; a status that cannot be written at
            # all (a wrong mount) stops the start, after sshd is stopped again.
            self._write_status(mode.value, strict=True)
            log.info("ready: mode=%s", mode.value)
            while not self.stop.wait(2.0):
                writer.retry()
                self._write_status(mode.value)
                _reap_orphans(self.sshd.pid)
        finally:
            self.sshd.stop()  # the listener: new logins are refused from here on
            log.info("stopping: sshd no longer accepts connections")
            self._drain()
            syslog_stop.set()
            listener.close()
            access.close()
            writer.close()
        return 1 if self.failed else 0

    def _drain(self) -> None:
        """Open tunnels get up to SSH_PROXY_DRAIN_SECONDS to end by themselves; the rest
        are cut, and the count logged."""
        proc = ProcFS()

        def connections() -> list[int]:
            _reap_orphans(None)  # the monitors are ours now that the listener is gone
            return open_connections(proc)

        seconds = self.settings.drain_seconds
        # A login still in progress would be let in after the stop and hold the drain: cut
        # at once (the client sees the connection closed before it got in).
        _, logins = split_connections(proc, connections(), login_uids())
        if logins:
            # Their pre-auth children too: orphaned, they would hold the drain themselves.
            children = [c for pid in logins for c in proc.children(pid)]
            cut_connections(sorted({*logins, *children}), connections)
            log.info("cut %d login(s) in progress (not authenticated at stop)", len(logins))
        pids = connections()
        if pids:
            log.info("draining %d open connection(s) for up to %d s", len(pids), seconds)
        result = drain(connections, seconds,
                       cut=lambda left: cut_connections(left, connections))
        if result.cut:
            log.warning("drain over: cut %d open connection(s) after %d s", result.cut, seconds)
        elif result.open_at_start:
            log.info("drained: all %d connection(s) ended by themselves", result.open_at_start)
        else:
            log.info("no open connection: nothing to drain")

    def _start_sshd(self, host_keys: Future[list[Path]]) -> None:
        paths = self.paths.sshd
        template = paths.template.read_text()
        # Atomic like every file sshd reads: a restarting sshd never sees half a config.
        atomic_write(paths.config, render_sshd_config(template, self.settings, paths,
                                                      host_keys.result()).encode())
        check_config(paths)
        self.sshd.start()

    def _publish(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        if self.hostkeys is not None:
            self.hostkeys.update(snapshot)

    def _write_errors(self) -> WriteErrors:
        """Why the rendered keys or access.log could not be written lately ("" = fine)."""
        return WriteErrors(rendered=self.writer.error if self.writer else "",
                           access_log=self.access.file.error if self.access else "")

    def _write_status(self, mode: str, strict: bool = False) -> None:
        try:
            write_status(self.paths.status, writer=self._status_writer, document=StatusDocument(
                heartbeat=time.time(), mode=mode, sshd_pid=self.sshd.pid,
                sshd_restarts=self.sshd.restarts,
                settings=SettingsView(
                    permit_hosts=self.settings.permit_hosts,
                    permit_ports=self.settings.permit_ports,
                    labels=tuple(f"{k}={v}" if v is not None else k
                                 for k, v in self.settings.labels)),
                state=self.snapshot or WatcherState(), write_errors=self._write_errors()))
        except OSError as exc:
            if strict:
                raise
            log.warning("cannot write %s: %s", self.paths.status, exc)


def login_uids() -> frozenset[int]:
    """The uids a logged-in connection's session child runs as (the tunnel user's)."""
    return uids_of(("limited-user",))


def local_names() -> frozenset[str]:
    """The proxy's own names as its resolver knows them (hostname, FQDN): never a
    target's. Read once at start-up (the hosts block never holds the proxy's address)."""
    names = {socket.gethostname()}
    try:
        names.add(socket.getfqdn())
    except OSError as exc:  # the FQDN is extra; the hostname is what matters
        log.warning("cannot resolve the proxy's FQDN: %s", exc)
    return frozenset(n for n in names if n)


def _no_fetch(target: Any) -> KeyState:
    return KeyState(status="failed", error="no discovery with MANUAL_AUTH_FILE=true")


def _reap_orphans(keep: int | None) -> None:
    """As PID 1, collect zombies reparented to us (never sshd: Popen waits on that one)."""
    if os.getpid() != 1:
        return
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == keep:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[0] == "Z" and fields[1] == "1":
            try:
                os.waitpid(int(entry.name), os.WNOHANG)
            except ChildProcessError:
                pass
