"""B3 overhead: the proxy hop against going straight to the same target.

One target, one proxy (Docker discovery, as deployed); interleaved, paired per round:

- login: `ssh root@TARGET true` through the proxy vs `ssh root@TARGET_IP true` (goal <= 2.2x);
- scp of 128 MiB of random bytes from the target to /dev/null, through the proxy vs
  direct, as a throughput ratio (goal >= 0.9x), with diagnostics beside it (the proxy by its
  container address, AES-GCM on the hop to the proxy or on both hops) and, for every scp,
  the CPU seconds per GiB of each process on the path: the client's session ssh (scp's ssh,
  to the target), the client's tunnel ssh (`ssh -W`, to the proxy), Docker's userland port
  forwarder (docker-proxy, when the engine runs one), the proxy container (its sshd) and the
  target container (its sshd and scp);
- link-limited: the same pair with the target's egress shaped to 200 Mbit/s (`tc ... tbf`,
  set from the host in the target's network namespace), the realistic case of a remote user.

    .venv/bin/python bench/overhead.py [--rounds 15] [--scp-rounds 4] [--mib 128]
                                       [--shaped-rounds 3] [--shaped-mib 256] [--rate 200mbit]
                                       [--variants ...]
(defaults: ~5 minutes on 2 cores at load average 40-57)
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (BenchError, BenchRun, SshClient, dist, docker, interleave, paired_ratios, pct,  # noqa: E402
                    save, table, timed, valid)

import helpers  # noqa: E402

BLOB = "/root/bench-blob"
AES = "aes128-gcm@openssh.com"
TICK = os.sysconf("SC_CLK_TCK")
ROLES = ("client session ssh", "client tunnel ssh", "docker-proxy", "proxy sshd", "target sshd+scp")


def direct_argv(client: SshClient, ip: str, *args: str, scp: bool = False, remote: str = BLOB) -> list[str]:
    """The same client options without the ProxyCommand: straight to the target's address
    (with scp=True, `args` are scp options)."""
    opts = ["-i", client.key_path, *helpers.NO_PROMPT_OPTS, "-o", f"ConnectTimeout={client.connect_timeout}"]
    if scp:
        return ["scp", *opts, *args, f"root@{ip}:{remote}", "/dev/null"]
    return ["ssh", *opts, f"root@{ip}", *args]


@dataclass
class TunedClient(SshClient):
    """SshClient whose tunnel ssh (the ProxyCommand `ssh -W`) gets extra options and, with
    `cgroup`, runs in that cgroup (its CPU then counts apart from the session's)."""

    outer_opts: Sequence[str] = ()
    cgroup: "Cgroup | None" = None

    def proxy_command(self) -> str:
        command = super().proxy_command().replace("ssh -W", f"ssh {shlex.join(self.outer_opts)} -W", 1)
        return self.cgroup.wrap_command(command) if self.cgroup else command


# --------------------------------------------------------------------------- CPU accounting


@dataclass
class Cgroup:
    """A CPU-accounting cgroup of our own on the host, for client processes: every process
    started in it (and its children until they move) counts here, however it ends."""

    path: Path
    usage_file: str

    @classmethod
    def create(cls, name: str) -> "Cgroup":
        v1 = Path("/sys/fs/cgroup/cpuacct")
        if (v1 / "cpuacct.usage").exists():
            path, usage = v1 / name, "cpuacct.usage"
        elif Path("/sys/fs/cgroup/cgroup.controllers").exists():
            path, usage = Path("/sys/fs/cgroup") / name, "cpu.stat"
        else:
            raise BenchError("no cgroup CPU accounting found under /sys/fs/cgroup: cannot split the client's CPU")
        path.mkdir(exist_ok=True)
        return cls(path, usage)

    def cpu(self) -> float:
        text = (self.path / self.usage_file).read_text()
        if self.usage_file == "cpuacct.usage":
            return int(text) / 1e9
        return int(next(l.split()[1] for l in text.splitlines() if l.startswith("usage_usec"))) / 1e6

    def wrap_command(self, command: str) -> str:
        """A shell command line that joins this cgroup, then becomes `command`."""
        return shlex.join(["sh", "-c", f"echo $$ > {self.path}/cgroup.procs && exec {command}"])

    def wrap_argv(self, argv: Sequence[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def remove(self) -> None:
        # Empty once its processes ended; a leftover (a hung client) keeps it, harmlessly.
        try:
            self.path.rmdir()
        except OSError:
            pass


def container_cpu(cid: str) -> float:
    """CPU seconds the container's processes used so far (cgroup counter, exact)."""
    v1 = Path("/sys/fs/cgroup/cpuacct/docker") / cid / "cpuacct.usage"
    if v1.exists():
        return int(v1.read_text()) / 1e9
    stat = (Path("/sys/fs/cgroup/system.slice") / f"docker-{cid}.scope" / "cpu.stat").read_text()
    usage = next(line.split()[1] for line in stat.splitlines() if line.startswith("usage_usec"))
    return int(usage) / 1e6


def pid_cpu(pid: int) -> float:
    """utime+stime of a live process, seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def docker_proxy_pids(port: int) -> list[int]:
    """The engine's userland forwarder processes for a published host port (none when the
    engine forwards in the kernel only)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"docker-proxy") and str(port).encode() in argv:
            pids.append(int(entry.name))
    return pids


@dataclass
class Meter:
    """Measures one scp: wall seconds and CPU seconds per role, from counters read before
    and after (containers and client processes: cgroup counters; docker-proxy: /proc)."""

    proxy_id: str
    target_id: str
    forwarder_pids: Sequence[int]
    session: Cgroup
    tunnel: Cgroup
    idle: Mapping[str, float] = field(default_factory=dict)  # CPU s per wall s when idle

    def counters(self) -> dict[str, float]:
        return {"proxy sshd": container_cpu(self.proxy_id), "target sshd+scp": container_cpu(self.target_id),
                "docker-proxy": sum(pid_cpu(p) for p in self.forwarder_pids),
                "client session ssh": self.session.cpu(), "client tunnel ssh": self.tunnel.cpu()}

    def calibrate(self, seconds: float = 5.0) -> None:
        """The containers' background CPU (the watcher's loop, the key endpoint), taken
        off every scp's figure so the rows are the transfer's cost."""
        before = self.counters()
        time.sleep(seconds)
        after = self.counters()
        self.idle = {k: (after[k] - before[k]) / seconds for k in ("proxy sshd", "target sshd+scp")}

    def run(self, argv: list[str], timeout: float = 300) -> dict | None:
        before = self.counters()
        seconds, proc = timed(self.session.wrap_argv(argv), timeout=timeout)
        if proc.returncode != 0:
            return None
        time.sleep(0.2)  # the tunnel ssh ends just after the session: let it account
        after = self.counters()
        return {"seconds": seconds,
                "cpu": {k: max(0.0, after[k] - before[k] - self.idle.get(k, 0.0) * seconds) for k in before}}


# --------------------------------------------------------------------------- link shaping


def target_pid(target_id: str) -> int:
    return int(docker("inspect", "-f", "{{.State.Pid}}", target_id).stdout.strip())


def shape(target_id: str, rate: str | None) -> None:
    """Sets (rate) or removes (None) a token bucket on the target's eth0 egress, from the
    host in the container's network namespace (no capability or tool in the image needed)."""
    ns = ["nsenter", "-t", str(target_pid(target_id)), "-n", "tc", "qdisc"]
    argv = (ns + ["replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]
            if rate else ns + ["del", "dev", "eth0", "root"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 and rate:
        raise BenchError(f"could not shape the target's link ({shlex.join(argv)}): {proc.stderr.strip()}")


# --------------------------------------------------------------------------- main


def ok(argv: list[str], timeout: float = 300) -> Callable[[], float | None]:
    def once() -> float | None:
        seconds, proc = timed(argv, timeout=timeout)
        return seconds if proc.returncode == 0 else None
    return once


def scp_cases(proxy, key, name: str, target_ip: str, proxy_ip: str, remote: str,
              tunnel: Cgroup, variants: Sequence[str]) -> dict[str, list[str]]:
    """The argv of each way of copying `remote` from the target to /dev/null."""
    def via(port, host: str = "127.0.0.1", outer: Sequence[str] = (), inner: Sequence[str] = ()) -> list[str]:
        client = TunedClient(port, key, proxy_host=host, outer_opts=outer, cgroup=tunnel)
        return client.scp_argv(client.remote(name, remote), "/dev/null", opts=inner)

    plain = SshClient(proxy, key)
    aes = ["-c", AES]
    every = {
        "direct": lambda: direct_argv(plain, target_ip, scp=True, remote=remote),
        "proxy": lambda: via(proxy),
        "proxy-by-ip": lambda: via(22, host=proxy_ip),
        "proxy-aes-tunnel": lambda: via(proxy, outer=aes),
        "proxy-aes": lambda: via(proxy, outer=aes, inner=aes),
        "direct-aes": lambda: direct_argv(plain, target_ip, *aes, scp=True, remote=remote),
    }
    return {v: every[v]() for v in variants}


def measure(meter: Meter, cases: Mapping[str, list[str]], rounds: int) -> dict[str, list[dict | None]]:
    """Interleaved rounds of every case; per case, one record (seconds, cpu) per round."""
    records: dict[str, list[dict | None]] = {k: [] for k in cases}

    def once(name: str) -> Callable[[], float | None]:
        def go() -> float | None:
            record = meter.run(cases[name])
            records[name].append(record)
            return record["seconds"] if record else None
        return go

    interleave({k: once(k) for k in cases}, rounds)
    return {k: v[-rounds:] for k, v in records.items()}  # the warm-up round is not kept


def seconds_of(records: Sequence[dict | None]) -> list[float | None]:
    return [r["seconds"] if r else None for r in records]


def cpu_per_gib(records: Sequence[dict | None], mib: int) -> dict[str, float]:
    """Median CPU seconds per GiB copied, per role."""
    ok_records = [r for r in records if r]
    return {role: statistics.median(r["cpu"].get(role, 0.0) for r in ok_records) * 1024 / mib
            if ok_records else float("nan") for role in ROLES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--scp-rounds", type=int, default=4)
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--shaped-rounds", type=int, default=3)
    # 256 MiB, the size: at 200 Mbit/s a copy takes ~11 s, and the proxy's second
    # handshake (~0.2 s) no longer weighs in the ratio as it did with 32 MiB (~1.5 s).
    parser.add_argument("--shaped-mib", type=int, default=256)
    parser.add_argument("--rate", default="200mbit")
    parser.add_argument("--variants", nargs="+", default=["direct", "proxy", "proxy-by-ip", "proxy-aes-tunnel"],
                        choices=["direct", "proxy", "proxy-by-ip", "proxy-aes-tunnel", "proxy-aes", "direct-aes"],
                        help="scp cases on the unshaped link (direct and proxy always)")
    args = parser.parse_args()
    run = BenchRun("overhead")
    cgroups: list[Cgroup] = []
    try:
        run.images()
        run.create_network()
        key = run.key("login")
        name = f"bench-overhead-{run.run_id}"
        target = run.target(name, key)
        proxy = run.proxy(env={"SSH_TARGET_LABELS": f"ssh-proxy-bench-run={run.run_id}"})
        client = SshClient(proxy, key)
        _wait_login(client, name)
        small = f"{BLOB}-small"
        made = target.exec(f"head -c {args.mib * 1048576} /dev/urandom > {BLOB} && "
                           f"head -c {args.shaped_mib * 1048576} /dev/urandom > {small}", timeout=120)
        if made.returncode != 0:
            raise BenchError(f"could not write {args.mib} + {args.shaped_mib} MiB in the target: {made.stderr.strip()}")
        login = interleave({"proxy": ok(client.ssh_argv(name, "true"), 60),
                            "direct": ok(direct_argv(client, target.ip, "true"), 60)}, args.rounds)
        proxy_ip = docker("inspect", "-f", f'{{{{with index .NetworkSettings.Networks "{run.network}"}}}}'
                          "{{.IPAddress}}{{end}}", proxy.id).stdout.strip()
        session, tunnel = (Cgroup.create(f"ssh-proxy-bench-{run.run_id}-{role}") for role in ("session", "tunnel"))
        cgroups += [session, tunnel]
        meter = Meter(proxy.id, target.id, docker_proxy_pids(proxy.port), session, tunnel)
        meter.calibrate()
        args.variants = list(dict.fromkeys(["direct", "proxy", *args.variants]))
        scp = measure(meter, scp_cases(proxy, key, name, target.ip, proxy_ip, BLOB, tunnel,
                                       args.variants), args.scp_rounds)
        shape(target.id, args.rate)
        try:
            shaped = measure(meter, scp_cases(proxy, key, name, target.ip, proxy_ip, small, tunnel,
                                              ["direct", "proxy"]), args.shaped_rounds)
        finally:
            shape(target.id, None)
    finally:
        run.cleanup()
        for cgroup in cgroups:  # empty by now
            cgroup.remove()

    md = report(args, login, scp, shaped, forwarder=bool(meter.forwarder_pids), idle=meter.idle)
    save("overhead", md, {"login": login, "scp": scp, "shaped": shaped, "mib": args.mib,
                          "shaped_mib": args.shaped_mib, "rate": args.rate, "idle_cpu": meter.idle,
                          "docker_proxy": bool(meter.forwarder_pids)})
    return 0


def _ratio_row(label: str, ratios: list[float], goal: str = "", met: bool | None = None) -> list[object]:
    verdict = "" if met is None else ("met" if met else "MISSED")
    return [label, f"{pct(ratios, 50):.2f}x", f"{pct(ratios, 10):.2f}x (p10)",
            f"{min(ratios, default=float('nan')):.2f}x (min)", goal, verdict, len(ratios)]


def report(args, login, scp, shaped, forwarder: bool, idle: Mapping[str, float]) -> str:
    login_ratio = paired_ratios(login["proxy"], login["direct"])
    t = {k: seconds_of(v) for k, v in scp.items()}
    s = {k: seconds_of(v) for k, v in shaped.items()}
    throughput = paired_ratios(t["direct"], t["proxy"])  # time B / time A = rate A / rate B
    shaped_ratio = paired_ratios(s["direct"], s["proxy"])
    rows = [
        ["login, proxy / direct (time)", f"{pct(login_ratio, 50):.2f}x", f"{pct(login_ratio, 90):.2f}x (p90)",
         f"{max(login_ratio, default=float('nan')):.2f}x (max)", "<= 2.2x",
         "met" if pct(login_ratio, 50) <= 2.2 else "MISSED", len(login_ratio)],
        _ratio_row(f"scp {args.mib} MiB, proxy / direct (throughput), one shared 2-core box", throughput,
                   ">= 0.9x", pct(throughput, 50) >= 0.9),
        _ratio_row(f"scp {args.shaped_mib} MiB, target link shaped to {args.rate}: proxy / direct "
                   "(throughput)", shaped_ratio, ">= 0.9x", pct(shaped_ratio, 50) >= 0.9),
    ]
    # scp's time includes its login (proxy: two handshakes): the transfer alone, less each
    # path's own p50 login time, is what a long copy sees.
    setup = {"proxy": pct(login["proxy"], 50), "direct": pct(login["direct"], 50)}
    net = [d / p for d, p in zip(_less(t["direct"], setup["direct"]), _less(t["proxy"], setup["proxy"]))
           if d is not None and p is not None]
    rows.insert(2, _ratio_row("same, transfer only (each path's p50 login time taken off)", net))
    net_shaped = [d / p for d, p in zip(_less(s["direct"], setup["direct"]), _less(s["proxy"], setup["proxy"]))
                  if d is not None and p is not None]
    rows.append(_ratio_row("same, transfer only (each path's p50 login time taken off)", net_shaped))
    for variant, base, label in (
            ("proxy-by-ip", "direct", "proxy by its container address (no port forwarder)"),
            ("proxy-aes-tunnel", "proxy", f"{AES} on the hop to the proxy, vs the default proxy path"),
            ("proxy-aes", "direct-aes", f"{AES} on both hops, vs direct with it"),
            ("proxy-aes", "direct", f"{AES} on both hops, vs direct default")):
        if variant in t and base in t:
            rows.append(_ratio_row(f"diagnostic: scp, {label} (throughput)", paired_ratios(t[base], t[variant])))

    mib_s = {k: [args.mib / x for x in valid(v)] for k, v in t.items()}
    shaped_mib_s = {k: [args.shaped_mib / x for x in valid(v)] for k, v in s.items()}
    cpu_rows = []
    labels = {"direct": "direct", "proxy": "proxy", "proxy-by-ip": "proxy by container address",
              "proxy-aes-tunnel": f"proxy, {AES} on the hop to the proxy",
              "proxy-aes": f"proxy, {AES} on both hops", "direct-aes": f"direct, {AES}"}
    cases = [(labels[k], v, args.mib) for k, v in scp.items()]
    cases += [(f"{labels[k]}, link {args.rate}", v, args.shaped_mib) for k, v in shaped.items()]
    for label, records, mib in cases:
        per = cpu_per_gib(records, mib)
        wall = statistics.median(valid(seconds_of(records)) or [float("nan")]) * 1024 / mib
        cpu_rows.append([label, *(f"{per[r]:.2f}" for r in ROLES), f"{sum(per.values()):.2f}",
                         f"{wall:.2f}", f"{sum(per.values()) / wall:.2f}"])
    d_login = {k: dist(v) for k, v in login.items()}
    fwd = ("Docker's userland port forwarder (docker-proxy) carries the published port here"
           if forwarder else "this engine runs no userland forwarder (docker-proxy column: 0)")
    return (
        "### B3 overhead\n\nOne target, one proxy (Docker discovery); every pair ran back to back, "
        f"{args.rounds} login rounds, {args.scp_rounds} scp rounds, {args.shaped_rounds} rounds with the "
        "link shaped. Direct = the same ssh options without the ProxyCommand, to the target's address. "
        f"Link-limited: `tc qdisc replace dev eth0 root tbf rate {args.rate}` in the target's network "
        "namespace, so the direct and the proxied path leave the target through the same bucket.\n\n"
        + table(["case", "p50", "other side", "worst", "goal", "p50 vs goal", "pairs"], rows)
        + "\n\nFor scale on this machine: login p50 "
        f"{d_login['proxy']['p50'] * 1000:.0f} ms through the proxy, {d_login['direct']['p50'] * 1000:.0f} ms "
        f"direct; scp p50 {pct(mib_s['proxy'], 50):.0f} MiB/s through the proxy, "
        f"{pct(mib_s['direct'], 50):.0f} MiB/s direct; with the link shaped "
        f"{pct(shaped_mib_s['proxy'], 50):.1f} MiB/s through the proxy, {pct(shaped_mib_s['direct'], 50):.1f} MiB/s "
        f"direct ({args.rate} = {_mbit(args.rate) / 8 / 1.048576:.1f} MiB/s of the wire).\n\n"
        "CPU seconds per GiB copied, per process on the path (median of the rounds; containers "
        "from their cgroup counters less their idle rate measured before, "
        f"{idle.get('proxy sshd', 0) * 1000:.0f} ms/s for the proxy with its watcher; client "
        f"processes from cgroups of their own; {fwd}). The last column is the CPU the transfer kept busy "
        "(CPU s / wall s; 2.0 = both cores):\n\n"
        + table(["scp", *ROLES, "total", "wall s/GiB", "cores busy"], cpu_rows))


def _less(values: Sequence[float | None], setup: float) -> list[float | None]:
    return [v - setup if v is not None and v > setup else None for v in values]


def _mbit(rate: str) -> float:
    number = rate.lower().removesuffix("mbit")
    try:
        return float(number)
    except ValueError:
        return float("nan")


def _wait_login(client: SshClient, host: str) -> None:
    """The proxy learns the key asynchronously: retry until the first login works."""
    def works() -> bool:
        return timed(client.ssh_argv(host, "true"), timeout=30)[1].returncode == 0
    if not helpers.wait_until(works, 90, interval=0.5):
        raise BenchError(f"no login to {host} through the proxy within 90 s")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"overhead: {exc}", file=sys.stderr)
        sys.exit(1)
