"""B4 burst: 200 and 500 simultaneous logins to the proxy.

Clients run in client containers on the proxy's network (the proxy image, which ships the
OpenSSH client), so each container is one source address as sshd counts them
(PerSourceMaxStartups is per address): 200 and 500 logins spread over 4 sources (50 and 125
each), and 500 from a single source, beyond its 256 pre-auth slots, to show that limit at
work. Every client of a burst starts at the same wall-clock instant (the containers share
the host's clock). A login is `ssh limited-user@proxy true`, which authenticates and is
answered by the proxy's no-shell message: success = exit 1 with that message.
Bursts are interleaved (200/4, 500/4, 500/1, then again).

    .venv/bin/python bench/burst.py [--repeat 2] [--sources 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchError, BenchRun, dist, docker, save, table  # noqa: E402

import helpers  # noqa: E402

# Runs inside a client container (system python3): waits for the common start instant,
# starts N ssh at once, reports per login: seconds, exit code, a classification.
CLIENT = r"""
import json, subprocess, sys, threading, time
start_at, count, host = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
opts = ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=60", "-i", "/keys/login"]
out = [None] * count

def login(n, started, p):
    # one thread per client: each exit is timed when it happens, not when reaped in order
    try:
        _, err = p.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        p.kill(); _, err = p.communicate()
    ended = time.monotonic()
    text = err.decode(errors="replace")
    if p.returncode == 1 and "ssh-proxy:" in text:
        kind = "ok"
    elif "kex_exchange_identification" in text or "Connection closed by" in text \
            or "Connection reset" in text:
        kind = "dropped"
    elif p.returncode < 0 or "timed out" in text:
        kind = "timeout"
    else:
        kind = "other: " + text.strip().splitlines()[-1][:120] if text.strip() else "other"
    out[n] = [ended - started, p.returncode, kind]

time.sleep(max(0.0, start_at - time.time()))
threads = []
for n in range(count):
    started = time.monotonic()
    p = subprocess.Popen(["ssh", *opts, "limited-user@" + host, "true"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t = threading.Thread(target=login, args=(n, started, p))
    t.start()
    threads.append(t)
for t in threads:
    t.join()
print(json.dumps(out))
"""


def burst(clients: list[str], proxy_ip: str, total: int, sources: int) -> list[list]:
    """One burst of `total` logins from the first `sources` client containers."""
    per = [total // sources + (1 if i < total % sources else 0) for i in range(sources)]
    start_at = time.time() + 3.0
    procs = [subprocess.Popen(["docker", "exec", "-i", cid, "python3", "-", str(start_at), str(n), proxy_ip],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for cid, n in zip(clients, per)]
    results: list[list] = []
    for p in procs:
        out, err = p.communicate(CLIENT.encode(), timeout=300)
        if p.returncode != 0:
            raise BenchError(f"client container failed: {err.decode(errors='replace')[-2000:]}")
        results += json.loads(out)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--sources", type=int, default=4)
    args = parser.parse_args()
    run = BenchRun("burst")
    try:
        proxy_image, _ = run.images()
        run.create_network()
        key = run.key("login")
        keys = run.work / "served"
        keys.mkdir()
        (keys / "login.pub").write_text(key.public + "\n")
        proxy = run.proxy(env={"MANUAL_AUTH_FILE": "true"}, docker_socket=False,
                          volumes=[f"{keys}:/etc/ssh/authorized_keys.d:ro"])
        proxy_ip = docker("inspect", "-f", f'{{{{with index .NetworkSettings.Networks "{run.network}"}}}}'
                          "{{.IPAddress}}{{end}}", proxy.id).stdout.strip()
        limits = proxy.exec("grep -E '^(MaxStartups|PerSource|LoginGraceTime)' /etc/ssh/sshd_config").stdout
        clients = []
        for i in range(args.sources):
            cid = docker("run", "-d", "--name", helpers.unique_name(f"ssh-proxy-bench-client{i}"),
                         "--network", run.network, *run.label_args(), "--no-healthcheck",
                         "-v", f"{key.private.parent}:/keys:ro", "--entrypoint", "sleep",
                         proxy_image, "infinity").stdout.strip()
            clients.append(cid)
        if not helpers.wait_until(lambda: burst(clients[:1], proxy_ip, 1, 1)[0][2] == "ok", 60, interval=1):
            raise BenchError("a single login from a client container does not work")
        cases = [(200, args.sources), (500, args.sources), (500, 1)]
        results: dict[str, list[list]] = {f"{n} from {s} source{'s' if s > 1 else ''}": []
                                          for n, s in cases}
        for _ in range(args.repeat):
            for (n, s), label in zip(cases, results):
                print(f"burst: {label}", file=sys.stderr)
                results[label] += burst(clients, proxy_ip, n, s)
                time.sleep(5)  # let sshd reap the burst before the next
    finally:
        run.cleanup()

    rows = []
    for label, res in results.items():
        ok = [r[0] for r in res if r[2] == "ok"]
        kinds: dict[str, int] = {}
        for r in res:
            kinds[r[2]] = kinds.get(r[2], 0) + 1
        d = dist(ok)
        other = sum(v for k, v in kinds.items() if k not in ("ok", "dropped"))
        rows.append([label, f"{100 * len(ok) / len(res):.1f}%", f"{d.get('p50', float('nan')):.2f}",
                     f"{d.get('p99', float('nan')):.2f}", f"{d.get('max', float('nan')):.2f}",
                     kinds.get("dropped", 0), other, len(res)])
    md = ("### B4 burst\n\nSimultaneous `ssh limited-user@proxy` logins from client containers on the "
          f"proxy's network (one source address each), {args.repeat} bursts of each size, interleaved; "
          "latency in seconds of the successful logins, from the client's start to its exit. "
          "sshd limits in force (from the rendered sshd_config):\n\n```\n" + limits.strip() + "\n```\n\n"
          + table(["burst", "success", "p50 s", "p99 s", "max s", "dropped by sshd", "other failures",
                   "logins"], rows))
    save("burst", md, {"results": results, "limits": limits})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"burst: {exc}", file=sys.stderr)
        sys.exit(1)
