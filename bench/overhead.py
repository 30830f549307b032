"""B3 overhead: the proxy hop against going straight to the same target.

One target, one proxy (Docker discovery, as deployed); interleaved, paired per round:

- login: `ssh root@TARGET true` through the proxy vs `ssh root@TARGET_IP true` (goal <= 2.2x);
- scp of 256 MiB of random bytes from the target to /dev/null, through the proxy vs
  direct, as a throughput ratio (goal >= 0.9x).

    .venv/bin/python bench/overhead.py [--rounds 30] [--scp-rounds 6] [--mib 256]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (BenchError, BenchRun, SshClient, dist, docker, interleave, paired_ratios, pct,  # noqa: E402
                    save, table, timed, valid)

import helpers  # noqa: E402

BLOB = "/root/bench-blob"
AES = "aes128-gcm@openssh.com"


def direct_argv(client: SshClient, ip: str, *args: str, scp: bool = False) -> list[str]:
    """The same client options without the ProxyCommand: straight to the target's address
    (with scp=True, `args` are scp options)."""
    opts = ["-i", client.key_path, *helpers.NO_PROMPT_OPTS, "-o", f"ConnectTimeout={client.connect_timeout}"]
    if scp:
        return ["scp", *opts, *args, f"root@{ip}:{BLOB}", "/dev/null"]
    return ["ssh", *opts, f"root@{ip}", *args]


@dataclass
class TunedClient(SshClient):
    """SshClient whose outer hop (the ProxyCommand ssh) gets extra options too."""

    outer_opts: Sequence[str] = ()

    def proxy_command(self) -> str:
        return super().proxy_command().replace("ssh -W", f"ssh {shlex.join(self.outer_opts)} -W", 1)


def ok(argv: list[str], timeout: float = 300):
    def once() -> float | None:
        seconds, proc = timed(argv, timeout=timeout)
        return seconds if proc.returncode == 0 else None
    return once


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--scp-rounds", type=int, default=6)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    run = BenchRun("overhead")
    try:
        run.images()
        run.create_network()
        key = run.key("login")
        name = f"bench-overhead-{run.run_id}"
        target = run.target(name, key)
        proxy = run.proxy(env={"SSH_TARGET_LABELS": f"ssh-proxy-bench-run={run.run_id}"})
        client = SshClient(proxy, key)
        _wait_login(client, name)
        made = target.exec(f"head -c {args.mib * 1048576} /dev/urandom > {BLOB}", timeout=120)
        if made.returncode != 0:
            raise BenchError(f"could not write {args.mib} MiB in the target: {made.stderr.strip()}")
        login = interleave({"proxy": ok(client.ssh_argv(name, "true"), 60),
                            "direct": ok(direct_argv(client, target.ip, "true"), 60)}, args.rounds)
        # Diagnostics beside the goal pair: without Docker's userland port forwarder (the
        # proxy's own address on the network), and with AES-GCM (AES-NI) instead of the
        # default chacha20-poly1305 on every hop.
        proxy_ip = docker("inspect", "-f", f'{{{{with index .NetworkSettings.Networks "{run.network}"}}}}'
                          "{{.IPAddress}}{{end}}", proxy.id).stdout.strip()
        by_ip = SshClient(22, key, proxy_host=proxy_ip)
        aes = ["-c", AES]
        tuned = TunedClient(proxy, key, extra_opts=aes, outer_opts=aes)
        scp = interleave({"proxy": ok(client.scp_argv(client.remote(name, BLOB), "/dev/null")),
                          "direct": ok(direct_argv(client, target.ip, scp=True)),
                          "proxy-by-ip": ok(by_ip.scp_argv(by_ip.remote(name, BLOB), "/dev/null")),
                          "proxy-aes": ok(tuned.scp_argv(tuned.remote(name, BLOB), "/dev/null")),
                          "direct-aes": ok(direct_argv(client, target.ip, *aes, scp=True))},
                         args.scp_rounds)
    finally:
        run.cleanup()

    login_ratio = paired_ratios(login["proxy"], login["direct"])
    throughput_ratio = paired_ratios(scp["direct"], scp["proxy"])  # time B / time A = rate A / rate B
    mib_s = {k: [args.mib / s for s in valid(v)] for k, v in scp.items()}
    rows = [
        ["login, proxy / direct (time)", f"{pct(login_ratio, 50):.2f}x", f"{pct(login_ratio, 90):.2f}x",
         f"{max(login_ratio, default=float('nan')):.2f}x", "<= 2.2x", "met" if pct(login_ratio, 50) <= 2.2 else "MISSED",
         len(login_ratio)],
        [f"scp {args.mib} MiB, proxy / direct (throughput)", f"{pct(throughput_ratio, 50):.2f}x",
         f"{pct(throughput_ratio, 10):.2f}x (p10)", f"{min(throughput_ratio, default=float('nan')):.2f}x (min)", ">= 0.9x",
         "met" if pct(throughput_ratio, 50) >= 0.9 else "MISSED", len(throughput_ratio)],
    ]
    for variant, base, label in (("proxy-by-ip", "direct", "proxy by its container address (no docker-proxy)"),
                                 ("proxy-aes", "direct-aes", f"proxy, {AES} on both hops, vs direct with it"),
                                 ("proxy-aes", "direct", f"proxy, {AES} on both hops, vs direct default")):
        r = paired_ratios(scp[base], scp[variant])
        rows.append([f"diagnostic: scp, {label} (throughput)", f"{pct(r, 50):.2f}x", f"{pct(r, 10):.2f}x (p10)",
                     f"{min(r, default=float('nan')):.2f}x (min)", "", "", len(r)])
    d_login = {k: dist(v) for k, v in login.items()}
    md = ("### B3 overhead\n\nOne target, one proxy (Docker discovery); every pair ran back to back, "
          f"{args.rounds} login rounds, {args.scp_rounds} scp rounds. Direct = the same ssh options "
          "without the ProxyCommand, to the target's address.\n\n"
          + table(["case", "p50", "p90 (worse side)", "worst", "goal", "p50 vs goal", "pairs"], rows)
          + "\n\nFor scale on this machine: login p50 "
          f"{d_login['proxy']['p50'] * 1000:.0f} ms through the proxy, {d_login['direct']['p50'] * 1000:.0f} ms "
          f"direct; scp p50 {pct(mib_s['proxy'], 50):.0f} MiB/s through the proxy, "
          f"{pct(mib_s['direct'], 50):.0f} MiB/s direct.")
    save("overhead", md, {"login": login, "scp_seconds": scp, "mib": args.mib})
    return 0


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
