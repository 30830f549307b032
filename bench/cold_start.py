"""B5 cold start: 100 targets already running, then the proxy starts; Docker and Kubernetes.

The targets start first (each with its own key), then a proxy, and the proxy's index is read
every 0.25 s: for each target, the seconds from `docker run` of the proxy to its key being
served. Once all are served, every target is logged in to through the proxy (8 at a time) to
confirm it is reachable. Also: how long the proxy took to listen, and each key's time as a
ratio to that.

Two discovery modes, one proxy each, started one after the other against the same running
target containers (the previous proxy removed first):

- docker: the proxy finds the targets by a label through the Docker API;
- kubernetes: the tests' fake API server (tests/fakekube, in this process) holds one Ready pod
  per target (pod IP = the container's IP, each pod its own name and labels) before the proxy
  starts; exec into a pod runs `docker exec` in its container. Logins go by pod name.

And two sets of targets, each measured in both modes:

- all fast: every target answers GET /publickey at once;
- mixed: of the same number, some exec-only (no GET /publickey: the proxy falls back to
  reading ~/.ssh/id_ed25519.pub by exec) and some slow (GET /publickey answers after a delay).

The proxy's host keys are provided (made once per run, mounted read-only at
/etc/ssh/host_keys, as deploy/'s Secret and the compose file's volume provide them after the
first start), so each start is a restart's; one more run (Docker mode, all fast) starts a
brand-new container that makes its own, the first start of a deployment (RSA 3072: 0.6-1.9 s
here, on the way to sshd listening).

    .venv/bin/python bench/cold_start.py [--mode both|docker|kubernetes]
        [--variant both|fast|mixed] [--targets 100] [--exec-only 10] [--slow 10] [--delay 2]
        [--no-fresh]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (BenchError, BenchRun, KeyPair, Proxy, SshClient, Target, dist, docker,  # noqa: E402
                    save, table, timed)

from tests.fakekube import ExecCall, ExecResult, FakeKube, make_pod  # noqa: E402
import helpers  # noqa: E402  (tests/e2e, on the path through common)
from watcher.sshd import ensure_host_keys  # noqa: E402

# The served keys: the single index file, or (a planned layout) a directory of shards with
# the same line format; whichever exists is read, either may be missing.
READ_INDEX = f"cat /etc/ssh/authorized_keys.index 2>/dev/null; {helpers.CAT_INDEX}"
NAMESPACE = "bench"
POLL = 0.25  # seconds between reads of the index
SERVE_DEADLINE = 240.0
KINDS = ("fast", "exec-only", "slow")
HOST_KEY_DIR = "/etc/ssh/host_keys"
FRESH = "new container: makes its host keys"


def served_fingerprints(proxy: Proxy) -> set[str]:
    """Fingerprints (each index line's first field) the proxy serves now, in either layout."""
    return {line.split(" ", 1)[0] for line in proxy.exec(READ_INDEX).stdout.splitlines() if line}


@dataclass(frozen=True)
class Variant:
    """A set of targets measured in every mode."""

    key: str  # "fast" | "mixed"
    title: str

    @property
    def label(self) -> str:
        """The Docker label its targets carry (the Docker-mode proxy's SSH_TARGET_LABELS)."""
        return f"ssh-proxy-bench-cold-{self.key}"


@dataclass(frozen=True)
class Spec:
    """One target container to start: its key name, kind and the variants it belongs to."""

    key_name: str
    kind: str  # one of KINDS
    variants: tuple[str, ...]


@dataclass(frozen=True)
class Running:
    """A started target: its container, key and kind."""

    target: Target
    key: KeyPair
    kind: str


@dataclass(frozen=True)
class Outcome:
    """One proxy's cold start: seconds from its `docker run`."""

    mode: str
    variant: str
    listening: float
    served: dict[str, list[float]]  # kind -> each target's key served
    all_served: float
    all_reachable: float | None  # None: not confirmed by login (the new-container run)


def fleet(targets: int, exec_only: int, slow: int) -> list[Spec]:
    """Every target to start: `targets` fast ones (all in the fast variant, the first
    targets - exec_only - slow also in the mixed one) and the mixed variant's special ones."""
    keep = targets - exec_only - slow
    specs = [Spec(f"f{i}", "fast", ("fast", "mixed") if i < keep else ("fast",)) for i in range(targets)]
    specs += [Spec(f"e{i}", "exec-only", ("mixed",)) for i in range(exec_only)]
    specs += [Spec(f"s{i}", "slow", ("mixed",)) for i in range(slow)]
    return specs


def start_target(run: BenchRun, spec: Spec, variants: list[Variant], delay: float) -> Running:
    key = run.key(spec.key_name)
    labels = {v.label: run.run_id for v in variants if v.key in spec.variants}
    env = {"PUBLICKEY_DELAY": f"{delay:g}"} if spec.kind == "slow" else {}
    target = run.target(f"bench-cold-{run.run_id}-{spec.key_name}", key, labels=labels, env=env,
                        serve_publickey=spec.kind != "exec-only")
    return Running(target, key, spec.kind)


# --------------------------------------------------------------------------- one cold start


def wait_served(proxy: Proxy, started: float, wanted: set[str]) -> dict[str, float]:
    """fingerprint -> seconds since `started` when the index first held it."""
    served: dict[str, float] = {}
    while len(served) < len(wanted):
        now = time.perf_counter() - started
        if now > SERVE_DEADLINE:
            raise BenchError(f"only {len(served)} of {len(wanted)} keys served after {SERVE_DEADLINE:.0f} s")
        for fp in (served_fingerprints(proxy) & wanted) - served.keys():
            served[fp] = now
        time.sleep(POLL)
    return served


def confirm_logins(proxy: Proxy, logins: list[tuple[str, KeyPair]]) -> None:
    """Every (host, key) logs in through the proxy, 8 at a time."""
    def reachable(login: tuple[str, KeyPair]) -> bool:
        host, key = login
        return timed(SshClient(proxy, key).ssh_argv(host, "true"), timeout=60)[1].returncode == 0
    with ThreadPoolExecutor(8) as pool:
        ok = list(pool.map(reachable, logins))
    if not all(ok):
        failed = [host for (host, _), good in zip(logins, ok) if not good]
        raise BenchError(f"{len(failed)} of {len(logins)} targets not reachable though served: {failed[:5]}")


def cold_start(mode: str, variant: str, targets: list[Running], hosts: list[str],
               start_proxy: Callable[[], Proxy], confirm: bool = True) -> Outcome:
    """Starts the proxy, times each target's key to being served, then (`confirm`) confirms
    every login (target i by hosts[i]); the proxy is removed at the end."""
    started = time.perf_counter()
    proxy = start_proxy()
    try:
        listening = time.perf_counter() - started  # start_proxy returns once sshd listens
        served = wait_served(proxy, started, {t.key.fingerprint for t in targets})
        all_served = time.perf_counter() - started
        all_reachable = None
        if confirm:
            confirm_logins(proxy, [(host, t.key) for host, t in zip(hosts, targets)])
            all_reachable = time.perf_counter() - started
    finally:
        proxy.remove()
    by_kind = {kind: [served[t.key.fingerprint] for t in targets if t.kind == kind] for kind in KINDS}
    return Outcome(mode, variant, listening, {k: v for k, v in by_kind.items() if v},
                   all_served, all_reachable)


# --------------------------------------------------------------------------- the two modes


def host_keys(run: BenchRun) -> Path:
    """One set of host keys for every proxy of the run, made by the watcher's own code
    (made once: the next call finds them)."""
    directory = run.work / "host_keys"
    ensure_host_keys(directory)
    return directory


def keys_volume(run: BenchRun) -> list[str]:
    return [f"{host_keys(run)}:{HOST_KEY_DIR}:ro"]


def docker_cold_start(run: BenchRun, variant: Variant, targets: list[Running], fresh: bool = False) -> Outcome:
    env = {"SSH_TARGET_LABELS": f"{variant.label}={run.run_id}"}
    volumes = [] if fresh else keys_volume(run)
    title = f"{variant.title}, {FRESH}" if fresh else variant.title
    # A new container differs from the first Docker run only in its host keys: its logins
    # are not confirmed again (~40 s; B5 stays under 5 minutes).
    return cold_start("docker", title, targets, [t.target.name for t in targets],
                      lambda: run.proxy(env=env, volumes=volumes), confirm=not fresh)


def docker_exec(containers: dict[str, str]) -> Callable[[ExecCall], ExecResult]:
    """The fake API server's exec: the command run by `docker exec` in the pod's container."""
    def handler(call: ExecCall) -> ExecResult:
        cid = containers.get(call.pod)
        if cid is None:
            return ExecResult(stderr=f"no container for pod {call.pod}\n".encode(), exit_code=126)
        proc = subprocess.run(["docker", "exec", cid, *call.command], capture_output=True, timeout=30)
        return ExecResult(stdout=proc.stdout, stderr=proc.stderr, exit_code=proc.returncode)
    return handler


def kube_cold_start(run: BenchRun, variant: Variant, targets: list[Running]) -> Outcome:
    """A fresh fake API server holding one Ready pod per target, then the proxy."""
    gateway = docker("network", "inspect", run.network, "-f",
                     "{{(index .IPAM.Config 0).Gateway}}").stdout.strip()
    fake = FakeKube(namespace=NAMESPACE, host=gateway).start()
    try:
        pods = [f"cold-{t.key.name}-{run.run_id}" for t in targets]  # SSH_PERMIT_TARGET_HOST below
        for pod, t in zip(pods, targets):
            fake.add_pod(make_pod(pod, ip=t.target.ip, labels={"app": pod, "kind": t.kind}))
        fake.exec_handler = docker_exec({pod: t.target.id for pod, t in zip(pods, targets)})
        config = fake.write_kubeconfig(run.work / f"kubeconfig-{variant.key}")
        config.chmod(0o644)
        proxy_pod = f"ssh-proxy-{variant.key}-{run.run_id}"

        def start_proxy() -> Proxy:
            # No Docker socket: the kube config alone selects Kubernetes mode.
            proxy = run.proxy(env={"POD_NAME": proxy_pod, "SSH_PERMIT_TARGET_HOST": f"*-{run.run_id}"},
                              volumes=[f"{config}:/root/.kube/config:ro", *keys_volume(run)],
                              docker_socket=False)
            ip = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                        proxy.id).stdout.strip()
            fake.add_pod(make_pod(proxy_pod, ip=ip, labels={"app": "ssh-proxy"}))
            return proxy
        return cold_start("kubernetes", variant.title, targets, pods, start_proxy)
    finally:
        fake.stop()


# --------------------------------------------------------------------------- report


def rows_of(o: Outcome) -> list[list[object]]:
    def cells(values: list[float]) -> list[object]:
        d, r = dist(values), dist([v / o.listening for v in values])
        return [d["n"], f"{d['p50']:.2f}", f"{d['p90']:.2f}", f"{d['p99']:.2f}", f"{d['max']:.2f}",
                f"{r['p50']:.2f}x / {r['max']:.2f}x"]
    every = [v for values in o.served.values() for v in values]
    rows = [[o.mode, o.variant, "`docker run` -> sshd listening", 1, f"{o.listening:.2f}", "", "", "", ""],
            [o.mode, o.variant, "`docker run` -> a target's key served", *cells(every)]]
    if len(o.served) > 1:
        rows += [[o.mode, o.variant, f"... of the {kind} targets", *cells(v)] for kind, v in o.served.items()]
    if o.all_reachable is None:
        rows.append([o.mode, o.variant, "`docker run` -> every key served (logins not confirmed again)", 1,
                     f"{o.all_served:.2f}", "", "", "", ""])
    else:
        rows.append([o.mode, o.variant, f"`docker run` -> every key served / all {len(every)} logins confirmed",
                     1, f"{o.all_served:.2f} / {o.all_reachable:.2f}", "", "", "", ""])
    return rows


def chosen_variants(args: argparse.Namespace) -> list[Variant]:
    fast = Variant("fast", "all fast")
    counts = ((args.targets - args.exec_only - args.slow, "fast"), (args.exec_only, "exec-only"),
              (args.slow, f"slow ({args.delay:g} s)"))
    mixed = Variant("mixed", ", ".join(f"{n} {what}" for n, what in counts if n))
    return {"both": [fast, mixed], "fast": [fast], "mixed": [mixed]}[args.variant]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("both", "docker", "kubernetes"), default="both")
    parser.add_argument("--variant", choices=("both", "fast", "mixed"), default="both")
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--exec-only", type=int, default=10, help="in the mixed variant")
    parser.add_argument("--slow", type=int, default=10, help="in the mixed variant")
    parser.add_argument("--delay", type=float, default=2.0, help="seconds a slow target's GET /publickey waits")
    parser.add_argument("--no-fresh", dest="fresh", action="store_false",
                        help="no run of a brand-new proxy that makes its own host keys")
    args = parser.parse_args()
    if args.exec_only + args.slow > args.targets:
        parser.error("--exec-only + --slow is more than --targets")
    modes = ("docker", "kubernetes") if args.mode == "both" else (args.mode,)
    variants = chosen_variants(args)
    keys = {v.key for v in variants}
    specs = [s for s in fleet(args.targets, args.exec_only, args.slow) if keys & set(s.variants)]
    measure = {"docker": docker_cold_start, "kubernetes": kube_cold_start}
    run = BenchRun("coldstart")
    outcomes: list[Outcome] = []
    try:
        run.images()
        run.create_network()
        with ThreadPoolExecutor(6) as pool:
            running = list(pool.map(lambda s: start_target(run, s, variants, args.delay), specs))
        print(f"cold_start: {len(running)} targets running", file=sys.stderr)
        for variant in variants:
            members = [r for r, s in zip(running, specs) if variant.key in s.variants]
            runs = [lambda mode=mode: measure[mode](run, variant, members) for mode in modes]
            if args.fresh and variant.key == "fast" and "docker" in modes:
                runs.append(lambda: docker_cold_start(run, variant, members, fresh=True))
            for one in runs:
                outcome = one()
                outcomes.append(outcome)
                print(f"cold_start: {outcome.mode}, {outcome.variant}: all served {outcome.all_served:.2f} s",
                      file=sys.stderr)
    finally:
        run.cleanup()

    rows = [row for o in outcomes for row in rows_of(o)]
    md = (f"### B5 cold start\n\n{args.targets} targets running, then the proxy starts; seconds from the "
          "proxy's `docker run`. Docker mode finds the targets by a label; Kubernetes mode watches the tests' "
          "**fake** API server (tests/fakekube), which holds one Ready pod per target (pod IP = the "
          "container's IP) before the proxy starts, and whose exec runs `docker exec` (a real API server "
          "adds its own list and exec latency). The proxies run one after the other against the same "
          "running targets. Exec-only targets serve no GET /publickey (the key is read by exec); slow ones "
          f"answer it after {args.delay:g} s. The last column is each key's time as a ratio to the "
          f"proxy's own start (sshd listening), p50 / max. The index was read every {POLL} s. "
          "Host keys: provided to every proxy (read-only at /etc/ssh/host_keys, as deploy/'s Secret and "
          "the compose file's volume provide them from the second start on), except in the rows marked "
          f"\"{FRESH}\": a brand-new container that makes its own first (RSA 3072 on the way to sshd "
          "listening), once per deployment.\n\n"
          + table(["mode", "targets", "event", "n", "p50", "p90", "p99", "max", "vs sshd listening"], rows))
    save("cold_start", md, {"runs": [vars(o) for o in outcomes]})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"cold_start: {exc}", file=sys.stderr)
        sys.exit(1)
