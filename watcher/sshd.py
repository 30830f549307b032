"""sshd: render its config, keep host keys, run it as a child and restart it if it dies."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Callable

import tenacity

from . import backoff
from .config import Settings
from .errors import WatcherError
from .sessions import ProcFS

log = logging.getLogger(__name__)

CUT_GRACE = 1.0  # seconds a cut connection gets to exit on SIGTERM before SIGKILL
STABLE_AFTER = 60.0  # seconds of sshd uptime after which its next crash is a first one
HOST_KEY_TYPES = (("ed25519", []), ("ecdsa", ["-b", "256"]), ("rsa", ["-b", "3072"]))


@dataclass(frozen=True)
class SshdPaths:
    template: Path = Path("/opt/ssh-proxy/sshd/sshd_config.template")
    config: Path = Path("/etc/ssh/sshd_config")
    host_key_dir: Path = Path("/etc/ssh/host_keys")
    keys_command: Path = Path("/usr/local/libexec/ssh-proxy/authorized-keys-command")
    keys_command_user: str = "nobody"
    # The login index: one file per fingerprint shard (render.SHARD_NAMES), sorted.
    index_dir: Path = Path("/etc/ssh/authorized_keys.index.d")
    # sshd's privilege separation dir: made at start, since a tmpfs /run (read-only root
    # filesystem) starts empty and even `sshd -t` refuses to run without it.
    privsep_dir: Path = Path("/run/sshd")
    sshd: str = "/usr/sbin/sshd"


def permit_open(settings: Settings) -> str:
    """sshd_config `PermitOpen`: the global ceiling every key's own permitopen sits under.

    With discovery, each key carries its target's aliases (names and IPs), so the ceiling
    only limits ports: `*:<port>`. A host list here would also have to list every alias.
    Without discovery (manual mode) it is the only host check: the listed hosts.
    """
    sshd_checks_hosts = not settings.mode.discovers and not settings.any_host
    hosts = list(settings.permit_hosts) if sshd_checks_hosts else ["*"]
    ports = list(settings.permit_ports)
    if hosts == ["*"] and ports == ["*"]:
        return "any"
    return " ".join(f"{h}:{p}" for h in hosts for p in ports)


# sshd's pre-authentication slots (sshd_config MaxStartups, PerSourceMaxStartups).
# A connection holds a slot from accept until it logs in or fails (LoginGraceTime, 30 s).
# - One source may hold PER_SOURCE_MAX_STARTUPS = 256 slots: a burst of 200 simultaneous
#   logins from one address (tests/e2e/test_lifecycle.py::test_200_concurrent_logins) fits
#   with 56 to spare; the 257th concurrent unauthenticated connection of that source is
#   refused ("Exceeded MaxStartups"), whatever the others do.
# - MaxStartups 512:50:1024: random early drop starts at 512 slots in use (2 sources at
#   their cap), 50% rising to 100% at 1024 (4 sources). So one noisy source, even
#   flooding, takes at most 256 of the 512 slots below any drop: every other source's
#   login is served exactly as when it is alone.
# - A source is an IPv4 address (/32) or an IPv6 /64, the block one client usually has.
MAX_STARTUPS = "512:50:1024"
PER_SOURCE_MAX_STARTUPS = 256
PER_SOURCE_NET_BLOCK_SIZE = "32:64"


def render_sshd_config(template: str, settings: Settings, paths: SshdPaths,
                       host_keys: list[Path]) -> str:
    return Template(template).substitute(
        host_keys="\n".join(f"HostKey {k}" for k in host_keys),
        keys_command=str(paths.keys_command),
        keys_command_user=paths.keys_command_user,
        index_dir=str(paths.index_dir),
        permit_open=permit_open(settings),
        max_startups=MAX_STARTUPS,
        per_source_max_startups=str(PER_SOURCE_MAX_STARTUPS),
        per_source_net_block_size=PER_SOURCE_NET_BLOCK_SIZE,
    )


def ensure_host_keys(directory: Path) -> list[Path]:
    """The host keys in `directory`; missing ones are generated once, when it is writable.

    A read-only directory (a Kubernetes Secret, a `:ro` volume) is used exactly as it is:
    every replica then presents the same host key, and nothing is regenerated.
    """
    if directory.exists() and not directory.is_dir():
        raise WatcherError(f"the host key directory {directory} is not a directory: remove the "
                           "file in its place, or mount a directory (or a Secret) there")
    directory.mkdir(parents=True, exist_ok=True)
    writable = os.access(directory, os.W_OK)
    keys = []
    for kind, extra in HOST_KEY_TYPES:
        path = directory / f"ssh_host_{kind}_key"
        if not path.exists():
            if not writable:
                continue
            log.info("generating %s host key in %s", kind, directory)
            _keygen(kind, extra, path)
        if path.stat().st_mode & 0o077 and writable:
            path.chmod(0o600)  # sshd refuses a private key others can read
        keys.append(path)
    if not keys:
        raise WatcherError(f"no host key in {directory}, and it is read-only: put at least one of "
                           + ", ".join(f"ssh_host_{kind}_key" for kind, _ in HOST_KEY_TYPES)
                           + " there (e.g. a Secret made with ssh-keygen), or mount it writable")
    return keys


def _keygen(kind: str, extra: list[str], path: Path) -> None:
    result = subprocess.run(["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", "ssh-proxy",
                             "-f", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        for made in (path, path.with_name(path.name + ".pub")):  # never a half-made key
            made.unlink(missing_ok=True)
        said = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise WatcherError(f"ssh-keygen could not generate the {kind} host key {path}: {said}; "
                           f"check that {path.parent} is writable with free space, or mount "
                           "host keys made beforehand with ssh-keygen there")


def check_config(paths: SshdPaths) -> None:
    """`sshd -t`: refuse to start on a config sshd would reject, with its own words."""
    paths.privsep_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    result = subprocess.run([paths.sshd, "-t", "-f", str(paths.config)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise WatcherError(f"sshd rejected {paths.config}: {result.stderr.strip()}")


class SshdProcess:
    """sshd -D as a child; restarted with backoff if it exits while we are running."""

    def __init__(self, paths: SshdPaths) -> None:
        self.paths = paths
        self.process: subprocess.Popen | None = None
        self.restarts = 0  # in all, for status
        self._failures = 0  # in a row, for the backoff
        self._started_at = 0.0
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.poll() is None else None

    def start(self) -> None:
        self.paths.privsep_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        with self._lock:
            self.process = subprocess.Popen([self.paths.sshd, "-D", "-f", str(self.paths.config)],
                                            stdin=subprocess.DEVNULL)
            self._started_at = time.monotonic()
        log.info("sshd started pid=%d", self.process.pid)

    def supervise(self, stop: threading.Event) -> None:
        """Wait on sshd; when it dies unexpectedly, start it again (tenacity backoff)."""
        wait = tenacity.wait_exponential(multiplier=0.5, max=30)
        while not stop.is_set():
            process = self.process
            if process is None:
                return
            while process.poll() is None:
                if stop.wait(0.5):
                    return
            self.restarts += 1
            # A crash after a long healthy run starts the backoff over.
            stable = time.monotonic() - self._started_at > STABLE_AFTER
            self._failures = 1 if stable else self._failures + 1
            delay = backoff.delay(wait, self._failures)
            log.error("sshd exited with status %s; restarting in %.1fs", process.returncode, delay)
            if stop.wait(delay):
                return
            self.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()



# ---- stop: drain the open connections --------------------------------------------------
def open_connections(proc: ProcFS) -> list[int]:
    """Pids of the per-connection sshd processes still running once the listener is gone:
    sshd processes whose parent is not sshd (their post-auth children have one). Exited
    ones not reaped yet (zombies) are not counted."""
    found = []
    for entry in proc.root.iterdir():
        if not entry.name.isdigit() or _zombie(entry):
            continue
        info = proc.info(int(entry.name))
        if info is None or not proc.is_sshd(info):
            continue
        parent = proc.info(info.ppid)
        if parent is None or not proc.is_sshd(parent):
            found.append(info.pid)
    return sorted(found)


def split_connections(proc: ProcFS, pids: list[int],
                      login_uids: frozenset[int]) -> tuple[list[int], list[int]]:
    """(tunnels, logins in progress) among the connections' monitor pids. A connection is
    a tunnel once its monitor has a child running as a login user (the post-auth child);
    before that (no child yet, or the pre-auth child as sshd's privsep user) it is a login
    in progress, which must not be let in after the stop. Gone pids are in neither."""
    tunnels, logins = [], []
    for pid in pids:
        if proc.info(pid) is None:
            continue
        if any(proc.uid(child) in login_uids for child in proc.children(pid)):
            tunnels.append(pid)
        else:
            logins.append(pid)
    return tunnels, logins


def _zombie(entry: Path) -> bool:
    try:
        stat = (entry / "stat").read_text()
    except OSError:
        return True  # gone
    return stat[stat.rindex(")") + 2:].startswith("Z")


@dataclass(frozen=True)
class DrainResult:
    open_at_start: int
    cut: int


def drain(connections: Callable[[], list[int]], seconds: float, cut: Callable[[list[int]], None],
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], object] = time.sleep, poll: float = 0.2) -> DrainResult:
    """Let the open connections end by themselves for up to `seconds`, then `cut` those
    still open. Returns at once when none is open."""
    pids = connections()
    at_start = len(pids)
    deadline = clock() + seconds
    while pids and clock() < deadline:
        sleep(min(poll, max(0.0, deadline - clock())))
        pids = connections()
    if pids:
        cut(pids)
    return DrainResult(open_at_start=at_start, cut=len(pids))


def cut_connections(pids: list[int], connections: Callable[[], list[int]],
                    sleep: Callable[[float], object] = time.sleep) -> None:
    """SIGTERM each connection's monitor (it passes the signal to its session child, and
    sshd logs the close); SIGKILL whichever is still there after CUT_GRACE."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    waited = 0.0
    while waited < CUT_GRACE and set(pids) & set(connections()):
        sleep(0.1)
        waited += 0.1
    for pid in set(pids) & set(connections()):
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # ended meanwhile: nothing to cut
        pass
