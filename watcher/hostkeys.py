"""The targets' SSH host keys, learned by a keyscan and kept as known_hosts lines.

Users reach a target with strict host-key checking instead of trusting its key on first use:
the watcher scans each granted target's SSH port at the address it reaches it by (the
network it shares with the target), validates the keys with `keys.py`, and writes them,
keyed by the target's granted names only, to HOST_KEYS_PATH (`watcher known-hosts` prints
it). A key is tied to one target at one address: a target that goes, or whose address
changes, loses its keys; a re-created target (new container, same name) is scanned afresh.

Pure: `ssh_port`, `wanted`, `parse_scan`, `render`. Adapter: `keyscan` (runs ssh-keyscan)
and `HostKeyLearner` (a component fed the reconciler's published snapshots; the only
writer of HOST_KEYS_PATH).
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import tenacity

from .cache import write_if_changed
from .errors import KeyRejected, WatcherError
from .keys import parse_public_key
from .model import PublicKey
from .snapshot import WatcherState
from .targets import valid_name

log = logging.getLogger(__name__)

HOST_KEYS_PATH = Path("/etc/ssh/target_known_hosts")
DEFAULT_SSH_PORT = 22
MAX_HOST_KEYS = 16  # per target: ssh-keyscan asks for one key of each of a handful of types
HEADER = ("# Host keys of the ssh-proxy targets, learned by the watcher (ssh-keyscan) and\n"
          "# keyed by each target's granted names. Written by the watcher: do not edit.\n")


class HostKeyError(WatcherError):
    """A target's host keys could not be had (no answer, or nothing valid); says why."""


# --- pure ----------------------------------------------------------------------------------


def ssh_port(permit_ports: Iterable[str]) -> int:
    """The targets' SSH port: the one port of SSH_PERMIT_TARGET_PORT when it permits exactly
    one literal port (no other port could be reached through the proxy), else 22."""
    ports = tuple(permit_ports)
    if len(ports) == 1 and ports[0].isdigit():
        return int(ports[0])
    return DEFAULT_SSH_PORT


@dataclass(frozen=True)
class ScanSubject:
    """One target at one address: a new container (id) or a new address is a new subject,
    whose keys are learned afresh; the old subject's keys are dropped."""

    target_id: str
    address: str
    port: int = DEFAULT_SSH_PORT

    @property
    def scanned_host(self) -> str:
        """How ssh-keyscan names the host in its answer lines."""
        return self.address if self.port == DEFAULT_SSH_PORT else f"[{self.address}]:{self.port}"


@dataclass(frozen=True)
class Wanted:
    """A granted target whose host keys are wanted, with the names they are keyed by."""

    subject: ScanSubject
    name: str
    names: tuple[str, ...]


def host_pattern(name: str, port: int) -> str:
    """A name as known_hosts writes it: `[name]:port` when the port is not 22."""
    return name if port == DEFAULT_SSH_PORT else f"[{name}]:{port}"


def is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def known_host_names(aliases: Iterable[str]) -> tuple[str, ...]:
    """The granted aliases that may key a known_hosts line: host names and IP addresses
    only (no ',', space, glob or '!' could slip in and widen the line to other hosts)."""
    return tuple(a for a in aliases if valid_name(a) or is_address(a))


def wanted(state: WatcherState, port: int) -> dict[str, Wanted]:
    """Target id -> what to learn, for every served target with an address and a name."""
    out: dict[str, Wanted] = {}
    for target in state.targets:
        names = known_host_names(target.aliases)
        if target.address and names:
            out[target.id] = Wanted(ScanSubject(target.id, target.address, port),
                                    target.name, names)
    return out


def parse_scan(output: str, subject: ScanSubject) -> tuple[tuple[PublicKey, ...], tuple[str, ...]]:
    """ssh-keyscan's stdout -> (valid keys, a reason per line refused).

    Only lines about the scanned host count; each key passes `keys.parse_public_key`
    (the same checks as a user key), comments dropped, duplicates once."""
    keys: dict[str, PublicKey] = {}
    problems: list[str] = []
    for number, raw in enumerate(output.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        host, _, rest = line.partition(" ")
        if host != subject.scanned_host:
            problems.append(f"line {number}: an answer for another host")
            continue
        try:
            key = parse_public_key(rest)
        except KeyRejected as exc:
            problems.append(f"line {number}: {exc}")
            continue
        keys.setdefault(key.line(), PublicKey(key.key_type, key.blob_b64, "", key.fingerprint,
                                              key.bits))
    if len(keys) > MAX_HOST_KEYS:
        problems.append(f"{len(keys)} keys: only the first {MAX_HOST_KEYS} kept")
    return tuple(keys.values())[:MAX_HOST_KEYS], tuple(problems)


def render(targets: Mapping[str, Wanted],
           learned: Mapping[ScanSubject, tuple[PublicKey, ...]]) -> str:
    """The known_hosts file: per target (by name) its keys, each on the target's names."""
    out = [HEADER]
    for want in sorted(targets.values(), key=lambda w: (w.name, w.subject.target_id)):
        keys = learned.get(want.subject)
        if not keys:
            continue
        hosts = ",".join(host_pattern(n, want.subject.port) for n in want.names)
        out.append(f"# {want.names[0]}\n")
        out.extend(f"{hosts} {key.line()}\n" for key in keys)
    return "".join(out)


# --- adapter -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanPolicy:
    """How hard to try: a target's sshd may still be starting when the target is granted."""

    timeout: int = 5  # ssh-keyscan -T: seconds per connection
    workers: int = 4  # scans at once
    attempts: int = 8
    max_total: float = 90.0  # seconds of retrying one subject
    max_wait: float = 15.0  # longest pause between two attempts
    again_after: float = 300.0  # a subject that gave up is tried again this much later


def keyscan(subject: ScanSubject, timeout: int = 5) -> str:
    """ssh-keyscan of one target: its stdout (key lines), or HostKeyError saying why not."""
    # The usual host key types only: each type is a connection of its own, and security-key
    # types would only fill the target's log with failed negotiations.
    argv = ["ssh-keyscan", "-T", str(timeout), "-t", "ed25519,ecdsa,rsa", "-p", str(subject.port),
            "--", subject.address]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=timeout * 4, check=False)
    except subprocess.TimeoutExpired as exc:
        raise HostKeyError(f"ssh-keyscan of {subject.scanned_host} did not finish in "
                           f"{timeout * 4} s") from exc
    except OSError as exc:
        raise HostKeyError(f"cannot run ssh-keyscan ({exc}): is openssh-client installed?") from exc
    if not proc.stdout.strip():
        said = [line for line in proc.stderr.splitlines() if line and not line.startswith("#")]
        raise HostKeyError(f"no host key from {subject.scanned_host}"
                           + (f": {said[-1][:200]}" if said else " (is its sshd up?)"))
    return proc.stdout


class HostKeyLearner:
    """Keeps HOST_KEYS_PATH in step with the published snapshots.

    `update` (the reconcile thread) only hands over the newest snapshot; `run` (its own
    thread) is the single writer: it drops the keys of subjects no longer wanted, starts
    scans (a bounded pool; tenacity retries while the target's sshd boots) and writes the
    file whenever what it would hold changes. A scan that ends after its subject went away
    is discarded, so a key can only ever be written on the names of the target scanned.
    """

    def __init__(self, path: Path, port: int,
                 scan: Callable[[ScanSubject], str] | None = None,
                 policy: ScanPolicy = ScanPolicy(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.port = port
        self.policy = policy
        self.scan = scan or (lambda subject: keyscan(subject, policy.timeout))
        self.clock = clock
        self.error = ""  # why the file could not be written lately ("" = it was)
        self._state: WatcherState | None = None
        self._wanted: dict[str, Wanted] = {}
        self._learned: dict[ScanSubject, tuple[PublicKey, ...]] = {}
        self._scanning: set[ScanSubject] = set()
        self._gave_up: dict[ScanSubject, float] = {}  # subject -> when
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop = threading.Event()

    def update(self, state: WatcherState) -> None:
        """The newest snapshot (cheap: the reconciler must never wait on a scan)."""
        with self._lock:
            self._state = state
        self._changed.set()

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        pool = ThreadPoolExecutor(self.policy.workers, thread_name_prefix="hostkeys")
        try:
            while not stop.is_set():
                self.sync(pool.submit)
                # Wake up for a new snapshot or a finished scan; else now and then, to try
                # again what gave up (or a write that failed).
                self._changed.wait(2.0 if self.error else 30.0)
                self._changed.clear()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def sync(self, submit: Callable[..., Future]) -> None:
        """One round: forget what is no longer wanted, start what is missing, write."""
        with self._lock:
            if self._state is None:
                return  # nothing published yet: keep the file of the previous run as it is
            self._wanted = wanted(self._state, self.port)
            subjects = {w.subject for w in self._wanted.values()}
            self._learned = {s: k for s, k in self._learned.items() if s in subjects}
            self._gave_up = {s: t for s, t in self._gave_up.items() if s in subjects}
            now = self.clock()
            due = [s for s in subjects
                   if s not in self._learned and s not in self._scanning
                   and now - self._gave_up.get(s, -self.policy.again_after) >= self.policy.again_after]
            self._scanning.update(due)
        for subject in sorted(due, key=lambda s: s.target_id):
            submit(self._learn, subject)
        with self._lock:
            text = render(self._wanted, self._learned)
        self._write(text)

    def _wanted_now(self, subject: ScanSubject) -> bool:
        with self._lock:
            want = self._wanted.get(subject.target_id)
            return want is not None and want.subject == subject

    def _learn(self, subject: ScanSubject) -> None:
        keys: tuple[PublicKey, ...] = ()
        try:
            keys = self._scan_with_retries(subject)
        except HostKeyError as exc:
            if self._wanted_now(subject):  # else the target went (or moved) meanwhile
                log.warning("target %s at %s: no host key learned: %s; strict ssh clients "
                            "refuse it until one is (tried again in %d s)", subject.target_id,
                            subject.scanned_host, exc, self.policy.again_after)
        except Exception:  # a scan must never take the learner down
            log.exception("target %s: host key scan failed", subject.target_id)
        with self._lock:
            self._scanning.discard(subject)
            want = self._wanted.get(subject.target_id)
            if keys and want is not None and want.subject == subject:
                self._learned[subject] = keys
                log.info("target %s: learned %d host key(s)", want.name, len(keys))
            elif not keys:
                self._gave_up[subject] = self.clock()
        self._changed.set()

    def _scan_with_retries(self, subject: ScanSubject) -> tuple[PublicKey, ...]:
        policy = self.policy
        for attempt in tenacity.Retrying(
                stop=tenacity.stop_any(tenacity.stop_after_attempt(policy.attempts),
                                       tenacity.stop_after_delay(policy.max_total),
                                       lambda _: self._stop.is_set()
                                       or not self._wanted_now(subject)),
                wait=tenacity.wait_exponential(multiplier=0.5, max=policy.max_wait),
                retry=tenacity.retry_if_exception_type(HostKeyError),
                sleep=self._stop.wait, reraise=True):
            with attempt:
                keys, problems = parse_scan(self.scan(subject), subject)
                for problem in problems:
                    log.warning("target %s: host key refused: %s", subject.target_id, problem)
                if not keys:
                    raise HostKeyError(f"no valid host key from {subject.scanned_host}")
                return keys
        raise AssertionError("unreachable: tenacity reraises the last error")

    def _write(self, text: str) -> None:
        try:
            write_if_changed(self.path, text.encode())
        except OSError as exc:
            if not self.error:
                log.error("cannot write %s (%s): `watcher known-hosts` shows the previous "
                          "keys; retried every 2 s (free space in %s)", self.path, exc,
                          self.path.parent)
            self.error = str(exc)
            return
        if self.error:
            log.info("%s written again (the earlier error was: %s)", self.path, self.error)
            self.error = ""
