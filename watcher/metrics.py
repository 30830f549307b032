"""Prometheus metrics (WATCHER_METRICS_PORT): one registry of the proxy's own, never the
global one, so each Metrics (and each test) stands alone.

Gauges are read from the published state when scraped (`StateCollector`): the targets and
keys are what the last render served, with no second bookkeeping that could drift. Counters
count events as they happen: source events, key fetches, writes of the rendered keys, access
events. Every label takes its value from a small fixed set: never a target name or an error
text, so a hostile or churning fleet cannot grow the series without bound.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .accesslog import EVENTS, AccessEvent
from .errors import WatcherError
from .model import KeyState, Target
from .snapshot import KeyStatus, WatcherState
from .sources.base import TargetSink
from .targets import ProxyIdentity

PREFIX = "ssh_proxy"
SOURCE_EVENTS = ("upsert", "remove", "resync")
FETCH_REASONS = ("none", "timeout", "invalid-key", "http-status", "unreachable",
                 "exec-failed", "internal", "other")
WRITE_RESULTS = ("ok", "unchanged", "failed")
# From a batch of events written at once (tens of ms) to a backlog behind 100k-target renders.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_LOGINS = {"accepted": "accepted", "denied": "denied"}
_TUNNELS = {"tunnel": "opened", "tunnel-denied": "denied"}


class MetricsError(WatcherError):
    """The metrics endpoint cannot be served."""


def fetch_reason(keys: KeyState) -> str:
    """One of FETCH_REASONS for a fetch's outcome, from the KeyFetcher's error text
    (fetch.py and the platform clients word it). The first matching rule wins: a hang is
    told apart from a refusal, a target that answered with no valid key from one that did
    not answer."""
    if keys.status == "ok":
        return "none"
    error = keys.error
    if error.startswith("internal error"):
        return "internal"
    if "did not finish" in error or "Timeout" in error:
        return "timeout"
    if any(part.startswith(("http: ", "exec: ")) for part in error.split("; ")):
        return "invalid-key"  # KeyRejected: lines are prefixed by the way they came
    if "answered HTTP" in error:
        return "http-status"
    if error.startswith("GET ") or "no address on a network" in error:
        return "unreachable"
    if error.startswith("exec"):
        return "exec-failed"
    return "other"


@dataclass(frozen=True)
class Observed:
    """What the gauges show, read at scrape time."""

    state: WatcherState
    sshd_restarts: int = 0


class StateCollector(Collector):
    """Gauges of the latest published state (a custom collector: nothing to keep in step)."""

    def __init__(self, observe: Callable[[], Observed]) -> None:
        self.observe = observe

    def collect(self) -> Iterator[Metric]:
        seen = self.observe()
        state = seen.state
        targets = GaugeMetricFamily(f"{PREFIX}_targets", "Targets served, by key state",
                                    labels=["state"])
        counts = {status: 0 for status in KeyStatus}
        for target in state.targets:
            counts[target.key_status] += 1
        for status, count in counts.items():
            targets.add_metric([status.value], count)
        yield targets
        yield GaugeMetricFamily(f"{PREFIX}_targets_ignored",
                                "Targets seen but not served (filtered or unreachable)",
                                value=len(state.ignored))
        yield GaugeMetricFamily(f"{PREFIX}_keys_served", "Key lines in the index sshd reads",
                                value=state.keys_served)
        if state.source.kind:  # manual mode has no platform to connect to
            connected = GaugeMetricFamily(f"{PREFIX}_source_connected",
                                          "1 while the platform source is connected, else 0",
                                          labels=["kind"])
            connected.add_metric([state.source.kind], 1 if state.source.connected else 0)
            yield connected
        yield CounterMetricFamily(f"{PREFIX}_sshd_restarts", "Times sshd was restarted",
                                  value=seen.sshd_restarts)


class Metrics:
    """The proxy's metrics: counters fed by the components, gauges read from the state."""

    def __init__(self, observe: Callable[[], Observed] = lambda: Observed(WatcherState()),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.clock = clock
        self.events = Counter(f"{PREFIX}_source_events", "Events from the platform source, "
                              "by type (resync = a full relist)", ["type"],
                              registry=self.registry)
        self.fetches = Counter(f"{PREFIX}_key_fetches", "Key fetches, by result and reason "
                               "(reason 'none' for ok)", ["result", "reason"],
                               registry=self.registry)
        self.writes = Counter(f"{PREFIX}_cache_writes", "Writes of the rendered keys (index, "
                              "cache, hosts block), by result", ["result"],
                              registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_event_to_index_seconds", "Seconds from a source "
                                 "event being posted to the index containing it being written",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.logins = Counter(f"{PREFIX}_logins", "Logins, by result", ["result"],
                              registry=self.registry)
        self.tunnels = Counter(f"{PREFIX}_tunnels", "Tunnels asked for, by result", ["result"],
                               registry=self.registry)
        self.access = Counter(f"{PREFIX}_access_events", "Access-log events, by event",
                              ["event"], registry=self.registry)
        self._zero_series()
        self.registry.register(StateCollector(observe))
        # Event-to-index latency: posted -> applied by the reconciler -> in a render handed
        # to the writer -> written. Source events are posted under the lock, so the posted
        # queue keeps the reconciler inbox's order.
        self._lock = threading.Lock()
        self._posted: deque[float] = deque()
        self._applied: list[float] = []
        self._unwritten: list[float] = []  # in a render whose write failed: retried

    def _zero_series(self) -> None:
        """Every fixed label value exported from the start: a rate needs its zero."""
        for kind in SOURCE_EVENTS:
            self.events.labels(kind)
        self.fetches.labels("ok", "none")
        for reason in FETCH_REASONS[1:]:
            self.fetches.labels("failed", reason)
        for result in WRITE_RESULTS:
            self.writes.labels(result)
        for result in _LOGINS.values():
            self.logins.labels(result)
        for result in _TUNNELS.values():
            self.tunnels.labels(result)
        for event in EVENTS:
            self.access.labels(event)

    # ---- source events (any source thread) ---------------------------------------------
    def source_event(self, kind: str, post: Callable[[], None]) -> None:
        """Count one event and post it to the reconciler, noting when."""
        self.events.labels(kind).inc()
        with self._lock:
            self._posted.append(self.clock())
            post()

    def applied(self, _event: str = "applied") -> None:
        """The reconciler applied the oldest posted source event (its thread)."""
        with self._lock:
            if self._posted:
                self._applied.append(self._posted.popleft())

    # ---- writes of the rendered keys (under the writer's lock) -------------------------
    def write_result(self, result: str, fresh: bool) -> None:
        """`fresh`: a render the reconciler just handed over (it holds every event applied
        so far); else a retry of the newest render, holding what earlier renders held."""
        self.writes.labels(result).inc()
        with self._lock:
            if fresh:
                self._unwritten.extend(self._applied)
                self._applied = []
            if result == "failed":
                return
            done, self._unwritten = self._unwritten, []
        now = self.clock()
        for posted in done:
            self.latency.observe(max(0.0, now - posted))

    # ---- key fetches and access events ----------------------------------------------------
    def fetched(self, keys: KeyState) -> None:
        self.fetches.labels("ok" if keys.status == "ok" else "failed", fetch_reason(keys)).inc()

    def counting_fetch(self, fetch: Callable[[Target], KeyState]) -> Callable[[Target], KeyState]:
        def counted(target: Target) -> KeyState:
            keys = fetch(target)
            self.fetched(keys)
            return keys
        return counted

    def access_event(self, event: AccessEvent) -> None:
        if event.event not in EVENTS:
            return  # never a label value from outside the fixed set
        self.access.labels(event.event).inc()
        if event.event in _LOGINS:
            self.logins.labels(_LOGINS[event.event]).inc()
        elif event.event in _TUNNELS:
            self.tunnels.labels(_TUNNELS[event.event]).inc()

    # ---- the endpoint -------------------------------------------------------------------
    def serve(self, port: int, addr: str = "0.0.0.0") -> WSGIServer:
        """Serve /metrics on a daemon thread; the server is returned for `shutdown`."""
        try:
            server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {addr}:{port} (WATCHER_METRICS_PORT): "
                               f"{exc}; choose a free port or unset the variable") from exc
        return server


class CountingSink:
    """A TargetSink in front of the reconciler: counts the source's events and notes when
    each was posted, for the event-to-index latency."""

    def __init__(self, sink: TargetSink, metrics: Metrics) -> None:
        self.sink = sink
        self.metrics = metrics

    def upsert(self, target: Target) -> None:
        self.metrics.source_event("upsert", lambda: self.sink.upsert(target))

    def remove(self, target_id: str) -> None:
        self.metrics.source_event("remove", lambda: self.sink.remove(target_id))

    def replace_all(self, targets: Iterable[Target]) -> None:
        listed = tuple(targets)
        self.metrics.source_event("resync", lambda: self.sink.replace_all(listed))

    def ready(self, target_id: str) -> None:
        self.sink.ready(target_id)  # a hint to fetch now, not a change of the targets

    def set_source_status(self, status: dict) -> None:
        self.sink.set_source_status(status)

    def set_proxy_identity(self, proxy: ProxyIdentity) -> None:
        self.sink.set_proxy_identity(proxy)
