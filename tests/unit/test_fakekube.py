"""tests/fakekube: the fake API server, driven by the real kubernetes client (37.x)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterator

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.stream import stream

from tests.fakekube import V4, ExecResult, FakeKube, make_pod, make_service, set_ready


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with FakeKube() as server:
        yield server


@pytest.fixture
def api(fake: FakeKube, tmp_path: Path) -> client.CoreV1Api:
    path = fake.write_kubeconfig(tmp_path / "kubeconfig")
    return client.CoreV1Api(config.new_client_from_config(str(path)))


def _events(api: client.CoreV1Api, version: str, **kwargs) -> list[dict]:
    kwargs.setdefault("timeout_seconds", 5)
    return list(watch.Watch().stream(api.list_namespaced_pod, "default",
                                     resource_version=version, _request_timeout=(5, 10),
                                     **kwargs))


def test_list_deserialises_into_strict_models(fake: FakeKube, api: client.CoreV1Api) -> None:
    fake.add_pod(make_pod("web-1", labels={"app": "web"}))
    fake.add_pod(make_pod("db-1", labels={"app": "db"}))
    fake.add_service(make_service("web", {"app": "web"}))
    pods = api.list_namespaced_pod("default")
    assert [p.metadata.name for p in pods.items] == ["db-1", "web-1"]
    assert int(pods.metadata.resource_version) == fake.resource_version
    status = pods.items[0].status.container_statuses[0]
    assert status.image and status.image_id and status.restart_count == 0
    assert pods.items[0].metadata.uid and pods.items[0].metadata.creation_timestamp
    web = api.list_namespaced_pod("default", label_selector="app in (web,cache)")
    assert [p.metadata.name for p in web.items] == ["web-1"]
    by_field = api.list_namespaced_pod("default", field_selector="metadata.name=db-1")
    assert [p.metadata.name for p in by_field.items] == ["db-1"]
    assert api.list_namespaced_service("default").items[0].spec.selector == {"app": "web"}
    assert api.read_namespaced_pod("web-1", "default").status.pod_ip == "10.244.0.10"
    assert client.VersionApi(api.api_client).get_code().git_version == "v1.37.0"


def test_watch_from_resource_version_sees_only_later_events(fake: FakeKube,
                                                             api: client.CoreV1Api) -> None:
    fake.add_pod(make_pod("old"))
    version = api.list_namespaced_pod("default").metadata.resource_version
    stored = fake.add_pod(make_pod("new", labels={"app": "web"}))
    fake.put("pods", set_ready(stored, False))
    fake.delete_pod("old")
    fake.close_streams()  # ends the watch cleanly once it has caught up
    events = _events(api, version)
    seen = [(e["type"], e["object"].metadata.name) for e in events]
    assert seen == [("ADDED", "new"), ("MODIFIED", "new"), ("DELETED", "old")]
    versions = [int(e["object"].metadata.resource_version) for e in events]
    assert versions == sorted(versions) and versions[0] > int(version)


def test_watch_label_selector_turns_leaving_into_deleted(fake: FakeKube,
                                                         api: client.CoreV1Api) -> None:
    version = str(fake.resource_version)
    pod = fake.add_pod(make_pod("web-1", labels={"app": "web"}))
    fake.put("pods", {**pod, "metadata": {**pod["metadata"], "labels": {"app": "other"}}})
    fake.close_streams()
    events = _events(api, version, label_selector="app=web")
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]


def test_bookmarks_only_when_allowed(fake: FakeKube, api: client.CoreV1Api) -> None:
    version = str(fake.resource_version)
    fake.add_pod(make_pod("a"))
    fake.bookmark()
    fake.close_streams()
    allowed = _events(api, version, allow_watch_bookmarks=True)
    assert [e["type"] for e in allowed] == ["ADDED", "BOOKMARK"]
    assert allowed[1]["raw_object"]["metadata"]["resourceVersion"] == str(fake.resource_version)
    fake.close_streams()
    assert [e["type"] for e in _events(api, version)] == ["ADDED"]


def test_expired_version_gets_410(fake: FakeKube, api: client.CoreV1Api) -> None:
    version = api.list_namespaced_pod("default").metadata.resource_version
    fake.expire()
    with pytest.raises(client.ApiException) as raised:
        _events(api, version)
    assert raised.value.status == 410
    fresh = api.list_namespaced_pod("default").metadata.resource_version
    fake.add_pod(make_pod("after"))
    fake.close_streams()
    assert [e["type"] for e in _events(api, fresh)] == ["ADDED"]


def test_open_watch_gets_410_mid_stream(fake: FakeKube, api: client.CoreV1Api) -> None:
    version = str(fake.resource_version)
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.extend(_events(api, version, timeout_seconds=30))
        except client.ApiException as exc:
            outcome.append(exc.status)

    reader = threading.Thread(target=run)
    reader.start()
    assert fake.wait_watching("pods")
    fake.expire()
    reader.join(20)
    assert outcome == [410]


def test_server_timeout_ends_the_stream(fake: FakeKube, api: client.CoreV1Api) -> None:
    assert _events(api, str(fake.resource_version), timeout_seconds=1) == []
    assert fake.requests_to("pods", watch=True)[-1].param("timeoutSeconds") == "1"


def test_down_cuts_streams_and_up_keeps_objects(fake: FakeKube, api: client.CoreV1Api) -> None:
    fake.add_pod(make_pod("kept"))
    errors: list[Exception] = []

    def run() -> None:
        try:
            _events(api, str(fake.resource_version), timeout_seconds=30)
        except Exception as exc:  # the cut stream surfaces as a protocol error
            errors.append(exc)

    reader = threading.Thread(target=run)
    reader.start()
    assert fake.wait_watching("pods")
    fake.down()
    reader.join(20)
    assert not reader.is_alive() and errors
    with pytest.raises(Exception):
        api.list_namespaced_pod("default", _request_timeout=2)
    fake.up()
    assert [p.metadata.name for p in api.list_namespaced_pod("default").items] == ["kept"]


def test_stall_holds_requests_until_resumed(fake: FakeKube, api: client.CoreV1Api) -> None:
    version = client.VersionApi(api.api_client)
    fake.stall()
    with pytest.raises((urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.MaxRetryError)):
        version.get_code(_request_timeout=0.3)
    fake.resume()
    assert version.get_code(_request_timeout=5).major == "1"


def test_denied_verb_answers_403_status(fake: FakeKube, api: client.CoreV1Api) -> None:
    fake.deny("watch", "pods")
    api.list_namespaced_pod("default")  # list still allowed
    with pytest.raises(client.ApiException) as raised:
        _events(api, "1")
    assert raised.value.status == 403
    assert 'cannot watch resource "pods"' in json.loads(raised.value.body)["message"]


@pytest.mark.parametrize("protocols", [("v5.channel.k8s.io", V4), (V4,)])
def test_exec_channels_and_exit_code(fake: FakeKube, api: client.CoreV1Api,
                                     protocols: tuple[str, ...]) -> None:
    fake.exec_protocols = protocols
    fake.add_pod(make_pod("web-1", containers=("main", "side")))
    calls = []

    def handler(call):
        calls.append(call)
        return ExecResult(stdout=b"ssh-ed25519 AAAA k\n", stderr=b"warning\n", exit_code=3)

    fake.exec_handler = handler
    ws = stream(api.connect_get_namespaced_pod_exec, "web-1", "default",
                command=["cat", "--", "/k.pub"], container="side", stderr=True, stdin=False,
                stdout=True, tty=False, _preload_content=False, binary=True)
    ws.run_forever(timeout=10)
    assert ws.subprotocol == protocols[0]
    assert ws.read_stdout(timeout=0) == b"ssh-ed25519 AAAA k\n"
    assert ws.read_stderr(timeout=0) == b"warning\n"
    assert ws.returncode == 3
    assert calls[0].command == ("cat", "--", "/k.pub") and calls[0].container == "side"


def test_exec_success_and_kubeconfig_namespace(fake: FakeKube, tmp_path: Path) -> None:
    path = fake.write_kubeconfig(tmp_path / "kc", namespace="team-a")
    _, context = config.list_kube_config_contexts(config_file=str(path))
    assert context["context"]["namespace"] == "team-a"
    fake.add_pod(make_pod("web-1", namespace="team-a"))
    fake.exec_handler = lambda call: ExecResult(stdout=b"ok")
    api = client.CoreV1Api(config.new_client_from_config(str(path)))
    out = stream(api.connect_get_namespaced_pod_exec, "web-1", "team-a", command=["true"],
                 stderr=True, stdin=False, stdout=True, tty=False)
    assert out == "ok"
