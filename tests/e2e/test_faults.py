"""Faults (issue 13): the Docker engine going away and coming back, a stop with open tunnels,
a full disk. Real engine, real image; the engine itself is never restarted (other containers
run on it): its socket is reached through a relay the test starts, kills and recreates,
as a restarting engine would (refused, then a new socket file: a new inode)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest

from helpers import (DOCKER_SOCKET, KeyPair, Proxy, SshClient, docker, free_port, read_banner,
                     remove_containers, run_proxy_container, status, wait_for_login, wait_for_status,
                     wait_for_proxy_banner, wait_until)



class SocketRelay:
    """`socat` relaying a unix socket at `path` to the real engine's socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Listens on a new socket file (a new inode, as a restarted engine makes)."""
        self.path.unlink(missing_ok=True)
        # Its own process group: socat forks a child per connection, and an engine that
        # goes away drops every connection, the open ones included.
        self.process = subprocess.Popen(
            ["socat", f"UNIX-LISTEN:{self.path},fork,mode=600", f"UNIX-CONNECT:{DOCKER_SOCKET}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        assert wait_until(self.path.is_socket, 10), f"socat did not create {self.path}"

    def kill(self) -> None:
        """The engine stops answering: the socket file stays, connections are refused."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # the listener and every relay child
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[SocketRelay]:
    directory = tmp_path / "dockerdir"
    directory.mkdir()
    started = SocketRelay(directory / "docker.sock")
    started.start()
    yield started
    started.kill()


@pytest.fixture
def proxy_via(request, proxy_image, test_network, session_id) -> Iterator[Callable[..., Proxy]]:
    """A proxy that reaches the engine only through `volumes` (no real socket mounted)."""
    started: list[Proxy] = []

    def start(env: dict[str, str], volumes: list[str], docker_args: list[str] | None = None) -> Proxy:
        return run_proxy_container(test_network, session_id, image=proxy_image, env=env, volumes=volumes,
                                   docker_args=docker_args, docker_socket=False, track=started.append)

    yield start
    failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))
    remove_containers(started, failed=failed)


def source(proxy: Proxy) -> dict:
    return status(proxy).get("source") or {}


def test_engine_outage_keeps_serving_then_resyncs(start_target, keypair, relay, proxy_via):
    sfx = secrets.token_hex(3)
    old_key, new_key = keypair("old"), keypair("new")
    old = start_target(f"fo-old-{sfx}", old_key)
    proxy = proxy_via(env={"SSH_PROXY_MODE": "docker", "SSH_PERMIT_TARGET_HOST": f"*-{sfx}",
                           "DOCKER_HOST": "unix:///var/run/dockerdir/docker.sock",
                           "SSH_PROXY_SOURCE_OUTAGE_SECONDS": "600"},
                      volumes=[f"{relay.path.parent}:/var/run/dockerdir"])
    wait_for_login(SshClient(proxy, old_key), old.name)

    relay.kill()  # refused
    assert wait_until(lambda: source(proxy).get("state") == "reconnecting"
                      and source(proxy).get("attempt", 0) >= 2, 60), source(proxy)
    outage = source(proxy)
    assert "refused" in outage["error"].lower(), outage
    health = proxy.exec(["watcher", "health"])
    assert health.returncode != 0 and "docker source is reconnecting (attempt" in health.stdout, health
    assert proxy.exec(["watcher", "health", "--liveness"]).returncode == 0
    # sshd serves the last good keys all the while.
    wait_for_login(SshClient(proxy, old_key), old.name)

    # Meanwhile one target goes, another comes; then the engine is back with a new socket.
    old.remove()
    new = start_target(f"fo-new-{sfx}", new_key)
    relay.kill()
    relay.path.unlink()  # missing for a moment, as while an engine restarts
    relay.start()

    assert wait_until(lambda: source(proxy).get("connected") is True, 60), source(proxy)
    wait_for_login(SshClient(proxy, new_key), new.name, deadline=60)
    assert wait_until(lambda: old_key.fingerprint not in proxy.read_index(), 30), \
        "the target removed during the outage is still granted"
    assert proxy.state() == "running"


def test_engine_gone_for_good_exits_and_restart_policy_mounts_the_new_socket(start_target, keypair,
                                                                              relay, proxy_via):
    """The single-file bind mount of the socket, as the README says to run it: once the
    engine's socket is a new file, only a new container start sees it."""
    sfx = secrets.token_hex(3)
    key, later_key = keypair("k"), keypair("later")
    target = start_target(f"fg-a-{sfx}", key)
    proxy = proxy_via(env={"SSH_PERMIT_TARGET_HOST": f"*-{sfx}", "SSH_PROXY_SOURCE_OUTAGE_SECONDS": "5"},
                      volumes=[f"{relay.path}:{DOCKER_SOCKET}"],
                      docker_args=["--restart", "on-failure"])
    wait_for_login(SshClient(proxy, key), target.name)

    relay.kill()
    relay.start()  # a new inode: the container's mount still names the old, dead socket
    later = start_target(f"fg-b-{sfx}", later_key)

    def restarted() -> bool:
        count = docker("inspect", "-f", "{{.RestartCount}}", proxy.id).stdout.strip()
        return count.isdigit() and int(count) >= 1
    assert wait_until(restarted, 120), f"the proxy was not restarted (on-failure); logs:\n{proxy.logs()}"
    gave_up = [line for line in proxy.logs().splitlines() if "has not answered for 5 s" in line]
    assert len(gave_up) == 1, proxy.logs()
    assert "unix:///var/run/docker.sock" in gave_up[0] and "--restart unless-stopped" in gave_up[0]
    assert "Traceback" not in proxy.logs()

    wait_for_proxy_banner(proxy)
    assert wait_until(lambda: source(proxy).get("connected") is True, 60), source(proxy)
    wait_for_login(SshClient(proxy, later_key), later.name, deadline=60)
    wait_for_login(SshClient(proxy, key), target.name)


# --------------------------------------------------------------------------- drain on stop


class HeldTunnel:
    """`ssh -N -L 127.0.0.1:PORT:DEST` through the proxy, held open by the test."""

    def __init__(self, proxy: Proxy, key: KeyPair, dest: str) -> None:
        self.port = free_port()
        argv = SshClient(proxy_port=proxy, key=key).direct_argv(
            opts=["-N", "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{self.port}:{dest}"])
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        assert wait_until(lambda: self.works() or not self.alive(), 30), f"the tunnel to {dest} did not open"
        assert self.alive(), f"ssh -N -L {dest} exited {self.process.returncode}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def works(self) -> bool:
        """A new forward over the held connection reaches the target's sshd."""
        return read_banner("127.0.0.1", self.port, timeout=5).startswith("SSH-2.0-")

    def close(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def hold() -> Iterator[Callable[[Proxy, KeyPair, str], HeldTunnel]]:
    held: list[HeldTunnel] = []

    def start(proxy: Proxy, key: KeyPair, dest: str) -> HeldTunnel:
        held.append(HeldTunnel(proxy, key, dest))
        return held[-1]

    yield start
    for tunnel in held:
        tunnel.close()


def exit_code(proxy: Proxy) -> tuple[str, int]:
    state, code = docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", proxy.id).stdout.split()
    return state, int(code)


def test_stop_drains_open_tunnel_refuses_new_logins_and_exits_0_when_it_ends(start_target, start_proxy,
                                                                               keypair, hold):
    sfx = secrets.token_hex(3)
    key = keypair("k")
    target = start_target(f"fd-a-{sfx}", key)
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": f"*-{sfx}", "SSH_PROXY_DRAIN_SECONDS": "300"})
    client = SshClient(proxy, key)
    wait_for_login(client, target.name)
    tunnel = hold(proxy, key, f"{target.name}:22")

    stopping = subprocess.Popen(["docker", "stop", "-t", "400", proxy.id], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: "msg=\"draining " in proxy.logs(), 60), proxy.logs()
        assert client.ssh(target.name, "true", timeout=30).returncode != 0, "a new login got in during the drain"
        assert tunnel.alive() and tunnel.works(), "the open tunnel stopped working during the drain"
        tunnel.close()  # the last tunnel ends: the proxy exits now, not at the drain's end
        stopping.wait(timeout=120)
    finally:
        if stopping.poll() is None:
            stopping.kill()
    assert stopping.returncode == 0, stopping.stderr.read()
    assert exit_code(proxy) == ("exited", 0), proxy.logs()
    assert "connection(s) ended by themselves" in proxy.logs(), proxy.logs()


def test_docker_stop_cuts_tunnels_left_after_the_drain_and_exits_0(start_target, start_proxy, keypair, hold):
    sfx = secrets.token_hex(3)
    key = keypair("k")
    target = start_target(f"fc-a-{sfx}", key)
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": f"*-{sfx}"})  # the default drain, 8 s
    wait_for_login(SshClient(proxy, key), target.name)
    tunnel = hold(proxy, key, f"{target.name}:22")

    docker("stop", proxy.id)  # Docker's default: SIGKILL after 10 s, exit 137
    assert exit_code(proxy) == ("exited", 0), proxy.logs()
    assert "drain over: cut 1 open connection(s)" in proxy.logs()
    assert wait_until(lambda: not tunnel.alive(), 30), "the client did not see its connection cut"


# --------------------------------------------------------------------------- disk full


def test_disk_full_keeps_serving_the_previous_keys_and_resumes(start_target, start_proxy, keypair):
    sfx = secrets.token_hex(3)
    key, new_key, newer_key = keypair("k"), keypair("new"), keypair("newer")
    first = start_target(f"fx-a-{sfx}", key)
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": f"*-{sfx}"},
                        docker_args=["--mount", "type=tmpfs,destination=/etc/ssh,tmpfs-size=2m,tmpfs-mode=0755"])
    wait_for_login(SshClient(proxy, key), first.name)
    before = proxy.read_index()
    assert key.fingerprint in before

    proxy.exec("dd if=/dev/zero of=/etc/ssh/fill bs=64k 2>/dev/null; true", check=True)
    new = start_target(f"fx-b-{sfx}", new_key)
    doc = wait_for_status(proxy, lambda d: "No space left" in (d.get("write_errors") or {}).get("rendered", ""), 60)
    newer = start_target(f"fx-c-{sfx}", newer_key)
    assert wait_until(lambda: f"target added: {newer.name}" in proxy.logs(), 30), proxy.logs()
    wait_for_login(SshClient(proxy, key), first.name)  # the previous keys are served
    assert proxy.read_index() == before, "the index changed on a full disk"
    assert SshClient(proxy, new_key).ssh(new.name, "true", timeout=30).returncode != 0
    # A revocation does not wait for space: the withdrawn line goes from the index in place.
    first.remove()
    assert wait_until(lambda: key.fingerprint not in proxy.read_index(), 30), proxy.logs()
    assert SshClient(proxy, key).ssh(first.name, "true", timeout=30).returncode != 0
    logs = proxy.logs()
    assert logs.count("cannot write the rendered keys") == 1, logs
    assert logs.count("cannot write /etc/ssh/access.log") <= 1, logs
    assert doc["heartbeat"]

    proxy.exec("rm -f /etc/ssh/fill", check=True)
    wait_for_status(proxy, lambda d: (d.get("write_errors") or {}).get("rendered") == "", 60)
    wait_for_login(SshClient(proxy, new_key), new.name)
    wait_for_login(SshClient(proxy, newer_key), newer.name)
    assert "rendered keys written again" in proxy.logs()
    assert wait_until(lambda: new_key.fingerprint in proxy.access_log(), 30), "access.log did not resume"



def test_access_log_rotates_by_size(start_target, start_proxy, keypair):
    sfx = secrets.token_hex(3)
    key = keypair("k")
    target = start_target(f"fr-a-{sfx}", key)
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": f"*-{sfx}", "ACCESS_LOG_MAX_BYTES": "4096",
                             "ACCESS_LOG_BACKUPS": "1"})
    client = SshClient(proxy, key)

    def rotated() -> bool:
        client.ssh(target.name, "true", timeout=30)
        sizes = proxy.exec("wc -c < /etc/ssh/access.log.1").stdout.strip()
        # .1 holds a full file, and access.log has started over
        return sizes.isdigit() and int(sizes) > 2048 and proxy.exec(
            "test $(wc -c < /etc/ssh/access.log) -lt 4097").returncode == 0 and \
            key.fingerprint in proxy.access_log()
    assert wait_until(rotated, 180, interval=0), proxy.exec("ls -l /etc/ssh").stdout
    listing = proxy.exec("ls /etc/ssh").stdout.split()
    assert "access.log.2" not in listing, listing
    assert int(proxy.exec("wc -c < /etc/ssh/access.log.1").stdout) <= 4096


def test_stop_cuts_a_login_in_progress_and_exits_0(start_proxy):
    """A TCP connection that sent only its SSH banner (a login in progress) at `docker stop`:
    cut at once, not drained for SSH_PROXY_DRAIN_SECONDS as an open tunnel."""
    import socket as socket_module

    proxy = start_proxy(env={"SSH_PROXY_DRAIN_SECONDS": "300", "MANUAL_AUTH_FILE": "true",
                             "SSH_PERMIT_TARGET_HOST": "nowhere", "SSH_PERMIT_TARGET_PORT": "22"})
    login = socket_module.create_connection((proxy.host, proxy.port), timeout=30)
    try:
        login.settimeout(30)
        assert login.recv(256).startswith(b"SSH-2.0-"), "the proxy sent no banner"
        login.sendall(b"SSH-2.0-test_login_in_progress\r\n")
        stopping = subprocess.Popen(["docker", "stop", "-t", "400", proxy.id], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            stopping.wait(timeout=200)  # far under the 300 s drain: the login did not hold it
        finally:
            if stopping.poll() is None:
                stopping.kill()
        assert stopping.returncode == 0, stopping.stderr.read()
    finally:
        login.close()
    logs = proxy.logs()
    assert exit_code(proxy) == ("exited", 0), logs
    assert "cut 1 login(s) in progress" in logs, logs
    assert "draining" not in logs, logs
