"""watcher.metrics: every metric rendered by prometheus_client from the proxy's own registry,
after feeding the real components (reconciler, writer, access log, key fetcher)."""

from __future__ import annotations

import http.server
import io
import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest
import requests
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from watcher.app import AccessLog, OutputWriter, Paths
from watcher.config import RunMode, Settings, load_settings
from watcher.errors import ConfigError
from watcher.fetch import FetchPolicy, KeyFetcher
from watcher.metrics import (FETCH_REASONS, CountingSink, Metrics, MetricsError, Observed,
                             fetch_reason)
from watcher.model import KeyState, Target
from watcher.reconcile import Reconciler
from watcher.snapshot import (IgnoredTarget, KeyStatus, SourceStatus, TargetStatus,
                              WatcherState)
from watcher.sshd import SshdPaths
from watcher.targets import ProxyIdentity

DATA = Path(__file__).parent / "data"
KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGrgF2u2H0uP3wLC0OBC0Fs0vYx3A9k7w8q8TQ9fDc8t "
       "user@example")


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the text exposition a scraper reads."""
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def target(n: int) -> Target:
    return Target(id=f"{n:x}".rjust(64, "a"), name=f"ws-{n}", address=f"172.18.0.{n + 10}",
                  started_at="2024-01-01T00:00:00Z")


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("env, expected", [({}, None), ({"WATCHER_METRICS_PORT": ""}, None),
                                           ({"WATCHER_METRICS_PORT": " "}, None),
                                           ({"WATCHER_METRICS_PORT": "9100"}, 9100),
                                           ({"WATCHER_METRICS_PORT": "1"}, 1),
                                           ({"WATCHER_METRICS_PORT": "65535"}, 65535)])
def test_metrics_port_is_off_unless_set(env: dict[str, str], expected: int | None) -> None:
    assert load_settings(env).metrics_port == expected


@pytest.mark.parametrize("bad", ["0", "65536", "nine", "91OO", "-1", "9100x", "９100"])
def test_an_invalid_metrics_port_names_the_variable(bad: str) -> None:
    with pytest.raises(ConfigError, match="WATCHER_METRICS_PORT=.*1-65535"):
        load_settings({"WATCHER_METRICS_PORT": bad})


# --- gauges: read from the published state ------------------------------------------------


def test_gauges_show_the_latest_published_state() -> None:
    state = WatcherState(
        targets=(TargetStatus("a", "a", key_status=KeyStatus.OK),
                 TargetStatus("b", "b", key_status=KeyStatus.OK),
                 TargetStatus("c", "c", key_status=KeyStatus.FAILED),
                 TargetStatus("d", "d", key_status=KeyStatus.FETCHING)),
        ignored=(IgnoredTarget("e", "e", "label missing"),), keys_served=5,
        source=SourceStatus(kind="docker", connected=True))
    published: list[Observed] = [Observed(WatcherState())]
    metrics = Metrics(lambda: published[-1])
    assert value(metrics, "ssh_proxy_targets", state="ok") == 0
    assert ("ssh_proxy_source_connected", (("kind", "docker"),)) not in samples(metrics)

    published.append(Observed(state, sshd_restarts=2))
    assert value(metrics, "ssh_proxy_targets", state="ok") == 2
    assert value(metrics, "ssh_proxy_targets", state="failed") == 1
    assert value(metrics, "ssh_proxy_targets", state="fetching") == 1
    assert value(metrics, "ssh_proxy_targets", state="pending") == 0
    assert value(metrics, "ssh_proxy_targets_ignored") == 1
    assert value(metrics, "ssh_proxy_keys_served") == 5
    assert value(metrics, "ssh_proxy_source_connected", kind="docker") == 1
    assert value(metrics, "ssh_proxy_sshd_restarts_total") == 2

    published.append(Observed(WatcherState(source=SourceStatus(kind="docker", connected=False))))
    assert value(metrics, "ssh_proxy_source_connected", kind="docker") == 0
    assert value(metrics, "ssh_proxy_targets", state="ok") == 0


# --- source events and the event-to-index latency --------------------------------------------


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[tuple[Metrics, Clock, CountingSink, Reconciler, OutputWriter]]:
    """The real reconciler and writer, wired to a Metrics as the supervisor wires them."""
    clock = Clock()
    metrics = Metrics(clock=clock)
    paths = Paths(cache=tmp_path / "keys" / "authorized_keys_cache", hosts=tmp_path / "hosts",
                  sshd=SshdPaths(index_dir=tmp_path / "keys" / "authorized_keys.index.d"))
    writer = OutputWriter(paths, RunMode.DOCKER, pin_names=False, on_result=metrics.write_result)
    reconciler = Reconciler(Settings(), ProxyIdentity(),
                            metrics.counting_fetch(lambda t: KeyState(status="failed",
                                                                      error="GET x answered HTTP 404")),
                            writer, pin_names=False, observe=metrics.applied)
    yield metrics, clock, CountingSink(reconciler, metrics), reconciler, writer
    reconciler.pool.shutdown(wait=True)


def test_source_events_are_counted_by_type(wired) -> None:
    metrics, _, sink, reconciler, _ = wired
    sink.replace_all([target(1), target(2)])
    sink.upsert(target(3))
    sink.upsert(target(3))
    sink.remove(target(2).id)
    sink.set_source_status({"kind": "docker", "connected": True})
    reconciler.run_once_pending()
    assert value(metrics, "ssh_proxy_source_events_total", type="resync") == 1
    assert value(metrics, "ssh_proxy_source_events_total", type="upsert") == 2
    assert value(metrics, "ssh_proxy_source_events_total", type="remove") == 1
    assert sorted(e.target.name for e in reconciler.entries.values()) == ["ws-1", "ws-3"]
    assert reconciler.status["source"] == {"kind": "docker", "connected": True}


def test_latency_runs_from_posting_to_the_write_that_holds_the_event(wired) -> None:
    metrics, clock, sink, reconciler, writer = wired
    clock.now = 100.0
    sink.upsert(target(1))
    clock.now = 101.5
    sink.upsert(target(2))
    clock.now = 103.0
    reconciler.run_once_pending()  # both applied, rendered and written at 103
    assert value(metrics, "ssh_proxy_event_to_index_seconds_count") == 2
    assert value(metrics, "ssh_proxy_event_to_index_seconds_sum") == pytest.approx(3.0 + 1.5)
    assert value(metrics, "ssh_proxy_event_to_index_seconds_bucket", le="2.5") == 1
    assert value(metrics, "ssh_proxy_event_to_index_seconds_bucket", le="5.0") == 2
    # Posted but not applied yet: not observed, whatever else is written meanwhile.
    sink.remove(target(1).id)
    writer.retry()
    assert value(metrics, "ssh_proxy_event_to_index_seconds_count") == 2


def test_an_event_whose_write_failed_is_observed_when_a_retry_writes_it(wired, tmp_path) -> None:
    metrics, clock, sink, reconciler, writer = wired
    keys_dir = tmp_path / "keys"
    keys_dir.write_text("a file where the directory should be")  # every write fails
    clock.now = 10.0
    sink.upsert(target(1))
    clock.now = 11.0
    reconciler.run_once_pending()
    assert writer.error
    assert value(metrics, "ssh_proxy_cache_writes_total", result="failed") == 1
    assert value(metrics, "ssh_proxy_event_to_index_seconds_count") == 0

    clock.now = 12.0
    sink.upsert(target(2))  # posted, not applied: the retried render does not hold it
    keys_dir.unlink()
    clock.now = 13.0
    writer.retry()
    assert writer.error == ""
    assert value(metrics, "ssh_proxy_cache_writes_total", result="ok") == 1
    assert value(metrics, "ssh_proxy_event_to_index_seconds_count") == 1
    assert value(metrics, "ssh_proxy_event_to_index_seconds_sum") == pytest.approx(3.0)

    clock.now = 16.0
    reconciler.run_once_pending()
    assert value(metrics, "ssh_proxy_event_to_index_seconds_count") == 2
    assert value(metrics, "ssh_proxy_event_to_index_seconds_sum") == pytest.approx(3.0 + 4.0)
    writes = {r: value(metrics, "ssh_proxy_cache_writes_total", result=r)
              for r in ("ok", "unchanged", "failed")}
    assert writes["failed"] == 1 and writes["ok"] + writes["unchanged"] == 2


# --- key fetches: result and a reason from a fixed set ------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        if self.server.mode == "hang":  # type: ignore[attr-defined]
            self.server.release.wait(10)  # type: ignore[attr-defined]
            return
        body = {"ok": KEY.encode(), "garbage": b"not a key\n"}.get(self.server.mode)  # type: ignore[attr-defined]
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def key_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.mode = "ok"  # type: ignore[attr-defined]
    server.release = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exec_failing(target: Target, argv: list[str], limit: int) -> bytes:
    from watcher.errors import FetchError
    raise FetchError(f"exec {argv[-1]} in {target.name} exited 1: no such file")


@pytest.mark.parametrize("mode, sources, result, reason", [
    ("ok", ("api",), "ok", "none"),
    ("garbage", ("api",), "failed", "invalid-key"),
    ("404", ("api",), "failed", "http-status"),
    ("closed", ("api",), "failed", "unreachable"),
    ("hang", ("api",), "failed", "timeout"),
    ("closed", ("exec",), "failed", "exec-failed"),
])
def test_fetches_are_counted_by_result_and_reason(key_server, mode: str, sources: tuple[str, ...],
                                                  result: str, reason: str) -> None:
    key_server.mode = mode
    port = _closed_port() if mode == "closed" else key_server.server_address[1]
    policy = FetchPolicy(connect_timeout=2.0, read_timeout=0.5, attempts=1, max_total=5.0)
    fetcher = KeyFetcher(port, "~/.ssh/id_ed25519.pub", _exec_failing, policy=policy,
                         sources=sources)  # type: ignore[arg-type]
    metrics = Metrics()
    keys = metrics.counting_fetch(fetcher.fetch)(
        Target(id="f" * 64, name="ws", address="127.0.0.1", started_at="t"))
    assert keys.status == ("ok" if result == "ok" else "failed")
    assert value(metrics, "ssh_proxy_key_fetches_total", result=result, reason=reason) == 1
    others = [k for k, v in samples(metrics).items()
              if k[0] == "ssh_proxy_key_fetches_total" and v and k[1] != (("reason", reason),
                                                                          ("result", result))]
    assert others == []


@pytest.mark.parametrize("error", ["internal error: boom", "\x1b[31m target-chosen text", "",
                                   "GET http://evil/ failed: ConnectionError; exec: no valid key"])
def test_a_fetch_reason_is_always_one_of_the_fixed_set(error: str) -> None:
    assert fetch_reason(KeyState(status="failed", error=error)) in FETCH_REASONS[1:]


# --- access events: logins and tunnels --------------------------------------------------------


def test_logins_and_tunnels_follow_the_access_log(tmp_path: Path) -> None:
    metrics = Metrics()
    out = io.StringIO()
    access = AccessLog(tmp_path / "access.log", lambda fp: ("ws",), lambda alias: "ws",
                       stdout=out, observe=metrics.access_event)
    try:
        for name in ("sshd-tunnel-permitted.log", "sshd-tunnel-denied.log",
                     "sshd-unknown-key.log", "sshd-shell.log", "sshd-concurrent.log"):
            for line in (DATA / name).read_bytes().splitlines():
                access(line)
    finally:
        access.close()
    logged = [part.split("=", 1)[1] for line in out.getvalue().splitlines()
              for part in line.split() if part.startswith("event=")]
    assert logged.count("accepted") >= 2 and logged.count("denied") >= 1
    assert logged.count("tunnel") >= 1 and logged.count("tunnel-denied") >= 1
    assert value(metrics, "ssh_proxy_logins_total", result="accepted") == logged.count("accepted")
    assert value(metrics, "ssh_proxy_logins_total", result="denied") == logged.count("denied")
    assert value(metrics, "ssh_proxy_tunnels_total", result="opened") == logged.count("tunnel")
    assert value(metrics, "ssh_proxy_tunnels_total", result="denied") == logged.count("tunnel-denied")
    for event in set(logged):
        assert value(metrics, "ssh_proxy_access_events_total", event=event) == logged.count(event)


# --- the endpoint -------------------------------------------------------------------------------


def test_the_endpoint_serves_the_registry_and_a_taken_port_is_one_clear_error() -> None:
    metrics = Metrics(lambda: Observed(WatcherState(keys_served=7)))
    server = metrics.serve(0, addr="127.0.0.1")
    try:
        port = server.server_port
        body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "ssh_proxy_keys_served 7.0" in body
        assert "ssh_proxy_logins_total" in body
        with pytest.raises(MetricsError, match=f"{port}.*WATCHER_METRICS_PORT"):
            Metrics().serve(port, addr="127.0.0.1")
    finally:
        server.shutdown()
        server.server_close()
