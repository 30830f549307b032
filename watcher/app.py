"""The supervisor: wires sources, the reconciler, sshd and the access log; PID 1 in the image."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from .accesslog import AccessEvent, AccessTracker, format_event, parse_datagram
from .cache import update_hosts_block, write_if_changed
from .config import Settings
from .fetch import KeyFetcher
from .model import KeyState
from .reconcile import Reconciler, Snapshot
from .render import Rendered
from .sources.docker import DockerSource
from .sources.manual import ManualKeySource
from .sshd import SshdPaths, SshdProcess, check_config, ensure_host_keys, render_sshd_config
from .status import snapshot_document, write_status
from .syslog_listener import SyslogListener
from .targets import ProxyIdentity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Paths:
    cache: Path = Path("/etc/ssh/authorized_keys_cache")
    hosts: Path = Path("/etc/hosts")
    access_log: Path = Path("/etc/ssh/access.log")
    status: Path = Path("/run/ssh-proxy/status.json")
    syslog_socket: Path = Path("/dev/log")
    keys_dir: Path = Path("/etc/ssh/authorized_keys.d")
    sshd: SshdPaths = field(default_factory=SshdPaths)


class OutputWriter:
    """The reconciler's single write path: hosts block, then index, then the cache."""

    def __init__(self, paths: Paths, pin_names: bool, write_cache: bool) -> None:
        self.paths = paths
        self.pin_names = pin_names
        self.write_cache = write_cache  # False in manual mode: there the cache is an input

    def __call__(self, rendered: Rendered) -> bool:
        changed = False
        if self.pin_names:
            # Names first, so a newly granted name resolves by the time sshd allows it.
            changed |= update_hosts_block(self.paths.hosts, rendered.hosts_block)
        changed |= write_if_changed(self.paths.sshd.index, rendered.index.encode())
        if self.write_cache:
            changed |= write_if_changed(self.paths.cache, rendered.cache.encode())
        return changed


def hosts_writable(path: Path) -> bool:
    return path.exists() and os.access(path, os.W_OK)


class AccessLog:
    """sshd syslog datagrams -> access events -> access.log and stdout."""

    def __init__(self, path: Path, owners: Callable[[str], tuple[str, ...]],
                 alias_owner: Callable[[str], str], stdout: TextIO = sys.stdout) -> None:
        self.path = path
        self.owners = owners
        self.alias_owner = alias_owner
        self.stdout = stdout
        # Tunnels may stay open for days; the pid cap bounds memory anyway.
        self.tracker = AccessTracker(max_idle=7 * 86400)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a", buffering=1, encoding="utf-8")
        os.chmod(path, 0o644)

    def __call__(self, datagram: bytes) -> None:
        try:
            self._handle(datagram)
        except Exception:  # one odd line must not take the access log (or the proxy) down
            log.exception("access log: cannot handle sshd line %r", datagram[:200])

    def _handle(self, datagram: bytes) -> None:
        parsed = parse_datagram(datagram)
        if parsed is None:
            return
        pid, message = parsed
        for event in self.tracker.feed(pid, message, time.time()):
            line = format_event(event, self.target_of(event))
            self.handle.write(line + "\n")
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
        self.handle.close()


class Supervisor:
    def __init__(self, settings: Settings, paths: Paths = Paths()) -> None:
        self.settings = settings
        self.paths = paths
        self.stop = threading.Event()
        self.snapshot: Snapshot | None = None
        self.sshd = SshdProcess(paths.sshd)
        self.threads: list[threading.Thread] = []
        self.failed = False  # a component crashed: exit non-zero so a restart policy acts

    def _thread(self, target: Callable[..., Any], *args: Any, name: str) -> None:
        def guarded() -> None:
            try:
                target(*args)
            except Exception:
                log.exception("%s failed; stopping", name)
                self.failed = True
                self.stop.set()
        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        manual = self.settings.manual_auth_file
        mode = "manual" if manual else "docker"
        source: DockerSource | None = None
        if manual:
            if self.settings.labels:
                log.warning("SSH_TARGET_LABELS has no effect with MANUAL_AUTH_FILE=true "
                            "(there is no discovery to select targets)")
            pin_names, identity, fetch = False, ProxyIdentity(), _no_fetch
        else:
            pin_names = hosts_writable(self.paths.hosts)
            if not pin_names:
                log.warning("%s is not writable: only target names, ids and IPs are granted",
                            self.paths.hosts)
            source = DockerSource(sink=None)
            identity = self._identity(source)
            fetch = KeyFetcher(self.settings.publickey_api_port, self.settings.key_path,
                               source.exec_read, sources=self.settings.key_sources).fetch
        reconciler = Reconciler(self.settings, identity, fetch,
                                OutputWriter(self.paths, pin_names, write_cache=not manual),
                                self._publish, pin_names=pin_names, scope_manual=not manual)
        keys = ManualKeySource(reconciler, self.paths.keys_dir,
                               seed_file=self.paths.cache if manual else None)
        keys.load()
        if source is not None:
            source.sink = reconciler
        reconciler.run_once_pending()  # the index exists before sshd starts

        listener = SyslogListener(str(self.paths.syslog_socket))
        access = AccessLog(self.paths.access_log, reconciler.owners_of, reconciler.alias_owner)
        self._thread(listener.serve, access, self.stop, name="syslog")
        self._start_sshd(hosts_enforced_by_sshd=manual)
        self._thread(reconciler.run, self.stop, name="reconcile")
        self._thread(keys.run, self.stop, name="manual-keys")
        if source is not None:
            self._thread(source.run, self.stop, name="docker-source")
        self._thread(self.sshd.supervise, self.stop, name="sshd")
        log.info("ready: mode=%s", mode)
        self._write_status(mode)  # health can answer from the first second
        try:
            while not self.stop.wait(2.0):
                self._write_status(mode)
                _reap_orphans(self.sshd.pid)
        finally:
            log.info("stopping")
            self.sshd.stop()
            listener.close()
            access.close()
        return 1 if self.failed else 0

    def _identity(self, source: DockerSource) -> ProxyIdentity:
        try:
            return source.discover_identity()
        except Exception as exc:  # the source loop reconnects; identity is refreshed there
            log.warning("could not inspect the proxy's own container yet: %s", exc)
            return ProxyIdentity()

    def _start_sshd(self, hosts_enforced_by_sshd: bool) -> None:
        paths = self.paths.sshd
        host_keys = ensure_host_keys(paths.host_key_dir)
        template = paths.template.read_text()
        paths.config.write_text(render_sshd_config(template, self.settings, paths, host_keys,
                                                   hosts_enforced_by_sshd))
        check_config(paths)
        self.sshd.start()

    def _publish(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def _write_status(self, mode: str) -> None:
        try:
            write_status(self.paths.status, snapshot_document(self.snapshot, {
                "mode": mode, "sshd_pid": self.sshd.pid, "sshd_restarts": self.sshd.restarts,
                "settings": {"permit_hosts": list(self.settings.permit_hosts),
                             "permit_ports": list(self.settings.permit_ports),
                             "labels": [f"{k}={v}" if v is not None else k
                                        for k, v in self.settings.labels]}}))
        except OSError as exc:
            log.warning("cannot write %s: %s", self.paths.status, exc)


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
