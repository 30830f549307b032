"""Kubernetes API outages (issue 13): the watcher keeps relisting with backoff, says
`reconnecting` with the attempt and the last error, and an API server that keeps failing
for the outage limit ends it with a SourceError naming the server (the pod restarts).
Driven by a fake clock: the backoff sleeps advance it, nothing waits."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import urllib3
from kubernetes import client as k8s

from tests.fakekube import FakeKube, make_pod
from watcher.errors import SourceError
from watcher.sources.kubernetes_client import KubernetesClient, load_config
from watcher.sources.kubernetes_watcher import KubernetesWatcher
from watcher.sources.outage import Outage

from test_faults_docker_outage import FakeClock
from test_kubernetes_source import RecordingSink, wait_for

URL = "https://10.96.0.1:443"


class FailingKube:
    """An API server that fails `failures` list calls (then answers an empty namespace)."""

    def __init__(self, error: Exception, failures: int = 10_000) -> None:
        self.error = error
        self.failures = failures
        self.namespace = "team"
        self.config = SimpleNamespace(configuration=SimpleNamespace(host=URL))

    def list(self, resource: str, selector: str = "") -> tuple[list, str]:
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        return [], "1"

    def watch(self, resource: str, version: str, timeout: int, selector: str) -> Any:
        raise urllib3.exceptions.ProtocolError("watch cut")

    def ping(self) -> None:
        pass


def _watcher(kube: Any, clock: FakeClock, limit: float = 60) -> tuple[KubernetesWatcher, RecordingSink]:
    sink = RecordingSink()
    return KubernetesWatcher(sink, kube, proxy_pod="", outage_limit=limit, clock=clock,
                             sleep=clock.sleep), sink


@pytest.mark.parametrize("error", [
    urllib3.exceptions.MaxRetryError(None, "/api/v1", "[Errno 111] Connection refused"),
    k8s.ApiException(status=503, reason="Service Unavailable"),
    k8s.ApiException(status=401, reason="Unauthorized"),
], ids=["refused", "5xx", "auth"])
def test_api_server_that_keeps_failing_ends_the_watcher_after_the_limit(error: Exception) -> None:
    clock = FakeClock()
    watcher, sink = _watcher(FailingKube(error), clock, limit=60)
    with pytest.raises(SourceError) as raised:
        watcher.run(threading.Event())
    message = str(raised.value)
    assert URL in message and "60 s" in message and "\n" not in message
    assert "restart" in message  # what happens and what to check
    assert 60 <= clock.now - 1000.0 < 60 + 31  # gave up at the first attempt past the limit
    statuses = [s for s in sink.statuses if not s["connected"]]
    assert [s["attempt"] for s in statuses] == list(range(1, len(statuses) + 1))
    assert all(s["state"] == "reconnecting" and s["error"] for s in statuses)
    assert statuses[-1]["gives_up_after"] == 60


def test_api_server_that_comes_back_in_time_is_followed_and_the_outage_forgotten() -> None:
    clock = FakeClock()
    kube = FailingKube(k8s.ApiException(status=500, reason="Internal Server Error"), failures=4)
    watcher, sink = _watcher(kube, clock, limit=60)
    stop = threading.Event()
    lists = []
    real_list = kube.list

    def list_then_stop(resource: str, selector: str = "") -> tuple[list, str]:
        result = real_list(resource, selector)
        lists.append(resource)
        if len(lists) >= 4:  # answered twice (two rounds): enough
            stop.set()
        return result

    kube.list = list_then_stop
    watcher.run(stop)  # returns: stopped, not given up
    assert watcher.outage == Outage(60)  # forgotten: the API server answered
    reconnecting = [s["attempt"] for s in sink.statuses if not s["connected"]]
    assert reconnecting[:4] == [1, 2, 3, 4]  # the 4 failures, counted while they lasted
    assert any(s["connected"] for s in sink.statuses)


def test_outage_is_shared_with_the_docker_source() -> None:
    from watcher.sources import docker_watcher
    assert docker_watcher.Outage is Outage


def test_fake_api_server_stopped_for_good_ends_the_watcher(tmp_path: Path) -> None:
    """The real client against tests/fakekube, stopped for good after the watcher connected."""
    with FakeKube(namespace="team") as fake:
        fake.add_pod(make_pod("ws-1"))
        config = load_config(str(fake.write_kubeconfig(tmp_path / "kc")),
                             service_account_dir=tmp_path)
        kube = KubernetesClient(config, exec_timeout=3.0, request_timeout=3.0)
        sink = RecordingSink()
        watcher = KubernetesWatcher(sink, kube, proxy_pod="", outage_limit=2, ping_interval=0.2,
                                    healthy_after=0.5)
        failure: list[BaseException] = []
        stop = threading.Event()

        def run() -> None:
            try:
                watcher.run(stop)
            except BaseException as exc:  # noqa: BLE001 - what the supervisor would see
                failure.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert wait_for(lambda: sink.status.get("connected") is True)
        fake.down()
        thread.join(60)
        stop.set()
        assert not thread.is_alive(), "the watcher still runs with the API server gone"
        assert failure and isinstance(failure[0], SourceError), failure
        assert fake.url in str(failure[0])
        assert sink.status.get("state") == "reconnecting" and sink.status.get("attempt", 0) >= 1
