"""watcher.sources.kubernetes_client / kubernetes_watcher: the pure pod/service functions, and the client and watcher
driven against the fake API server (tests/fakekube) through the real kubernetes client."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import tenacity
from kubernetes import client as k8s

from tests.fakekube import ExecCall, ExecResult, FakeKube, make_pod, make_service, set_ready, with_changes
from watcher.errors import FetchError, FetchTimeout, SourceError
from watcher.fetch import key_file_command
from watcher.model import Target
from watcher.targets import ProxyIdentity
from watcher.sources import kubernetes_client as ks
from watcher.sources.kubernetes_client import KubernetesClient, load_config
from watcher.config import load_settings
from watcher.sources import kubernetes_watcher
from watcher.sources.kubernetes_watcher import KubernetesWatcher


def _stored(pod: dict, rv: int = 5) -> dict:
    """A pod as the server returns it (namespace and resourceVersion set)."""
    return with_changes(pod, metadata__resourceVersion=str(rv))


# ---- pure ---------------------------------------------------------------------------------------
def test_running_ready_pod_is_a_target() -> None:
    assert ks.is_target_pod(make_pod("a"))


@pytest.mark.parametrize("pod", [
    make_pod("pending", phase="Pending"),
    make_pod("failed", phase="Failed"),
    make_pod("not-ready", ready=False),
    make_pod("terminating", deletion=True),
    make_pod("no-ip", ip=""),
    with_changes(make_pod("no-conditions"), status__conditions=[]),
])
def test_pods_that_are_not_targets(pod: dict) -> None:
    assert not ks.is_target_pod(pod)


def test_pod_target_fields() -> None:
    pod = make_pod("ws-0", namespace="team", ip="10.1.2.3", labels={"b": "2", "a": "1"},
                   hostname="ws-0", subdomain="workspaces", uid="uid-1")
    target = ks.pod_target(pod, ("svc", "svc.team"))
    assert target == Target(
        id="uid-1", name="ws-0", address="10.1.2.3", hostname="ws-0",
        aliases=("ws-0.workspaces.team.svc.cluster.local", "svc", "svc.team"),
        labels=(("a", "1"), ("b", "2")), source="kubernetes",
        started_at=target.started_at)
    assert ks.pod_fqdn(pod, "example.org") == "ws-0.workspaces.team.svc.example.org"


def test_fqdn_needs_hostname_and_subdomain() -> None:
    assert ks.pod_fqdn(make_pod("a", hostname="h")) == ""
    assert ks.pod_fqdn(make_pod("a", subdomain="s")) == ""
    assert ks.pod_target(make_pod("a", hostname="h")).aliases == ()


def test_second_pod_ip_is_an_own_address() -> None:
    pod = with_changes(make_pod("a", ip="10.0.0.5"),
                       status__podIPs=[{"ip": "10.0.0.5"}, {"ip": "fd00::5"}])
    target = ks.pod_target(pod)
    assert (target.address, target.addresses) == ("10.0.0.5", ("fd00::5",))


def test_started_at_changes_on_container_restart() -> None:
    first = ks.pod_started_at(make_pod("a"))
    assert ks.pod_started_at(make_pod("a", restart_count=1)) != first
    assert ks.pod_started_at(make_pod("a", started_at="2026-12-04T11:00:00Z")) != first
    assert ks.pod_started_at(make_pod("a")) == first


def test_service_selection_and_names() -> None:
    pod = make_pod("a", labels={"app": "web", "tier": "x"})
    assert ks.service_selects(make_service("web", {"app": "web"}), pod)
    assert not ks.service_selects(make_service("web", {"app": "db"}), pod)
    assert not ks.service_selects(make_service("web", {}), pod)
    assert not ks.service_selects(make_service("web", None), pod)
    assert not ks.service_selects(make_service("web", {"app": "web"}, namespace="other"), pod)
    assert ks.service_names(make_service("web", {}, namespace="ns"), "c.local") == (
        "web", "web.ns", "web.ns.svc", "web.ns.svc.c.local")


def test_service_names_go_only_to_the_single_selected_target() -> None:
    one = make_pod("one", labels={"app": "web"}, uid="u1")
    two = make_pod("two", labels={"app": "web"}, uid="u2")
    idle = make_pod("idle", labels={"app": "web"}, uid="u3", ready=False)
    web = make_service("web", {"app": "web"})
    also = make_service("also", {"app": "web", "extra": "1"})
    pods = {"u1": one, "u3": idle}
    assert ks.service_members(web, pods) == {"u1"}
    targets = ks.derive_targets(pods, {"web": web})
    assert targets["u1"].aliases == ks.service_names(web) and "u3" not in targets
    pods["u2"] = two  # a second ready pod behind `web`: the name is ambiguous, nobody has it
    targets = ks.derive_targets(pods, {"web": web})
    assert targets["u1"].aliases == () and targets["u2"].aliases == ()
    pods["u2"] = with_changes(two, metadata__labels={"app": "web", "extra": "1"})
    members = {"web": {"u1", "u2"}, "also": {"u2"}}
    assert ks.granted_service_names("u2", {"web": web, "also": also}, members) == (
        ks.service_names(also))
    assert ks.derive_targets(pods, {"web": web, "also": also})["u2"].aliases == (
        ks.service_names(also))


def test_proxy_pod_is_never_a_target_and_names_the_identity() -> None:
    proxy = make_pod("ssh-proxy-7d9", "default", ip="10.0.0.9", labels={"app": "proxy"}, uid="p")
    other = make_pod("ws", "default", uid="w")
    svc = make_service("ssh-proxy", {"app": "proxy"}, "default")
    assert set(ks.derive_targets({"p": proxy, "w": other}, {"ssh-proxy": svc},
                                 "ssh-proxy-7d9")) == {"w"}
    assert not ks.is_candidate(proxy, "ssh-proxy-7d9") and ks.is_candidate(other, "ssh-proxy-7d9")
    identity = ks.proxy_identity(proxy, [svc])
    assert identity.addresses == {"10.0.0.9"}
    assert {"ssh-proxy-7d9", "ssh-proxy", "ssh-proxy.default.svc.cluster.local"} <= identity.names
    assert ks.proxy_identity(None, [svc]).names == frozenset()


def test_label_selector_from_settings_pairs() -> None:
    assert ks.label_selector([("role", "ssh"), ("team", None)]) == "role=ssh,team"
    assert ks.label_selector([]) == ""


@pytest.mark.parametrize("text,code", [
    ('{"metadata":{},"status":"Success"}', 0),
    ('{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":'
     '[{"reason":"ExitCode","message":"2"}]}}', 2),
    ('{"status":"Failure","message":"container not found"}', -1),
    ("", -1),
    ("not json", -1),
])
def test_exec_exit_code(text: str, code: int) -> None:
    assert ks.exec_exit_code(text) == code


def test_forbidden_message_names_verb_resource_and_namespace() -> None:
    exc = k8s.ApiException(status=403, reason="Forbidden")
    exc.body = json.dumps({"message": 'pods is forbidden: cannot watch resource "pods"'})
    line = ks.forbidden_message(exc, "watch", "pods", "team")
    assert "'watch' on 'pods' in namespace 'team'" in line and "cannot watch" in line
    assert "\n" not in line


# ---- config -------------------------------------------------------------------------------------
def test_load_config_from_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKube(namespace="team")
    path = fake.write_kubeconfig(tmp_path / "kc")
    monkeypatch.setenv("KUBECONFIG", str(path))
    loaded = load_config(service_account_dir=tmp_path)
    assert loaded.namespace == "team" and loaded.source == str(path)


def test_load_config_in_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes.config import incluster_config

    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text("not checked here")
    (tmp_path / "namespace").write_text("team\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "never-read"))
    loaded = load_config(service_account_dir=tmp_path)
    assert (loaded.namespace, loaded.source) == ("team", "in-cluster")
    assert loaded.configuration.host == "https://10.96.0.1:443"
    assert loaded.configuration.retries == 0


def test_load_config_without_namespace_or_file(tmp_path: Path) -> None:
    path = FakeKube().write_kubeconfig(tmp_path / "kc", namespace=None)
    with pytest.raises(SourceError, match="names no namespace"):
        load_config(str(path), service_account_dir=tmp_path)
    with pytest.raises(SourceError, match="set KUBECONFIG"):
        load_config(str(tmp_path / "missing"), service_account_dir=tmp_path)


# ---- against the fake API server -----------------------------------------------------------------
class RecordingSink:
    """The reconciler's input interface, recording calls and the resulting desired state."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, Any]] = []
        self.state: dict[str, Target] = {}
        self.status: dict = {}
        self.statuses: list[dict] = []
        self.identity: Any = None

    def replace_all(self, targets: list[Target]) -> None:
        with self.lock:
            self.calls.append(("replace_all", tuple(targets)))
            self.state = {t.id: t for t in targets}

    def upsert(self, target: Target) -> None:
        with self.lock:
            self.calls.append(("upsert", target))
            self.state[target.id] = target

    def remove(self, target_id: str) -> None:
        with self.lock:
            self.calls.append(("remove", target_id))
            self.state.pop(target_id, None)

    def set_source_status(self, status: dict) -> None:
        with self.lock:
            self.status = status
            self.statuses.append(status)

    def set_proxy_identity(self, identity: Any) -> None:
        with self.lock:
            self.identity = identity

    def names(self) -> set[str]:
        with self.lock:
            return {t.name for t in self.state.values()}

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(1 for k, _ in self.calls if k == kind)


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll until true (generous deadline: the machine is shared)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with FakeKube(namespace="team") as server:
        yield server


@pytest.fixture
def kube(fake: FakeKube, tmp_path: Path) -> KubernetesClient:
    config = load_config(str(fake.write_kubeconfig(tmp_path / "kc")),
                         service_account_dir=tmp_path)
    return KubernetesClient(config, exec_timeout=3.0, request_timeout=3.0)


@pytest.fixture
def start(kube: KubernetesClient) -> Iterator[Callable[..., tuple[KubernetesWatcher,
                                                                   RecordingSink]]]:
    stops: list[tuple[threading.Event, threading.Thread]] = []

    def starter(selector: str = "", proxy_pod: str = "ssh-proxy-0", ping_interval: float = 10):
        sink = RecordingSink()
        watcher = KubernetesWatcher(sink, kube, label_selector=selector, proxy_pod=proxy_pod,
                                    watch_timeout=30, healthy_after=0.5,
                                    ping_interval=ping_interval)
        watcher.wait = tenacity.wait_fixed(0.1)
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
        thread.start()
        stops.append((stop, thread))
        assert wait_for(lambda: sink.status.get("connected") is True)
        return watcher, sink

    yield starter
    for stop, thread in stops:
        stop.set()
        thread.join(10)


def _both_watching(fake: FakeKube, count: int = 1) -> None:
    assert fake.wait_watching("pods", count) and fake.wait_watching("services", count)


def test_initial_list_then_add_delete(fake: FakeKube, start) -> None:
    fake.add_pod(make_pod("ws-1"))
    fake.add_pod(make_pod("booting", phase="Pending"))
    watcher, sink = start()
    assert sink.calls[0][0] == "replace_all" and sink.names() == {"ws-1"}
    _both_watching(fake)
    added = fake.add_pod(make_pod("ws-2"))
    assert wait_for(lambda: sink.names() == {"ws-1", "ws-2"})
    fake.delete_pod("ws-2")
    assert wait_for(lambda: sink.names() == {"ws-1"})
    assert ("remove", added["metadata"]["uid"]) in sink.calls
    watch = fake.requests_to("pods", watch=True)[0]
    assert watch.param("allowWatchBookmarks") == "true" and watch.param("timeoutSeconds") == "30"
    assert watch.param("resourceVersion")


@pytest.mark.parametrize("change", [
    lambda pod: set_ready(pod, False),
    lambda pod: with_changes(pod, metadata__deletionTimestamp="2026-12-04T10:05:00Z"),
    lambda pod: with_changes(pod, status__phase="Failed"),
])
def test_not_ready_terminating_or_failed_is_removed_at_once(fake: FakeKube, start,
                                                            change) -> None:
    pod = fake.add_pod(make_pod("ws-1"))
    _, sink = start()
    _both_watching(fake)
    fake.put("pods", change(pod))
    assert wait_for(lambda: sink.names() == set())
    assert sink.calls[-1] == ("remove", pod["metadata"]["uid"])


def test_irrelevant_modification_emits_nothing_but_restart_does(fake: FakeKube, start) -> None:
    pod = fake.add_pod(make_pod("ws-1"))
    _, sink = start()
    _both_watching(fake)
    fake.put("pods", with_changes(pod, metadata__annotations={"note": "x"}))
    fake.put("pods", make_pod("marker", uid="m"))  # a later event proves the first was handled
    assert wait_for(lambda: "marker" in sink.names())
    assert [c for c in sink.calls if c[0] == "upsert" and c[1].name == "ws-1"] == []
    restarted = fake.get("pods", "ws-1", "team")
    restarted["status"]["containerStatuses"][0]["restartCount"] = 1
    fake.put("pods", restarted)
    assert wait_for(lambda: any(c[0] == "upsert" and c[1].name == "ws-1" for c in sink.calls))


def test_410_mid_stream_relists_nothing_stale_nothing_missed(fake: FakeKube, start) -> None:
    fake.add_pod(make_pod("stays"))
    gone = fake.add_pod(make_pod("goes"))
    _, sink = start()
    _both_watching(fake)
    lists = len(fake.requests_to("pods", watch=False))
    fake.expire()  # open watches get 410 before any of the changes below
    fake.delete_pod("goes")
    fake.add_pod(make_pod("new"))
    assert wait_for(lambda: sink.names() == {"stays", "new"})
    assert len(fake.requests_to("pods", watch=False)) > lists
    assert gone["metadata"]["uid"] not in sink.state


def test_api_down_then_up_reconnects_and_resyncs(fake: FakeKube, start) -> None:
    fake.add_pod(make_pod("stays"))
    fake.add_pod(make_pod("goes"))
    _, sink = start()
    _both_watching(fake)
    fake.down()
    assert wait_for(lambda: sink.status.get("connected") is False)
    assert "cannot reach the Kubernetes API" in sink.status["error"]
    fake.delete_pod("goes")
    fake.add_pod(make_pod("new"))
    fake.up()
    assert wait_for(lambda: sink.status.get("connected") is True
                    and sink.names() == {"stays", "new"})
    assert sink.count("replace_all") >= 2


def test_half_open_api_is_noticed_by_the_health_check(fake: FakeKube, start,
                                                      kube: KubernetesClient) -> None:
    kube.request_timeout = 0.5
    _, sink = start(ping_interval=0.2)
    _both_watching(fake)
    fake.stall()  # the watches stay open but silent; only the health check can tell
    assert wait_for(lambda: sink.status.get("connected") is False)
    assert "did not answer a health check" in sink.status["error"]
    fake.add_pod(make_pod("while-stalled"))
    fake.resume()
    assert wait_for(lambda: sink.status.get("connected") is True
                    and sink.names() == {"while-stalled"})


def test_only_permitted_service_names_are_granted() -> None:
    """SSH_PERMIT_TARGET_HOST applies to Service names too."""
    pod = make_pod("one", labels={"app": "web"}, uid="u1")
    web, db = make_service("web", {"app": "web"}), make_service("db", {"app": "web"})
    settings = load_settings({"SSH_PERMIT_TARGET_HOST": "web*,one"})
    targets = ks.derive_targets({"u1": pod}, {"web": web, "db": db},
                                permitted=settings.host_permitted)
    assert targets["u1"].aliases == ks.service_names(web)


def test_from_settings_carries_filters_and_domain() -> None:
    settings = load_settings({"SSH_TARGET_LABELS": "team=a,ssh", "SSH_PERMIT_TARGET_HOST": "ws-*",
                              "KUBERNETES_CLUSTER_DOMAIN": "Corp.Example."})
    watcher = kubernetes_watcher.from_settings(object(), object(), settings)
    assert watcher.selector == "team=a,ssh" and watcher.domain == "corp.example"
    assert watcher.permit_service("ws-1") and not watcher.permit_service("db")


def test_clean_stream_end_relists(fake: FakeKube, start) -> None:
    _, sink = start()
    _both_watching(fake)
    fake.close_streams()
    assert wait_for(lambda: sink.count("replace_all") >= 2)


def test_service_names_follow_services(fake: FakeKube, start) -> None:
    web = fake.add_pod(make_pod("web-1", labels={"app": "web"}))
    db = fake.add_pod(make_pod("db-1", labels={"app": "db"}))
    _, sink = start()
    _both_watching(fake)
    web_id, db_id = web["metadata"]["uid"], db["metadata"]["uid"]
    names = ks.service_names(make_service("front", None, namespace="team"))

    def aliases(uid: str) -> tuple[str, ...]:
        with sink.lock:
            return sink.state[uid].aliases if uid in sink.state else ()

    svc = fake.add_service(make_service("front", {"app": "web"}, namespace="team"))
    assert wait_for(lambda: aliases(web_id) == names and aliases(db_id) == ())
    fake.put("services", with_changes(svc, spec__selector={"app": "db"}))
    assert wait_for(lambda: aliases(web_id) == () and aliases(db_id) == names)
    fake.add_pod(make_pod("db-2", labels={"app": "db"}))  # now ambiguous: nobody has it
    assert wait_for(lambda: len(sink.state) == 3 and aliases(db_id) == ())
    fake.delete_pod("db-2")
    assert wait_for(lambda: aliases(db_id) == names)
    fake.delete_service("front")
    assert wait_for(lambda: aliases(db_id) == ())


def test_label_selector_is_sent_to_the_server(fake: FakeKube, start) -> None:
    fake.add_pod(make_pod("ssh-ws", labels={"role": "ssh"}))
    fake.add_pod(make_pod("other", labels={"role": "db"}))
    _, sink = start(selector="role=ssh")
    _both_watching(fake)
    assert sink.names() == {"ssh-ws"}
    pod = fake.get("pods", "ssh-ws", "team")
    fake.put("pods", with_changes(pod, metadata__labels={"role": "gone"}))
    assert wait_for(lambda: sink.names() == set())
    assert all(r.param("labelSelector") == "role=ssh" for r in fake.requests_to("pods"))
    assert all(not r.param("labelSelector") for r in fake.requests_to("services"))


def test_bookmarks_change_nothing_and_keep_the_stream(fake: FakeKube, start) -> None:
    _, sink = start()
    _both_watching(fake)
    calls, lists = len(sink.calls), len(fake.requests_to("pods", watch=False))
    fake.bookmark()
    fake.add_pod(make_pod("after"))
    assert wait_for(lambda: sink.names() == {"after"})
    assert len(sink.calls) == calls + 1
    assert len(fake.requests_to("pods", watch=False)) == lists


def test_own_pod_is_identity_not_target(fake: FakeKube, start) -> None:
    fake.add_pod(make_pod("ssh-proxy-0", ip="10.244.0.2", labels={"app": "proxy"}))
    fake.add_pod(make_pod("ws-1"))
    fake.add_service(make_service("ssh-proxy", {"app": "proxy"}, namespace="team"))
    _, sink = start(proxy_pod="ssh-proxy-0")
    assert sink.names() == {"ws-1"}
    assert sink.identity.addresses == {"10.244.0.2"}
    assert {"ssh-proxy-0", "ssh-proxy.team.svc"} <= sink.identity.names


def test_forbidden_watch_reports_one_clear_line(fake: FakeKube, kube: KubernetesClient,
                                                caplog: pytest.LogCaptureFixture) -> None:
    fake.deny("watch", "pods")
    sink = RecordingSink()
    watcher = KubernetesWatcher(sink, kube, proxy_pod="", healthy_after=5)
    watcher.wait = tenacity.wait_fixed(0.05)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.WARNING, logger="watcher.sources.kubernetes_watcher"):
        thread.start()
        assert wait_for(lambda: len(fake.requests_to("pods", watch=True)) >= 3)
        stop.set()
        thread.join(10)
    errors = {s["error"] for s in sink.statuses if not s["connected"]}
    assert len(errors) == 1
    assert "lacks verb 'watch' on 'pods' in namespace 'team'" in errors.pop()
    lines = [r.getMessage() for r in caplog.records if "lacks verb" in r.getMessage()]
    assert len(lines) == 1


def test_forbidden_list_names_list(fake: FakeKube, kube: KubernetesClient) -> None:
    fake.deny("list", "services")
    with pytest.raises(SourceError, match="lacks verb 'list' on 'services'"):
        kube.list("services")


# ---- exec fallback ------------------------------------------------------------------------------
def _target(fake: FakeKube, name: str = "ws-1") -> Target:
    return ks.pod_target(fake.add_pod(make_pod(name)))


def test_exec_reads_the_key_file_with_the_fetch_argv(fake: FakeKube,
                                                     kube: KubernetesClient) -> None:
    calls = []
    fake.exec_handler = lambda call: calls.append(call) or ExecResult(stdout=b"ssh-ed25519 AAAA\n")
    target = _target(fake)
    argv = key_file_command("~/.ssh/id_ed25519.pub")
    assert kube.exec_read(target, argv, 65536) == b"ssh-ed25519 AAAA\n"
    assert calls[0].command == tuple(argv) and calls[0].container == "main"


def test_exec_non_zero_exit_is_a_fetch_error(fake: FakeKube, kube: KubernetesClient) -> None:
    fake.exec_handler = lambda call: ExecResult(stderr=b"cat: no such file\n", exit_code=1)
    with pytest.raises(FetchError, match="exited 1: cat: no such file"):
        kube.exec_read(_target(fake), ["cat", "--", "/k"], 100)


def test_exec_is_bounded_in_bytes_and_time(fake: FakeKube, kube: KubernetesClient) -> None:
    def endless() -> Iterator[bytes]:
        while True:
            yield b"\0" * 4096

    fake.exec_handler = lambda call: ExecResult(stdout=endless())
    assert kube.exec_read(_target(fake), ["cat", "/dev/zero"], 10000) == b"\0" * 10000
    kube.exec_timeout = 0.5
    fake.exec_handler = lambda call: ExecResult(hang=30)
    with pytest.raises(FetchTimeout):
        kube.exec_read(_target(fake, "ws-2"), ["cat", "/fifo"], 100)


def test_exec_refused_by_rbac_or_for_a_replaced_pod(fake: FakeKube,
                                                    kube: KubernetesClient) -> None:
    target = _target(fake)
    fake.deny("create", "pods/exec")
    with pytest.raises(FetchError, match="lacks verb 'create' on 'pods/exec'"):
        kube.exec_read(target, ["cat", "/k"], 100)
    fake.allow("create", "pods/exec")
    fake.delete_pod("ws-1")
    fake.add_pod(make_pod("ws-1"))  # same name, new uid
    with pytest.raises(FetchError, match="replaced"):
        kube.exec_read(target, ["cat", "/k"], 100)


def test_exec_into_a_pod_that_is_gone_or_unreadable_is_a_fetch_error(fake: FakeKube,
                                                                      kube: KubernetesClient) -> None:
    target = _target(fake)
    fake.delete_pod("ws-1")
    with pytest.raises(FetchError, match="no longer exists"):
        kube.exec_read(target, ["cat", "/k"], 100)
    target = _target(fake, "ws-2")
    fake.deny("get", "pods")
    with pytest.raises(FetchError, match="lacks verb 'get' on 'pods'"):
        kube.exec_read(target, ["cat", "/k"], 100)


def test_the_client_never_imports_the_generated_core_api(fake: FakeKube, tmp_path: Path) -> None:
    """kubernetes 37's core_v1_api builds ~250 pydantic models when first imported (0.8 s
    of CPU before a cold start's first list): list, watch, read and exec go without it."""
    fake.add_pod(make_pod("ws-1"))
    fake.exec_handler = lambda call: ExecResult(stdout=b"ssh-ed25519 AAAA\n")
    config = fake.write_kubeconfig(tmp_path / "kc")
    script = f"""
import sys
from watcher.sources import kubernetes_client as ks
kube = ks.KubernetesClient(ks.load_config({str(config)!r}, service_account_dir=__import__("pathlib").Path({str(tmp_path)!r})))
kube.ping()
pods, version = kube.list("pods")
kube.list("services")
watcher, events = kube.watch("pods", version, 1)
watcher.stop()
target = ks.pod_target(pods[0])
assert kube.exec_read(target, ["cat", "/k"], 100) == b"ssh-ed25519 AAAA\\n"
loaded = sorted(m for m in sys.modules if m.startswith("kubernetes.client.api.")
                or m.startswith("kubernetes.client.models."))
print(loaded)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "core_v1_api" not in proc.stdout and "v1_pod" not in proc.stdout, proc.stdout


# ---- incremental == full ----------------------------------------------------------------------
def test_incremental_events_match_a_full_derivation() -> None:
    """Random pod and service events: the watcher's incremental state always equals the
    full derivation (the reference), and the sink holds exactly what was emitted."""
    import random

    rng = random.Random(11)
    sink = RecordingSink()
    watcher = KubernetesWatcher(sink, kube=None, proxy_pod="proxy")  # type: ignore[arg-type]
    names = [f"p{i}" for i in range(8)] + ["proxy"]
    apps = ["a", "b", "c"]
    live_pods: dict[str, dict] = {}
    live_services: dict[str, dict] = {}
    granted = 0
    for _ in range(400):
        if rng.random() < 0.75:
            name = rng.choice(names)
            if name in live_pods and rng.random() < 0.2:
                watcher.handle_event("pods", {"type": "DELETED", "raw_object": live_pods.pop(name)})
                continue
            pod = make_pod(name, "ns", ip=f"10.0.0.{names.index(name) + 2}",
                           labels={"app": rng.choice(apps)}, ready=rng.random() < 0.8,
                           restart_count=rng.randint(0, 1),
                           uid=live_pods[name]["metadata"]["uid"] if name in live_pods else "")
            kind = "MODIFIED" if name in live_pods else "ADDED"
            live_pods[name] = pod
            watcher.handle_event("pods", {"type": kind, "raw_object": pod})
        else:
            name = rng.choice(["s1", "s2", "s3"])
            if name in live_services and rng.random() < 0.3:
                watcher.handle_event("services", {"type": "DELETED",
                                                  "raw_object": live_services.pop(name)})
                continue
            svc = make_service(name, {"app": rng.choice(apps)}, "ns")
            kind = "MODIFIED" if name in live_services else "ADDED"
            live_services[name] = svc
            watcher.handle_event("services", {"type": kind, "raw_object": svc})
        reference = ks.derive_targets(watcher.pods, watcher.services, "proxy")
        assert watcher.emitted == reference
        assert sink.state == reference
        granted += any(t.aliases for t in reference.values())
    assert granted > 20  # the sequence did exercise single-owner service names

def test_own_pod_outside_the_label_selector_still_reserved(fake: FakeKube, start) -> None:
    fake.add_pod(make_pod("ssh-proxy-0", ip="10.244.0.2", labels={"app": "proxy"}))
    fake.add_pod(make_pod("ws-1", labels={"role": "ssh"}))
    _, sink = start(selector="role=ssh", proxy_pod="ssh-proxy-0")
    assert sink.names() == {"ws-1"}
    assert sink.identity.addresses == {"10.244.0.2"} and "ssh-proxy-0" in sink.identity.names


def test_outage_does_not_log_urllib3_retries(fake: FakeKube, start,
                                             caplog: pytest.LogCaptureFixture) -> None:
    _, sink = start()
    _both_watching(fake)
    with caplog.at_level(logging.WARNING):
        fake.down()
        assert wait_for(lambda: sink.status.get("connected") is False)
        fake.up()
        assert wait_for(lambda: sink.status.get("connected") is True)
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]
    assert len([r for r in caplog.records if "cannot reach" in r.getMessage()]) == 1


def test_malformed_kubeconfig_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "kc"
    path.write_text("clusters: [unclosed")
    with pytest.raises(SourceError, match="cannot be used"):
        load_config(str(path), service_account_dir=tmp_path)


# ---- with the real reconciler and key fetcher ---------------------------------------------------
def _ed25519_line(comment: str) -> str:
    import base64
    import hashlib
    import struct

    def string(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    blob = string(b"ssh-ed25519") + string(hashlib.sha256(comment.encode()).digest())
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


@contextlib.contextmanager
def _pipeline(fake: FakeKube, kube: KubernetesClient,
              settings: Any = None) -> Iterator[Callable[[], Any]]:
    """Watcher -> Reconciler -> KeyFetcher (HTTP refused, exec through the fake) -> render;
    yields a function returning the last Rendered (None before the first write)."""
    from watcher.config import Settings
    from watcher.fetch import FetchPolicy, KeyFetcher
    from watcher.reconcile import Reconciler
    from watcher.render import Rendered

    def refuse(url: str, policy: FetchPolicy) -> bytes:  # no network beyond loopback here
        raise FetchError(f"GET {url} failed: ConnectionRefusedError")

    fetcher = KeyFetcher(8080, "~/.ssh/id_ed25519.pub", kube.exec_read,
                         FetchPolicy(attempts=1, max_total=5), http_get=refuse)
    writes: list[Rendered] = []
    lock = threading.Lock()

    def write(rendered: Rendered) -> bool:
        with lock:
            writes.append(rendered)
        return True

    def last() -> Rendered | None:
        with lock:
            return writes[-1] if writes else None

    rec = Reconciler(settings or Settings(), ProxyIdentity(), fetcher.fetch, write,
                     min_wait=0.01, max_wait=0.1)
    watcher = KubernetesWatcher(rec, kube, proxy_pod="ssh-proxy-0", watch_timeout=30)
    stop = threading.Event()
    threads = [threading.Thread(target=rec.run, args=(stop,), daemon=True),
               threading.Thread(target=watcher.run, args=(stop,), daemon=True)]
    for thread in threads:
        thread.start()
    try:
        yield last
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


def test_pod_key_fetched_by_exec_rendered_and_revoked(fake: FakeKube,
                                                      kube: KubernetesClient) -> None:
    key = _ed25519_line("ws-1")
    fake.exec_handler = lambda call: ExecResult(stdout=key.encode() + b"\n")
    with _pipeline(fake, kube) as last:
        def cache() -> str:
            rendered = last()
            return rendered.cache if rendered else ""

        fake.add_pod(make_pod("ws-1", ip="10.244.0.7", labels={"app": "ws"}))
        fake.add_service(make_service("ws", {"app": "ws"}, "team"))
        assert wait_for(lambda: 'permitopen="ws.team.svc.cluster.local:' in cache())
        line = cache().splitlines()[-1]
        assert key.split()[1] in line and 'permitopen="ws-1:' in line
        assert 'permitopen="10.244.0.7:' in line
        fake.put("pods", set_ready(fake.get("pods", "ws-1", "team"), False))
        assert wait_for(lambda: key.split()[1] not in cache())


def test_hostile_pods_cannot_take_names_or_smuggle_keys(fake: FakeKube,
                                                        kube: KubernetesClient) -> None:
    """The Docker suite's hijacks, as pods: a hostname that is another pod's name in other
    case, a Service named after another pod, a loopback Service name, and key bodies that
    try to carry options or extra lines."""
    keys = {name: _ed25519_line(name) for name in ("victim", "evil-a", "evil-b", "evil-c")}
    bodies = {name: line.encode() + b"\n" for name, line in keys.items()}
    bodies["evil-d"] = (b'command="/bin/sh" ' + keys["evil-c"].encode() + b"\n"
                        + b"ssh-ed25519 AAAA\x00 victim\n")
    bodies["evil-e"] = b"ssh-ed25519 " + b"A" * 70_000 + b"\n"

    def exec_handler(call: ExecCall) -> ExecResult:
        return ExecResult(stdout=bodies[call.pod])

    fake.exec_handler = exec_handler
    with _pipeline(fake, kube) as last:
        fake.add_pod(make_pod("victim", ip="10.244.0.2", labels={"app": "victim"}))
        fake.add_pod(make_pod("evil-a", ip="10.244.0.3", hostname="VICTIM", labels={"app": "a"}))
        fake.add_pod(make_pod("evil-b", ip="10.244.0.4", labels={"app": "b"}))
        fake.add_service(make_service("victim", {"app": "b"}))  # a Service named like the pod
        fake.add_pod(make_pod("evil-c", ip="10.244.0.5", labels={"app": "c"}))
        fake.add_service(make_service("localhost", {"app": "c"}))
        fake.add_pod(make_pod("evil-d", ip="10.244.0.6", labels={"app": "d"}))
        fake.add_pod(make_pod("evil-e", ip="10.244.0.8", labels={"app": "e"}))

        def settled() -> bool:
            rendered = last()
            return rendered is not None and all(
                keys[n].split()[1] in rendered.cache for n in ("victim", "evil-a", "evil-b", "evil-c"))

        assert wait_for(settled)
        rendered = last()
        lines = {name: next(line for line in rendered.cache.splitlines()
                            if keys[name].split()[1] in line) for name in keys}
        assert 'permitopen="victim:' in lines["victim"]
        for evil in ("evil-a", "evil-b", "evil-c"):
            assert 'permitopen="victim:' not in lines[evil].lower(), lines[evil]
            assert 'permitopen="localhost:' not in lines[evil]
        # The Service's own qualified names are what cluster DNS gives it: they lead to the
        # pod it selects, never to the pod that merely shares the short name.
        assert 'permitopen="victim.team.svc.cluster.local:' in lines["evil-b"]
        assert 'permitopen="localhost.team:' in lines["evil-c"]  # only the bare name is loopback
        # Pinned names lead to the pod they were granted to, whatever their case.
        pinned = [line.split() for line in rendered.hosts_block.splitlines()
                  if line and not line.startswith("#")]
        owners = {name.lower(): row[0] for row in pinned for name in row[1:]}
        assert owners["victim"] == "10.244.0.2" and "localhost" not in owners
        # Option-carrying and oversized bodies serve nothing at all.
        assert "/bin/sh" not in rendered.cache and "A" * 1000 not in rendered.cache
        assert 'permitopen="evil-d:' not in rendered.cache
        assert 'permitopen="evil-e:' not in rendered.cache


# ---- RBAC: the Role in deploy/ against the calls this code really makes -------------------------
REPO = Path(__file__).resolve().parents[2]


def _rbac_needs(request) -> set[tuple[str, str]]:
    """(verb, resource) an API server authorises for one recorded request ({} for /version,
    which every authenticated user may read)."""
    parts = request.path.strip("/").split("/")
    if parts[:2] != ["api", "v1"] or len(parts) < 5 or parts[2] != "namespaces":
        return set()
    resource, rest = parts[4], parts[5:]
    if not rest:
        return {("watch" if request.is_watch else "list", resource)}
    if len(rest) == 1:
        return {("get", resource)}
    # exec over a websocket is an HTTP GET: `get` before Kubernetes 1.35, `create` from 1.35
    return {("get", f"{resource}/{rest[1]}"), ("create", f"{resource}/{rest[1]}")}


def _role_grants(path: Path) -> set[tuple[str, str]]:
    import yaml

    role = yaml.safe_load(path.read_text())
    return {(verb, resource) for rule in role["rules"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_role_grants_exactly_the_calls_the_source_makes(fake: FakeKube, kube: KubernetesClient,
                                                        start) -> None:
    """Every verb the code needs is in deploy/kubernetes/role.yaml, and the Role grants
    nothing the code does not use (least privilege)."""
    fake.add_pod(make_pod("ssh-proxy-0", labels={"app": "ssh-proxy"}))  # outside the selector
    fake.add_service(make_service("web", {"team": "a"}))
    _, sink = start(selector="team=a")
    _both_watching(fake)
    fake.exec_handler = lambda call: ExecResult(stdout=b"ssh-ed25519 AAAA\n")
    kube.exec_read(_target(fake), key_file_command("~/.ssh/id_ed25519.pub"), 1000)
    needed = set().union(*(_rbac_needs(r) for r in fake.requests))
    granted = _role_grants(REPO / "deploy" / "kubernetes" / "role.yaml")
    assert needed - granted == set(), "the Role lacks what the code calls"
    assert granted - needed == set(), "the Role grants what the code never calls"
