"""B2 keys scale: login latency through the proxy with 1, 1k, 10k, 100k keys served.

One run starts, side by side, a proxy per key count (MANUAL_AUTH_FILE=true, the keys as
generated files in /etc/ssh/authorized_keys.d/: what sshd looks up at login is then the
watcher's real index) and, in each of those containers, a second stock sshd on port 2222
started from the same rendered config with `AuthorizedKeysFile` (the same lines, the
login key last, where a linear scan finds it last) instead of the AuthorizedKeysCommand.
Then, interleaved round by round:

- login (`ssh -J`-style, ProxyCommand `ssh -W`) through the proxy to one target, `true`;
- an unknown key offered to the proxy (time until "Permission denied");
- opening the tunnel by a name pinned in /etc/hosts, with 1 vs 100k names in the file.

Prints each as a ratio to its 1-key (1-name) case two ways: paired round by round (p50 and
p90 of the per-round ratios), and as the ratio of the two distributions' p50 and p90. The
p90 of per-round ratios is above 1 even for two identical setups (it is the spread of a
ratio of two noisy times), so a second 1-key proxy, the same as the first, is timed as well:
its row (A/A) is the noise floor of both statistics in this run.

    .venv/bin/python bench/keys_scale.py [--rounds 20] [--sizes 1,1000,10000,100000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (BenchError, BenchRun, Proxy, SshClient, dist, docker, fake_key_line,  # noqa: E402
                    interleave, paired_ratios, pct, save, table, timed)

import helpers  # noqa: E402

STOCK_DIR = "/etc/ssh/bench-stock"
STOCK_PORT = 2222


def stock_sshd(proxy: Proxy) -> int:
    """Starts stock sshd (AuthorizedKeysFile, no command) inside the proxy on STOCK_PORT,
    from the config the watcher rendered; returns its published host port."""
    script = (
        "set -e; sed -e 's/^Port 22$/Port %d/' "
        "-e 's#^AuthorizedKeysFile none#AuthorizedKeysFile %s/keys#' "
        "-e '/^AuthorizedKeysCommand/d' /etc/ssh/sshd_config >/run/sshd_config.stock; "
        "/usr/sbin/sshd -t -f /run/sshd_config.stock; /usr/sbin/sshd -f /run/sshd_config.stock"
    ) % (STOCK_PORT, STOCK_DIR)
    proc = proxy.exec(script)
    if proc.returncode != 0:
        raise BenchError(f"stock sshd did not start in {proxy.name}: {proc.stderr.strip()}")
    if not helpers.wait_until(lambda: helpers.listening_inside(proxy.id, STOCK_PORT), 30):
        raise BenchError(f"stock sshd in {proxy.name} is not listening on {STOCK_PORT}")
    out = docker("port", proxy.id, f"{STOCK_PORT}/tcp").stdout.strip().splitlines()[0]
    return int(out.rsplit(":", 1)[1])


def index_lines(proxy: Proxy) -> int:
    out = proxy.exec(f"({helpers.CAT_INDEX}) | wc -l").stdout.strip()
    return int(out) if out.isdigit() else -1


def start_proxy(run: BenchRun, size: int, login_line: str, tag: str = "") -> tuple[Proxy, int]:
    """A manual-mode proxy serving `size` keys (the login key among them) via its index,
    plus the stock sshd over the same lines; (proxy, stock port)."""
    keys = run.work / f"keys-{tag or size}"
    stock = run.work / f"stock-{tag or size}"
    keys.mkdir()
    stock.mkdir(mode=0o755)
    fillers = [fake_key_line(i) for i in range(size - 1)]
    (keys / "filler.pub").write_text("".join(f + "\n" for f in fillers))
    (keys / "login.pub").write_text(login_line + "\n")
    (stock / "keys").write_text("".join(f"restrict,port-forwarding {line}\n"
                                        for line in [*fillers, login_line]))
    (stock / "keys").chmod(0o644)
    proxy = run.proxy(env={"MANUAL_AUTH_FILE": "true"}, docker_socket=False,
                      volumes=[f"{keys}:/etc/ssh/authorized_keys.d:ro", f"{stock}:{STOCK_DIR}:ro"],
                      docker_args=["-p", f"127.0.0.1::{STOCK_PORT}"])
    if not helpers.wait_until(lambda: index_lines(proxy) == size, 180, interval=1):
        raise BenchError(f"proxy for {size} keys: index has {index_lines(proxy)} lines, not {size}, "
                         f"after 180 s; logs:\n{proxy.logs()[-3000:]}")
    return proxy, stock_sshd(proxy)


def pin_names(proxy: Proxy, alias: str, address: str, fillers: int) -> None:
    """Appends `fillers` names (loopback addresses: looked up, never contacted) and then
    alias -> address to the proxy's /etc/hosts (manual mode does not manage it)."""
    script = (f"python3 -c \"import sys; sys.stdout.write(''.join("
              f"'127.%d.%d.%d filler-%d.bench\\n' % ((i >> 16) & 255, (i >> 8) & 255, i & 255, i) "
              f"for i in range({fillers})))\" >>/etc/hosts; echo '{address} {alias}' >>/etc/hosts")
    proc = proxy.exec(script)
    if proc.returncode != 0:
        raise BenchError(f"could not fill /etc/hosts of {proxy.name}: {proc.stderr.strip()}")


def login(argv: list[str], expect_refusal: bool = False):
    def once() -> float | None:
        seconds, proc = timed(argv, timeout=60)
        refused = proc.returncode == 255 and b"Permission denied" in proc.stderr
        good = refused if expect_refusal else proc.returncode == 0
        return seconds if good else None
    return once


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sizes", default="1,1000,10000,100000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    big = sizes[-1]
    run = BenchRun("keys")
    try:
        run.images()
        run.create_network()
        key, unknown = run.key("login"), run.key("unknown")
        target_name = f"bench-keys-{run.run_id}"
        target = run.target(target_name, key, serve_publickey=False)
        login_line = key.public
        proxies: dict[int, tuple[Proxy, int]] = {}
        for size in sizes:
            print(f"starting proxy with {size} keys", file=sys.stderr)
            proxies[size] = start_proxy(run, size, login_line)
        # /etc/hosts: the 1-key proxy gets 1 pinned name, a second 1-key proxy `big` names.
        alias = f"pinned-{run.run_id}"
        hosts_big, _ = start_proxy(run, 1, login_line, tag="hosts")
        again, _ = start_proxy(run, sizes[0], login_line, tag="again")  # the A/A control
        pin_names(proxies[sizes[0]][0], alias, target.ip, 0)
        pin_names(hosts_big, alias, target.ip, big)

        variants = {}
        for size, (proxy, stock_port) in proxies.items():
            variants[f"index-{size}"] = login(SshClient(proxy.port, key).ssh_argv(target_name, "true"))
            variants[f"stock-{size}"] = login(SshClient(stock_port, key).ssh_argv(target_name, "true"))
        variants[f"index-{sizes[0]}-again"] = login(SshClient(again.port, key).ssh_argv(target_name, "true"))
        for size in (sizes[0], big):
            proxy, stock_port = proxies[size]
            variants[f"unknown-index-{size}"] = login(SshClient(proxy.port, unknown).direct_argv("true"),
                                                      expect_refusal=True)
            variants[f"unknown-stock-{size}"] = login(SshClient(stock_port, unknown).direct_argv("true"),
                                                      expect_refusal=True)
        variants["hosts-1"] = login(SshClient(proxies[sizes[0]][0].port, key).ssh_argv(alias, "true"))
        variants[f"hosts-{big}"] = login(SshClient(hosts_big.port, key).ssh_argv(alias, "true"))
        for name, fn in variants.items():  # every variant must work before it is timed
            if fn() is None:
                raise BenchError(f"{name}: the login did not give the expected result")
        samples = interleave(variants, args.rounds)
    finally:
        run.cleanup()

    def ratio_row(label: str, a: str, b: str) -> list[object]:
        r = paired_ratios(samples[a], samples[b])
        return [label, f"{pct(r, 50):.2f}x", f"{pct(r, 90):.2f}x",
                f"{pct(samples[a], 50) / pct(samples[b], 50):.2f}x",
                f"{pct(samples[a], 90) / pct(samples[b], 90):.2f}x",
                f"{pct(samples[a], 50) * 1000:.0f}", len(r)]

    rows = [ratio_row(f"index, {sizes[0]} keys, a second proxy (A/A: the noise floor)",
                      f"index-{sizes[0]}-again", f"index-{sizes[0]}")]
    for size in sizes:
        rows.append(ratio_row(f"index, {size} keys", f"index-{size}", f"index-{sizes[0]}"))
    for size in sizes:
        rows.append(ratio_row(f"stock AuthorizedKeysFile, {size} keys", f"stock-{size}", f"index-{sizes[0]}"))
    for size in sizes:
        rows.append(ratio_row(f"stock / index at {size} keys", f"stock-{size}", f"index-{size}"))
    rows.append(ratio_row(f"unknown key, index, {big} vs {sizes[0]}", f"unknown-index-{big}",
                          f"unknown-index-{sizes[0]}"))
    rows.append(ratio_row(f"unknown key, stock, {big} vs {sizes[0]}", f"unknown-stock-{big}",
                          f"unknown-stock-{sizes[0]}"))
    rows.append(ratio_row(f"tunnel by name, {big} vs 1 names in /etc/hosts", f"hosts-{big}", "hosts-1"))
    md = ("### B2 keys scale\n\nLogin through the proxy to one target (`ssh` with ProxyCommand "
          "`ssh -W`, command `true`), paired per round with the baseline named in the row "
          f"(`index, {sizes[0]} keys` unless the row says otherwise); {args.rounds} interleaved rounds. "
          "Paired: p50 / p90 of the per-round ratios; of the distributions: the row's p50 (p90) "
          "over the baseline's. The A/A row times a second proxy set up exactly as the baseline: "
          "how far from 1.00x each statistic lands by noise alone.\n\n"
          + table(["case", "paired p50", "paired p90", "p50 ratio", "p90 ratio",
                   "p50 ms (this machine)", "pairs"], rows))
    save("keys_scale", md, {"samples": samples, "dist": {k: dist(v) for k, v in samples.items()}})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"keys_scale: {exc}", file=sys.stderr)
        sys.exit(1)
