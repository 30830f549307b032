"""watcher.fetch against a real HTTP server on 127.0.0.1: happy path, fallbacks, hostile bodies."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from watcher.errors import FetchError
from watcher.fetch import MAX_BODY, FetchPolicy, KeyFetcher, http_get_body, key_file_command
from watcher.model import Target

POLICY = FetchPolicy(attempts=2, max_wait=0.01, connect_timeout=0.5, read_timeout=0.5)
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
KEY_PATH = "~/.ssh/id_ed25519.pub"


# --- keys from ssh-keygen -------------------------------------------------------------

@dataclass(frozen=True)
class GenKey:
    line: str  # "<type> <blob> <comment>"
    fingerprint: str

    @property
    def blob(self) -> str:
        return self.line.split()[1]


def _keygen(directory: Path, name: str, *args: str) -> GenKey:
    path = directory / name
    subprocess.run([SSH_KEYGEN, "-q", *args, "-N", "", "-C", f"{name}@target", "-f", str(path)],
                   check=True, capture_output=True)
    fp = subprocess.run([SSH_KEYGEN, "-lf", f"{path}.pub"], check=True, capture_output=True,
                        text=True).stdout.split()[1]
    return GenKey((directory / f"{name}.pub").read_text().strip(), fp)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, GenKey]:
    d = tmp_path_factory.mktemp("keys")
    return {"ed1": _keygen(d, "ed1", "-t", "ed25519"),
            "ed2": _keygen(d, "ed2", "-t", "ed25519"),
            "rsa1024": _keygen(d, "rsa1024", "-t", "rsa", "-b", "1024")}


# --- the HTTP server ------------------------------------------------------------------

@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True
    drip: float = 0.0  # seconds between 8-byte pieces of the body
    piece: int = 16384


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.reply = Reply()
        self.hits = 0
        self.paths: list[str] = []
        self.sent = 0  # body bytes the kernel accepted
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server_address[1]


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        reply = self.server.reply
        with self.server.lock:
            self.server.hits += 1
            self.server.paths.append(self.path)
        # A small send buffer: what the kernel accepts is close to what the client read.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.content_length:
            self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.flush()
            step = 8 if reply.drip else reply.piece
            for start in range(0, len(reply.body), step):
                chunk = reply.body[start:start + step]
                self.wfile.write(chunk)
                self.wfile.flush()
                with self.server.lock:
                    self.server.sent += len(chunk)
                if reply.drip:
                    time.sleep(reply.drip)
        except OSError:
            pass  # the client hung up: that is what the caps are for
        self.close_connection = True


@pytest.fixture
def server(monkeypatch) -> Iterator[Server]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


class FakeExec:
    def __init__(self, result: bytes | Exception) -> None:
        self.result = result
        self.calls: list[tuple[Target, list[str], int]] = []

    def __call__(self, target: Target, argv: list[str], limit: int) -> bytes:
        self.calls.append((target, list(argv), limit))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


TARGET = Target(id="c" * 64, name="web", address="127.0.0.1")


def fetcher(port: int, exec_reader=None, key_path: str = KEY_PATH) -> KeyFetcher:
    return KeyFetcher(port, key_path, exec_reader, POLICY)


# --- happy paths ----------------------------------------------------------------------

def test_valid_key_via_http(server: Server, keys) -> None:
    server.reply = Reply(body=(keys["ed1"].line + "\n").encode())
    exec_reader = FakeExec(RuntimeError("must not be called"))
    state = fetcher(server.port, exec_reader).fetch(TARGET)
    assert state.status == "ok"
    assert state.via == "http"
    assert state.error == "" and state.rejected == ()
    [key] = state.keys
    assert key.key_type == "ssh-ed25519"
    assert key.blob_b64 == keys["ed1"].blob
    assert key.fingerprint == keys["ed1"].fingerprint
    assert key.comment == "ed1@target"
    assert server.paths == ["/publickey"]
    assert exec_reader.calls == []


def test_two_valid_keys_both_accepted(server: Server, keys) -> None:
    server.reply = Reply(body=f"{keys['ed1'].line}\r\n# comment\n\n{keys['ed2'].line}\n".encode())
    state = fetcher(server.port).fetch(TARGET)
    assert state.status == "ok"
    assert [k.fingerprint for k in state.keys] == [keys["ed1"].fingerprint, keys["ed2"].fingerprint]


def test_http_404_falls_back_to_exec(server: Server, keys) -> None:
    server.reply = Reply(status=404, body=b"not found")
    exec_reader = FakeExec((keys["ed2"].line + "\n").encode())
    state = fetcher(server.port, exec_reader).fetch(TARGET)
    assert state.status == "ok"
    assert state.via == "exec"
    assert [k.fingerprint for k in state.keys] == [keys["ed2"].fingerprint]
    assert exec_reader.calls == [(TARGET, key_file_command(KEY_PATH), MAX_BODY + 1)]
    assert exec_reader.calls[0][1] == ["sh", "-c", 'exec cat -- "$HOME"/.ssh/id_ed25519.pub']
    assert server.hits == 1


def test_connection_refused_falls_back_to_exec(closed_port: int, keys) -> None:
    exec_reader = FakeExec(keys["ed1"].line.encode())
    state = fetcher(closed_port, exec_reader, key_path="/etc/key.pub").fetch(TARGET)
    assert state.status == "ok" and state.via == "exec"
    assert exec_reader.calls[0][1] == ["cat", "--", "/etc/key.pub"]


def test_no_address_goes_straight_to_exec(keys) -> None:
    exec_reader = FakeExec(keys["ed1"].line.encode())
    target = Target(id="d" * 64, name="hostnet")
    state = fetcher(1, exec_reader).fetch(target)
    assert state.status == "ok" and state.via == "exec"
    assert exec_reader.calls[0][0] is target


def test_redirect_is_not_followed(server: Server, keys) -> None:
    server.reply = Reply(status=302, headers={"Location": "http://127.0.0.1:1/publickey"})
    exec_reader = FakeExec(keys["ed1"].line.encode())
    state = fetcher(server.port, exec_reader).fetch(TARGET)
    assert state.status == "ok" and state.via == "exec"


# --- failures -------------------------------------------------------------------------

def test_both_failing_is_failed_with_both_errors(server: Server) -> None:
    server.reply = Reply(status=404)
    exec_reader = FakeExec(FetchError("exec cat in web exited 1: No such file or directory"))
    state = fetcher(server.port, exec_reader).fetch(TARGET)
    assert state.status == "failed"
    assert state.keys == ()
    assert "HTTP 404" in state.error
    assert "No such file or directory" in state.error
    assert server.hits == 2  # attempts=2: a FetchError is retried
    assert len(exec_reader.calls) == 2


def test_refused_and_no_exec(closed_port: int) -> None:
    state = fetcher(closed_port, None).fetch(TARGET)
    assert state.status == "failed"
    assert f"GET http://127.0.0.1:{closed_port}/publickey failed: ConnectionError" in state.error
    assert "exec is not available for this source" in state.error


def test_http_get_body_errors(server: Server, closed_port: int) -> None:
    server.reply = Reply(status=500, body=b"oops")
    url = f"http://127.0.0.1:{server.port}/publickey"
    with pytest.raises(FetchError, match=f"GET {url} answered HTTP 500"):
        http_get_body(url, POLICY)
    with pytest.raises(FetchError, match="failed: ConnectionError"):
        http_get_body(f"http://127.0.0.1:{closed_port}/publickey", POLICY)


# --- hostile bodies -------------------------------------------------------------------

TEN_MIB = 10 * 1024 * 1024


def test_huge_body_without_length_is_capped(server: Server, keys) -> None:
    server.reply = Reply(body=b"A" * TEN_MIB, content_length=False)
    url = f"http://127.0.0.1:{server.port}/publickey"
    started = time.monotonic()
    body = http_get_body(url, POLICY)
    assert len(body) == MAX_BODY + 1
    assert time.monotonic() - started < 2
    deadline = time.monotonic() + 3
    while server.sent < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # Read at most the cap plus one 16 KiB chunk; the rest sits in socket buffers at most.
    assert MAX_BODY < server.sent < 2 * 1024 * 1024


def test_huge_body_is_rejected_and_exec_used(server: Server, keys) -> None:
    server.reply = Reply(body=b"A" * TEN_MIB, content_length=False)
    exec_reader = FakeExec(keys["ed1"].line.encode())
    state = fetcher(server.port, exec_reader).fetch(TARGET)
    assert state.status == "ok" and state.via == "exec"
    assert state.rejected == (f"http: body of {MAX_BODY + 1} bytes exceeds the "
                              f"{MAX_BODY}-byte limit",)
    time.sleep(0.2)
    assert server.sent < 2 * 1024 * 1024


def test_huge_content_length_is_not_read(server: Server) -> None:
    server.reply = Reply(body=b"A" * TEN_MIB, content_length=True)
    url = f"http://127.0.0.1:{server.port}/publickey"
    body = http_get_body(url, POLICY)
    assert body == b"\0" * (MAX_BODY + 1)
    time.sleep(0.2)
    assert server.sent < 2 * 1024 * 1024
    state = fetcher(server.port, None).fetch(TARGET)
    assert state.status == "failed"
    assert f"http: body of {MAX_BODY + 1} bytes exceeds" in state.error


def test_body_just_under_the_cap_is_read_whole(server: Server, keys) -> None:
    body = (keys["ed1"].line + "\n").encode()
    body += b"#" * (MAX_BODY - len(body) - 1) + b"\n"
    assert len(body) == MAX_BODY
    server.reply = Reply(body=body, content_length=False)
    state = fetcher(server.port).fetch(TARGET)
    assert state.status == "ok"
    assert [k.fingerprint for k in state.keys] == [keys["ed1"].fingerprint]


def test_option_prefixed_line_rejected(server: Server, keys) -> None:
    line = f'command="/bin/sh",permitopen="*:*" {keys["ed1"].line}\n'
    server.reply = Reply(body=line.encode())
    exec_reader = FakeExec(line.encode())
    state = fetcher(server.port, exec_reader).fetch(TARGET)
    assert state.status == "failed"
    assert state.keys == ()
    assert "http: line 1: options are not allowed before the key type" in state.error
    assert "exec: line 1: options are not allowed before the key type" in state.error
    assert server.hits == 1  # rejected, not retried: the answer would be the same


def test_mixed_body_keeps_only_clean_keys(server: Server, keys) -> None:
    ed1, ed2, rsa = keys["ed1"], keys["ed2"], keys["rsa1024"]
    blob = ed2.blob
    bad_b64 = "ssh-ed25519 AAAA!!notbase64== x"
    mismatch = f"ssh-rsa {ed1.blob} liar"
    body = "\n".join([
        f'no-pty,permitopen="db:22" {ed2.line}',
        ed1.line,
        bad_b64,
        mismatch,
        rsa.line,
        f"ssh-ed25519 {blob[:-4]} truncated",
        "",
    ])
    server.reply = Reply(body=body.encode())
    state = fetcher(server.port).fetch(TARGET)
    assert state.status == "ok" and state.via == "http"
    assert [k.fingerprint for k in state.keys] == [ed1.fingerprint]
    for key in state.keys:
        assert key.line() == f"ssh-ed25519 {ed1.blob}"
        assert "=" not in key.key_type and "," not in key.key_type
    rejected = "\n".join(state.rejected)
    assert "http: line 1: options are not allowed before the key type" in rejected
    assert "http: line 3: key blob is not valid base64" in rejected
    assert "http: line 4: type mismatch: line says ssh-rsa, key blob says ssh-ed25519" in rejected
    assert "http: line 5: RSA key of 1024 bits; at least 2048 required" in rejected
    assert "http: line 6:" in rejected
    assert len(state.rejected) == 5


@pytest.mark.parametrize("body, reason", [
    (b"ssh-ed25519 AAAA!!notbase64== x\n", "not valid base64"),
    (b"\x00ssh-ed25519\n", "NUL byte"),
    (b"\xff\xfe\n", "not valid UTF-8"),
    (b"", "no valid key"),
    (b"hello world\n", "unsupported key type"),
])
def test_unusable_bodies(server: Server, body: bytes, reason: str) -> None:
    server.reply = Reply(body=body)
    exec_reader = FakeExec(FetchError("exec: no such file"))
    state = fetcher(server.port, exec_reader).fetch(TARGET)
    assert state.status == "failed"
    assert state.keys == ()
    assert reason in state.error
    assert "exec: no such file" in state.error


def test_rsa_1024_only(server: Server, keys) -> None:
    server.reply = Reply(body=keys["rsa1024"].line.encode())
    state = fetcher(server.port, FakeExec(keys["rsa1024"].line.encode())).fetch(TARGET)
    assert state.status == "failed"
    assert "RSA key of 1024 bits" in state.error


def test_type_mismatch_only(server: Server, keys) -> None:
    server.reply = Reply(body=f"ssh-rsa {keys['ed1'].blob}\n".encode())
    state = fetcher(server.port, FakeExec(FetchError("exec failed"))).fetch(TARGET)
    assert state.status == "failed"
    assert "type mismatch" in state.error


def test_dripping_body_is_bounded_in_time(server: Server, keys) -> None:
    body = (keys["ed1"].line + "\n").encode()
    body = body + b"#" * (120 - len(body)) + b"\n"  # 16 pieces of 8 bytes: ~2.2 s
    server.reply = Reply(body=body, content_length=False, drip=0.14)
    started = time.monotonic()
    fetcher(server.port, FakeExec(FetchError("no exec"))).fetch(TARGET)
    elapsed = time.monotonic() - started
    assert elapsed < POLICY.attempts * (POLICY.connect_timeout + POLICY.read_timeout) + 0.5


def test_gzip_bomb_is_capped_after_decoding(server: Server) -> None:
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    body = b"".join(packer.compress(b"\0" * (1 << 20)) for _ in range(64)) + packer.flush()
    assert len(body) < 256 * 1024  # 64 MiB once decoded
    server.reply = Reply(body=body, headers={"Content-Encoding": "gzip"}, content_length=False)
    out = http_get_body(f"http://127.0.0.1:{server.port}/publickey", POLICY)
    assert out == b"\0" * (MAX_BODY + 1)


def test_bogus_content_length_does_not_escape(server: Server, keys) -> None:
    server.reply = Reply(body=(keys["ed1"].line + "\n").encode(),
                         headers={"Content-Length": "\u00b2"}, content_length=False)
    exec_reader = FakeExec(keys["ed2"].line.encode())
    state = fetcher(server.port, exec_reader).fetch(TARGET)
    assert state.status == "ok"
    assert [k.fingerprint for k in state.keys] in ([keys["ed1"].fingerprint],
                                                   [keys["ed2"].fingerprint])


def test_environment_proxy_is_not_used_for_targets(server: Server, keys, closed_port: int,
                                                  monkeypatch) -> None:
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{closed_port}")
    server.reply = Reply(body=(keys["ed1"].line + "\n").encode())
    state = fetcher(server.port, None).fetch(TARGET)
    assert state.status == "ok", state.error
    assert state.via == "http"


# --- key_file_command -----------------------------------------------------------------

def test_key_file_command_absolute() -> None:
    assert key_file_command("/etc/ssh/key.pub") == ["cat", "--", "/etc/ssh/key.pub"]
    assert key_file_command("/a b/it's") == ["cat", "--", "/a b/it's"]


def test_key_file_command_home() -> None:
    assert key_file_command("~/.ssh/id_ed25519.pub") == [
        "sh", "-c", 'exec cat -- "$HOME"/.ssh/id_ed25519.pub']


@pytest.mark.parametrize("relative", [".ssh/id.pub", "my keys/it's.pub", "$(touch pwned)",
                                      "a;b`c`\"d\"\\e", "-n.pub", "*"])
def test_key_file_command_home_runs_safely(tmp_path: Path, relative: str) -> None:
    home = tmp_path / "home"
    path = home / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("ssh-ed25519 AAAA key\n")
    (home / "decoy").write_text("decoy\n")
    argv = key_file_command("~/" + relative)
    assert argv[:2] == ["sh", "-c"]
    result = subprocess.run(argv, env={"HOME": str(home), "PATH": os.environ["PATH"]},
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ssh-ed25519 AAAA key\n"
    assert not (tmp_path / "pwned").exists() and not (home / "pwned").exists()


def test_key_file_command_home_with_spaces_in_home(tmp_path: Path) -> None:
    home = tmp_path / "my home's dir"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id.pub").write_text("k\n")
    result = subprocess.run(key_file_command("~/.ssh/id.pub"),
                            env={"HOME": str(home), "PATH": os.environ["PATH"]},
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, "k\n")


def test_a_hanging_source_is_not_retried_in_the_same_round(keys) -> None:
    # A hang (exec that never ends, a body that drips) holds a pool worker: the fetch gives
    # up after one attempt and the reconciler retries in a later round.
    from watcher.errors import FetchTimeout

    exec_reader = FakeExec(FetchTimeout("exec cat in web did not finish within 5s"))
    policy = FetchPolicy(attempts=5, max_wait=0.01, connect_timeout=0.2, read_timeout=0.2)
    state = KeyFetcher(1, KEY_PATH, exec_reader, policy).fetch(Target(id="x" * 64, name="web"))
    assert state.status == "failed"
    assert "did not finish" in state.error
    assert len(exec_reader.calls) == 1


# --- SSH_TARGET_KEY_SOURCE: which sources, in which order ---------------------------------

def sourced(port: int, exec_reader, *sources: str) -> KeyFetcher:
    return KeyFetcher(port, KEY_PATH, exec_reader, POLICY, sources=sources)  # type: ignore[arg-type]


def test_default_order_is_http_then_exec(server: Server, keys) -> None:
    server.reply = Reply(body=(keys["ed1"].line + "\n").encode())
    exec_reader = FakeExec(keys["ed2"].line.encode())
    state = sourced(server.port, exec_reader, "api", "exec").fetch(TARGET)
    assert (state.status, state.via) == ("ok", "http")
    assert [k.fingerprint for k in state.keys] == [keys["ed1"].fingerprint]
    assert exec_reader.calls == []
    assert KeyFetcher(server.port, KEY_PATH, None).sources == ("api", "exec")


def test_api_only_takes_the_http_key(server: Server, keys) -> None:
    server.reply = Reply(body=(keys["ed1"].line + "\n").encode())
    exec_reader = FakeExec(keys["ed2"].line.encode())
    state = sourced(server.port, exec_reader, "api").fetch(TARGET)
    assert (state.status, state.via) == ("ok", "http")
    assert [k.fingerprint for k in state.keys] == [keys["ed1"].fingerprint]
    assert exec_reader.calls == []


@pytest.mark.parametrize("reply", [Reply(status=404), Reply(status=500, body=b"oops"),
                                   Reply(body=b"not a key\n"), Reply(body=b"A" * TEN_MIB)],
                         ids=["404", "500", "garbage", "huge"])
def test_api_only_never_execs_when_http_fails(server: Server, keys, reply: Reply) -> None:
    # A target that makes its HTTP answer fail must not get an exec into itself.
    server.reply = reply
    exec_reader = FakeExec(keys["ed2"].line.encode())
    state = sourced(server.port, exec_reader, "api").fetch(TARGET)
    assert state.status == "failed"
    assert state.keys == ()
    assert exec_reader.calls == []
    assert "exec" not in state.error
    assert server.hits >= 1


def test_api_only_never_execs_when_nothing_listens(closed_port: int, keys) -> None:
    exec_reader = FakeExec(keys["ed2"].line.encode())
    state = sourced(closed_port, exec_reader, "api").fetch(TARGET)
    assert state.status == "failed"
    assert "ConnectionError" in state.error
    assert exec_reader.calls == []


def test_api_only_without_an_address_fails_without_exec(keys) -> None:
    exec_reader = FakeExec(keys["ed2"].line.encode())
    state = sourced(1, exec_reader, "api").fetch(Target(id="d" * 64, name="hostnet"))
    assert state.status == "failed"
    assert "no address" in state.error
    assert exec_reader.calls == []


def test_exec_only_never_sends_http(server: Server, keys) -> None:
    # The HTTP answer would win in the default order: with exec alone it is never asked for.
    server.reply = Reply(body=(keys["ed1"].line + "\n").encode())
    exec_reader = FakeExec(keys["ed2"].line.encode())
    state = sourced(server.port, exec_reader, "exec").fetch(TARGET)
    assert (state.status, state.via) == ("ok", "exec")
    assert [k.fingerprint for k in state.keys] == [keys["ed2"].fingerprint]
    assert exec_reader.calls == [(TARGET, key_file_command(KEY_PATH), MAX_BODY + 1)]
    assert server.hits == 0


def test_exec_only_failing_does_not_fall_back_to_http(server: Server, keys) -> None:
    server.reply = Reply(body=(keys["ed1"].line + "\n").encode())
    exec_reader = FakeExec(FetchError("exec cat in web exited 1: No such file or directory"))
    state = sourced(server.port, exec_reader, "exec").fetch(TARGET)
    assert state.status == "failed"
    assert "No such file or directory" in state.error
    assert "GET" not in state.error
    assert server.hits == 0
    assert len(exec_reader.calls) == POLICY.attempts  # still retried while the target boots


def test_exec_only_rejected_body_names_exec(server: Server, keys) -> None:
    exec_reader = FakeExec(keys["rsa1024"].line.encode())
    state = sourced(server.port, exec_reader, "exec").fetch(TARGET)
    assert state.status == "failed"
    assert state.error.startswith("exec: ") and "RSA key of 1024 bits" in state.error
    assert server.hits == 0


@pytest.mark.parametrize("sources", [(), ("http",), ("api", "file"), ("ssh",)])
def test_unknown_sources_are_refused(sources: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="'api' and/or 'exec'"):
        KeyFetcher(1, KEY_PATH, None, POLICY, sources=sources)  # type: ignore[arg-type]


# --- between attempts: GET /publickey alone, polled --------------------------------------

class VirtualTime:
    """sleep() advances clock(): the fetcher's waits without waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


class BootingHttp:
    """GET /publickey refused until `ready_at` (virtual seconds), then the key; optionally
    each refused GET takes `cost` seconds (a connect that is dropped, not refused)."""

    def __init__(self, time_: VirtualTime, ready_at: float, body: bytes, cost: float = 0.0) -> None:
        self.time, self.ready_at, self.body, self.cost = time_, ready_at, body, cost
        self.calls: list[float] = []

    def __call__(self, url: str, policy: FetchPolicy) -> bytes:
        self.calls.append(self.time.now)
        if self.time.now < self.ready_at:
            self.time.now += self.cost
            raise FetchError(f"GET {url} failed: ConnectionError")
        return self.body


def booting(ready_at: float, keys, cost: float = 0.0, sources=("api", "exec"),
            exec_result: bytes | Exception = FetchError("exec: no such file")):
    time_ = VirtualTime()
    http = BootingHttp(time_, ready_at, (keys["ed1"].line + "\n").encode(), cost)
    exec_reader = FakeExec(exec_result)
    policy = FetchPolicy(attempts=5, max_wait=4.0, max_total=1e9, poll_interval=0.2)
    fetcher = KeyFetcher(8080, KEY_PATH, exec_reader, policy, http_get=http, sources=sources,
                         sleep=time_.sleep, clock=time_.clock)
    return fetcher, time_, http, exec_reader


def test_a_key_served_while_the_target_boots_is_taken_at_the_next_poll(keys) -> None:
    # Attempts at 0 and 0.5 s fail; without polls the next would be at 1.5 s.
    fetcher, time_, http, exec_reader = booting(0.6, keys)
    state = fetcher.fetch(TARGET)
    assert (state.status, state.via) == ("ok", "http")
    assert time_.now == pytest.approx(0.7)  # the first poll after 0.6 s
    assert len(exec_reader.calls) == 2  # exec only in the two full attempts, never in a poll
    assert all(s <= 0.2 + 1e-9 for s in time_.slept)


def test_exec_only_targets_are_not_polled(keys) -> None:
    fetcher, time_, http, exec_reader = booting(0.0, keys, sources=("exec",))
    state = fetcher.fetch(TARGET)
    assert state.status == "failed"
    assert http.calls == []
    assert time_.slept == [0.5, 1.0, 2.0, 4.0]  # tenacity's schedule, untouched
    assert len(exec_reader.calls) == 5


def test_a_target_without_an_address_is_not_polled(keys) -> None:
    fetcher, time_, http, _ = booting(0.0, keys)
    state = fetcher.fetch(Target(id="d" * 64, name="hostnet"))
    assert state.status == "failed"
    assert http.calls == []
    assert time_.slept == [0.5, 1.0, 2.0, 4.0]


def test_a_poll_that_is_not_refused_at_once_ends_the_polls_of_that_wait(keys) -> None:
    # Each GET costs 1 s (a dropped connect): one poll per wait, then the wait's rest slept.
    fetcher, time_, http, _ = booting(1e9, keys, cost=1.0)
    state = fetcher.fetch(TARGET)
    assert state.status == "failed"
    full_attempts = 5
    waits = 4
    assert len(http.calls) == full_attempts + waits


def test_polls_stop_when_the_fetch_gives_up(keys) -> None:
    fetcher, time_, http, exec_reader = booting(1e9, keys)
    state = fetcher.fetch(TARGET)
    assert state.status == "failed"
    assert "ConnectionError" in state.error and "no such file" in state.error
    assert len(exec_reader.calls) == 5
    # 0.5 + 1 + 2 + 4 s of waits, GET /publickey tried at least every 0.2 s throughout
    assert time_.now == pytest.approx(7.5)
    gaps = [b - a for a, b in zip(http.calls, http.calls[1:])]
    assert max(gaps) <= 0.2 + 1e-9 and len(http.calls) > 7.5 / 0.2
