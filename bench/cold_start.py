"""B5 cold start: 100 targets already running, then the proxy starts.

Starts the targets first (each with its own key, serving GET /publickey), then the proxy
(Docker discovery), and reads the proxy's index every 0.25 s: for each target, the seconds
from `docker run` of the proxy to its key being served. Once all are served, every target
is logged in to through the proxy (8 at a time) to confirm it is reachable. Also: how long
the proxy took to listen, and the same distribution as a ratio to that.

    .venv/bin/python bench/cold_start.py [--targets 100]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchError, BenchRun, SshClient, dist, save, table, timed  # noqa: E402


INDEX = "/etc/ssh/authorized_keys.index"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=100)
    args = parser.parse_args()
    run = BenchRun("coldstart")
    try:
        run.images()
        run.create_network()
        keys = [run.key(f"t{i}") for i in range(args.targets)]
        names = [f"bench-cold-{run.run_id}-{i}" for i in range(args.targets)]
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda i: run.target(names[i], keys[i]), range(args.targets)))
        print(f"cold_start: {args.targets} targets running", file=sys.stderr)
        started = time.perf_counter()
        proxy = run.proxy(env={"SSH_TARGET_LABELS": f"ssh-proxy-bench-run={run.run_id}"})
        listening = time.perf_counter() - started  # run.proxy returns once sshd listens
        served: dict[str, float] = {}
        wanted = {k.fingerprint for k in keys}
        while len(served) < len(wanted):
            if time.perf_counter() - started > 240:
                raise BenchError(f"only {len(served)} of {len(wanted)} keys served after 240 s")
            now = time.perf_counter() - started
            for line in proxy.read_file(INDEX).splitlines():
                fp = line.split(" ", 1)[0]
                if fp in wanted and fp not in served:
                    served[fp] = now
            time.sleep(0.25)
        all_served = time.perf_counter() - started

        def reachable(i: int) -> bool:
            return timed(SshClient(proxy, keys[i]).ssh_argv(names[i], "true"), timeout=60)[1].returncode == 0
        with ThreadPoolExecutor(8) as pool:
            ok = list(pool.map(reachable, range(args.targets)))
        all_reachable = time.perf_counter() - started
        if not all(ok):
            raise BenchError(f"{ok.count(False)} of {args.targets} targets not reachable though served")
    finally:
        run.cleanup()

    times = list(served.values())
    d = dist(times)
    ratio = dist([t / listening for t in times])
    rows = [["proxy `docker run` -> sshd listening", 1, f"{listening:.2f}", "", "", "", ""],
            ["proxy `docker run` -> a target's key served", d["n"], f"{d['p50']:.2f}", f"{d['p90']:.2f}",
             f"{d['p99']:.2f}", f"{d['max']:.2f}",
             f"{ratio['p50']:.2f}x / {ratio['max']:.2f}x"],
            [f"proxy `docker run` -> every key served, then all {args.targets} logins confirmed", 1,
             f"{all_served:.2f} / {all_reachable:.2f}", "", "", "", ""]]
    md = (f"### B5 cold start\n\n{args.targets} targets running, then the proxy starts (Docker discovery); "
          "seconds from the proxy's `docker run`; the last column is each key's time as a ratio "
          "to the proxy's own start (sshd listening), p50 / max. The index was read every 0.25 s.\n\n"
          + table(["event", "n", "p50", "p90", "p99", "max", "vs sshd listening"], rows))
    save("cold_start", md, {"listening": listening, "served": times, "all_served": all_served,
                            "all_reachable": all_reachable})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"cold_start: {exc}", file=sys.stderr)
        sys.exit(1)
