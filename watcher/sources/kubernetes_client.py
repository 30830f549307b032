"""Kubernetes, the client half: pods and services as Targets (pure), and the API as the
watcher needs it (config, list, watch, bounded exec). `kubernetes_watcher` follows it.

The proxy runs as a pod in one namespace and serves the other pods there. A pod is a target
while it is Running and Ready and not terminating; it is reached at its pod IP. Service
names (`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.<domain>`) are soft aliases of the one
target pod a Service selects. When a Service selects several target pods the name is
ambiguous: it is granted to none of them (a key opens exactly one target, and a name pinned
in /etc/hosts leads to one address), and the pods stay reachable by their own names.

Library pitfalls handled here: `load_kube_config` raises ConfigException when there is no
config; the websocket reader of `WSClient.update` drains every available frame without
bound, so exec output is read frame by frame here, under a byte cap and a deadline; and the
generated `CoreV1Api` is never used: kubernetes 37's `core_v1_api` module builds ~250
pydantic model classes when it is first imported (0.8 s of CPU in the image, before the
first list of a cold start), and the watcher reads the server's JSON, never the models.
Requests go through the library's `ApiClient` (URL, query, auth, TLS) and, for exec, its
`ws_client`, with the paths and parameters the generated methods use.
"""


from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import urllib3
import websocket
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.config.config_exception import ConfigException
from kubernetes.stream import ws_client

from ..config import Settings
from ..errors import FetchError, FetchTimeout, SourceError
from ..model import Target
from ..targets import ProxyIdentity

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_KUBECONFIG = "/root/.kube/config"
DEFAULT_DOMAIN = "cluster.local"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
_STDOUT, _STDERR, _ERROR = 1, 2, 3  # exec channels (v4/v5); 255 = v5 close, ignored

Obj = Mapping[str, Any]  # an API object as the server sends it (camelCase JSON)


# ---- pure: pods and services -> targets -------------------------------------------------------
def meta(obj: Obj) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def pod_uid(pod: Obj) -> str:
    return meta(pod).get("uid") or ""


def pod_labels(pod: Obj) -> dict[str, str]:
    return dict(meta(pod).get("labels") or {})


def pod_ips(pod: Obj) -> tuple[str, ...]:
    """The pod's IPs, primary first (podIPs when sent, else podIP)."""
    status = pod.get("status") or {}
    ips = [entry.get("ip", "") for entry in status.get("podIPs") or []]
    return tuple(dict.fromkeys(ip for ip in [status.get("podIP") or "", *ips] if ip))


def is_target_pod(pod: Obj) -> bool:
    """Running, Ready condition True, not terminating, and with an address."""
    status = pod.get("status") or {}
    if meta(pod).get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [])
    return ready and bool(pod_ips(pod))


def pod_fqdn(pod: Obj, domain: str = DEFAULT_DOMAIN) -> str:
    """`hostname.subdomain.ns.svc.<domain>` when the pod sets both, else ""."""
    spec = pod.get("spec") or {}
    hostname, subdomain = spec.get("hostname") or "", spec.get("subdomain") or ""
    if not hostname or not subdomain:
        return ""
    return f"{hostname}.{subdomain}.{meta(pod).get('namespace', '')}.svc.{domain}"


def pod_started_at(pod: Obj) -> str:
    """Changes whenever a container (re)starts, so a restarted pod's key is fetched again."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    parts = []
    for status in sorted(statuses, key=lambda s: s.get("name", "")):
        running = (status.get("state") or {}).get("running") or {}
        parts.append(f"{status.get('name')}:{status.get('restartCount', 0)}:"
                     f"{running.get('startedAt', '')}")
    return ",".join(parts)


def service_selects(service: Obj, pod: Obj) -> bool:
    """The Service's selector is non-empty and matches the pod (same namespace)."""
    selector = (service.get("spec") or {}).get("selector") or {}
    if not selector or meta(service).get("namespace") != meta(pod).get("namespace"):
        return False
    labels = pod_labels(pod)
    return all(labels.get(key) == value for key, value in selector.items())


def service_names(service: Obj, domain: str = DEFAULT_DOMAIN) -> tuple[str, ...]:
    """The names cluster DNS gives a Service: svc, svc.ns, svc.ns.svc, svc.ns.svc.<domain>."""
    name, ns = meta(service).get("name", ""), meta(service).get("namespace", "")
    return (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.{domain}")


def is_candidate(pod: Obj, proxy_pod: str = "") -> bool:
    """A target pod that is not the proxy's own pod (by name)."""
    return is_target_pod(pod) and meta(pod).get("name") != proxy_pod


def service_members(service: Obj, pods: Mapping[str, Obj], proxy_pod: str = "") -> set[str]:
    """Uids of the target pods a Service selects."""
    return {uid for uid, pod in pods.items()
            if is_candidate(pod, proxy_pod) and service_selects(service, pod)}


def granted_service_names(uid: str, services: Mapping[str, Obj],
                          members: Mapping[str, set[str]],
                          domain: str = DEFAULT_DOMAIN,
                          permitted: Callable[[str], bool] = lambda name: True) -> tuple[str, ...]:
    """Names of the permitted Services (by name) whose only target pod is `uid`: a name
    shared by several pods is granted to none (see the module docstring)."""
    out: list[str] = []
    for name in sorted(services):
        if members.get(name) == {uid} and permitted(name):
            out.extend(service_names(services[name], domain))
    return tuple(out)


def pod_target(pod: Obj, aliases: tuple[str, ...] = (), domain: str = DEFAULT_DOMAIN) -> Target:
    """The pod as a Target: id = uid, name = pod name, address = primary pod IP."""
    ips = pod_ips(pod)
    fqdn = pod_fqdn(pod, domain)
    return Target(id=pod_uid(pod), name=meta(pod).get("name", ""),
                  address=ips[0] if ips else "", addresses=ips[1:],
                  hostname=(pod.get("spec") or {}).get("hostname") or "",
                  aliases=tuple(dict.fromkeys(((fqdn,) if fqdn else ()) + aliases)),
                  labels=tuple(sorted(pod_labels(pod).items())), source="kubernetes",
                  started_at=pod_started_at(pod))


def derive_targets(pods: Mapping[str, Obj], services: Mapping[str, Obj], proxy_pod: str = "",
                   domain: str = DEFAULT_DOMAIN,
                   permitted: Callable[[str], bool] = lambda name: True) -> dict[str, Target]:
    """Targets by uid from pods (by uid) and Services (by name); O(pods x services)."""
    members = {name: service_members(svc, pods, proxy_pod) for name, svc in services.items()}
    return {uid: pod_target(pod, granted_service_names(uid, services, members, domain, permitted),
                            domain)
            for uid, pod in pods.items() if is_candidate(pod, proxy_pod)}


def proxy_identity(pod: Obj | None, services: Iterable[Obj],
                   domain: str = DEFAULT_DOMAIN) -> ProxyIdentity:
    """The proxy pod's names (its name, hostname, FQDN, names of Services selecting it) and
    IPs: never granted to a target."""
    if pod is None:
        return ProxyIdentity()
    names = {meta(pod).get("name", ""), (pod.get("spec") or {}).get("hostname") or "",
             pod_fqdn(pod, domain)}
    for service in services:
        if service_selects(service, pod):
            names.update(service_names(service, domain))
    return ProxyIdentity(names=frozenset(n for n in names if n),
                         addresses=frozenset(pod_ips(pod)))


def label_selector(labels: Iterable[tuple[str, str | None]]) -> str:
    """SSH_TARGET_LABELS pairs as a server-side label selector (`k=v,k2`)."""
    return ",".join(key if value is None else f"{key}={value}" for key, value in labels)


def exec_exit_code(status_text: str) -> int:
    """The exit code from the exec error channel's Status JSON (0 = Success); -1 when the
    Status is a failure without an exit code (e.g. the container is gone)."""
    try:
        status = json.loads(status_text or "{}")
    except ValueError:
        return -1
    if status.get("status") == "Success":
        return 0
    for cause in (status.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode" and str(cause.get("message", "")).isdigit():
            return int(cause["message"])
    return -1


def forbidden_message(exc: k8s.ApiException, verb: str, resource: str, namespace: str) -> str:
    """One line naming what the Role lacks, with the server's own words."""
    detail = ""
    try:
        detail = json.loads(exc.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        pass
    return (f"Kubernetes RBAC: the proxy's Role lacks verb {verb!r} on {resource!r} in "
            f"namespace {namespace!r}; add it to the Role bound to the proxy's service account"
            + (f" ({detail})" if detail else ""))


# ---- config ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KubeConfig:
    configuration: k8s.Configuration
    namespace: str
    source: str  # "in-cluster" or the kubeconfig path, for messages


def load_config(kubeconfig: str | None = None,
                service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> KubeConfig:
    """In-cluster config (namespace from the service account), else the kubeconfig
    (`kubeconfig`, `$KUBECONFIG`, /root/.kube/config; namespace from its current context)."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
        namespace = (service_account_dir / "namespace").read_text().strip()
        if namespace:
            return KubeConfig(_quiet(configuration), namespace, "in-cluster")
    except (ConfigException, OSError):
        pass
    path = kubeconfig or os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    configuration = k8s.Configuration()
    try:
        k8s_config.load_kube_config(config_file=path, client_configuration=configuration)
        _, current = k8s_config.list_kube_config_contexts(config_file=path)
    except (ConfigException, OSError, ValueError, TypeError, yaml.YAMLError) as exc:
        raise SourceError(f"no Kubernetes configuration: not running in a pod with a service "
                          f"account, and kubeconfig {path} cannot be used ({exc}); run the "
                          "proxy in the cluster or set KUBECONFIG") from exc
    namespace = ((current or {}).get("context") or {}).get("namespace") or ""
    if not namespace:
        raise SourceError(f"kubeconfig {path}: context {(current or {}).get('name', '?')!r} "
                          "names no namespace; set one (kubectl config set-context --current "
                          "--namespace=<ns>)")
    return KubeConfig(_quiet(configuration), namespace, path)


def _quiet(configuration: k8s.Configuration) -> k8s.Configuration:
    """No urllib3-level retries: the watcher retries with its own backoff, and urllib3 logs a
    warning for each of its own retries."""
    configuration.retries = 0
    return configuration


# ---- client ------------------------------------------------------------------------------------
class KubernetesClient:
    """List, watch and exec against one namespace."""

    def __init__(self, config: KubeConfig, exec_timeout: float = 5.0,
                 request_timeout: float = 15.0) -> None:
        self.config = config
        self.namespace = config.namespace
        self.exec_timeout = exec_timeout
        self.request_timeout = request_timeout
        self.api_client = k8s.ApiClient(config.configuration)

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None) -> "KubernetesClient":
        """In-cluster, else the kubeconfig; SourceError says what is missing."""
        return cls(load_config(kubeconfig))

    def ping(self) -> None:
        """GET /version within the request timeout; raises when the server does not answer."""
        self._get("/version/", timeout=self.request_timeout).read()

    def read_pod(self, name: str, timeout: float | None = None) -> dict | None:
        """One pod as the server's JSON, None when it does not exist."""
        try:
            response = _call(lambda: self._get(
                "/api/v1/namespaces/{namespace}/pods/{name}", {"name": name},
                timeout=timeout or self.request_timeout), "get", "pods", self.namespace)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(response.data)

    def list(self, resource: str, selector: str = "") -> tuple[list[dict], str]:
        """(objects as the server's JSON, the list's resourceVersion). Raw JSON, not
        models: watch events arrive raw too, and a model round trip rewrites timestamps."""
        query = [("labelSelector", selector)] if selector else []
        response = _call(lambda: self._get(_COLLECTIONS[resource], query=query,
                                           timeout=self.request_timeout),
                         "list", resource, self.namespace)
        try:
            body = json.loads(response.data)
        except ValueError as exc:
            raise SourceError(f"Kubernetes API sent a {resource} list that is not JSON") from exc
        return body.get("items") or [], (body.get("metadata") or {}).get("resourceVersion", "")

    def watch(self, resource: str, resource_version: str, timeout_seconds: int,
              selector: str = "") -> tuple[k8s_watch.Watch, Iterable[dict]]:
        """A Watch (to stop it) and its events, with bookmarks, from `resource_version`.
        Each event as the server sent it: `raw_object` (no model: Watch deserializes into
        the return type it reads off the function, and this one names none)."""
        path = _COLLECTIONS[resource]

        # No return annotation: Watch deserializes events into a class it reads there.
        def list_watch(namespace: str, **kwargs: Any):  # type: ignore[no-untyped-def]
            query = [(_QUERY[name], value) for name, value in kwargs.items() if name in _QUERY]
            return self._get(path, query=query, timeout=kwargs.get("_request_timeout"))

        kwargs: dict[str, Any] = {
            "resource_version": resource_version, "allow_watch_bookmarks": True,
            "timeout_seconds": timeout_seconds,
            # connect, read: the server ends the stream first; a dead link errors soon after
            "_request_timeout": (self.request_timeout, timeout_seconds + self.request_timeout)}
        if selector:
            kwargs["label_selector"] = selector
        watcher = k8s_watch.Watch()
        return watcher, watcher.stream(list_watch, self.namespace, **kwargs)

    def _get(self, path: str, path_params: Mapping[str, str] | None = None,
             query: Iterable[tuple[str, Any]] = (), timeout: Any = None) -> urllib3.BaseHTTPResponse:
        """GET `path` (with {namespace} and `path_params` filled in) as the generated methods
        make it with _preload_content=False: the urllib3 response, its body unread; a status
        outside 2xx raises the library's ApiException (with the server's body)."""
        method, url, headers, body, post = self._serialize(path, path_params, query)
        response = self.api_client.call_api(method, url, header_params=headers, body=body,
                                            post_params=post, _request_timeout=timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise k8s.ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response

    def _serialize(self, path: str, path_params: Mapping[str, str] | None = None,
                   query: Iterable[tuple[str, Any]] = (), accept: str = "application/json") -> tuple:
        """(method, url, headers, body, post params) of a GET, as the generated methods
        serialize it: {namespace} and `path_params` in the path, list values repeated
        (`command=a&command=b`), the bearer token when the config has one."""
        return self.api_client.param_serialize(
            method="GET", resource_path=path,
            path_params={"namespace": self.namespace, **(path_params or {})},
            query_params=list(query), header_params={"Accept": accept},
            auth_settings=["BearerToken"], collection_formats={"command": "multi"})

    def exec_read(self, target: Target, argv: list[str], limit: int) -> bytes:
        """Run argv in the pod's default container; at most `limit` bytes of stdout.
        Frames are read here under one deadline."""
        deadline = time.monotonic() + self.exec_timeout
        container = self._exec_container(target)
        _, url, headers, _, _ = self._serialize(
            "/api/v1/namespaces/{namespace}/pods/{name}/exec", {"name": target.name},
            [("command", argv), ("container", container), ("stderr", True), ("stdin", False),
             ("stdout", True), ("tty", False)], accept="*/*")
        # The handshake itself has no timeout in ws_client (it sets none on the socket);
        # everything after it is bounded below.
        try:
            ws = ws_client.websocket_call(self.config.configuration, "GET", url, headers=headers,
                                          _preload_content=False, binary=True)
        except k8s.ApiException as exc:
            raise FetchError(f"exec in {target.name} failed: "
                             f"{_exec_reason(exc, self.namespace)}") from exc
        try:
            out, err, status = _read_exec(ws.sock, limit, deadline)
        except websocket.WebSocketTimeoutException as exc:
            raise FetchTimeout(f"exec {argv[-1]!s} in {target.name} did not finish within "
                               f"{self.exec_timeout:.0f}s") from exc
        except (websocket.WebSocketException, OSError) as exc:
            raise FetchError(f"exec in {target.name} failed: {exc}") from exc
        finally:
            _close_quietly(ws.sock)
        if len(out) >= limit:
            return bytes(out[:limit])
        code = exec_exit_code(status)
        if code != 0:
            detail = err.decode(errors="replace").strip().splitlines()[:1]
            raise FetchError(f"exec {argv[-1]!s} in {target.name} exited {code}"
                             + (f": {detail[0][:200]}" if detail else ""))
        return bytes(out)

    def _exec_container(self, target: Target) -> str:
        """The pod's default container; refuses a pod that is no longer the target (same
        name, new uid: a replaced pod answers for itself once the watch reports it)."""
        try:
            pod = self.read_pod(target.name, timeout=self.exec_timeout)
        except SourceError as exc:  # a 403, named by read_pod
            raise FetchError(f"exec in {target.name} failed: {exc}") from exc
        except k8s.ApiException as exc:
            raise FetchError(f"exec in {target.name} failed: "
                             f"{_exec_reason(exc, self.namespace, 'get', 'pods')}") from exc
        except (urllib3.exceptions.HTTPError, ValueError) as exc:
            raise FetchError(f"exec in {target.name} failed: {exc}") from exc
        if pod is None:
            raise FetchError(f"exec in {target.name} skipped: the pod no longer exists")
        if pod_uid(pod) != target.id:
            raise FetchError(f"exec in {target.name} skipped: the pod was replaced")
        containers = (pod.get("spec") or {}).get("containers") or [{}]
        return (meta(pod).get("annotations") or {}).get(DEFAULT_CONTAINER_ANNOTATION) \
            or containers[0].get("name", "")


_COLLECTIONS = {"pods": "/api/v1/namespaces/{namespace}/pods",
                "services": "/api/v1/namespaces/{namespace}/services"}
_QUERY = {"resource_version": "resourceVersion", "allow_watch_bookmarks": "allowWatchBookmarks",
          "timeout_seconds": "timeoutSeconds", "label_selector": "labelSelector",
          "watch": "watch"}  # Watch.stream's keyword arguments -> the API's query parameters


def _read_exec(sock: websocket.WebSocket, limit: int,
               deadline: float) -> tuple[bytearray, bytearray, str]:
    """(stdout, stderr, error-channel Status) until the server closes, `limit` stdout bytes
    arrive, or the deadline passes (WebSocketTimeoutException)."""
    out, err, status = bytearray(), bytearray(), ""
    while len(out) < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise websocket.WebSocketTimeoutException("deadline")
        sock.settimeout(remaining)
        opcode, frame = sock.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
        data = frame.data if isinstance(frame.data, bytes) else frame.data.encode()
        if opcode not in (websocket.ABNF.OPCODE_BINARY, websocket.ABNF.OPCODE_TEXT) or not data:
            continue
        channel, payload = data[0], data[1:]
        if channel == _STDOUT:
            out += payload
        elif channel == _STDERR:
            err += payload[: max(0, 1024 - len(err))]
        elif channel == _ERROR:
            status += payload.decode(errors="replace")
    return out, err, status


def _exec_reason(exc: k8s.ApiException, namespace: str, verb: str = "create",
                 resource: str = "pods/exec") -> str:
    reason = str(exc.reason or "")
    if exc.status == 0 and reason.startswith("Handshake status 403"):
        # ws_client wraps a refused websocket upgrade as status 0: "Handshake status 403
        # Forbidden -+-+- {headers} -+-+- {body}"
        exc = k8s.ApiException(status=403, reason="Forbidden")
        exc.body = reason.rsplit(" -+-+- ", 1)[-1]
    if exc.status == 403:
        return forbidden_message(exc, verb, resource, namespace)
    if exc.status == 0:
        return reason.split(" -+-+- ", 1)[0]
    return f"HTTP {exc.status} {exc.reason}"


def _call(fn: Any, verb: str, resource: str, namespace: str) -> Any:
    """Run an API call; a 403 becomes a SourceError naming what the Role lacks."""
    try:
        return fn()
    except k8s.ApiException as exc:
        if exc.status == 403:
            raise SourceError(forbidden_message(exc, verb, resource, namespace)) from exc
        if exc.status == 410:
            raise WatchExpired(f"{resource}: {exc.reason}") from exc
        raise


class WatchExpired(Exception):
    """410 Gone: the watch's resourceVersion is too old; relist."""


def classify_api_error(exc: k8s.ApiException, verb: str, resource: str, namespace: str) -> Exception:
    if exc.status == 410:
        return WatchExpired(f"{resource}: {exc.reason}")
    if exc.status == 403:
        return SourceError(forbidden_message(exc, verb, resource, namespace))
    return exc


def _close_quietly(sock: Any) -> None:
    try:
        sock.shutdown()
    except Exception:  # closing a dead socket may raise anything; it is dead either way
        pass


def from_settings(settings: Settings) -> KubernetesClient:
    """The platform entry point (see watcher.platforms)."""
    return KubernetesClient.from_environment()
