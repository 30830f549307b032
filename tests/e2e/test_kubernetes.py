"""Kubernetes mode end to end: the real image, its kube config pointing at a fake API server
(tests/fakekube, the wire protocol the real client speaks) whose pods are real Docker
containers (pod IP = container IP), and the real ssh/scp clients.

No real cluster runs here: what this proves is the proxy's side (mode detection, list+watch,
key fetch by HTTP and by exec over the API's websocket, names pinned to pods, revocation,
outage handling), against a server that speaks the API faithfully.
"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from helpers import (KeyPair, Proxy, SshClient, Target, docker, free_port, make_keypair,
                     module_containers, run_proxy_container, run_target_container,
                     wait_for_login, wait_for_status, wait_until)
from tests.fakekube import ExecCall, ExecResult, FakeKube, make_pod, make_service, set_ready

NAMESPACE = "workspaces"
SFX = secrets.token_hex(3)


class Cluster:
    """The fake API server, the pods it lists (real containers) and the proxy."""

    def __init__(self, fake: FakeKube) -> None:
        self.fake = fake
        self.containers: dict[str, str] = {}  # pod name -> container name
        self.proxy: Proxy | None = None
        self.targets: dict[str, Target] = {}  # "a": serves /publickey, "b": exec only
        self.host_key: list[str] = []  # [type, base64] of the mounted host key

    def add_pod(self, pod_name: str, target: Target, **labels: str) -> dict:
        self.containers[pod_name] = target.name
        return self.fake.add_pod(make_pod(pod_name, ip=target.ip, labels=labels or {"app": pod_name}))

    def exec_in_container(self, call: ExecCall) -> ExecResult:
        """The API server's exec, done for real: `docker exec` in the pod's container."""
        container = self.containers.get(call.pod)
        if container is None:
            return ExecResult(stderr=f"pod {call.pod} has no container".encode(), exit_code=1)
        proc = subprocess.run(["docker", "exec", container, *call.command], capture_output=True,
                              timeout=30, stdin=subprocess.DEVNULL)
        return ExecResult(stdout=proc.stdout, stderr=proc.stderr, exit_code=proc.returncode)


def gateway_of(network: str) -> str:
    """The host's address on a test network: containers on it reach the fake API there."""
    return docker("network", "inspect", network, "-f",
                  "{{(index .IPAM.Config 0).Gateway}}").stdout.strip()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, KeyPair]:
    directory = tmp_path_factory.mktemp("kube-keys")
    return {name: make_keypair(directory, name) for name in ("a", "b", "x")}


@pytest.fixture(scope="module")
def cluster(request, proxy_image, target_image, test_network, session_id, keys,
            tmp_path_factory) -> Iterator[Cluster]:
    fake = FakeKube(namespace=NAMESPACE, host=gateway_of(test_network)).start()
    world = Cluster(fake)
    fake.exec_handler = world.exec_in_container
    kubeconfig = fake.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")
    kubeconfig.chmod(0o644)
    # Host keys as a Kubernetes Secret mounts them: read-only, mode 0400, one type only.
    host_keys = tmp_path_factory.mktemp("host-keys")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "secret",
                    "-f", str(host_keys / "ssh_host_ed25519_key")], check=True)
    (host_keys / "ssh_host_ed25519_key").chmod(0o400)
    world.host_key = (host_keys / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    with module_containers(request) as started:
        # Docker mode would need the socket: none is mounted, so the kube config alone
        # must make the proxy choose Kubernetes mode.
        world.proxy = run_proxy_container(
            test_network, session_id, image=proxy_image, docker_socket=False,
            volumes=[f"{kubeconfig}:/root/.kube/config:ro", f"{host_keys}:/etc/ssh/host_keys:ro"],
            env={"POD_NAME": f"ssh-proxy-{SFX}", "SSH_PERMIT_TARGET_HOST": f"*-{SFX}"},
            track=started.append)
        proxy_ip = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                          world.proxy.name).stdout.strip()
        fake.add_pod(make_pod(f"ssh-proxy-{SFX}", ip=proxy_ip, labels={"app": "ssh-proxy"}))
        world.targets = {
            name: run_target_container(f"kws-{name}-{SFX}", keys[name], test_network, session_id,
                                       image=target_image, serve_publickey=(name != "b"),
                                       track=started.append)
            for name in ("a", "b")}
        try:
            yield world
        finally:
            fake.stop()


def client(cluster: Cluster, key: KeyPair) -> SshClient:
    return SshClient(cluster.proxy, key)


def test_kube_config_selects_kubernetes_mode(cluster: Cluster) -> None:
    doc = wait_for_status(cluster.proxy, lambda d: (d.get("source") or {}).get("connected"), 30)
    assert doc["mode"] == "kubernetes"
    health = cluster.proxy.exec(["watcher", "health"])
    assert health.returncode == 0 and health.stdout.strip() == "healthy", health


def test_read_only_host_key_is_used_as_it_is(cluster: Cluster) -> None:
    """Every replica presents the Secret's host key; nothing is generated beside it."""
    scan = subprocess.run(["ssh-keyscan", "-T", "10", "-p", str(cluster.proxy.port), cluster.proxy.host],
                          capture_output=True, text=True, timeout=60)
    offered = {tuple(line.split()[1:3]) for line in scan.stdout.splitlines()
               if line and not line.startswith("#")}
    assert offered == {tuple(cluster.host_key)}, scan.stderr


def test_pod_by_name_ssh_and_scp(cluster: Cluster, keys, tmp_path: Path) -> None:
    pod = f"pod-a-{SFX}"
    cluster.add_pod(pod, cluster.targets["a"])
    ssh = client(cluster, keys["a"])
    wait_for_login(ssh, pod)
    # The pod name is not a container name: only the proxy's pinned name can lead there.
    hostname = ssh.ssh(pod, "hostname")
    assert hostname.returncode == 0 and hostname.stdout.strip() == cluster.targets["a"].hostname

    data = secrets.token_bytes(200_000)
    (tmp_path / "up.bin").write_bytes(data)
    up = ssh.run(ssh.scp_argv(str(tmp_path / "up.bin"), ssh.remote(pod, "/tmp/up.bin")))
    assert up.returncode == 0, up.stderr
    down = ssh.run(ssh.scp_argv(ssh.remote(pod, "/tmp/up.bin"), str(tmp_path / "down.bin")))
    assert down.returncode == 0, down.stderr
    assert hashlib.sha256((tmp_path / "down.bin").read_bytes()).digest() == hashlib.sha256(data).digest()

    # Another key never opens this pod.
    assert client(cluster, keys["x"]).ssh(pod, "true").returncode != 0


def test_service_names_and_tunnel(cluster: Cluster, keys) -> None:
    pod, svc = f"pod-a-{SFX}", f"web-{SFX}"
    if pod not in cluster.containers:
        cluster.add_pod(pod, cluster.targets["a"])
    cluster.fake.add_service(make_service(svc, {"app": pod}))
    ssh = client(cluster, keys["a"])
    for name in (svc, f"{svc}.{NAMESPACE}", f"{svc}.{NAMESPACE}.svc.cluster.local"):
        wait_for_login(ssh, name)
    # An -L tunnel by service name to a port inside the pod (its /publickey server).
    local = free_port()
    tunnel = subprocess.Popen(ssh.ssh_argv(svc, opts=["-N", "-L", f"127.0.0.1:{local}:127.0.0.1:8080"]),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def served() -> bool:
            proc = subprocess.run(["curl", "-fsS", "--max-time", "3", f"http://127.0.0.1:{local}/publickey"],
                                  capture_output=True, text=True)
            return proc.returncode == 0 and keys["a"].blob in proc.stdout
        assert wait_until(served, 20), "no answer through the -L tunnel by service name"
    finally:
        tunnel.terminate()
        tunnel.wait(timeout=10)

    # The Service goes: its names go with it.
    cluster.fake.delete_service(svc)
    assert wait_until(lambda: ssh.ssh(svc, "true", timeout=20).returncode != 0, 15)
    assert ssh.ssh(pod, "true").returncode == 0


def test_exec_only_pod_gets_its_key_through_the_api(cluster: Cluster, keys) -> None:
    pod = f"pod-b-{SFX}"
    cluster.add_pod(pod, cluster.targets["b"])  # serves no /publickey: exec is the only way
    ssh = client(cluster, keys["b"])
    wait_for_login(ssh, pod)
    execs = [r for r in cluster.fake.requests if r.path.endswith(f"/pods/{pod}/exec")]
    assert execs, "the key was not read through the API's exec"
    # (status.json is rewritten every 2 s)
    wait_for_status(cluster.proxy, lambda d: any(t["name"] == pod and t["via"] == "exec"
                                                 for t in d.get("targets", [])), 10)


def test_not_ready_and_deleted_pods_are_revoked(cluster: Cluster, keys) -> None:
    pod = f"pod-c-{SFX}"
    stored = cluster.add_pod(pod, cluster.targets["a"], app=pod)
    ssh = client(cluster, keys["a"])
    wait_for_login(ssh, pod)

    cluster.fake.put("pods", set_ready(stored, False))
    assert wait_until(lambda: ssh.ssh(pod, "true", timeout=20).returncode != 0, 15), \
        "a NotReady pod still opens"
    cluster.fake.put("pods", set_ready(cluster.fake.get("pods", pod), True))
    wait_for_login(ssh, pod)

    cluster.fake.delete_pod(pod)
    assert wait_until(lambda: ssh.ssh(pod, "true", timeout=20).returncode != 0, 15), \
        "a deleted pod still opens"


def test_api_outage_keeps_serving_then_resyncs(cluster: Cluster, keys) -> None:
    pod = f"pod-d-{SFX}"
    cluster.add_pod(pod, cluster.targets["a"], app=pod)
    ssh = client(cluster, keys["a"])
    wait_for_login(ssh, pod)

    cluster.fake.down()
    try:
        assert wait_until(lambda: cluster.proxy.exec(["watcher", "health"]).returncode != 0, 40), \
            "health stayed green while the API was down"
        health = cluster.proxy.exec(["watcher", "health"])
        assert "kubernetes source is reconnecting (attempt" in health.stdout, health.stdout
        # Liveness stays green: restarting the proxy would not bring the API back.
        assert cluster.proxy.exec(["watcher", "health", "--liveness"]).returncode == 0
        # sshd keeps serving the last good keys.
        assert ssh.ssh(pod, "true").returncode == 0
        # Deleted while the API is away: seen only after the resync.
        cluster.fake.delete_pod(pod)
    finally:
        cluster.fake.up()
    assert wait_until(lambda: cluster.proxy.exec(["watcher", "health"]).returncode == 0, 60)
    assert wait_until(lambda: ssh.ssh(pod, "true", timeout=20).returncode != 0, 20), \
        "a pod deleted during the outage kept its key after the resync"
