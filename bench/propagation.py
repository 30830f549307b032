"""B1 propagation: how soon the proxy follows Docker, and Kubernetes, both ways.

Two proxies side by side, interleaved target by target: one in Docker mode (discovery by the
Docker API), one in Kubernetes mode against the fake API server of the tests
(tests/fakekube, in this process; its pods are real target containers, pod IP = container
IP). N targets are added one by one, each with its own key:

- Docker: from the target's key endpoint answering (sshd and GET /publickey both listening)
  to the first successful login through the proxy;
- Kubernetes: the container is started first (key endpoint answering), then its pod is
  stored with Ready=True (the watch's ADDED event carries it): from that event to the first
  successful login.

Then each target in turn goes: Docker alternately `docker stop` / `docker rm -f`, from the
command returning; Kubernetes the pod is deleted (the watch's DELETED event), from the
delete; to the proxy refusing the key ("Permission denied"). Login attempts follow each
other without pause; each figure is when the first attempt that saw the change started, so
it may overstate by up to one attempt (a login through the proxy, ~0.4 s here; a refusal,
~0.2 s). The Kubernetes API server is the fake: a real one adds its own watch latency.

    .venv/bin/python bench/propagation.py [--targets 10] [--mode both|docker|kubernetes]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchError, BenchRun, Proxy, SshClient, Target, dist, docker, save, table, timed  # noqa: E402

from tests.fakekube import FakeKube, make_pod  # noqa: E402

NAMESPACE = "bench"


def until(predicate: Callable[[], bool], deadline: float = 120) -> float:
    """Seconds from now to the start of the first attempt, back to back, for which
    predicate() held (the change was there by then); BenchError past the deadline."""
    started = time.perf_counter()
    while True:
        attempt = time.perf_counter() - started
        if predicate():
            return attempt
        if attempt > deadline:
            raise BenchError(f"not within {deadline} s")


def logs_in(argv: list[str]) -> Callable[[], bool]:
    return lambda: timed(argv, timeout=30)[1].returncode == 0


def refused(argv: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        proc = timed(argv, timeout=30)[1]
        return proc.returncode == 255 and b"Permission denied" in proc.stderr
    return check


@dataclass
class Kube:
    """The fake API server and the Kubernetes-mode proxy that watches it."""

    fake: FakeKube
    proxy: Proxy

    @classmethod
    def start(cls, run: BenchRun) -> "Kube":
        gateway = docker("network", "inspect", run.network, "-f",
                         "{{(index .IPAM.Config 0).Gateway}}").stdout.strip()
        fake = FakeKube(namespace=NAMESPACE, host=gateway).start()
        config = fake.write_kubeconfig(run.work / "kubeconfig")
        config.chmod(0o644)
        # No Docker socket: the kube config alone selects Kubernetes mode.
        proxy = run.proxy(env={"POD_NAME": f"ssh-proxy-{run.run_id}", "SSH_PERMIT_TARGET_HOST": f"*-{run.run_id}"},
                          volumes=[f"{config}:/root/.kube/config:ro"], docker_socket=False)
        proxy_ip = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                          proxy.id).stdout.strip()
        fake.add_pod(make_pod(f"ssh-proxy-{run.run_id}", ip=proxy_ip, labels={"app": "ssh-proxy"}))
        return cls(fake, proxy)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--mode", choices=("both", "docker", "kubernetes"), default="both")
    args = parser.parse_args()
    docker_on, kube_on = args.mode in ("both", "docker"), args.mode in ("both", "kubernetes")
    run = BenchRun("propagation")
    added: dict[str, list[float]] = {"docker": [], "kubernetes": []}
    removed: dict[str, list[float]] = {"docker stop": [], "docker rm -f": [], "pod deleted": []}
    kube: Kube | None = None
    try:
        run.images()
        run.create_network()
        role = f"ssh-proxy-bench-docker={run.run_id}"  # only the Docker-mode targets carry it
        dproxy = run.proxy(env={"SSH_TARGET_LABELS": role}) if docker_on else None
        kube = Kube.start(run) if kube_on else None
        dtargets: list[tuple[Target, SshClient]] = []
        pods: list[tuple[str, SshClient]] = []
        for i in range(args.targets):
            if dproxy is not None:
                key = run.key(f"d{i}")
                name = f"bench-prop-{run.run_id}-{i}"
                target = run.target(name, key, labels={role.split("=")[0]: run.run_id})
                client = SshClient(dproxy, key)
                added["docker"].append(until(logs_in(client.ssh_argv(name, "true"))))
                dtargets.append((target, client))
            if kube is not None:
                key = run.key(f"k{i}")
                target = run.target(f"bench-kpod-{run.run_id}-{i}", key)  # key endpoint answering
                pod = f"kpod-{i}-{run.run_id}"
                client = SshClient(kube.proxy, key)
                argv = client.ssh_argv(pod, "true")
                kube.fake.add_pod(make_pod(pod, ip=target.ip, labels={"app": pod}))  # ADDED, Ready=True
                added["kubernetes"].append(until(logs_in(argv)))
                pods.append((pod, client))
            print(f"propagation: target {i} in", file=sys.stderr)
        for i in range(args.targets):
            if i < len(dtargets):
                target, client = dtargets[i]
                gone = refused(client.direct_argv("true"))
                if gone():
                    raise BenchError(f"{target.name}: key refused before the target went away")
                how = "docker stop" if i % 2 == 0 else "docker rm -f"
                if how == "docker stop":
                    docker("stop", "-t", "2", target.id)
                else:
                    docker("rm", "-f", target.id)
                removed[how].append(until(gone))
            if i < len(pods):
                pod, client = pods[i]
                gone = refused(client.direct_argv("true"))
                if gone():
                    raise BenchError(f"pod {pod}: key refused before the pod went away")
                kube.fake.delete_pod(pod)
                removed["pod deleted"].append(until(gone))
    finally:
        if kube is not None:
            kube.fake.stop()
        run.cleanup()

    rows = []
    if added["docker"]:
        rows.append(["Docker: target started (key endpoint ready) -> first login through the proxy",
                     *_cells(added["docker"])])
    if added["kubernetes"]:
        rows.append(["Kubernetes: pod event with Ready=True (key endpoint ready) -> first login",
                     *_cells(added["kubernetes"])])
    rows += [[f"Docker: `{how}` returned -> key refused", *_cells(v)]
             for how, v in removed.items() if how != "pod deleted" and v]
    if removed["pod deleted"]:
        rows.append(["Kubernetes: pod DELETED event -> key refused", *_cells(removed["pod deleted"])])
    md = ("### B1 propagation\n\nTwo proxies side by side, targets added one at a time, interleaved: "
          "Docker mode (discovery by the Docker API) and Kubernetes mode against the tests' **fake** "
          "API server (tests/fakekube; its pods are real target containers, pod IP = container IP; "
          "a real API server adds its own watch latency). Seconds; each figure may overstate by one "
          "login attempt.\n\n"
          + table(["event", "n", "p50", "p90", "p99", "max"], rows))
    save("propagation", md, {"added": added, "removed": removed})
    return 0


def _cells(values: list[float]) -> list[object]:
    d = dist(values)
    return [d["n"], f"{d['p50']:.2f}", f"{d['p90']:.2f}", f"{d['p99']:.2f}", f"{d['max']:.2f}"]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"propagation: {exc}", file=sys.stderr)
        sys.exit(1)
