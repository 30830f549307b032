"""watcher.sources.docker_client / docker_watcher: the pure inspect/event helpers and the adapter with a fake client."""

from __future__ import annotations

import copy
import queue
from typing import Any, Iterator

import docker.errors
import socket as _socket
import threading
import time

import pytest
import requests

from watcher.errors import FetchError
from watcher.model import Target
from watcher.sources import docker_client as docker_source
from watcher.sources.docker_client import (
    DockerClient,
    demux_frames,
    container_target,
    identity_from_attrs,
    is_running,
    own_container_id,
)
from watcher.sources.docker_watcher import (DockerWatcher, event_action, event_container_id,
                                            event_health)

WEB_ID = "3f4e8a2b1c9d" + "0123456789abcdef" * 3 + "0123"
DB_ID = "9a8b7c6d5e4f" + "fedcba9876543210" * 3 + "3210"
HOSTNET_ID = "5d5d5d5d5d5d" + "1111222233334444" * 3 + "5555"
PROXY_ID = "c0ffee123456" + "abcdefabcdefabcd" * 3 + "abcd"
BRIDGE_NET = "b" * 64
FRONTEND_NET = "f1" * 32
BACKEND_NET = "ba" * 32
HOST_NET = "40" * 32

assert all(len(i) == 64 for i in (WEB_ID, DB_ID, HOSTNET_ID, PROXY_ID))


def _endpoint(network_id: str, ip: str, aliases: list[str] | None,
              dns_names: list[str] | None, gateway: str = "") -> dict[str, Any]:
    return {"IPAMConfig": None, "Links": None, "Aliases": aliases, "MacAddress": "02:42:ac:11:00:02",
            "DriverOpts": None, "NetworkID": network_id, "EndpointID": "e" * 64,
            "Gateway": gateway, "IPAddress": ip, "IPPrefixLen": 16 if ip else 0,
            "IPv6Gateway": "", "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0,
            "DNSNames": dns_names}


# `docker inspect` of `docker run -d --name web -l com.example.role=web nginx` (default bridge).
WEB_BRIDGE: dict[str, Any] = {
    "Id": WEB_ID,
    "Created": "2024-05-01T10:00:00.000000000Z",
    "Path": "/docker-entrypoint.sh",
    "Args": ["nginx", "-g", "daemon off;"],
    "State": {"Status": "running", "Running": True, "Paused": False, "Restarting": False,
              "OOMKilled": False, "Dead": False, "Pid": 4242, "ExitCode": 0, "Error": "",
              "StartedAt": "2024-05-01T10:00:01.123456789Z",
              "FinishedAt": "0001-01-01T00:00:00Z"},
    "Image": "sha256:" + "1" * 64,
    "Name": "/web",
    "RestartCount": 0,
    "HostConfig": {"NetworkMode": "default"},
    "Config": {"Hostname": WEB_ID[:12], "Domainname": "", "User": "",
               "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
               "Cmd": ["nginx", "-g", "daemon off;"], "Image": "nginx",
               "Labels": {"com.example.role": "web", "maintainer": "NGINX"}},
    "NetworkSettings": {
        "Bridge": "", "SandboxID": "s" * 64, "Ports": {"80/tcp": None},
        "Networks": {"bridge": _endpoint(BRIDGE_NET, "172.17.0.2", None, None, "172.17.0.1")},
    },
}

# `docker run -d --name db --hostname db-host --network app --network-alias postgres
#  --network-alias primary postgres` (user network: Aliases and, Docker >= 25, DNSNames).
DB_USER_NET: dict[str, Any] = {
    "Id": DB_ID,
    "State": {"Status": "running", "Running": True, "Paused": False, "Restarting": False,
              "Pid": 4343, "StartedAt": "2024-05-01T11:00:00.5Z"},
    "Name": "/db",
    "HostConfig": {"NetworkMode": "app"},
    "Config": {"Hostname": "db-host", "Labels": {}},
    "NetworkSettings": {"Networks": {
        "app": _endpoint(FRONTEND_NET, "172.20.0.5", ["postgres", "primary", DB_ID[:12]],
                         ["db", DB_ID[:12], "postgres", "primary"], "172.20.0.1"),
    }},
}

# Two networks; the proxy is only on "frontend".
WEB_TWO_NETS: dict[str, Any] = {
    "Id": WEB_ID,
    "State": {"Status": "running", "Running": True, "Paused": False, "Restarting": False,
              "StartedAt": "2024-05-02T09:00:00Z"},
    "Name": "/api",
    "Config": {"Hostname": WEB_ID[:12], "Labels": None},
    "NetworkSettings": {"Networks": {
        "frontend": _endpoint(FRONTEND_NET, "172.20.0.7", ["api-public"],
                              ["api", WEB_ID[:12], "api-public"]),
        "backend": _endpoint(BACKEND_NET, "172.21.0.7", ["api-internal"],
                             ["api", WEB_ID[:12], "api-internal"]),
    }},
}

# `docker run --network host --name hostnet ...`: no IP, the host's hostname.
HOSTNET: dict[str, Any] = {
    "Id": HOSTNET_ID,
    "State": {"Status": "running", "Running": True, "Paused": False, "Restarting": False,
              "StartedAt": "2024-05-03T08:00:00Z"},
    "Name": "/hostnet",
    "HostConfig": {"NetworkMode": "host"},
    "Config": {"Hostname": "docker-host", "Labels": {"ssh-proxy": "on"}},
    "NetworkSettings": {"Networks": {"host": _endpoint(HOST_NET, "", None, None)}},
}

PROXY_ATTRS: dict[str, Any] = {
    "Id": PROXY_ID,
    "State": {"Running": True, "StartedAt": "2024-05-01T09:00:00Z"},
    "Name": "/ssh-proxy",
    "Config": {"Hostname": "proxy-host", "Labels": {}},
    "NetworkSettings": {"Networks": {
        "frontend": _endpoint(FRONTEND_NET, "172.20.0.2", ["jump"], ["ssh-proxy", "jump"]),
    }},
}


# --- container_target ---------------------------------------------------------------------

def test_default_bridge() -> None:
    t = container_target(WEB_BRIDGE, None)
    assert t == Target(id=WEB_ID, name="web", address="172.17.0.2", hostname="", aliases=(),
                       labels=(("com.example.role", "web"), ("maintainer", "NGINX")),
                       source="docker", started_at="2024-05-01T10:00:01.123456789Z")


def test_default_bridge_not_shared_with_proxy() -> None:
    t = container_target(WEB_BRIDGE, {FRONTEND_NET})
    assert t.address == ""
    assert t.aliases == ()
    assert t.name == "web"


def test_user_network_aliases_and_dns_names() -> None:
    t = container_target(DB_USER_NET, {FRONTEND_NET})
    assert t.name == "db"
    assert t.address == "172.20.0.5"
    assert t.hostname == "db-host"
    # The name, short id and address are not repeated as aliases; duplicates are dropped.
    assert t.aliases == ("postgres", "primary")
    assert t.labels == ()
    assert t.started_at == "2024-05-01T11:00:00.5Z"


def test_two_networks_only_the_shared_one_counts() -> None:
    t = container_target(WEB_TWO_NETS, {FRONTEND_NET})
    assert t.name == "api"
    assert t.address == "172.20.0.7"
    assert t.aliases == ("api-public",)
    assert t.hostname == ""
    assert t.labels == ()


def test_two_networks_proxy_outside_docker_sees_all() -> None:
    t = container_target(WEB_TWO_NETS, None)
    # Networks are taken in name order: backend first gives the address.
    assert t.address == "172.21.0.7"
    assert t.aliases == ("api-internal", "api-public")
    assert t.addresses == ("172.20.0.7",)


def test_network_mode_host() -> None:
    t = container_target(HOSTNET, None)
    assert t.address == ""
    assert t.aliases == ()
    assert t.hostname == "docker-host"
    assert t.labels == (("ssh-proxy", "on"),)
    assert container_target(HOSTNET, {FRONTEND_NET}).address == ""


def test_minimal_and_missing_fields() -> None:
    t = container_target({"Id": WEB_ID}, None)
    assert t == Target(id=WEB_ID, name="", address="", hostname="", aliases=(), labels=(),
                       started_at="")
    t = container_target({"Id": WEB_ID, "Name": "/x", "Config": None, "State": None,
                          "NetworkSettings": {"Networks": {"n": None}}}, None)
    assert (t.name, t.address) == ("x", "")


def test_is_running() -> None:
    assert is_running(WEB_BRIDGE) is True
    for change in ({"Running": False, "Status": "exited"}, {"Paused": True},
                   {"Restarting": True}):
        attrs = copy.deepcopy(WEB_BRIDGE)
        attrs["State"].update(change)
        assert is_running(attrs) is False
    assert is_running({}) is False


# --- own_container_id ---------------------------------------------------------------------

OVERLAY = "ab" * 32  # overlay2 layer ids are 64 hex too: they must not be taken for the id

MOUNTINFO_V2 = f"""\
745 700 0:52 / / rw,relatime master:311 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/ABCDEF:/var/lib/docker/overlay2/l/GHIJKL,upperdir=/var/lib/docker/overlay2/{OVERLAY}/diff,workdir=/var/lib/docker/overlay2/{OVERLAY}/work
746 745 0:55 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
747 745 0:56 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
750 745 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw
751 745 254:1 /var/lib/docker/volumes/{"cd" * 32}/_data /data rw,relatime master:1 - ext4 /dev/vda1 rw
760 745 254:1 /var/lib/docker/containers/{PROXY_ID}/resolv.conf /etc/resolv.conf rw,relatime - ext4 /dev/vda1 rw
761 745 254:1 /var/lib/docker/containers/{PROXY_ID}/hostname /etc/hostname rw,relatime - ext4 /dev/vda1 rw
762 745 254:1 /var/lib/docker/containers/{PROXY_ID}/hosts /etc/hosts rw,relatime - ext4 /dev/vda1 rw
"""

MOUNTINFO_HOST = """\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
"""

CGROUP_V1 = "".join(f"{n}:{c}:/docker/{DB_ID}\n" for n, c in
                    [(12, "pids"), (11, "memory"), (10, "cpu,cpuacct"), (1, "name=systemd")])


def test_own_id_from_mountinfo() -> None:
    assert own_container_id(MOUNTINFO_V2, "0::/\n") == PROXY_ID


def test_own_id_mountinfo_wins_over_cgroup() -> None:
    assert own_container_id(MOUNTINFO_V2, CGROUP_V1) == PROXY_ID


def test_own_id_from_cgroup_v1() -> None:
    assert own_container_id(MOUNTINFO_HOST, CGROUP_V1) == DB_ID
    assert own_container_id("", f"12:pids:/docker/{DB_ID}") == DB_ID


def test_own_id_custom_data_root() -> None:
    line = f"761 745 254:1 /srv/docker-data/containers/{WEB_ID}/hostname /etc/hostname rw - ext4 x rw\n"
    assert own_container_id(line, "") == WEB_ID


def test_own_id_none() -> None:
    assert own_container_id(MOUNTINFO_HOST, "0::/user.slice/user-1000.slice/session-2.scope\n") == ""
    assert own_container_id("", "") == ""
    # Uppercase or short ids are not container ids.
    assert own_container_id(f"/docker/containers/{WEB_ID.upper()}/hostname", "") == ""
    assert own_container_id("", f"12:pids:/docker/{WEB_ID[:63]}") == ""


# --- identity_from_attrs -----------------------------------------------------------------

def test_identity_from_attrs() -> None:
    identity = identity_from_attrs(PROXY_ATTRS)
    assert identity.container_id == PROXY_ID
    assert identity.names == frozenset({"ssh-proxy", "proxy-host", PROXY_ID[:12], "jump"})
    assert identity.addresses == frozenset({"172.20.0.2"})


def test_identity_host_network() -> None:
    identity = identity_from_attrs(HOSTNET)
    assert identity.addresses == frozenset()
    assert identity.names == frozenset({"hostnet", "docker-host", HOSTNET_ID[:12]})


# --- events -------------------------------------------------------------------------------

def container_event(action: str, cid: str, name: str = "web") -> dict[str, Any]:
    return {"status": action, "id": cid, "from": "nginx", "Type": "container", "Action": action,
            "Actor": {"ID": cid, "Attributes": {"image": "nginx", "name": name}},
            "scope": "local", "time": 1714557600, "timeNano": 1714557600000000000}


def network_event(action: str, cid: str, net_id: str = FRONTEND_NET) -> dict[str, Any]:
    return {"Type": "network", "Action": action,
            "Actor": {"ID": net_id, "Attributes": {"container": cid, "name": "frontend",
                                                   "type": "bridge"}},
            "scope": "local", "time": 1714557600, "timeNano": 1714557600000000000}


def test_event_action() -> None:
    assert event_action(container_event("start", WEB_ID)) == "start"
    assert event_action({"Action": "exec_start: cat /x"}) == "exec_start"
    assert event_action({"Action": "exec_create: sh -c exec cat -- \"$HOME\"/x"}) == "exec_create"
    assert event_action({"Action": "health_status: healthy"}) == "health_status"
    assert event_action({"status": "die"}) == "die"
    assert event_action({}) == ""


def test_event_container_id() -> None:
    assert event_container_id(container_event("start", WEB_ID)) == WEB_ID
    assert event_container_id(network_event("connect", DB_ID)) == DB_ID
    assert event_container_id({"Type": "network", "Actor": {"ID": FRONTEND_NET}}) == ""
    assert event_container_id({"id": WEB_ID}) == WEB_ID
    assert event_container_id({}) == ""


# --- DockerWatcher + DockerClient with a fake engine ----------------------------------------------------------

class FakeAPI:
    def __init__(self, containers: dict[str, dict[str, Any]]) -> None:
        self.containers_by_id = containers
        self.inspected: list[str] = []

    def inspect_container(self, cid: str) -> dict[str, Any]:
        self.inspected.append(cid)
        if cid not in self.containers_by_id:
            raise docker.errors.NotFound(f"No such container: {cid}")
        return self.containers_by_id[cid]

    def containers(self, filters: dict | None = None) -> list[dict[str, Any]]:
        assert filters == {"status": "running"}
        return [{"Id": cid} for cid, attrs in self.containers_by_id.items()
                if (attrs.get("State") or {}).get("Running")]


class FakeClient:
    def __init__(self, api: Any) -> None:
        self.api = api


class FakeSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def upsert(self, target: Target) -> None:
        self.calls.append(("upsert", target))

    def remove(self, target_id: str) -> None:
        self.calls.append(("remove", target_id))

    def ready(self, target_id: str) -> None:
        self.calls.append(("ready", target_id))

    def replace_all(self, targets: list[Target]) -> None:
        self.calls.append(("replace_all", sorted(t.name for t in targets)))

    def set_source_status(self, status: dict) -> None:
        self.calls.append(("status", status))

    def set_proxy_identity(self, identity: Any) -> None:
        self.calls.append(("identity", identity))


def make_source(containers: dict[str, dict[str, Any]]) -> tuple[DockerWatcher, FakeSink, FakeAPI]:
    api = FakeAPI(containers)
    sink = FakeSink()
    return DockerWatcher(DockerClient(client_factory=lambda: FakeClient(api)), sink), sink, api


def test_start_event_upserts_running_container() -> None:
    source, sink, api = make_source({WEB_ID: WEB_BRIDGE})
    source.handle_event(container_event("start", WEB_ID))
    assert sink.calls == [("upsert", container_target(WEB_BRIDGE, None))]
    assert api.inspected == [WEB_ID]


def test_event_uses_the_proxy_networks() -> None:
    source, sink, _ = make_source({WEB_ID: WEB_TWO_NETS})
    source.client.proxy_networks = {FRONTEND_NET}
    source.handle_event(container_event("restart", WEB_ID))
    [(kind, t)] = sink.calls
    assert kind == "upsert" and t.address == "172.20.0.7"


def test_destroy_removes_without_inspecting() -> None:
    source, sink, api = make_source({WEB_ID: WEB_BRIDGE})
    source.handle_event(container_event("destroy", WEB_ID))
    assert sink.calls == [("remove", WEB_ID)]
    assert api.inspected == []


def test_not_found_removes() -> None:
    source, sink, api = make_source({})
    source.handle_event(container_event("die", WEB_ID))
    assert sink.calls == [("remove", WEB_ID)]
    assert api.inspected == [WEB_ID]


@pytest.mark.parametrize("state", [{"Running": False, "Status": "exited"}, {"Paused": True},
                                   {"Restarting": True}])
def test_not_running_removes(state: dict) -> None:
    attrs = copy.deepcopy(WEB_BRIDGE)
    attrs["State"].update(state)
    source, sink, _ = make_source({WEB_ID: attrs})
    source.handle_event(container_event("die", WEB_ID))
    assert sink.calls == [("remove", WEB_ID)]


def test_healthy_event_says_ready_without_inspecting() -> None:
    source, sink, api = make_source({WEB_ID: WEB_BRIDGE})
    source.handle_event(container_event("health_status: healthy", WEB_ID))
    assert sink.calls == [("ready", WEB_ID)]
    assert api.inspected == []


@pytest.mark.parametrize("status", ["unhealthy", "starting"])
def test_other_health_events_change_nothing(status: str) -> None:
    source, sink, api = make_source({WEB_ID: WEB_BRIDGE})
    source.handle_event(container_event(f"health_status: {status}", WEB_ID))
    assert sink.calls == [] and api.inspected == []


def test_event_health() -> None:
    assert event_health({"Action": "health_status: healthy"}) == "healthy"
    assert event_health({"status": "health_status: unhealthy"}) == "unhealthy"
    assert event_health(container_event("start", WEB_ID)) == ""
    assert event_health({}) == ""


def test_event_without_container_is_ignored() -> None:
    source, sink, api = make_source({WEB_ID: WEB_BRIDGE})
    source.handle_event({"Type": "network", "Action": "connect",
                         "Actor": {"ID": FRONTEND_NET, "Attributes": {}}})
    source.handle_event({})
    assert sink.calls == [] and api.inspected == []


def test_network_connect_of_a_target_reinspects_it() -> None:
    source, sink, api = make_source({DB_ID: DB_USER_NET})
    source.client.proxy_networks = {FRONTEND_NET}
    source.handle_event(network_event("connect", DB_ID))
    assert api.inspected == [DB_ID]
    assert sink.calls == [("upsert", container_target(DB_USER_NET, {FRONTEND_NET}))]


def test_events_about_the_proxy_container() -> None:
    source, sink, _ = make_source({PROXY_ID: PROXY_ATTRS, WEB_ID: WEB_TWO_NETS})
    source.client.identity = identity_from_attrs(PROXY_ATTRS)
    source.handle_event(container_event("start", PROXY_ID, "ssh-proxy"))
    assert sink.calls == [("remove", PROXY_ID)]  # never served as a target


def test_proxy_network_change_resyncs(monkeypatch) -> None:
    files = {"/proc/self/mountinfo": MOUNTINFO_V2, "/proc/self/cgroup": "0::/\n"}
    monkeypatch.setattr(docker_source, "_read", lambda path: files.get(path, ""))
    source, sink, api = make_source({PROXY_ID: PROXY_ATTRS, WEB_ID: WEB_TWO_NETS,
                                     DB_ID: DB_USER_NET})
    source.client.identity = identity_from_attrs(PROXY_ATTRS)
    source.handle_event(network_event("connect", PROXY_ID, BACKEND_NET))
    assert source.client.proxy_networks == {FRONTEND_NET}
    assert source.client.identity.container_id == PROXY_ID
    assert sink.calls == [("identity", source.client.identity), ("replace_all", ["api", "db"])]
    assert source.client.identity.container_id == PROXY_ID


def test_discover_identity_outside_docker(monkeypatch) -> None:
    monkeypatch.setattr(docker_source, "_read", lambda path: "")
    source, _, _ = make_source({})
    identity = source.client.discover_identity()
    assert identity.container_id == "" and source.client.proxy_networks is None


def test_list_targets_skips_proxy_and_stopped() -> None:
    stopped = copy.deepcopy(DB_USER_NET)
    stopped["State"]["Running"] = False
    source, _, _ = make_source({PROXY_ID: PROXY_ATTRS, WEB_ID: WEB_BRIDGE, DB_ID: stopped})
    source.client.identity = identity_from_attrs(PROXY_ATTRS)
    assert [t.name for t in source.client.list_targets()] == ["web"]


# --- exec_read ------------------------------------------------------------------------------

class ExecAPI:
    def __init__(self, chunks: list[tuple[bytes | None, bytes | None]], code: int | None = 0,
                 fail: Exception | None = None) -> None:
        self.chunks = chunks
        self.code = code
        self.fail = fail
        self.created: list[tuple[str, list[str], bool, bool]] = []
        self.consumed = 0
        self.inspected = 0
        self.hang = False  # keep the stream open after the last chunk (a key file that blocks)

    def exec_create(self, container: str, cmd: list[str], stdout: bool = True,
                    stderr: bool = True) -> dict[str, str]:
        if self.fail is not None:
            raise self.fail
        self.created.append((container, cmd, stdout, stderr))
        return {"Id": "exec-1"}

    def exec_start(self, exec_id: str, socket: bool = False) -> Any:
        """Docker's multiplexed stream on a real socket pair, written by a thread."""
        assert (exec_id, socket) == ("exec-1", True)
        ours, theirs = _socket.socketpair()
        self.peer = theirs  # kept: a collected socket would close and end the stream

        def feed() -> None:
            try:
                for stdout, stderr in self.chunks:
                    for stream, data in ((1, stdout), (2, stderr)):
                        if data:
                            theirs.sendall(bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big")
                                           + data)
                    self.consumed += 1
                    if self.hang:
                        continue
                if not self.hang:
                    theirs.close()
            except OSError:  # the reader closed its end after the cap: stop writing
                theirs.close()

        threading.Thread(target=feed, daemon=True).start()
        return ours

    def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        self.inspected += 1
        return {"ExitCode": self.code, "Running": False}


TARGET = Target(id=WEB_ID, name="web", address="172.17.0.2")
ARGV = ["sh", "-c", 'exec cat -- "$HOME"/.ssh/id_ed25519.pub']


def exec_source(api: ExecAPI) -> DockerClient:
    return DockerClient(client_factory=lambda: FakeClient(api))


def test_exec_read_returns_stdout_only() -> None:
    api = ExecAPI([(b"ssh-ed25519 AAAA", None), (None, b"warning\n"), (b" c\n", None)])
    assert exec_source(api).exec_read(TARGET, ARGV, 1000) == b"ssh-ed25519 AAAA c\n"
    assert api.created == [(WEB_ID, ARGV, True, True)]
    assert api.inspected == 1


def test_exec_read_caps_stdout() -> None:
    api = ExecAPI([(b"a" * 100, None)] * 1000)
    out = exec_source(api).exec_read(TARGET, ARGV, 250)
    assert out == b"a" * 250
    assert api.inspected == 0  # stopped reading once the cap was reached


def test_exec_read_that_never_ends_times_out() -> None:
    api = ExecAPI([(b"ssh-ed25519 AAAA", None)])
    api.hang = True
    source = exec_source(api)
    source.exec_timeout = 0.3
    started = time.monotonic()
    with pytest.raises(FetchError) as info:
        source.exec_read(TARGET, ARGV, 1000)
    assert time.monotonic() - started < 2
    assert "did not finish within" in str(info.value)


def test_demux_frames_keeps_partial_frame() -> None:
    buffer = bytearray(b"\x01\x00\x00\x00\x00\x00\x00\x03abc\x02\x00\x00\x00\x00\x00\x00\x05er")
    assert demux_frames(buffer) == [(1, b"abc")]
    assert buffer == bytearray(b"\x02\x00\x00\x00\x00\x00\x00\x05er")
    buffer += b"ror"
    assert demux_frames(buffer) == [(2, b"error")]
    assert buffer == bytearray()


def test_exec_read_nonzero_exit() -> None:
    api = ExecAPI([(None, b"cat: /root/.ssh/id_ed25519.pub: No such file or directory\n"
                          b"second line\n")], code=1)
    with pytest.raises(FetchError) as info:
        exec_source(api).exec_read(TARGET, ARGV, 1000)
    assert str(info.value) == (f"exec {ARGV[-1]} in web exited 1: "
                               "cat: /root/.ssh/id_ed25519.pub: No such file or directory")


def test_exec_read_nonzero_exit_without_stderr() -> None:
    api = ExecAPI([], code=127)
    with pytest.raises(FetchError) as info:
        exec_source(api).exec_read(TARGET, ["cat", "--", "/k"], 1000)
    assert str(info.value) == "exec /k in web exited 127"


def test_exec_read_unknown_exit_code_is_accepted() -> None:
    api = ExecAPI([(b"x", None)], code=None)
    assert exec_source(api).exec_read(TARGET, ARGV, 10) == b"x"


@pytest.mark.parametrize("error", [docker.errors.APIError("409 container is paused"),
                                   docker.errors.NotFound("No such container"),
                                   requests.ConnectionError("socket closed")])
def test_exec_read_api_errors(error: Exception) -> None:
    api = ExecAPI([], fail=error)
    with pytest.raises(FetchError) as info:
        exec_source(api).exec_read(TARGET, ARGV, 10)
    assert str(info.value).startswith("exec in web failed: ")
    assert str(error) in str(info.value)


# --- the watch loop: a broken events stream is followed by reconnect + full resync --------------

class _Stream:
    """An events stream: yields its events, then ends (daemon restart) or blocks until closed."""

    def __init__(self, events: list[dict[str, Any]], ends: bool) -> None:
        self.events = events
        self.ends = ends
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self.events
        if not self.ends:
            self.closed.wait(10)

    def close(self) -> None:
        self.closed.set()


class _StreamingAPI(FakeAPI):
    def __init__(self, containers: dict[str, dict[str, Any]], streams: list[_Stream]) -> None:
        super().__init__(containers)
        self.streams = streams
        self.filters: list[dict] = []

    def events(self, decode: bool = False, filters: dict | None = None) -> _Stream:
        assert decode
        self.filters.append(filters or {})
        return self.streams.pop(0)


class _PingingClient(FakeClient):
    def ping(self) -> bool:
        return True


def test_stream_end_reconnects_and_resyncs(monkeypatch) -> None:
    monkeypatch.setattr(docker_source, "_read", lambda path: "")
    first = _Stream([container_event("start", DB_ID, "db")], ends=True)
    second = _Stream([], ends=False)
    api = _StreamingAPI({WEB_ID: WEB_BRIDGE, DB_ID: DB_USER_NET}, [first, second])
    sink = FakeSink()
    source = DockerWatcher(DockerClient(client_factory=lambda: _PingingClient(api)), sink,
                           ping_interval=60)
    stop = threading.Event()

    def after_first_stream() -> bool:
        # While disconnected, web went away: only the resync can tell.
        api.containers_by_id.pop(WEB_ID, None)
        return True

    runner = threading.Thread(target=source.run, args=(stop,), daemon=True)
    runner.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(c[0] == "replace_all" for c in sink.calls) < 1:
        time.sleep(0.01)
    after_first_stream()
    while time.monotonic() < deadline and sum(c[0] == "replace_all" for c in sink.calls) < 2:
        time.sleep(0.01)
    stop.set()
    second.close()
    runner.join(5)
    assert not runner.is_alive()
    kinds = [c[0] for c in sink.calls if c[0] != "identity"]
    assert kinds[:3] == ["replace_all", "status", "upsert"]
    assert sink.calls[0][0] == "identity"  # before the first list: the proxy never serves itself
    assert [c for c in sink.calls if c[0] == "replace_all"][0] == ("replace_all", ["db", "web"])
    lost = [c for c in sink.calls if c[0] == "status" and not c[1]["connected"]]
    assert lost and lost[0][1]["reconnects"] == 1
    resync = [c for c in sink.calls if c[0] == "replace_all"][1]
    assert resync == ("replace_all", ["db"])  # the stale target is gone after the resync
    # Filtered server-side: our own key-fetch execs never come back as events.
    assert all("exec_start" not in f["event"] and f["type"] == ["container", "network"]
               for f in api.filters)
    # health_status makes the engine match each value as a prefix of the action: none may
    # let our own execs (or the health check's) through.
    assert all("health_status" in f["event"] for f in api.filters)
    for action in ("exec_create: cat -- /x", "exec_start: cat -- /x", "exec_die"):
        assert not any(action.startswith(v) for f in api.filters for v in f["event"]), action


# --- the stream is drained by its own thread; containers are inspected by others ------------

class _LiveStream:
    """An events stream fed by the test: `put` an event, `end()` it; counts what was read."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.read = 0

    def put(self, event: dict[str, Any]) -> None:
        self.queue.put(event)

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while (event := self.queue.get()) is not None:
            self.read += 1
            yield event

    def close(self) -> None:
        self.end()


class _GatedAPI(_StreamingAPI):
    """Inspects of `gated` ids wait for `gate` (an engine slow to answer); `fail` makes
    the next inspect of a gated id raise it (once)."""

    def __init__(self, containers: dict[str, dict[str, Any]], streams: list[Any]) -> None:
        super().__init__(containers, streams)
        self.gate = threading.Event()
        self.gated: set[str] = set()
        self.waiting = threading.Semaphore(0)  # released once per inspect that waits
        self.fail: Exception | None = None

    def inspect_container(self, cid: str) -> dict[str, Any]:
        if cid in self.gated:
            self.waiting.release()
            assert self.gate.wait(10)
        if self.fail is not None and cid in self.gated:
            fail, self.fail = self.fail, None
            raise fail
        attrs = super().inspect_container(cid)
        return copy.deepcopy(attrs)


def _follow(api: _GatedAPI, sink: FakeSink,
            monkeypatch: pytest.MonkeyPatch) -> tuple[DockerWatcher, threading.Event, threading.Thread]:
    monkeypatch.setattr(docker_source, "_read", lambda path: "")  # not in a container
    source = DockerWatcher(DockerClient(client_factory=lambda: _PingingClient(api)), sink,
                           ping_interval=3600)
    stop = threading.Event()
    runner = threading.Thread(target=source.run, args=(stop,), daemon=True)
    runner.start()
    assert _wait(lambda: any(c[0] == "status" and c[1]["connected"] for c in sink.calls))
    return source, stop, runner


def _wait(condition: Any, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def _stop(stop: threading.Event, runner: threading.Thread, *streams: _LiveStream) -> None:
    stop.set()
    for stream in streams:
        stream.end()
    runner.join(10)
    assert not runner.is_alive()


def test_events_are_read_while_inspects_wait(monkeypatch) -> None:
    # The engine drops events for a subscriber that lags (1,024 buffered, then 100 ms): the
    # stream is read on while every inspect waits, and a burst about one container is one
    # inspect once the engine answers.
    stream = _LiveStream()
    api = _GatedAPI({WEB_ID: WEB_BRIDGE, DB_ID: DB_USER_NET}, [stream])
    sink = FakeSink()
    source, stop, runner = _follow(api, sink, monkeypatch)
    relisted = len(api.inspected)
    api.gated = {WEB_ID, DB_ID}
    for i in range(3000):
        stream.put(container_event("start" if i % 2 else "die", WEB_ID if i % 3 else DB_ID))
    assert _wait(lambda: stream.read == 3000), stream.read  # all read, none inspected yet
    assert api.inspected[relisted:] == []
    api.gate.set()
    assert _wait(lambda: sum(c[0] == "upsert" for c in sink.calls) >= 2)
    _stop(stop, runner, stream)
    # At most: the inspect under way when the burst began, then one after it.
    assert 2 <= len(api.inspected) - relisted <= 4
    upserts = {c[1].id: c[1] for c in sink.calls if c[0] == "upsert"}
    assert set(upserts) == {WEB_ID, DB_ID}


def test_an_event_during_an_inspect_is_inspected_again(monkeypatch) -> None:
    stream = _LiveStream()
    api = _GatedAPI({WEB_ID: WEB_BRIDGE}, [stream])
    sink = FakeSink()
    source, stop, runner = _follow(api, sink, monkeypatch)
    api.gated = {WEB_ID}
    stream.put(container_event("start", WEB_ID))
    assert api.waiting.acquire(timeout=10)  # the inspect is under way (old name)...
    renamed = copy.deepcopy(WEB_BRIDGE)
    renamed["Name"] = "/web-renamed"
    api.containers_by_id[WEB_ID] = renamed
    stream.put(container_event("rename", WEB_ID))  # ...when the container is renamed
    assert _wait(lambda: stream.read == 2)
    api.gate.set()
    assert _wait(lambda: any(c[0] == "upsert" and c[1].name == "web-renamed" for c in sink.calls))
    _stop(stop, runner, stream)
    last = [c for c in sink.calls if c[0] in ("upsert", "remove")][-1]
    assert last[0] == "upsert" and last[1].name == "web-renamed"


def test_a_destroy_during_an_inspect_is_the_last_word(monkeypatch) -> None:
    stream = _LiveStream()
    api = _GatedAPI({WEB_ID: WEB_BRIDGE}, [stream])
    sink = FakeSink()
    source, stop, runner = _follow(api, sink, monkeypatch)
    api.gated = {WEB_ID}
    stream.put(container_event("start", WEB_ID))
    assert api.waiting.acquire(timeout=10)  # inspected while it still runs...
    stream.put(container_event("destroy", WEB_ID))  # ...and destroyed meanwhile
    assert _wait(lambda: stream.read == 2)
    api.gate.set()
    assert _wait(lambda: ("remove", WEB_ID) in sink.calls)
    _stop(stop, runner, stream)
    changes = [c for c in sink.calls if c[0] in ("upsert", "remove")]
    assert changes[-1] == ("remove", WEB_ID)  # the running state read before never follows it
    assert source._destroyed == set()


def test_events_during_the_relist_are_inspected_after_it(monkeypatch) -> None:
    stream = _LiveStream()
    stream.put(container_event("start", DB_ID))  # came while the proxy listed
    api = _GatedAPI({WEB_ID: WEB_BRIDGE, DB_ID: DB_USER_NET}, [stream])
    sink = FakeSink()
    source, stop, runner = _follow(api, sink, monkeypatch)
    assert _wait(lambda: any(c[0] == "upsert" for c in sink.calls))
    _stop(stop, runner, stream)
    kinds = [c[0] for c in sink.calls if c[0] != "identity"]
    assert kinds[:3] == ["replace_all", "status", "upsert"]


def test_an_inspect_that_fails_reconnects_and_relists(monkeypatch) -> None:
    first, second = _LiveStream(), _LiveStream()
    api = _GatedAPI({WEB_ID: WEB_BRIDGE, DB_ID: DB_USER_NET}, [first, second])
    sink = FakeSink()
    source, stop, runner = _follow(api, sink, monkeypatch)
    api.gated = {WEB_ID}
    api.fail = docker.errors.APIError("500 Server Error: engine overloaded")
    api.gate.set()
    first.put(container_event("start", WEB_ID))
    assert _wait(lambda: sum(c[0] == "replace_all" for c in sink.calls) == 2)
    _stop(stop, runner, first, second)
    lost = [c[1] for c in sink.calls if c[0] == "status" and not c[1]["connected"]]
    assert lost and lost[0]["reconnects"] == 1
    assert source.reconnects == 1
