"""Docker, the client half: inspect containers as Targets, read key files by exec, and know
the proxy's own container. `docker_watcher` follows the events stream with it.
"""

from __future__ import annotations

import logging
import re
import select
import socket
import time
from pathlib import Path
from typing import Any, Callable

import docker
import docker.errors
import requests

from ..config import Settings
from ..errors import FetchError, FetchTimeout, SourceError
from ..model import Target
from ..targets import ProxyIdentity

log = logging.getLogger(__name__)

# Container actions that change whether a container is a target or how it is reached, and
# health_status (its health check passed: a key it lacked is fetched now). Everything else
# (exec_*, attach ...) is filtered out server-side, which also keeps our own key-fetch execs
# from echoing back as events. "health_status" makes the engine match every filter value
# as a prefix of the action ("health_status: healthy"); none of these is a prefix of another
# action we would not want.
CONTAINER_EVENTS = ("start", "restart", "unpause", "pause", "die", "stop", "kill", "destroy",
                    "rename", "update", "health_status")
NETWORK_EVENTS = ("connect", "disconnect")
_CONTAINER_ID = re.compile(r"/(?:docker/containers|docker|containers)/([0-9a-f]{64})")


# ---- pure: container inspect attrs -> Target ------------------------------------------------
def container_target(attrs: dict[str, Any], proxy_networks: set[str] | None) -> Target:
    """A Target from `docker inspect` attrs; `proxy_networks` = network ids the proxy is on
    (None when the proxy does not run in a container: every network is reachable)."""
    config = attrs.get("Config") or {}
    state = attrs.get("State") or {}
    networks = ((attrs.get("NetworkSettings") or {}).get("Networks") or {})
    address = ""
    own_ips: list[str] = []
    extra: list[str] = []
    for net_name in sorted(networks):
        net = networks[net_name] or {}
        if proxy_networks is not None and net.get("NetworkID") not in proxy_networks:
            continue
        ip = net.get("IPAddress") or ""
        if ip and not address:
            address = ip
        elif ip:
            own_ips.append(ip)
        for alias in (net.get("Aliases") or []) + (net.get("DNSNames") or []):
            extra.append(alias)
    cid = attrs.get("Id", "")
    name = (attrs.get("Name") or "").lstrip("/")
    hostname = config.get("Hostname") or ""
    aliases = tuple(dict.fromkeys(a for a in extra if a not in (name, cid[:12], address)))
    addresses = tuple(dict.fromkeys(ip for ip in own_ips if ip != address))
    labels = tuple(sorted((config.get("Labels") or {}).items()))
    return Target(id=cid, name=name, address=address,
                  hostname="" if hostname == cid[:12] else hostname,
                  aliases=aliases, addresses=addresses, labels=labels, source="docker",
                  started_at=state.get("StartedAt", ""))


def is_running(attrs: dict[str, Any]) -> bool:
    state = attrs.get("State") or {}
    return bool(state.get("Running")) and not state.get("Paused") and not state.get("Restarting")


def own_container_id(mountinfo: str, cgroup: str) -> str:
    """The proxy's own container id from /proc/self/{mountinfo,cgroup} ("" outside Docker).

    mountinfo names /var/lib/docker/containers/<id>/ (hostname, resolv.conf mounts) on
    cgroup v1 and v2 alike; cgroup v1 paths are the fallback.
    """
    for text in (mountinfo, cgroup):
        match = _CONTAINER_ID.search(text)
        if match:
            return match.group(1)
    return ""


def identity_from_attrs(attrs: dict[str, Any]) -> ProxyIdentity:
    networks = ((attrs.get("NetworkSettings") or {}).get("Networks") or {})
    names = {(attrs.get("Name") or "").lstrip("/"), (attrs.get("Config") or {}).get("Hostname", ""),
             attrs.get("Id", "")[:12]}
    addresses = {n.get("IPAddress") for n in networks.values() if n and n.get("IPAddress")}
    for net in networks.values():
        names.update((net or {}).get("Aliases") or [])
    return ProxyIdentity(names=frozenset(n for n in names if n),
                         addresses=frozenset(a for a in addresses if a),
                         container_id=attrs.get("Id", ""))


def demux_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Take the complete frames of Docker's multiplexed stream off the front of `buffer`:
    8-byte header (stream 1 = stdout, 2 = stderr; 3 zero bytes; big-endian size), payload."""
    frames = []
    while len(buffer) >= 8:
        size = int.from_bytes(buffer[4:8], "big")
        if len(buffer) < 8 + size:
            break
        frames.append((buffer[0], bytes(buffer[8:8 + size])))
        del buffer[:8 + size]
    return frames


def read_exec_stream(sock: socket.socket, limit: int,
                     deadline: float) -> tuple[bytearray, bytearray, bool]:
    """(stdout, stderr, reached end) from an exec socket; stops at `limit` stdout bytes or
    at the deadline, whichever comes first."""
    buffer, out, err = bytearray(), bytearray(), bytearray()
    while len(out) < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
            return out, err, False
        chunk = sock.recv(65536)
        if not chunk:
            return out, err, True
        buffer += chunk
        for stream, data in demux_frames(buffer):
            if stream == 2:
                err += data[: max(0, 1024 - len(err))]
            else:
                out += data
    return out, err, False


# ---- adapter ------------------------------------------------------------------------------------
class DockerClient:
    """The engine as the watcher needs it: targets by id, a listing, exec reads, identity."""

    def __init__(self, base_url: str | None = None,
                 client_factory: Callable[[], docker.DockerClient] | None = None) -> None:
        self.exec_timeout = 5.0  # seconds for one key-file read by exec
        self.base_url = base_url or "unix:///var/run/docker.sock"
        self._factory = client_factory or (
            lambda: docker.DockerClient(base_url=self.base_url, timeout=15))
        self.client: docker.DockerClient | None = None
        self.identity = ProxyIdentity()
        self.proxy_networks: set[str] | None = None

    def reset(self) -> None:
        """Forget the connection: the next call connects anew (after a stream broke)."""
        self.client = None

    def api(self) -> Any:
        return self._client().api

    def ping(self) -> None:
        self._client().ping()
    # -- identity --
    def discover_identity(self) -> ProxyIdentity:
        """Who the proxy itself is, so it never serves itself and shares networks right."""
        client = self._client()
        cid = own_container_id(_read("/proc/self/mountinfo"), _read("/proc/self/cgroup"))
        if not cid:
            self.proxy_networks = None
            self.identity = ProxyIdentity()
            return self.identity
        try:
            attrs = client.api.inspect_container(cid)
        except docker.errors.NotFound:
            self.proxy_networks = None
            self.identity = ProxyIdentity(container_id=cid)
            return self.identity
        self.identity = identity_from_attrs(attrs)
        networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
        self.proxy_networks = {n.get("NetworkID") for n in networks.values() if n}
        return self.identity

    def _client(self) -> docker.DockerClient:
        if self.client is None:
            try:
                self.client = self._factory()
            except docker.errors.DockerException as exc:
                raise SourceError(f"cannot reach the Docker engine at {self.base_url}: {exc}; "
                                  "mount the socket with "
                                  "-v /var/run/docker.sock:/var/run/docker.sock") from exc
        return self.client

    # -- listing --
    def list_targets(self) -> list[Target]:
        client = self._client()
        out = []
        for summary in client.api.containers(filters={"status": "running"}):
            target = self.inspect_target(summary["Id"])
            if target is not None:
                out.append(target)
        return out

    def inspect_target(self, container_id: str) -> Target | None:
        """The container as a Target, or None when it is gone, not running or the proxy."""
        if container_id == self.identity.container_id:
            return None
        try:
            attrs = self._client().api.inspect_container(container_id)
        except docker.errors.NotFound:
            return None
        if not is_running(attrs):
            return None
        return container_target(attrs, self.proxy_networks)

    # -- exec: the key-file fallback --
    def exec_read(self, target: Target, argv: list[str], limit: int) -> bytes:
        """Run argv in the container, return at most `limit` bytes of stdout (stderr apart).

        docker-py reads exec output with socket timeouts disabled, so a key file that never
        ends (a FIFO, /dev/zero...) would hold a fetch worker forever: read the raw stream
        ourselves, under one overall deadline.
        """
        api = self._client().api
        try:
            exec_id = api.exec_create(target.id, argv, stdout=True, stderr=True)["Id"]
            sock = api.exec_start(exec_id, socket=True)
            try:
                out, err, complete = read_exec_stream(getattr(sock, "_sock", sock), limit,
                                                      time.monotonic() + self.exec_timeout)
            finally:
                sock.close()
            if not complete:
                if len(out) >= limit:
                    return bytes(out[:limit])
                raise FetchTimeout(f"exec {argv[-1]!s} in {target.name} did not finish "
                                   f"within {self.exec_timeout:.0f}s")
            code = api.exec_inspect(exec_id).get("ExitCode")
        except (docker.errors.APIError, requests.RequestException, OSError) as exc:
            raise FetchError(f"exec in {target.name} failed: {exc}") from exc
        if code not in (0, None):
            detail = err.decode(errors="replace").strip().splitlines()[:1]
            raise FetchError(f"exec {' '.join(argv[-1:])!s} in {target.name} exited {code}"
                             + (f": {detail[0][:200]}" if detail else ""))
        return bytes(out)


    def events(self) -> Any:
        """The engine's events stream, filtered server-side to what changes targets."""
        return self._client().api.events(decode=True, filters={
            "type": ["container", "network"],
            "event": list(CONTAINER_EVENTS + NETWORK_EVENTS)})


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def from_settings(settings: Settings) -> DockerClient:
    """The platform entry point (see watcher.platforms)."""
    return DockerClient(base_url=settings.docker_host)
