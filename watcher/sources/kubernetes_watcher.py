"""Kubernetes, the watcher half: list pods and services, then watch both; relist on every
stream end.

Level-triggered like the Docker source: every (re)connect lists and replaces the desired
state, so a lost event cannot leave a stale key. The watches carry `timeoutSeconds` (the
server ends them) and a client read timeout (an outage cannot hang them); 410 Gone and any
other end lead to a relist.
"""

from __future__ import annotations

import http.client
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Mapping

import tenacity
import urllib3
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

from .. import backoff
from ..config import Settings
from ..errors import SourceError
from ..model import Target
from ..targets import ProxyIdentity
from .base import TargetSink
from .outage import Outage
from .kubernetes_client import (
    DEFAULT_DOMAIN,
    KubernetesClient,
    classify_api_error,
    WatchExpired,
    meta,
    granted_service_names,
    is_candidate,
    label_selector,
    pod_target,
    pod_uid,
    proxy_identity,
    service_members,
    service_selects,
)

log = logging.getLogger(__name__)


class KubernetesWatcher:
    """Feeds a reconciler from one namespace until `stop` is set."""

    def __init__(self, sink: Any, kube: KubernetesClient, label_selector: str = "",
                 domain: str = DEFAULT_DOMAIN, proxy_pod: str | None = None,
                 permit_service: Callable[[str], bool] = lambda name: True,
                 watch_timeout: int = 300, healthy_after: float = 10.0,
                 ping_interval: float = 10.0, outage_limit: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] | None = None) -> None:
        self.sink = sink
        self.kube = kube
        self.selector = label_selector
        self.domain = domain
        self.permit_service = permit_service  # SSH_PERMIT_TARGET_HOST on Service names
        self.proxy_pod = (proxy_pod if proxy_pod is not None
                          else os.environ.get("POD_NAME") or os.environ.get("HOSTNAME", ""))
        self.watch_timeout = watch_timeout
        self.healthy_after = healthy_after  # a round this long resets the backoff
        self.ping_interval = ping_interval
        self.wait = tenacity.wait_exponential(multiplier=0.2, max=30)
        self.pods: dict[str, dict] = {}  # uid -> pod
        self.services: dict[str, dict] = {}  # name -> service
        self.members: dict[str, set[str]] = {}  # service name -> uids of target pods it selects
        self.own_pod: dict | None = None
        self.emitted: dict[str, Target] = {}
        self.identity = ProxyIdentity()
        self.connected = False
        self.reconnects = 0
        self._last_error = ""
        self.outage = Outage(outage_limit)  # ended by every list the API server answers
        self.clock = clock
        self._sleep = sleep

    # -- the loop: forever > one round (list + watches) > one event --
    def run(self, stop: threading.Event) -> None:
        attempt = expired = 0
        while not stop.is_set():
            started = self.clock()
            try:
                self._round(stop)
                healthy = self.clock() - started >= self.healthy_after
                if healthy:  # the server's timeoutSeconds: a routine relist, not an outage
                    attempt = expired = 0
                    self._last_error = ""
                error = "" if healthy else "watch streams ended right after they started"
            except WatchExpired as exc:
                expired += 1
                if expired == 1:
                    log.info("kubernetes watch expired (%s): relisting", exc)
                    continue
                error = f"watch expired again right after a relist ({exc})"
            except Exception as exc:  # any failure of a round: report, back off, relist
                error = _describe(exc, self.kube)
            if stop.is_set():
                return
            attempt += 1
            delay = backoff.delay(self.wait, attempt)
            if error:
                self._lost(error, delay)
            if self.outage.over(self.clock()):
                raise self._gave_up()
            if self._sleep is not None:
                self._sleep(delay)
            else:
                stop.wait(delay)

    def _gave_up(self) -> SourceError:
        return SourceError(
            f"the Kubernetes API at {self.kube.config.configuration.host} has failed every "
            f"attempt for {self.outage.limit:.0f} s ({self.outage.attempts} attempts; last error: "
            f"{self.outage.error}): exiting so the pod restarts; check the API server, the "
            "network policy between the proxy and it, and the service account's token and RBAC")

    def _lost(self, error: str, delay: float) -> None:
        self.connected = False
        self.reconnects += 1
        self.outage.failed(error, self.clock())
        if error != self._last_error:  # one line per distinct problem, not one per retry
            log.warning("kubernetes: %s; relisting in %.1fs", error, delay)
            self._last_error = error
        self.sink.set_source_status({"kind": "kubernetes", "connected": False,
                                     "reconnects": self.reconnects,
                                     **self.outage.status(self.clock())})

    def _round(self, stop: threading.Event) -> None:
        self.resync()
        events: queue.Queue = queue.Queue()
        watches = [self._start_watch(resource, version, events)
                   for resource, version in self._versions.items()]
        done = threading.Event()
        threading.Thread(target=self._ping_loop, args=(events, done, stop), daemon=True,
                         name="k8s-ping").start()
        try:
            while not stop.is_set():
                try:
                    resource, item = events.get(timeout=0.2)
                except queue.Empty:
                    continue
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    return  # a stream ended: relist
                self.handle_event(resource, item)
        finally:
            done.set()
            for watcher in watches:
                watcher.stop()

    def _ping_loop(self, events: queue.Queue, done: threading.Event,
                   stop: threading.Event) -> None:
        """A quiet watch cannot tell a calm namespace from a half-open connection (the
        read timeout only fires after timeoutSeconds): ask the API server for its version
        now and then, and end the round when it does not answer."""
        while not (done.wait(self.ping_interval) or stop.is_set()):
            try:
                self.kube.ping()
            except Exception as exc:  # any failure means the streams cannot be trusted
                events.put(("ping", SourceError(
                    f"Kubernetes API at {self.kube.config.configuration.host} did not answer "
                    f"a health check ({type(exc).__name__})")))
                return

    def _start_watch(self, resource: str, version: str, events: queue.Queue) -> k8s_watch.Watch:
        watcher, stream = self.kube.watch(resource, version, self.watch_timeout,
                                          self.selector if resource == "pods" else "")

        def pump() -> None:
            try:
                for event in stream:
                    events.put((resource, event))
                events.put((resource, None))
            except k8s.ApiException as exc:
                events.put((resource, classify_api_error(exc, "watch", resource, self.kube.namespace)))
            except Exception as exc:  # handed to the round, which reports and relists
                events.put((resource, exc))

        threading.Thread(target=pump, daemon=True, name=f"k8s-watch-{resource}").start()
        return watcher

    def resync(self) -> None:
        """List both resources and replace the desired state."""
        pods, pods_version = self.kube.list("pods", self.selector)
        services, services_version = self.kube.list("services")
        self._versions = {"pods": pods_version, "services": services_version}
        self.pods = {pod_uid(p): p for p in pods}
        self.services = {meta(s).get("name", ""): s for s in services}
        self.members = {name: service_members(svc, self.pods, self.proxy_pod)
                        for name, svc in self.services.items()}
        self.own_pod = next((p for p in pods if meta(p).get("name") == self.proxy_pod), None)
        if self.own_pod is None and self.proxy_pod and self.selector:
            self.own_pod = self._own_pod_outside_selector()
        self.outage.ended()  # the API server answered both lists
        self._refresh_identity(force=True)
        self.emitted = {uid: t for uid in self.pods if (t := self._target(uid)) is not None}
        self.sink.replace_all(list(self.emitted.values()))
        self.connected = True
        self.sink.set_source_status({"kind": "kubernetes", "connected": True, "error": "",
                                     "state": "connected", "namespace": self.kube.namespace,
                                     "reconnects": self.reconnects, "since": time.time()})

    # -- events: the work is proportional to what changed --
    def handle_event(self, resource: str, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("raw_object") or {}
        if kind not in ("ADDED", "MODIFIED", "DELETED") or not obj:
            return  # BOOKMARK: the Watch keeps its resourceVersion; nothing changed
        if resource == "pods":
            self._pod_changed(dict(obj), kind == "DELETED")
        else:
            self._service_changed(dict(obj), kind == "DELETED")

    def _pod_changed(self, pod: dict, deleted: bool) -> None:
        uid = pod_uid(pod)
        if deleted:
            self.pods.pop(uid, None)
        else:
            self.pods[uid] = pod
        affected = {uid}
        selectable = not deleted and is_candidate(pod, self.proxy_pod)
        for name, service in self.services.items():
            members = self.members.setdefault(name, set())
            before = set(members)
            if selectable and service_selects(service, pod):
                members.add(uid)
            else:
                members.discard(uid)
            if before != members and 1 in (len(before), len(members)):
                affected |= before | members  # the name's single owner changes: <= 2 pods
        self._refresh(affected)
        if meta(pod).get("name") == self.proxy_pod and self.proxy_pod:
            self.own_pod = None if deleted else pod
            self._refresh_identity()

    def _service_changed(self, service: dict, deleted: bool) -> None:
        name = meta(service).get("name", "")
        before = self.members.pop(name, set())
        if deleted:
            self.services.pop(name, None)
            after: set[str] = set()
        else:
            self.services[name] = service
            after = self.members[name] = service_members(service, self.pods, self.proxy_pod)
        self._refresh((before if len(before) == 1 else set())
                      | (after if len(after) == 1 else set()))
        self._refresh_identity()

    def _target(self, uid: str) -> Target | None:
        pod = self.pods.get(uid)
        if pod is None or not is_candidate(pod, self.proxy_pod):
            return None
        return pod_target(pod, granted_service_names(uid, self.services, self.members,
                                                     self.domain, self.permit_service),
                          self.domain)

    def _refresh(self, uids: set[str]) -> None:
        """Re-derive these pods; emit only what changed (an unchanged MODIFIED fetches
        nothing), remove at once what stopped being a target."""
        for uid in sorted(uids):
            target = self._target(uid)
            if target is None:
                if self.emitted.pop(uid, None) is not None:
                    self.sink.remove(uid)
            elif self.emitted.get(uid) != target:
                self.emitted[uid] = target
                self.sink.upsert(target)

    def _own_pod_outside_selector(self) -> dict | None:
        """The proxy's pod when the label selector leaves it out of the list (its names and
        address must still never be granted)."""
        try:
            return self.kube.read_pod(self.proxy_pod)
        except (SourceError, k8s.ApiException, urllib3.exceptions.HTTPError) as exc:
            log.info("kubernetes: the proxy's own pod %s cannot be read (%s); only its name "
                     "is reserved", self.proxy_pod, exc)
            return None

    def _refresh_identity(self, force: bool = False) -> None:
        identity = proxy_identity(self.own_pod, self.services.values(), self.domain)
        if self.proxy_pod and self.proxy_pod not in identity.names:
            identity = ProxyIdentity(names=identity.names | {self.proxy_pod},
                                     addresses=identity.addresses)
        if force or identity != self.identity:
            self.identity = identity
            self.sink.set_proxy_identity(identity)


def _describe(exc: Exception, kube: KubernetesClient) -> str:
    """One line for the log and the status: what failed and what to do."""
    if isinstance(exc, SourceError):
        return str(exc)
    if isinstance(exc, k8s.ApiException) and exc.status:
        return f"Kubernetes API answered HTTP {exc.status} {exc.reason}"
    if not isinstance(exc, (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)):
        log.exception("kubernetes watcher failed unexpectedly; relisting")
        return f"internal error: {exc!r}"
    log.debug("kubernetes API call failed: %r", exc)
    return (f"cannot reach the Kubernetes API at {kube.config.configuration.host}; check the "
            "API server and the network policy between the proxy and it")




def from_settings(client: KubernetesClient, sink: TargetSink, settings: Settings) -> KubernetesWatcher:
    """The platform entry point (see watcher.platforms)."""
    return KubernetesWatcher(sink, client, label_selector=label_selector(settings.labels),
                             domain=settings.cluster_domain,
                             permit_service=settings.host_permitted,
                             outage_limit=settings.source_outage_seconds)
