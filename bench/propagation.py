"""B1 propagation: how soon the proxy follows Docker, and Kubernetes, both ways, stage by stage.

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

Stages: the proxies log at debug level, and each change is split at the watcher's own log
lines (same host clock): the event seen (`target added` / `target removed`), the key fetched
(`N key(s) via`), the index written (`rendered keys written`), and the login through sshd
that first saw it. A regression shows in the stage that grew.

Late keys: targets whose key file appears only after the proxy's first fetch gave up (the
next retry is 5 s later), half with a Docker HEALTHCHECK that passes once the file is there
(the proxy fetches on the `healthy` event), half without: from the file written to the first
login.

    .venv/bin/python bench/propagation.py [--targets 30] [--late 4] [--mode both|docker|kubernetes]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchError, BenchRun, Proxy, SshClient, Target, dist, docker, save, table, timed  # noqa: E402

from tests.fakekube import FakeKube, make_pod  # noqa: E402

NAMESPACE = "bench"


def until(predicate: Callable[[], bool], deadline: float = 120) -> float:
    """The Unix time at which the first attempt, back to back, for which predicate() held
    started (the change was there by then); BenchError past the deadline."""
    started = time.monotonic()
    while True:
        attempt = time.time()
        if predicate():
            return attempt
        if time.monotonic() - started > deadline:
            raise BenchError(f"not within {deadline} s")


def logs_in(argv: list[str]) -> Callable[[], bool]:
    return lambda: timed(argv, timeout=30)[1].returncode == 0


def refused(argv: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        proc = timed(argv, timeout=30)[1]
        return proc.returncode == 255 and b"Permission denied" in proc.stderr
    return check


# ---- the watcher's own timeline, from its log ----------------------------------------------
_LINE = re.compile(r'^ts=(\S+) level=\w+ logger=\S+ msg="(.*)"')


@dataclass
class Timeline:
    """When the watcher saw, fetched and wrote what, read from a proxy's log (debug level)."""

    seen: dict[str, float] = field(default_factory=dict)  # target added: name -> first time
    fetched: dict[str, float] = field(default_factory=dict)  # N key(s) via: name -> first time
    removed: dict[str, float] = field(default_factory=dict)  # target removed: name -> first time
    writes: list[float] = field(default_factory=list)  # every index write that changed something

    @classmethod
    def read(cls, proxy: Proxy) -> "Timeline":
        line_of = cls()
        for line in proxy.logs().splitlines():
            match = _LINE.match(line)
            if not match:
                continue
            when = (datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%fZ")
                    .replace(tzinfo=timezone.utc).timestamp())
            msg = match.group(2)
            if msg.startswith("target added: "):
                line_of.seen.setdefault(msg.split()[2], when)
            elif msg.startswith("target removed: "):
                line_of.removed.setdefault(msg.split()[2], when)
            elif msg.startswith("target ") and " key(s) via " in msg:
                line_of.fetched.setdefault(msg.split()[1].rstrip(":"), when)
            elif msg.startswith("rendered keys written"):
                line_of.writes.append(when)
        return line_of

    def written_after(self, when: float | None) -> float | None:
        """The first index write at or after `when` (the one that carried that change)."""
        if when is None:
            return None
        return next((w for w in self.writes if w >= when), None)


def span(start: float | None, end: float | None) -> float | None:
    """end - start, never below 0 (a login attempt may start just before the write it
    needs and still get in); None when a stage was not seen."""
    if start is None or end is None:
        return None
    return max(0.0, end - start)


@dataclass
class Added:
    name: str
    origin: float  # `docker run` issued / the pod ADDED
    ready: float  # key endpoint answering (Docker) / = origin (Kubernetes)
    login: float  # the first successful login attempt started


@dataclass
class Removed:
    name: str
    origin: float  # the stop/rm command returned / the pod deleted
    refused: float  # the first refused attempt started


def add_stages(adds: list[Added], line_of: Timeline) -> dict[str, list[float | None]]:
    stages: dict[str, list[float | None]] = {"event seen": [], "key fetched": [], "index written": [],
                                             "sshd lets the login in": []}
    for a in adds:
        seen, fetched = line_of.seen.get(a.name), line_of.fetched.get(a.name)
        written = line_of.written_after(fetched)
        stages["event seen"].append(span(a.origin, seen))
        stages["key fetched"].append(span(seen, fetched))
        stages["index written"].append(span(fetched, written))
        # The bench tries only once the target is ready: from then, if the key was first.
        stages["sshd lets the login in"].append(span(None if written is None else max(written, a.ready), a.login))
    return stages


def remove_stages(removals: list[Removed], line_of: Timeline) -> dict[str, list[float | None]]:
    stages: dict[str, list[float | None]] = {"event seen": [], "index written": [],
                                             "sshd refuses the key": []}
    for r in removals:
        seen = line_of.removed.get(r.name)
        written = line_of.written_after(seen)
        stages["event seen"].append(span(r.origin, seen))
        stages["index written"].append(span(seen, written))
        stages["sshd refuses the key"].append(span(written, r.refused))
    return stages


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
        proxy = run.proxy(env={"POD_NAME": f"ssh-proxy-{run.run_id}", "SSH_PERMIT_TARGET_HOST": f"*-{run.run_id}",
                               **DEBUG},
                          volumes=[f"{config}:/root/.kube/config:ro"], docker_socket=False)
        proxy_ip = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                          proxy.id).stdout.strip()
        fake.add_pod(make_pod(f"ssh-proxy-{run.run_id}", ip=proxy_ip, labels={"app": "ssh-proxy"}))
        return cls(fake, proxy)


DEBUG = {"WATCHER_LOG_LEVEL": "debug"}  # the `rendered keys written` lines
LATE_KEY = "/root/late.pub"  # the late targets' key file: absent until the bench writes it


def late_keys(run: BenchRun, count: int) -> dict[str, list[float]]:
    """Seconds from a late key file written to the first login, with and without a
    HEALTHCHECK that passes once the file is there."""
    role = f"ssh-proxy-bench-late={run.run_id}"
    proxy = run.proxy(env={"SSH_TARGET_LABELS": role, "SSH_TARGET_KEY_PATH": LATE_KEY, **DEBUG})
    health = ["--health-cmd", f"test -s {LATE_KEY}", "--health-interval", "500ms", "--health-retries", "1"]
    kinds = ["with HEALTHCHECK" if i % 2 == 0 else "without" for i in range(count)]
    keys = [run.key(f"late{i}") for i in range(count)]
    with ThreadPoolExecutor(max_workers=count) as pool:
        targets = list(pool.map(
            lambda i: run.target(f"bench-late-{run.run_id}-{i}", keys[i], serve_publickey=False,
                                 labels={role.split("=")[0]: run.run_id},
                                 docker_args=health if kinds[i] == "with HEALTHCHECK" else []),
            range(count)))

        def gave_up(target: Target) -> bool:  # the first fetch failed: the next is 5 s away
            return f"target {target.name}: no key" in proxy.logs()

        for target in targets:
            until(lambda: gave_up(target), deadline=60)

        def measure(i: int) -> float:
            target = targets[i]
            target.exec(f"cp /root/.ssh/id_ed25519.pub {LATE_KEY}.tmp && mv {LATE_KEY}.tmp {LATE_KEY}",
                        check=True)
            written = time.time()
            return until(logs_in(SshClient(proxy, keys[i]).ssh_argv(target.name, "true"))) - written

        results = list(pool.map(measure, range(count)))
    out: dict[str, list[float]] = {"with HEALTHCHECK": [], "without": []}
    for kind, seconds in zip(kinds, results):
        out[kind].append(max(0.0, seconds))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=30)
    parser.add_argument("--late", type=int, default=4, help="late-key targets (half with a HEALTHCHECK)")
    parser.add_argument("--mode", choices=("both", "docker", "kubernetes"), default="both")
    args = parser.parse_args()
    docker_on, kube_on = args.mode in ("both", "docker"), args.mode in ("both", "kubernetes")
    run = BenchRun("propagation")
    adds: dict[str, list[Added]] = {"docker": [], "kubernetes": []}
    removals: dict[str, list[Removed]] = {"docker stop": [], "docker rm -f": [], "pod deleted": []}
    lines: dict[str, Timeline] = {}
    late: dict[str, list[float]] = {}
    kube: Kube | None = None
    try:
        run.images()
        run.create_network()
        role = f"ssh-proxy-bench-docker={run.run_id}"  # only the Docker-mode targets carry it
        dproxy = run.proxy(env={"SSH_TARGET_LABELS": role, **DEBUG}) if docker_on else None
        kube = Kube.start(run) if kube_on else None
        dtargets: list[tuple[Target, SshClient]] = []
        pods: list[tuple[str, SshClient]] = []
        for i in range(args.targets):
            if dproxy is not None:
                key = run.key(f"d{i}")
                name = f"bench-prop-{run.run_id}-{i}"
                issued = time.time()
                target = run.target(name, key, labels={role.split("=")[0]: run.run_id})
                ready = time.time()
                client = SshClient(dproxy, key)
                adds["docker"].append(Added(name, issued, ready, until(logs_in(client.ssh_argv(name, "true")))))
                dtargets.append((target, client))
            if kube is not None:
                key = run.key(f"k{i}")
                target = run.target(f"bench-kpod-{run.run_id}-{i}", key)  # key endpoint answering
                pod = f"kpod-{i}-{run.run_id}"
                client = SshClient(kube.proxy, key)
                argv = client.ssh_argv(pod, "true")
                stored = time.time()
                kube.fake.add_pod(make_pod(pod, ip=target.ip, labels={"app": pod}))  # ADDED, Ready=True
                adds["kubernetes"].append(Added(pod, stored, stored, until(logs_in(argv))))
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
                returned = time.time()
                removals[how].append(Removed(target.name, returned, until(gone)))
            if i < len(pods):
                pod, client = pods[i]
                gone = refused(client.direct_argv("true"))
                if gone():
                    raise BenchError(f"pod {pod}: key refused before the pod went away")
                kube.fake.delete_pod(pod)
                deleted = time.time()
                removals["pod deleted"].append(Removed(pod, deleted, until(gone)))
        if dproxy is not None:
            lines["docker"] = Timeline.read(dproxy)
        if kube is not None:
            lines["kubernetes"] = Timeline.read(kube.proxy)
        if docker_on and args.late > 0:
            print("propagation: late keys", file=sys.stderr)
            late = late_keys(run, args.late)
    finally:
        if kube is not None:
            kube.fake.stop()
        run.cleanup()

    added = {mode: [a.login - a.ready for a in v] for mode, v in adds.items()}
    removed = {how: [r.refused - r.origin for r in v] for how, v in removals.items()}
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
    stage_rows, stages = [], {}
    for mode, origin in (("docker", "`docker run` issued"), ("kubernetes", "pod ADDED (Ready)")):
        if adds[mode]:
            stages[f"{mode} add"] = add_stages(adds[mode], lines[mode])
            stage_rows += _stage_rows(f"{mode.capitalize()} add", origin, stages[f"{mode} add"])
    docker_removals = removals["docker stop"] + removals["docker rm -f"]
    if docker_removals:
        stages["docker remove"] = remove_stages(docker_removals, lines["docker"])
        stage_rows += _stage_rows("Docker remove", "`docker stop` / `rm -f` returned", stages["docker remove"])
    if removals["pod deleted"]:
        stages["kubernetes remove"] = remove_stages(removals["pod deleted"], lines["kubernetes"])
        stage_rows += _stage_rows("Kubernetes remove", "pod deleted", stages["kubernetes remove"])
    md = ("### B1 propagation\n\nTwo proxies side by side, targets added one at a time, interleaved: "
          "Docker mode (discovery by the Docker API) and Kubernetes mode against the tests' **fake** "
          "API server (tests/fakekube; its pods are real target containers, pod IP = container IP; "
          "a real API server adds its own watch latency). Seconds; each figure may overstate by one "
          "login attempt.\n\n"
          + table(["event", "n", "p50", "p90", "p99", "max"], rows))
    if stage_rows:
        md += ("\n\nBy stage, split at the watcher's own log lines (same clock): each stage from the "
               "end of the one before. A Docker target's key fetch starts when its container starts "
               "and retries while it boots, so that stage holds the target's boot; the login stage "
               "is as coarse as one login attempt.\n\n"
               + table(["change", "stage", "n", "p50", "p90", "p99", "max"], stage_rows))
    if late:
        md += ("\n\nLate keys: the key file written only after the proxy's first fetch gave up (its "
               "next retry 5 s later); from the file written to the first login. With a HEALTHCHECK "
               "(`test -s` of the file, every 0.5 s) the proxy fetches on Docker's `healthy` event.\n\n"
               + table(["target", "n", "p50", "p90", "p99", "max"],
                       [[f"late key, {kind}", *_cells(v)] for kind, v in late.items() if v]))
    save("propagation", md, {"added": added, "removed": removed, "stages": stages, "late": late})
    return 0


def _stage_rows(change: str, origin: str, stages: dict[str, list[float | None]]) -> list[list[object]]:
    rows = []
    for i, (stage, values) in enumerate(stages.items()):
        label = f"{origin} -> {stage}" if i == 0 else stage
        rows.append([change if i == 0 else "", label, *_cells(values)])
    return rows


def _cells(values: list[float | None]) -> list[object]:
    d = dist(values)
    if not d["n"]:
        return [0, "", "", "", ""]
    return [d["n"], f"{d['p50']:.2f}", f"{d['p90']:.2f}", f"{d['p99']:.2f}", f"{d['max']:.2f}"]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"propagation: {exc}", file=sys.stderr)
        sys.exit(1)
