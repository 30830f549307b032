"""Docker engine outages (issue 13 item 1): the reconnect backoff stays low, an engine that
comes back is resynced, one that stays away ends the watcher with a SourceError after the
outage limit. Driven by a fake clock: the retry sleeps advance it, nothing waits."""

from __future__ import annotations

import threading
from typing import Any

import docker.errors
import pytest
import requests

from watcher.errors import SourceError
from watcher.sources import docker_client as docker_source
from watcher.sources.docker_client import DockerClient
from watcher.sources.docker_watcher import RECONNECT_CAP, DockerWatcher, Outage
from watcher.snapshot import SourceStatus, StatusDocument, WatcherState, health_problems

from test_docker_source import DB_ID, DB_USER_NET, WEB_BRIDGE, WEB_ID, FakeSink


class FakeClock:
    """A monotonic clock the code sleeps on: sleeping only moves it (and is recorded)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class _Stream:
    """An events stream that blocks until closed (the engine is up and quiet)."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def __iter__(self):
        self.closed.wait()
        return iter(())

    def close(self) -> None:
        self.closed.set()


class Engine:
    """A fake engine: refuses while `down`, else answers from `containers`."""

    def __init__(self, containers: dict[str, dict[str, Any]], down_for: int,
                 error: Exception | None = None) -> None:
        self.containers = containers
        self.down_for = down_for  # connect attempts still refused
        self.error = error or requests.ConnectionError("[Errno 111] Connection refused")
        self.connects = 0
        self.stream: _Stream | None = None

    def factory(self) -> Any:
        self.connects += 1
        if self.down_for > 0:
            self.down_for -= 1
            raise self.error
        return _Client(self)


class _Client:
    def __init__(self, engine: Engine) -> None:
        self.api = self
        self.engine = engine

    def ping(self) -> bool:
        return True

    def inspect_container(self, cid: str) -> dict[str, Any]:
        if cid not in self.engine.containers:
            raise docker.errors.NotFound(cid)
        return self.engine.containers[cid]

    def containers(self, filters: dict | None = None) -> list[dict[str, Any]]:
        return [{"Id": cid} for cid in self.engine.containers]

    def events(self, decode: bool = False, filters: dict | None = None) -> _Stream:
        self.engine.stream = _Stream()
        return self.engine.stream


@pytest.fixture(autouse=True)
def _not_in_a_container(monkeypatch) -> None:
    monkeypatch.setattr(docker_source, "_read", lambda path: "")


def _watcher(engine: Engine, clock: FakeClock, limit: float = 60) -> tuple[DockerWatcher, FakeSink]:
    sink = FakeSink()
    client = DockerClient(base_url="unix:///var/run/dockerdir/docker.sock",
                          client_factory=engine.factory)
    return DockerWatcher(client, sink, ping_interval=3600, outage_limit=limit, clock=clock,
                         sleep=clock.sleep), sink


def test_outage_is_pure_and_resets() -> None:
    outage = Outage(limit=30)
    assert not outage.over(0)
    outage.failed("refused", now=100)
    outage.failed("refused again", now=110)
    assert not outage.over(129.9) and outage.over(130)
    assert outage.status(120) == {"state": "reconnecting", "attempt": 2, "error": "refused again",
                                  "outage_seconds": 20.0, "gives_up_after": 30}
    outage.ended()
    assert not outage.over(10_000) and outage.attempts == 0


def test_engine_that_stays_away_ends_the_watcher_after_the_limit() -> None:
    engine = Engine({}, down_for=10_000)
    clock = FakeClock()
    watcher, sink = _watcher(engine, clock, limit=60)
    with pytest.raises(SourceError) as raised:
        watcher.run(threading.Event())
    message = str(raised.value)
    assert "unix:///var/run/dockerdir/docker.sock" in message
    assert "Connection refused" in message and "--restart unless-stopped" in message
    # The backoff is capped low: a returning engine is seen within seconds.
    assert clock.sleeps and max(clock.sleeps) <= RECONNECT_CAP
    assert clock.now - 1000.0 >= 60
    assert clock.now - 1000.0 < 60 + RECONNECT_CAP + 1  # it gave up right after the limit
    statuses = [c[1] for c in sink.calls if c[0] == "status"]
    assert [s["attempt"] for s in statuses] == list(range(1, len(statuses) + 1))
    assert all(s["state"] == "reconnecting" and not s["connected"] for s in statuses)
    assert "Connection refused" in statuses[-1]["error"]


def test_engine_that_comes_back_is_resynced_and_the_outage_forgotten() -> None:
    engine = Engine({WEB_ID: WEB_BRIDGE, DB_ID: DB_USER_NET}, down_for=5)
    clock = FakeClock()
    watcher, sink = _watcher(engine, clock, limit=60)
    stop = threading.Event()
    runner = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    runner.start()
    waited = threading.Event()

    def last_status() -> dict:
        statuses = [c[1] for c in list(sink.calls) if c[0] == "status"]
        return statuses[-1] if statuses else {}

    for _ in range(500):  # up to 5 s of real time for the thread to connect and say so
        if watcher.connected and last_status().get("connected"):
            break
        waited.wait(0.01)
    assert watcher.connected, "the watcher did not reconnect once the engine answered"
    assert ("replace_all", ["db", "web"]) in sink.calls
    last = last_status()
    assert last["connected"] and last["state"] == "connected"
    assert watcher.outage.started is None and watcher.outage.attempts == 0
    stop.set()
    assert engine.stream is not None
    engine.stream.close()
    runner.join(5)
    assert not runner.is_alive()


def test_outages_apart_do_not_add_up() -> None:
    """Each outage gets the whole limit: 40 s down, back, 40 s down again is no give-up."""
    engine = Engine({WEB_ID: WEB_BRIDGE}, down_for=0)
    clock = FakeClock()
    watcher, _ = _watcher(engine, clock, limit=60)
    watcher.outage.failed("refused", clock())
    clock.now += 40
    watcher.outage.ended()  # what a good connect does
    watcher.outage.failed("refused", clock())
    clock.now += 40
    assert not watcher.outage.over(clock())


def test_health_names_the_reconnect_attempt_and_error() -> None:
    doc = StatusDocument(heartbeat=100.0, mode="docker", sshd_pid=7, state=WatcherState(
        source=SourceStatus(kind="docker", connected=False, state="reconnecting", attempt=4,
                            error="[Errno 111] Connection refused")))
    assert health_problems(doc, 101.0, listening=True) == [
        "docker source is reconnecting (attempt 4): [Errno 111] Connection refused"]
    assert health_problems(doc, 101.0, listening=True, require_source=False) == []


def test_an_outage_logs_its_first_failure_not_every_attempt(caplog) -> None:
    engine = Engine({}, down_for=10_000)
    clock = FakeClock()
    watcher, _ = _watcher(engine, clock, limit=30)
    caplog.set_level("INFO", logger="watcher.sources.docker_watcher")
    with pytest.raises(SourceError):
        watcher.run(threading.Event())
    assert engine.connects > 3
    warnings = [r for r in caplog.records if r.name == "watcher.sources.docker_watcher"]
    assert len(warnings) == 1 and "reconnect attempt 2" in warnings[0].getMessage()


@pytest.mark.parametrize("error, shown", [
    # docker-py, when the socket file is missing or not ours to open
    (docker.errors.DockerException("Error while fetching server API version: ('Connection aborted.', "
                                   "FileNotFoundError(2, 'No such file or directory'))"),
     "No such file or directory"),
    (docker.errors.DockerException("Error while fetching server API version: ('Connection aborted.', "
                                   "PermissionError(13, 'Permission denied'))"),
     "Permission denied"),
])
def test_missing_or_forbidden_socket_counts_as_an_outage(error: Exception, shown: str) -> None:
    engine = Engine({}, down_for=10_000, error=error)
    clock = FakeClock()
    watcher, sink = _watcher(engine, clock, limit=20)
    with pytest.raises(SourceError) as raised:
        watcher.run(threading.Event())
    assert shown in str(raised.value) and "unix:///var/run/dockerdir/docker.sock" in str(raised.value)
    assert shown in [c[1] for c in sink.calls if c[0] == "status"][-1]["error"]
