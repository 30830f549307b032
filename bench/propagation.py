"""B1 propagation: how soon the proxy follows Docker, both ways.

One proxy (Docker discovery). 30 targets started one by one, each with its own key:
from its key endpoint answering (sshd and GET /publickey both listening) to the first
successful login through the proxy. Then each target in turn is stopped (`docker stop`) or
removed (`docker rm -f`), alternately: from the command returning to the proxy refusing the
key ("Permission denied"). Login attempts follow each other without pause; each figure is
when the first attempt that saw the change started, so it may overstate by up to one
attempt (a login through the proxy, ~0.4 s here; a refusal, ~0.2 s).

    .venv/bin/python bench/propagation.py [--targets 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchError, BenchRun, SshClient, dist, docker, save, table, timed  # noqa: E402


def until(predicate, deadline: float = 120) -> float:
    """Seconds from now to the start of the first attempt, back to back, for which
    predicate() held (the change was there by then); BenchError past the deadline."""
    started = time.perf_counter()
    while True:
        attempt = time.perf_counter() - started
        if predicate():
            return attempt
        if attempt > deadline:
            raise BenchError(f"not within {deadline} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=30)
    args = parser.parse_args()
    run = BenchRun("propagation")
    added: list[float] = []
    removed: dict[str, list[float]] = {"docker stop": [], "docker rm -f": []}
    try:
        run.images()
        run.create_network()
        proxy = run.proxy(env={"SSH_TARGET_LABELS": f"ssh-proxy-bench-run={run.run_id}"})
        targets = []
        for i in range(args.targets):
            key = run.key(f"t{i}")
            name = f"bench-prop-{run.run_id}-{i}"
            target = run.target(name, key)  # returns once sshd and /publickey listen
            client = SshClient(proxy, key)
            argv = client.ssh_argv(name, "true")
            added.append(until(lambda: timed(argv, timeout=30)[1].returncode == 0))
            targets.append((target, client))
            print(f"propagation: target {i} in after {added[-1]:.2f} s", file=sys.stderr)
        for i, (target, client) in enumerate(targets):
            argv = client.direct_argv("true")

            def refused() -> bool:
                proc = timed(argv, timeout=30)[1]
                return proc.returncode == 255 and b"Permission denied" in proc.stderr
            if refused():
                raise BenchError(f"{target.name}: key refused before the target went away")
            how = "docker stop" if i % 2 == 0 else "docker rm -f"
            if how == "docker stop":
                docker("stop", "-t", "2", target.id)
            else:
                docker("rm", "-f", target.id)
            removed[how].append(until(refused))
    finally:
        run.cleanup()

    rows = [["target started (key endpoint ready) -> first login through the proxy", *_cells(added)]]
    rows += [[f"`{how}` returned -> key refused", *_cells(v)] for how, v in removed.items()]
    md = ("### B1 propagation\n\nOne proxy (Docker discovery), targets one at a time; seconds.\n\n"
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
