"""An in-process Kubernetes API server for tests, faithful to the wire protocol the real
`kubernetes` client speaks: lists carry a resourceVersion, watches are chunked streams of
JSON event lines (ADDED/MODIFIED/DELETED/BOOKMARK/ERROR 410), exec is a websocket with the
channel protocol (v5/v4.channel.k8s.io; stdin 0, stdout 1, stderr 2, error 3 = Status JSON).

Tests drive it: store, change and delete objects (each write bumps the resourceVersion),
expire watches (410), close streams, send bookmarks, go down and come back on the same port,
refuse a verb with 403, answer exec through a handler, and read the recorded requests.
"""

from __future__ import annotations

import bisect
import copy
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, urlsplit

from . import websocket as ws

V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"
RESOURCES = {"pods": ("Pod", "PodList"), "services": ("Service", "ServiceList")}
VERSION = {"major": "1", "minor": "37", "emulationMajor": "1", "emulationMinor": "37",
           "minCompatibilityMajor": "1", "minCompatibilityMinor": "36",
           "gitVersion": "v1.37.0", "gitCommit": "0" * 40, "gitTreeState": "clean",
           "buildDate": "2026-11-01T00:00:00Z", "goVersion": "go1.25.3", "compiler": "gc",
           "platform": "linux/amd64"}


@dataclass(frozen=True)
class ExecCall:
    namespace: str
    pod: str
    container: str
    command: tuple[str, ...]


@dataclass(frozen=True)
class ExecResult:
    """What an exec answers. `stdout` may be an iterable of chunks (e.g. endless);
    `hang` keeps the command running that many seconds before it exits."""

    stdout: bytes | Iterable[bytes] = b""
    stderr: bytes = b""
    exit_code: int = 0
    hang: float = 0.0


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]

    def param(self, name: str, default: str = "") -> str:
        return (self.query.get(name) or [default])[0]

    @property
    def is_watch(self) -> bool:
        return self.param("watch") in ("true", "True", "1")


@dataclass
class _Event:
    rv: int
    resource: str
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK | CLOSE (the stream ends here)
    obj: dict[str, Any]
    old: dict[str, Any] | None = None


@dataclass
class _State:
    rv: int = 100
    objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = field(
        default_factory=lambda: {r: {} for r in RESOURCES})
    log: list[_Event] = field(default_factory=list)
    oldest_rv: int = 0  # a watch from an older resourceVersion gets 410 Gone
    gone_epoch: int = 0  # bumped by expire(): open watches end with 410
    generation: int = 0  # bumped by down(): handlers of an old server abort
    stalled: bool = False  # stall(): connections stay open, nothing is answered or sent


class FakeKube:
    """Start with `start()` (or as a context manager); `url`, `write_kubeconfig()`."""

    def __init__(self, namespace: str = "default", token: str = "fake-token",
                 exec_protocols: tuple[str, ...] = (V5, V4), host: str = "127.0.0.1") -> None:
        self.host = host  # loopback, or a test network's gateway so containers reach it
        self.namespace = namespace
        self.token = token
        self.exec_protocols = exec_protocols
        self.exec_handler: Callable[[ExecCall], ExecResult] | None = None
        self.requests: list[Recorded] = []
        self.denied: set[tuple[str, str]] = set()  # (verb, resource), e.g. ("watch", "pods")
        self.port = 0
        self._cond = threading.Condition()
        self._state = _State()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self.open_watches: dict[str, int] = {r: 0 for r in RESOURCES}

    # ---- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> "FakeKube":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "FakeKube":
        handler = type("Handler", (_Handler,), {"fake": self})
        server = ThreadingHTTPServer((self.host, self.port), handler)
        server.daemon_threads = True
        server.block_on_close = False
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name=f"fakekube-{self.port}")
        self._thread.start()
        return self

    def down(self) -> None:
        """The API server goes away: listener closed, every open connection cut."""
        server, self._server = self._server, None
        with self._cond:
            self._state.generation += 1
            self._cond.notify_all()
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if server is not None:
            server.shutdown()
            server.server_close()

    def up(self) -> None:
        """Back on the same port, with the same objects (etcd kept them)."""
        self.start()

    def stop(self) -> None:
        self.down()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def write_kubeconfig(self, path: Path, namespace: str | None = "") -> Path:
        """A kubeconfig for this server; `namespace=None` leaves the context without one."""
        context: dict[str, Any] = {"cluster": "fake", "user": "tester"}
        if namespace is not None:
            context["namespace"] = namespace or self.namespace
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                  "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                  "users": [{"name": "tester", "user": {"token": self.token}}],
                  "contexts": [{"name": "fake", "context": context}]}
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    # ---- objects ------------------------------------------------------------------------
    def put(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace (ADDED or MODIFIED); returns the stored object."""
        meta = obj["metadata"]
        meta.setdefault("namespace", self.namespace)
        key = (meta["namespace"], meta["name"])
        with self._cond:
            old = self._state.objects[resource].get(key)
            stored = self._stamp(resource, obj)
            if old is not None:
                stored["metadata"]["uid"] = old["metadata"]["uid"]
                stored["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            self._state.objects[resource][key] = stored
            self._append(_Event(self._state.rv, resource, "MODIFIED" if old else "ADDED",
                                stored, old))
            return copy.deepcopy(stored)

    def delete(self, resource: str, name: str, namespace: str | None = None) -> None:
        key = (namespace or self.namespace, name)
        with self._cond:
            old = self._state.objects[resource].pop(key)
            gone = self._stamp(resource, old)
            self._append(_Event(self._state.rv, resource, "DELETED", gone, old))

    def get(self, resource: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        with self._cond:
            return copy.deepcopy(self._state.objects[resource][(namespace or self.namespace,
                                                                 name)])

    def add_pod(self, pod: dict[str, Any]) -> dict[str, Any]:
        return self.put("pods", pod)

    def delete_pod(self, name: str, namespace: str | None = None) -> None:
        self.delete("pods", name, namespace)

    def add_service(self, service: dict[str, Any]) -> dict[str, Any]:
        return self.put("services", service)

    def delete_service(self, name: str, namespace: str | None = None) -> None:
        self.delete("services", name, namespace)

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._state.rv

    # ---- stream control -----------------------------------------------------------------
    def expire(self) -> None:
        """Compaction: open watches get ERROR 410 Gone now, and so does any later watch
        from a resourceVersion before this point; a fresh list is the way back."""
        with self._cond:
            self._state.rv += 1
            self._state.oldest_rv = self._state.rv
            self._state.gone_epoch += 1
            self._cond.notify_all()

    def close_streams(self) -> None:
        """Open watches end cleanly (as at the server's own timeout) once they have sent
        what happened before this call; so does a later watch from an older version."""
        with self._cond:
            for resource in RESOURCES:
                self._append(_Event(self._state.rv, resource, "CLOSE", {}))

    def bookmark(self) -> None:
        """A BOOKMARK at the current resourceVersion to watches that allow them."""
        with self._cond:
            for resource in RESOURCES:
                self._append(_Event(self._state.rv, resource, "BOOKMARK", {}))

    def stall(self) -> None:
        """A half-open API server: connections stay up, but no request is answered and no
        event is sent until `resume()` (what a dead peer behind a NAT looks like)."""
        with self._cond:
            self._state.stalled = True
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self._state.stalled = False
            self._cond.notify_all()

    def deny(self, verb: str, resource: str) -> None:
        self.denied.add((verb, resource))

    def allow(self, verb: str, resource: str) -> None:
        self.denied.discard((verb, resource))

    def wait_watching(self, resource: str, count: int = 1, timeout: float = 10.0) -> bool:
        """True once at least `count` watches of `resource` are open."""
        with self._cond:
            return self._cond.wait_for(lambda: self.open_watches[resource] >= count, timeout)

    def requests_to(self, resource: str, watch: bool | None = None) -> list[Recorded]:
        with self._cond:
            out = [r for r in self.requests if r.path.endswith("/" + resource)]
        return [r for r in out if watch is None or r.is_watch == watch]

    # ---- internals (call with the lock held) --------------------------------------------
    def _stamp(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        self._state.rv += 1
        stored = copy.deepcopy(obj)
        kind = RESOURCES[resource][0]
        stored = {"kind": kind, "apiVersion": "v1", **stored}
        stored["metadata"]["resourceVersion"] = str(self._state.rv)
        return stored

    def _append(self, event: _Event) -> None:
        self._state.log.append(event)
        self._cond.notify_all()


# ---- selectors ------------------------------------------------------------------------------
def _split_terms(selector: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        terms.append(current.strip())
    return terms


def label_selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes label selector syntax: k=v, k==v, k!=v, k, !k, k in (a,b), k notin (a,b)."""
    for term in _split_terms(selector):
        if " notin " in term or " in " in term:
            negate = " notin " in term
            key, values = term.split(" notin " if negate else " in ", 1)
            allowed = {v.strip() for v in values.strip().strip("()").split(",")}
            present = key.strip() in labels and labels[key.strip()] in allowed
            if present == negate:
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_selector_matches(selector: str, obj: dict[str, Any]) -> bool:
    """metadata.name=x, status.phase!=Failed, spec.nodeName==n ... (dotted paths)."""
    for term in _split_terms(selector):
        negate = "!=" in term
        path, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        node: Any = obj
        for part in path.strip().split("."):
            node = node.get(part, "") if isinstance(node, dict) else ""
        if (str(node) == value.strip()) == negate:
            return False
    return True


def _matches(obj: dict[str, Any] | None, query: dict[str, list[str]]) -> bool:
    if obj is None:
        return False
    labels = (obj.get("metadata") or {}).get("labels") or {}
    lsel = (query.get("labelSelector") or [""])[0]
    fsel = (query.get("fieldSelector") or [""])[0]
    return ((not lsel or label_selector_matches(lsel, labels))
            and (not fsel or field_selector_matches(fsel, obj)))


def _status(code: int, reason: str, message: str, details: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                           "status": "Failure", "message": message, "reason": reason,
                           "code": code}
    if details:
        out["details"] = details
    return out


# ---- HTTP ---------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    fake: FakeKube
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake._cond:
            self.fake._conns.add(self.connection)
            self.generation = self.fake._state.generation

    def finish(self) -> None:
        with self.fake._cond:
            self.fake._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        state = self.fake._state
        with self.fake._cond:
            self.fake.requests.append(Recorded("GET", parts.path, query, dict(self.headers)))
            self.fake._cond.wait_for(lambda: not state.stalled
                                     or state.generation != self.generation)
            if state.generation != self.generation:
                self.close_connection = True
                return None
        if self.headers.get("Authorization") != f"Bearer {self.fake.token}":
            return self._json(401, _status(401, "Unauthorized", "Unauthorized"))
        segs = [s for s in parts.path.split("/") if s]
        if segs == ["version"]:
            return self._json(200, VERSION)
        if len(segs) >= 5 and segs[:3] == ["api", "v1", "namespaces"] and segs[4] in RESOURCES:
            ns, resource = segs[3], segs[4]
            if len(segs) == 5:
                watch = query.get("watch", [""])[0] in ("true", "True", "1")
                verb = "watch" if watch else "list"
                if self._forbidden(verb, resource, ns):
                    return None
                return self._watch(ns, resource, query) if watch else self._list(ns, resource,
                                                                                  query)
            if len(segs) == 6:
                if self._forbidden("get", resource, ns):
                    return None
                return self._get(ns, resource, segs[5])
            if len(segs) == 7 and resource == "pods" and segs[6] == "exec":
                if self._forbidden("create", "pods/exec", ns):
                    return None
                return self._exec(ns, segs[5], query)
        return self._json(404, _status(404, "NotFound", "the server could not find the "
                                       "requested resource"))

    do_POST = do_GET  # exec may be POSTed as well

    # -- plain answers --
    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _forbidden(self, verb: str, resource: str, ns: str) -> bool:
        if (verb, resource) not in self.fake.denied:
            return False
        name, _, sub = resource.partition("/")
        what = f'resource "{name}"' + (f' in subresource "{sub}"' if sub else "")
        user = f"system:serviceaccount:{ns}:ssh-proxy"
        self._json(403, _status(403, "Forbidden",
                                f'{name} is forbidden: User "{user}" cannot {verb} {what} '
                                f'in API group "" in the namespace "{ns}"',
                                {"kind": name}))
        return True

    def _list(self, ns: str, resource: str, query: dict[str, list[str]]) -> None:
        with self.fake._cond:
            items = [copy.deepcopy(o) for (o_ns, _), o in
                     sorted(self.fake._state.objects[resource].items()) if o_ns == ns]
            rv = self.fake._state.rv
        for item in items:  # list items carry no kind/apiVersion
            item.pop("kind", None)
            item.pop("apiVersion", None)
        items = [i for i in items if _matches(i, query)]
        self._json(200, {"kind": RESOURCES[resource][1], "apiVersion": "v1",
                         "metadata": {"resourceVersion": str(rv)}, "items": items})

    def _get(self, ns: str, resource: str, name: str) -> None:
        with self.fake._cond:
            obj = copy.deepcopy(self.fake._state.objects[resource].get((ns, name)))
        if obj is None:
            return self._json(404, _status(404, "NotFound",
                                           f'{resource} "{name}" not found',
                                           {"name": name, "kind": resource}))
        return self._json(200, obj)

    # -- watch --
    def _chunk(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, ns: str, resource: str, query: dict[str, list[str]]) -> None:
        fake, state = self.fake, self.fake._state
        param = (query.get("resourceVersion") or [""])[0]
        since = int(param) if param.isdigit() else 0
        bookmarks = (query.get("allowWatchBookmarks") or [""])[0] in ("true", "True", "1")
        timeout = float((query.get("timeoutSeconds") or ["1800"])[0])
        deadline = time.monotonic() + timeout
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with fake._cond:
            if since and since < state.oldest_rv:
                return self._gone(since)
            initial = []
            if not since:  # "any version": synthetic ADDED for what exists, then follow
                initial = [copy.deepcopy(o) for (o_ns, _), o in
                           sorted(state.objects[resource].items()) if o_ns == ns]
                since = state.rv
            pos = bisect.bisect_right([e.rv for e in state.log], since)
            gone = state.gone_epoch
            fake.open_watches[resource] += 1
            fake._cond.notify_all()
        try:
            for obj in initial:
                if _matches(obj, query):
                    self._chunk({"type": "ADDED", "object": obj})
            while True:
                with fake._cond:
                    fake._cond.wait_for(
                        lambda: state.generation != self.generation or (
                            not state.stalled and (len(state.log) > pos
                                                   or state.gone_epoch != gone
                                                   or time.monotonic() >= deadline)),
                        timeout=None if state.stalled else max(0.0,
                                                               deadline - time.monotonic()))
                    if state.stalled and state.generation == self.generation:
                        continue
                    if state.generation != self.generation:
                        self.close_connection = True
                        return None  # cut, no terminating chunk: the server went away
                    if state.gone_epoch != gone:
                        return self._gone(since)
                    if time.monotonic() >= deadline:
                        return self._end()
                    events, pos = state.log[pos:], len(state.log)
                for event in events:
                    since = event.rv
                    if event.type == "CLOSE" and event.resource == resource:
                        return self._end()
                    self._send_event(event, ns, resource, query, bookmarks)
        except OSError:
            self.close_connection = True
        finally:
            with fake._cond:
                fake.open_watches[resource] -= 1

    def _send_event(self, event: _Event, ns: str, resource: str,
                    query: dict[str, list[str]], bookmarks: bool) -> None:
        if event.resource != resource:
            return
        if event.type == "BOOKMARK":
            if bookmarks:
                self._chunk({"type": "BOOKMARK", "object": {
                    "kind": RESOURCES[resource][0], "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(event.rv), "creationTimestamp": None}}})
            return
        if event.obj["metadata"]["namespace"] != ns:
            return
        now = event.type != "DELETED" and _matches(event.obj, query)
        before = event.type != "ADDED" and _matches(event.old, query)
        # An object entering or leaving the selection is ADDED or DELETED to this watcher.
        if now and before:
            kind = "MODIFIED"
        elif now:
            kind = "ADDED"
        elif before:
            kind = "DELETED"
        else:
            return
        self._chunk({"type": kind, "object": event.obj})

    def _gone(self, since: int) -> None:
        self._chunk({"type": "ERROR", "object": _status(
            410, "Expired", f"too old resource version: {since} ({self.fake._state.oldest_rv})")})
        self._end()

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- exec over a websocket --
    def _exec(self, ns: str, name: str, query: dict[str, list[str]]) -> None:
        with self.fake._cond:
            pod = self.fake._state.objects["pods"].get((ns, name))
        if pod is None:
            return self._json(404, _status(404, "NotFound", f'pods "{name}" not found',
                                           {"name": name, "kind": "pods"}))
        if self.headers.get("Upgrade", "").lower() != "websocket":
            return self._json(400, _status(400, "BadRequest", "Upgrade request required"))
        protocol = ws.choose_protocol(self.headers.get("Sec-WebSocket-Protocol", ""),
                                      self.fake.exec_protocols)
        if not protocol:
            return self._json(400, _status(400, "BadRequest", "no supported channel protocol"))
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept",
                         ws.accept_key(self.headers.get("Sec-WebSocket-Key", "")))
        self.send_header("Sec-WebSocket-Protocol", protocol)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        containers = [c["name"] for c in pod["spec"]["containers"]]
        call = ExecCall(ns, name, (query.get("container") or containers[:1])[0],
                        tuple(query.get("command") or ()))
        handler = self.fake.exec_handler
        result = handler(call) if handler else ExecResult(stderr=b"no exec handler\n",
                                                          exit_code=126)
        try:
            self._exec_stream(call, result)
        except (OSError, EOFError):
            pass

    def _send_channel(self, channel: int, data: bytes) -> None:
        for start in range(0, max(len(data), 1), 32 * 1024):
            self.connection.sendall(ws.frame(ws.OP_BINARY, bytes([channel])
                                             + data[start:start + 32 * 1024]))

    def _exec_stream(self, call: ExecCall, result: ExecResult) -> None:
        chunks = [result.stdout] if isinstance(result.stdout, bytes) else result.stdout
        for chunk in chunks:
            if self.fake._state.generation != self.generation:
                return
            if chunk:
                self._send_channel(1, chunk)
        if result.stderr:
            self._send_channel(2, result.stderr)
        if result.hang and self._peer_closed_within(result.hang):
            return
        if result.exit_code == 0:
            status: dict[str, Any] = {"metadata": {}, "status": "Success"}
        else:
            status = {"metadata": {}, "status": "Failure",
                      "message": ("command terminated with non-zero exit code: error executing "
                                  f"command [{' '.join(call.command)}], exit code "
                                  f"{result.exit_code}"),
                      "reason": "NonZeroExitCode",
                      "details": {"causes": [{"reason": "ExitCode",
                                              "message": str(result.exit_code)}]}}
        self._send_channel(3, json.dumps(status).encode())
        self.connection.sendall(ws.close_frame())
        self._peer_closed_within(2.0)

    def _peer_closed_within(self, seconds: float) -> bool:
        """Wait up to `seconds` for the client's close frame or EOF (True if it came)."""
        self.connection.settimeout(seconds)
        try:
            while True:
                opcode, _ = ws.read_frame(self.connection)
                if opcode == ws.OP_CLOSE:
                    return True
        except (socket.timeout, TimeoutError):
            return False
        except (EOFError, OSError):
            return True
