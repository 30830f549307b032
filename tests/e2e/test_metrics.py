"""WATCHER_METRICS_PORT: the real image serves Prometheus metrics whose numbers are exactly
what the test did (targets, keys, logins, tunnels, a removal); the endpoint is never a
tunnel target; without the variable nothing listens.

Other developers' containers may come and go on the same engine: the proxy serves only
this test's targets (SSH_TARGET_LABELS), so targets, keys, logins and tunnels are exact,
while source events (every container's) are checked as lower bounds.
"""

from __future__ import annotations

import secrets

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from helpers import (SshClient, docker, listening_inside, log_mark, unique_name,
                     wait_for_event, wait_until)

METRICS_PORT = 9100
LABEL = "ssh-proxy-metrics-test"
TARGETS = 3
LOGINS = 4


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(scraped: dict, name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), float("nan"))


def wait_for_metrics(url: str, want: dict[tuple[str, tuple], float], deadline: float = 60) -> dict:
    """Scrape until every wanted sample has its value; fail with the differences."""
    last: dict = {}

    def matches() -> bool:
        nonlocal last
        last = scrape(url)
        return all(last.get(key) == value for key, value in want.items())

    if not wait_until(matches, deadline, interval=0.5):
        diff = {key: (last.get(key), value) for key, value in want.items() if last.get(key) != value}
        pytest.fail(f"metrics (got, wanted) after {deadline} s: {diff}", pytrace=False)
    return last


def sample(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def denied_tunnel(proxy, key, dest: str) -> None:
    """`ssh -W DEST` straight to the proxy relays nothing and is logged tunnel-denied."""
    client = SshClient(proxy, key)
    mark = log_mark(proxy)
    proc = client.run(client.direct_argv(opts=["-W", dest]), input="", timeout=30, text=False)
    assert proc.stdout == b"", f"-W {dest} relayed {proc.stdout[:200]!r}"
    assert proc.returncode == 255, f"-W {dest}: exit {proc.returncode} {proc.stderr!r}"
    wait_for_event(proxy, mark, event="tunnel-denied", dest=dest, deadline=10)


def test_metrics_count_what_happened_and_are_never_a_tunnel_target(
        start_target, start_proxy, keypair, test_network):
    run_id = secrets.token_hex(4)
    proxy = start_proxy(env={"WATCHER_METRICS_PORT": str(METRICS_PORT),
                             "SSH_TARGET_LABELS": f"{LABEL}={run_id}"},
                        docker_args=["-p", f"127.0.0.1::{METRICS_PORT}"])
    published = docker("port", proxy.id, f"{METRICS_PORT}/tcp").stdout.strip().splitlines()[0]
    url = f"http://127.0.0.1:{published.rsplit(':', 1)[1]}/metrics"
    assert wait_until(lambda: listening_inside(proxy.id, METRICS_PORT), 30)

    keys = [keypair(f"metrics-{i}") for i in range(TARGETS)]
    targets = [start_target(unique_name(f"metrics-{i}"), keys[i], labels={LABEL: run_id})
               for i in range(TARGETS)]
    # Every key served before the first login: no login is refused while a key is fetched.
    wait_for_metrics(url, {sample("ssh_proxy_targets", state="ok"): TARGETS,
                           sample("ssh_proxy_keys_served"): TARGETS,
                           sample("ssh_proxy_source_connected", kind="docker"): 1})

    for n in range(LOGINS):
        i = n % TARGETS
        proc = SshClient(proxy, keys[i]).ssh(targets[i].name, "true", timeout=60)
        assert proc.returncode == 0, proc.stderr
    stranger = keypair("metrics-stranger")
    assert SshClient(proxy, stranger).ssh(targets[0].name, "true", timeout=60).returncode != 0

    targets[-1].remove()
    scraped = wait_for_metrics(url, {
        sample("ssh_proxy_targets", state="ok"): TARGETS - 1,
        sample("ssh_proxy_targets", state="failed"): 0,
        sample("ssh_proxy_keys_served"): TARGETS - 1,
        sample("ssh_proxy_logins_total", result="accepted"): LOGINS,
        sample("ssh_proxy_logins_total", result="denied"): 1,
        sample("ssh_proxy_tunnels_total", result="opened"): LOGINS,
        sample("ssh_proxy_tunnels_total", result="denied"): 0,
        sample("ssh_proxy_key_fetches_total", result="ok", reason="none"): TARGETS,
        sample("ssh_proxy_sshd_restarts_total"): 0,
        sample("ssh_proxy_source_connected", kind="docker"): 1,
    })
    # Source events: at least the test's own (the engine is shared with other tests).
    assert metric(scraped, "ssh_proxy_source_events_total", type="resync") >= 1
    assert metric(scraped, "ssh_proxy_source_events_total", type="upsert") >= TARGETS
    assert metric(scraped, "ssh_proxy_source_events_total", type="remove") >= 1
    assert metric(scraped, "ssh_proxy_cache_writes_total", result="ok") >= TARGETS
    assert metric(scraped, "ssh_proxy_cache_writes_total", result="failed") == 0
    # Each target's add and the removal were written and observed (other containers'
    # events may still be on their way to the index: at most every event).
    latency_count = metric(scraped, "ssh_proxy_event_to_index_seconds_count")
    assert latency_count >= TARGETS + 1
    assert latency_count <= (metric(scraped, "ssh_proxy_source_events_total", type="resync")
                             + metric(scraped, "ssh_proxy_source_events_total", type="upsert")
                             + metric(scraped, "ssh_proxy_source_events_total", type="remove"))

    # The endpoint is never a tunnel target: not by the proxy's address, name or loopback.
    proxy_ip = docker("inspect", "-f",
                      f'{{{{(index .NetworkSettings.Networks "{test_network}").IPAddress}}}}',
                      proxy.id).stdout.strip()
    hostname = docker("inspect", "-f", "{{.Config.Hostname}}", proxy.id).stdout.strip()
    for dest in (f"{proxy_ip}:{METRICS_PORT}", f"{hostname}:{METRICS_PORT}",
                 f"127.0.0.1:{METRICS_PORT}", f"localhost:{METRICS_PORT}"):
        denied_tunnel(proxy, keys[0], dest)
    wait_for_metrics(url, {sample("ssh_proxy_tunnels_total", result="denied"): 4,
                           sample("ssh_proxy_tunnels_total", result="opened"): LOGINS})


def test_without_the_variable_nothing_listens(start_proxy):
    proxy = start_proxy(env={"SSH_TARGET_LABELS": f"{LABEL}=none"})
    assert wait_until(lambda: listening_inside(proxy.id, 22), 30)
    assert not listening_inside(proxy.id, METRICS_PORT)
    assert "metrics on port" not in proxy.logs()
