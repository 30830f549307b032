"""Shutdown and give-up times: the wall-clock limits the e2e tests used to assert, measured here.

The e2e tests keep the behaviour (the proxy exits 0 on SIGTERM, not killed, with a session
open or a key fetch hanging; a bad setting exits 2 before sshd starts); how fast is measured
here, rounds interleaved, as distributions and as ratios to a baseline of the same run:

- `docker stop` of a proxy serving one target (idle: the baseline);
- the same with an SSH session through the proxy open (`sleep 120` on the target);
- the same while a key fetch hangs (a target whose key file is a FIFO nobody writes: the
  exec'd `cat` never ends);
- a proxy with a bad setting, from `docker run` to the container exited, against a good
  proxy from `docker run` to sshd answering (how long a user waits for either verdict).

`docker stop` is given 30 s before it kills: a stop that is not clean shows as ~30 s and a
non-zero exit code (counted).

    .venv/bin/python bench/shutdown.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchError, BenchRun, SshClient, dist, docker, save, table  # noqa: E402

import helpers  # noqa: E402

STOP_GRACE = 30  # docker stop -t: SIGKILL only after this


def stop_seconds(proxy_id: str) -> tuple[float, int]:
    started = time.perf_counter()
    docker("stop", "-t", str(STOP_GRACE), proxy_id, timeout=STOP_GRACE + 30)
    elapsed = time.perf_counter() - started
    code = int(docker("inspect", "-f", "{{.State.ExitCode}}", proxy_id).stdout.strip())
    return elapsed, code


class Shutdown:
    def __init__(self, run: BenchRun) -> None:
        self.run = run
        self.key = run.key("ws")
        self.target = run.target(f"bench-stop-ws-{run.run_id}", self.key)
        fifo = run.work / "fifo"
        os.mkfifo(fifo)
        self.fifo = fifo
        self.env = {"SSH_PERMIT_TARGET_HOST": f"*-{run.run_id}"}

    def _serving_proxy(self, env: dict[str, str] | None = None):
        proxy = self.run.proxy(env={**self.env, **(env or {})})
        helpers.wait_for_login(SshClient(proxy, self.key), self.target.name)
        return proxy

    def idle(self) -> tuple[float, int]:
        proxy = self._serving_proxy()
        try:
            return stop_seconds(proxy.id)
        finally:
            docker("rm", "-f", proxy.id, check=False)

    def session_open(self) -> tuple[float, int]:
        proxy = self._serving_proxy()
        session = subprocess.Popen(SshClient(proxy, self.key).ssh_argv(self.target.name, "sleep", "120"),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            helpers.wait_for_event(proxy, event="tunnel", fp=self.key.fingerprint, deadline=15)
            return stop_seconds(proxy.id)
        finally:
            session.kill()
            session.wait(timeout=10)
            docker("rm", "-f", proxy.id, check=False)

    def fetch_hanging(self) -> tuple[float, int]:
        hung = self.run.target(f"bench-stop-hung-{secrets.token_hex(3)}-{self.run.run_id}", None,
                               serve_publickey=False, body_file=self.fifo)
        proxy = self._serving_proxy({"SSH_TARGET_KEY_PATH": helpers.PUBLICKEY_BODY_PATH})
        try:
            if not helpers.wait_until(
                    lambda: helpers.PUBLICKEY_BODY_PATH in hung.exec(["ps", "-eo", "args"]).stdout, 15):
                raise BenchError("the proxy never started reading the hung target's key file")
            return stop_seconds(proxy.id)
        finally:
            docker("rm", "-f", proxy.id, hung.id, check=False)

    def good_start(self) -> float:
        """docker run -> sshd answering (the banner)."""
        started = time.perf_counter()
        proxy = self.run.proxy(env=self.env)  # returns once sshd sends its banner
        elapsed = time.perf_counter() - started
        docker("rm", "-f", proxy.id, check=False)
        return elapsed

    def bad_setting(self) -> tuple[float, int]:
        """docker run with an invalid SSH_PERMIT_TARGET_PORT -> the container exited."""
        name = helpers.unique_name("ssh-proxy-bench-bad")
        started = time.perf_counter()
        docker(*helpers.proxy_run_args(name, self.run.network, self.run.run_id, image=helpers.PROXY_IMAGE,
                                       env={"SSH_PERMIT_TARGET_PORT": "not-a-port"},
                                       docker_args=self.run.label_args()))
        try:
            code = helpers.wait_for_exit(name, 60, interval=0.05)
            if code is None:
                raise BenchError("a proxy with SSH_PERMIT_TARGET_PORT=not-a-port still runs after 60 s")
            return time.perf_counter() - started, code
        finally:
            docker("rm", "-f", name, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    run = BenchRun("shutdown")
    run.images()
    run.create_network()
    bench = Shutdown(run)
    stops: dict[str, list[tuple[float, int]]] = {"idle": [], "session open": [], "key fetch hanging": []}
    starts: dict[str, list[tuple[float, int]]] = {"good setting: docker run -> sshd answering": [],
                                                  "bad setting: docker run -> exited": []}
    for r in range(args.rounds):  # interleaved: the machine's drift hits every case alike
        print(f"shutdown: round {r + 1} of {args.rounds}", file=sys.stderr)
        stops["idle"].append(bench.idle())
        stops["session open"].append(bench.session_open())
        stops["key fetch hanging"].append(bench.fetch_hanging())
        starts["good setting: docker run -> sshd answering"].append((bench.good_start(), 0))
        starts["bad setting: docker run -> exited"].append(bench.bad_setting())
    base_stop = dist([s for s, _ in stops["idle"]])
    base_start = dist([s for s, _ in starts["good setting: docker run -> sshd answering"]])
    rows = []
    for label, samples, base in ([(f"`docker stop`, {k}", v, base_stop) for k, v in stops.items()]
                                 + [(k, v, base_start) for k, v in starts.items()]):
        d = dist([s for s, _ in samples])
        codes = sorted({c for _, c in samples})
        rows.append([label, d["n"], f"{d['p50']:.2f}", f"{d['max']:.2f}",
                     f"{d['p50'] / base['p50']:.2f}x", ", ".join(map(str, codes))])
    md = ("### Shutdown and give-up\n\n"
          f"{args.rounds} interleaved rounds. Seconds; the ratio is to the first row of its group "
          f"(a stop to the idle stop, a start to the good start), p50 to p50. `docker stop -t "
          f"{STOP_GRACE}`: a stop that is not clean would take ~{STOP_GRACE} s and exit 137. The e2e "
          "tests assert the exit codes (0 on SIGTERM, 2 for a bad setting), not these times.\n\n"
          + table(["case", "n", "p50", "max", "vs baseline (p50)", "exit codes"], rows))
    save("shutdown", md, {"stops": stops, "starts": starts})
    return 0


if __name__ == "__main__":
    sys.exit(main())
