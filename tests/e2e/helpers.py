"""Shared machinery of the end-to-end tests: Docker CLI wrappers, the objects the
fixtures in conftest.py hand out, and the SSH client that goes through the proxy.

Everything talks to Docker through the `docker` CLI (what a user would type) and to the
proxy through the real OpenSSH client, with the options a user would pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGET_CONTEXT = REPO_ROOT / "tests" / "images" / "target"

# Overridable so that two checkouts can run their e2e suites side by side on one engine.
TARGET_IMAGE = os.environ.get("SSH_PROXY_TEST_TARGET_IMAGE", "ssh-proxy-target:test")
PROXY_IMAGE = os.environ.get("SSH_PROXY_TEST_PROXY_IMAGE", "ssh-proxy:test")
TEST_LABEL = "ssh-proxy-test"
"""Every container and network the tests create carries `ssh-proxy-test=1`; tests/run.sh
removes whatever carries it before and after a run."""
SESSION_LABEL = "ssh-proxy-test-session"
PROXY_USER = "limited-user"
PUBLICKEY_BODY_PATH = "/run/publickey-body"
"""Where start_target(body_file=...) mounts the file served as GET /publickey."""
DOCKER_SOCKET = "/var/run/docker.sock"
ACCESS_LOG = "/etc/ssh/access.log"
INDEX_DIR = "/etc/ssh/authorized_keys.index.d"  # the login index, one name per shard
# The index as sshd reads it, in order: the file each shard name leads to (the shard names
# of a group lead to one file), each once.
# The index as sshd's keys command answers it: the file of recent changes first (a key there
# is answered from it alone; "<fingerprint> #" is a key without lines), then the group files
# each shard name leads to; sorted by fingerprint, a key's lines in their order.
CAT_INDEX = (f'cd {INDEX_DIR} 2>/dev/null && {{ cat .recent 2>/dev/null; echo @@@; '
             f'for f in *; do readlink -f "$f"; done | uniq | while read -r p; do cat "$p" 2>/dev/null; done; }} | '
             """awk '$0 == "@@@" {base = 1; next} !base {held[$1] = 1; if ($2 != "#") print; next} """
             """!($1 in held)' | LC_ALL=C sort -s -k1,1""")
STATUS_JSON = "/run/ssh-proxy/status.json"

DOCKER_TIMEOUT = 120


# --------------------------------------------------------------------------- docker


def docker(*args: str, check: bool = True, timeout: float = DOCKER_TIMEOUT,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `docker ARGS...`; with check=True a failure fails the test with stderr."""
    argv = ["docker", *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{shlex.join(argv)}` did not finish within {timeout} s "
                    f"(stderr: {_text(exc.stderr)!r})", pytrace=False)
    if check and proc.returncode != 0:
        pytest.fail(f"`{shlex.join(argv)}` exited {proc.returncode}: "
                    f"{proc.stderr.strip() or proc.stdout.strip()}", pytrace=False)
    return proc


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def container_logs(name_or_id: str, tail: int | None = None) -> str:
    args = ["logs"] + (["--tail", str(tail)] if tail else []) + [name_or_id]
    proc = docker(*args, check=False)
    return proc.stdout + proc.stderr


def container_state(name_or_id: str) -> str:
    """`running`, `exited`, ... or `` when the container does not exist."""
    proc = docker("inspect", "-f", "{{.State.Status}}", name_or_id, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def remove_container(name_or_id: str) -> None:
    docker("rm", "-f", "-v", name_or_id, check=False)


def remove_stale_container(name: str) -> None:
    """Frees `name` when a previous, crashed run left a test container of that name;
    refuses to touch a container that is not ours."""
    proc = docker("inspect", "-f", f'{{{{index .Config.Labels "{TEST_LABEL}"}}}}', name, check=False)
    if proc.returncode != 0:
        return
    if proc.stdout.strip() != "1":
        pytest.fail(f"a container named {name!r} exists and is not a test container "
                    f"(no label {TEST_LABEL}=1): remove or rename it", pytrace=False)
    remove_container(name)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def build_image(tag: str, context: Path, dockerfile: Path | None = None) -> float:
    """`docker build -q`; returns the seconds it took, fails with the build log."""
    args = ["build", "-q", "--force-rm", "-t", tag]
    if dockerfile is not None:
        args += ["-f", str(dockerfile)]
    previous = docker("image", "inspect", "-f", "{{.Id}}", tag, check=False).stdout.strip()
    started = time.monotonic()
    proc = docker(*args, str(context), check=False, timeout=1200)
    if proc.returncode != 0:
        # -q hides the log: build again without it to show where it broke (cache makes
        # the steps that worked instant).
        again = docker(*(a for a in args if a != "-q"), str(context), check=False, timeout=1200)
        log = (again.stdout + again.stderr).strip().splitlines()
        pytest.fail(f"building {tag} from {context} failed:\n" + "\n".join(log[-60:]),
                    pytrace=False)
    elapsed = time.monotonic() - started
    current = docker("image", "inspect", "-f", "{{.Id}}", tag, check=False).stdout.strip()
    if previous and previous != current:
        # The image this tag named before, now untagged: drop it (kept when still in use).
        docker("image", "rm", previous, check=False)
    return elapsed


# --------------------------------------------------------------------------- waiting


def wait_until(predicate: Callable[[], bool], deadline: float, interval: float = 0.2) -> bool:
    """Calls predicate until it returns true or `deadline` seconds pass."""
    end = time.monotonic() + deadline
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


def read_banner(host: str, port: int, timeout: float = 2.0) -> str:
    """The first line a server sends on host:port, `` when nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = b""
            while b"\n" not in data and len(data) < 512:
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
            return data.decode(errors="replace").strip()
    except OSError:
        return ""


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeyPair:
    name: str
    private: Path
    """Path of the private key file (mode 600), for `ssh -i`."""
    public: str
    """The public key line, e.g. `ssh-ed25519 AAAA... comment` (no newline)."""
    fingerprint: str
    """`SHA256:...` as `ssh-keygen -lf` prints it."""

    @property
    def public_path(self) -> Path:
        return self.private.with_name(self.private.name + ".pub")

    @property
    def blob(self) -> str:
        """The base64 key blob of the public line (what authorized_keys files carry)."""
        return self.public.split()[1]


def make_keypair(directory: Path, name: str, comment: str | None = None, kind: str = "ed25519",
                 bits: int | None = None) -> KeyPair:
    """`ssh-keygen -t KIND [-b BITS]` without a passphrase in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / name
    if private.exists():
        raise ValueError(f"key {name!r} already exists in {directory}")
    subprocess.run(["ssh-keygen", "-q", "-t", kind, *(["-b", str(bits)] if bits else []), "-N", "",
                    "-C", comment or f"{name}@ssh-proxy-test", "-f", str(private)],
                   check=True, capture_output=True, timeout=30)
    public = private.with_name(name + ".pub").read_text().strip()
    listing = subprocess.run(["ssh-keygen", "-lf", str(private)], check=True, capture_output=True,
                             text=True, timeout=30).stdout.split()
    return KeyPair(name=name, private=private, public=public, fingerprint=listing[1])


# --------------------------------------------------------------------------- containers


@dataclass
class Target:
    """A running test target (tests/images/target)."""

    name: str
    id: str
    network: str
    hostname: str
    ip: str = ""
    """IPv4 address on `network` (the test network unless start_target got another)."""
    removed: bool = field(default=False, repr=False)

    def refresh_ip(self) -> str:
        proc = docker("inspect", "-f",
                      f'{{{{with index .NetworkSettings.Networks "{self.network}"}}}}{{{{.IPAddress}}}}{{{{end}}}}',
                      self.id)
        self.ip = proc.stdout.strip()
        return self.ip

    def exec(self, cmd: str | Sequence[str], check: bool = False, timeout: float = 60,
             user: str | None = None) -> subprocess.CompletedProcess[str]:
        """`docker exec`; a str runs through `sh -c`."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        extra = ["-u", user] if user else []
        return docker("exec", *extra, self.id, *argv, check=check, timeout=timeout)

    def logs(self) -> str:
        return container_logs(self.id)

    def state(self) -> str:
        return container_state(self.id)

    def stop(self, timeout: int = 5) -> None:
        docker("stop", "-t", str(timeout), self.id)

    def start(self) -> None:
        """Starts a stopped target again and waits for its sshd (its IP may change)."""
        docker("start", self.id)
        self.refresh_ip()
        wait_for_target_sshd(self)

    def connect(self, network: str, aliases: Iterable[str] = ()) -> None:
        args = ["network", "connect"]
        for alias in aliases:
            args += ["--alias", alias]
        docker(*args, network, self.id)

    def disconnect(self, network: str) -> None:
        docker("network", "disconnect", network, self.id)

    def remove(self) -> None:
        if not self.removed:
            remove_container(self.id)
            self.removed = True


def wait_for_target_sshd(target: Target, deadline: float = 90) -> None:
    # Generous: on a loaded 2-core machine 20 containers starting at once take a while.
    last = {"banner": ""}

    def ready() -> bool:
        if target.state() not in ("running", "created", "restarting"):
            pytest.fail(f"target {target.name} is {target.state() or 'gone'} instead of running; logs:\n"
                        f"{target.logs()}", pytrace=False)
        if not target.ip:
            target.refresh_ip()
        last["banner"] = read_banner(target.ip, 22) if target.ip else ""
        return last["banner"].startswith("SSH-2.0-")

    if not wait_until(ready, deadline):
        # What the target was still doing (its entrypoint starts sshd last) and what the
        # port said: a slow start and a broken network read differently here.
        ps = target.exec(["ps", "-eo", "pid,etime,time,stat,args"], timeout=20)
        pytest.fail(f"target {target.name} ({target.ip or 'no IP'}): sshd did not answer on port 22 "
                    f"within {deadline} s (last answer: {last['banner']!r}); its processes:\n"
                    f"{ps.stdout}{ps.stderr}\nlogs:\n{target.logs()}", pytrace=False)


@dataclass
class Proxy:
    """A running ssh-proxy container, its port 22 published on 127.0.0.1:`port`."""

    name: str
    id: str
    port: int = 0
    host: str = "127.0.0.1"
    removed: bool = field(default=False, repr=False)

    def refresh_port(self) -> int:
        proc = docker("port", self.id, "22/tcp")
        # `127.0.0.1:49153` (maybe several lines; all are the same loopback binding)
        first = proc.stdout.strip().splitlines()[0]
        self.port = int(first.rsplit(":", 1)[1])
        return self.port

    def logs(self) -> str:
        return container_logs(self.id)

    def state(self) -> str:
        return container_state(self.id)

    def banner(self) -> str:
        """The identification line the proxy sends (`SSH-2.0-OpenSSH_9.2p1 ...`); note that
        this connection shows in the access log as a pre-auth disconnect."""
        return read_banner(self.host, self.port, timeout=5)

    def exec(self, cmd: str | Sequence[str], check: bool = False, timeout: float = 60,
             user: str | None = None) -> subprocess.CompletedProcess[str]:
        """`docker exec`; a str runs through `sh -c`."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        extra = ["-u", user] if user else []
        return docker("exec", *extra, self.id, *argv, check=check, timeout=timeout)

    def read_file(self, path: str) -> str:
        """Contents of a file inside the proxy, `` when it does not exist."""
        proc = self.exec(["cat", path])
        return proc.stdout if proc.returncode == 0 else ""

    def read_index(self) -> str:
        """The login index as sshd sees it, in fingerprint order."""
        proc = self.exec(["sh", "-c", CAT_INDEX])
        return proc.stdout

    def access_log(self) -> str:
        return self.read_file(ACCESS_LOG)

    def stop(self, timeout: int = 10) -> None:
        docker("stop", "-t", str(timeout), self.id)

    def restart(self, timeout: int = 10) -> None:
        """`docker restart`, then waits for the banner again (the host port may change)."""
        docker("restart", "-t", str(timeout), self.id)
        wait_for_proxy_banner(self)

    def remove(self) -> None:
        if not self.removed:
            remove_container(self.id)
            self.removed = True


def listening_inside(container: str, port: int) -> bool:
    """Whether a socket listens on `port` inside the container (from /proc/net/tcp*),
    found without connecting to it."""
    proc = docker("exec", container, "cat", "/proc/net/tcp", "/proc/net/tcp6", check=False, timeout=30)
    suffix = f":{port:04X}"
    for line in proc.stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1].endswith(suffix) and fields[3] == "0A":  # 0A = LISTEN
            return True
    return False


def wait_for_proxy_banner(proxy: Proxy, deadline: float = 60) -> None:
    """Waits until the proxy serves SSH on 127.0.0.1:<published port>.

    Readiness is sshd listening inside the container (the published port is forwarded by
    Docker from the start), not a probe connection: a probe would be a pre-auth
    disconnect in the proxy's access log of every test. proxy.banner() reads the banner."""
    def ready() -> bool:
        state = proxy.state()
        if state in ("exited", "dead", ""):
            pytest.fail(f"proxy {proxy.name} is {state or 'gone'} instead of running; logs:\n"
                        f"{proxy.logs()}", pytrace=False)
        if state != "running":
            return False
        try:
            proxy.refresh_port()
        except (IndexError, ValueError):
            return False
        return listening_inside(proxy.id, 22)

    if not wait_until(ready, deadline, interval=0.3):
        pytest.fail(f"proxy {proxy.name}: sshd not listening on port 22 (published as "
                    f"{proxy.host}:{proxy.port}) within {deadline} s; logs:\n{proxy.logs()}", pytrace=False)


def env_args(env: Mapping[str, str] | None) -> list[str]:
    args: list[str] = []
    for key, value in (env or {}).items():
        args += ["-e", f"{key}={value}"]
    return args


def label_args(labels: Mapping[str, str] | None) -> list[str]:
    args: list[str] = []
    for key, value in (labels or {}).items():
        args += ["--label", f"{key}={value}" if value is not None else key]
    return args


def run_target_container(name: str, pubkey: KeyPair | str | None, network: str, session_id: str, *,
                         image: str = TARGET_IMAGE, serve_publickey: bool = True,
                         labels: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None,
                         body_file: str | Path | None = None, hostname: str | None = None,
                         network_aliases: Sequence[str] | None = None, publickey_port: int = 8080,
                         docker_args: Sequence[str] | None = None,
                         track: Callable[[Target], object] | None = None) -> Target:
    """`docker run -d` of a test target (what conftest's start_target and the module
    fixtures start); returns once its sshd answers on IP:22 and, when it serves
    /publickey, that port answers too. See start_target for the arguments.

    `track` gets the Target as soon as the container exists: the caller then removes it,
    also when it does not get ready. Without `track`, such a target is removed here.
    """
    key = pubkey.public if isinstance(pubkey, KeyPair) else pubkey
    remove_stale_container(name)
    args = ["run", "-d", "--name", name, "--hostname", hostname or name, "--network", network,
            "--label", f"{TEST_LABEL}=1", "--label", f"{SESSION_LABEL}={session_id}",
            *label_args(labels),
            "-e", f"SERVE_PUBLICKEY={1 if serve_publickey else 0}",
            "-e", f"PUBLICKEY_PORT={publickey_port}"]
    for alias in network_aliases or ():
        args += ["--network-alias", alias]
    if key is not None:
        args += ["-e", f"TARGET_PUBKEY={key}"]
    if body_file is not None:
        args += ["-v", f"{Path(body_file).resolve()}:{PUBLICKEY_BODY_PATH}:ro",
                 "-e", f"PUBLICKEY_BODY_FILE={PUBLICKEY_BODY_PATH}"]
    args += [*env_args(env), *(docker_args or ()), image]
    cid = docker(*args).stdout.strip()
    target = Target(name=name, id=cid, network=network, hostname=hostname or name)
    if track is not None:
        track(target)
    try:
        target.refresh_ip()
        wait_for_target_sshd(target)
        if serve_publickey and not wait_until(lambda: port_open(target.ip, publickey_port), 10):
            pytest.fail(f"target {name}: /publickey port {publickey_port} closed; logs:\n{target.logs()}",
                        pytrace=False)
    except BaseException:
        if track is None:
            target.remove()
        raise
    return target


def proxy_run_args(name: str, network: str, session_id: str, *, image: str = PROXY_IMAGE,
                   env: Mapping[str, str] | None = None, volumes: Sequence[str] | None = None,
                   docker_args: Sequence[str] | None = None, docker_socket: bool = True) -> list[str]:
    """`docker run -d` arguments of a proxy: on `network`, port 22 published on
    127.0.0.1, the Docker socket mounted (unless docker_socket=False); `volumes`: extra
    `-v` specs; `docker_args`: extra `docker run` options."""
    socket_mount = ["-v", f"{DOCKER_SOCKET}:{DOCKER_SOCKET}"] if docker_socket else []
    return ["run", "-d", "--name", name, "--network", network,
            "--label", f"{TEST_LABEL}=1", "--label", f"{SESSION_LABEL}={session_id}",
            "-p", "127.0.0.1::22", *socket_mount,
            *(a for v in (volumes or ()) for a in ("-v", v)),
            *env_args(env), *(docker_args or ()), image]


def wait_for_exit(name: str, timeout: float, interval: float = 0.2) -> int | None:
    """The exit code of container `name` once it has exited by itself; None if it still
    runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        state = docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name).stdout.split()
        if state[0] in ("exited", "dead"):
            return int(state[1])
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def run_proxy_container(network: str, session_id: str, *, name: str | None = None,
                        track: Callable[[Proxy], object] | None = None, **run_args) -> Proxy:
    """Starts a proxy (proxy_run_args; `name` defaults to a unique ssh-proxy-test-…) and
    returns once it serves SSH (wait_for_proxy_banner). `track`: as in run_target_container."""
    name = name or unique_name("ssh-proxy-test")
    remove_stale_container(name)
    cid = docker(*proxy_run_args(name, network, session_id, **run_args)).stdout.strip()
    proxy = Proxy(name=name, id=cid)
    if track is not None:
        track(proxy)
    try:
        wait_for_proxy_banner(proxy)
    except BaseException:
        if track is None:
            proxy.remove()
        raise
    return proxy


def remove_containers(containers: Iterable[Target | Proxy], failed: bool) -> None:
    """Removes the containers; when `failed`, first prints the logs of those still there
    (and a proxy's access log, when it has one)."""
    for container in containers:
        if failed and not container.removed:
            kind = "proxy" if isinstance(container, Proxy) else "target"
            print(f"\n===== logs of {kind} {container.name} =====\n{container.logs()}")
            log = container.access_log() if isinstance(container, Proxy) else ""
            if log:
                print(f"===== {ACCESS_LOG} of {container.name} =====\n{log}")
        container.remove()


@contextlib.contextmanager
def module_containers(request: pytest.FixtureRequest) -> Iterator[list[Target | Proxy]]:
    """For module-scoped fixtures: a list to put what they start in (e.g. as `track`);
    on exit all of it is removed, with the logs when a test failed meanwhile."""
    started: list[Target | Proxy] = []
    failed_before = request.session.testsfailed
    try:
        yield started
    finally:
        remove_containers(started, failed=request.session.testsfailed > failed_before)


# --------------------------------------------------------------------------- proxy state


_LOGFMT_PAIR = re.compile(r'([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict[str, str]:
    r"""One logfmt line -> {key: value}; an access-log line's leading timestamp (a first
    token without `=`) is "time". Quoted values lose their quotes and the `\\` / `\"`
    escapes; other escapes (`\n`, `\r`, `\xNN` for control characters) stay as written."""
    fields: dict[str, str] = {}
    head, _, rest = line.partition(" ")
    if "=" in head:
        rest = line
    else:
        fields["time"] = head
    for key, value in _LOGFMT_PAIR.findall(rest):
        if value.startswith('"'):
            value = re.sub(r'\\(["\\])', r"\1", value[1:-1])
        fields[key] = value
    return fields


def access_events(proxy: Proxy, since: int = 0, **match: str) -> list[dict[str, str]]:
    """The proxy's access-log events after the first `since` (a log_mark) whose fields
    include `match`, in log order."""
    events = [parse_logfmt(line) for line in proxy.access_log().splitlines() if line.strip()]
    return [e for e in events[since:] if all(e.get(k) == v for k, v in match.items())]


def log_mark(proxy: Proxy) -> int:
    """Number of access-log events now: pass it as `since` to look only at what follows."""
    return len(access_events(proxy))


def wait_for_event(proxy: Proxy, since: int = 0, deadline: float = 5, **match: str) -> dict[str, str]:
    """The first access-log event after `since` (a log_mark) whose fields include `match`
    (the log is written asynchronously from sshd's syslog); fails with the log since then."""
    found: list[dict[str, str]] = []

    def seen() -> bool:
        found[:] = access_events(proxy, since, **match)
        return bool(found)

    if not wait_until(seen, deadline):
        # AssertionError, not pytest.fail: a missing event is a finding about the product
        raise AssertionError(f"no access-log event with {match} within {deadline} s; log since line "
                             f"{since}:\n" + "\n".join(proxy.access_log().splitlines()[since:])
                             + f"\n(proxy state: {proxy.state()!r})")
    return found[0]


def status(proxy: Proxy) -> dict:
    """The proxy's status.json (rewritten every 2 s, so it may lag the proxy by as much);
    {} before the first one."""
    text = proxy.read_file(STATUS_JSON)
    return json.loads(text) if text else {}


def wait_for_status(proxy: Proxy, predicate: Callable[[dict], object], deadline: float = 10) -> dict:
    """The first status.json for which predicate(doc) holds; fails after `deadline` s."""
    doc: dict = {}

    def check() -> bool:
        doc.clear()
        doc.update(status(proxy))
        return bool(doc) and bool(predicate(doc))

    if not wait_until(check, deadline, interval=0.5):
        # The proxy's last lines at the end: a CI report keeps the end of a long message.
        logs = docker("logs", "--tail", "60", proxy.id, check=False)
        pytest.fail(f"status.json did not get there within {deadline} s:\n{json.dumps(doc, indent=1)}"
                    f"\n--- the proxy's last log lines:\n{logs.stdout}{logs.stderr}", pytrace=False)
    return doc


# --------------------------------------------------------------------------- host side


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch(url: str) -> tuple[int, bytes]:
    """HTTP GET: (status, body), also for an error status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# --------------------------------------------------------------------------- ssh client


NO_PROMPT_OPTS = (
    "-F", "/dev/null",                      # no ~/.ssh/config of whoever runs the tests
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "BatchMode=yes",
    "-o", "IdentitiesOnly=yes",             # only -i, never an agent's keys
    "-o", "IdentityAgent=none",
    "-o", "LogLevel=ERROR",                 # no "Permanently added ..." noise in stderr
)
"""What a user passes to keep ssh non-interactive; on every ssh the tests run."""


@dataclass
class SshClient:
    """OpenSSH client commands that reach targets through the proxy, as documented:

        ssh -o "ProxyCommand=ssh -W %h:%p -p PORT -i KEY ... limited-user@127.0.0.1" \\
            -i KEY ... root@TARGET CMD

    `key` logs in to the target; `proxy_key` (default: the same key) to the proxy.
    `proxy_port`: a port, or the Proxy itself (its current port is read each time, so the
    client follows proxy.restart(), which may change the published port).
    Every `*_argv` method returns a list for subprocess; `run` runs one.
    """

    proxy_port: int | Proxy
    key: Path | KeyPair
    proxy_key: Path | KeyPair | None = None
    proxy_host: str = "127.0.0.1"
    proxy_user: str = PROXY_USER
    user: str = "root"
    connect_timeout: int = 10
    extra_opts: Sequence[str] = ()
    """Added to the outer ssh (e.g. ["-o", "ServerAliveInterval=5"])."""

    @staticmethod
    def _path(key: Path | KeyPair) -> str:
        return str(key.private if isinstance(key, KeyPair) else key)

    @property
    def port(self) -> int:
        return self.proxy_port.port if isinstance(self.proxy_port, Proxy) else int(self.proxy_port)

    @property
    def key_path(self) -> str:
        return self._path(self.key)

    @property
    def proxy_key_path(self) -> str:
        return self._path(self.proxy_key if self.proxy_key is not None else self.key)

    # -- the hop to the proxy

    def proxy_command(self) -> str:
        """The ProxyCommand value (ssh expands %h/%p; `%` in paths is escaped)."""
        inner = ["ssh", "-W", "%h:%p", "-p", str(self.port),
                 "-i", self.proxy_key_path.replace("%", "%%"), *NO_PROMPT_OPTS,
                 "-o", f"ConnectTimeout={self.connect_timeout}",
                 f"{self.proxy_user}@{self.proxy_host}"]
        return shlex.join(inner)

    def ssh_options(self) -> list[str]:
        """Options shared by ssh/scp/sftp/rsync/sshfs: proxy, key, no prompts."""
        return ["-o", f"ProxyCommand={self.proxy_command()}", "-i", self.key_path,
                *NO_PROMPT_OPTS, "-o", f"ConnectTimeout={self.connect_timeout}", *self.extra_opts]

    def destination(self, host: str) -> str:
        return f"{self.user}@{host}"

    # -- argv builders

    def ssh_argv(self, host: str, *cmd: str, opts: Sequence[str] = ()) -> list[str]:
        """`ssh [opts] root@HOST [CMD...]`; opts go before the destination (-L, -X, -N...)."""
        return ["ssh", *self.ssh_options(), *opts, self.destination(host), *cmd]

    def scp_argv(self, *paths: str, opts: Sequence[str] = ()) -> list[str]:
        """`scp [opts] PATHS...`; write remote paths with remote(host, path)."""
        return ["scp", *self.ssh_options(), *opts, *paths]

    def sftp_argv(self, host: str, opts: Sequence[str] = ()) -> list[str]:
        """`sftp -b - root@HOST`-style: pass `-b -` in opts and the batch as `input`."""
        return ["sftp", *self.ssh_options(), *opts, self.destination(host)]

    def rsync_rsh(self) -> str:
        """The value of `rsync -e` (rsync splits it on spaces and honours quotes)."""
        return shlex.join(["ssh", *self.ssh_options()])

    def rsync_argv(self, *args: str) -> list[str]:
        """`rsync -e "ssh ..." ARGS...`; write remote paths with remote(host, path)."""
        return ["rsync", "-e", self.rsync_rsh(), *args]

    def sshfs_argv(self, host: str, remote_path: str, mountpoint: str | Path,
                   opts: Sequence[str] = ()) -> list[str]:
        """`sshfs root@HOST:PATH MOUNTPOINT` with the same ssh options (as -o)."""
        o: list[str] = []
        options = self.ssh_options()
        for flag, value in zip(options[::2], options[1::2]):
            if flag == "-i":
                o += ["-o", f"IdentityFile={value}"]
            elif flag == "-o":
                o += ["-o", value]
            # -F /dev/null: sshfs has no equivalent; -o options win over config anyway
        return ["sshfs", *o, *opts, f"{self.destination(host)}:{remote_path}", str(mountpoint)]

    def remote(self, host: str, path: str) -> str:
        """`root@HOST:PATH` for scp/rsync."""
        return f"{self.destination(host)}:{path}"

    def direct_argv(self, *args: str, opts: Sequence[str] = ()) -> list[str]:
        """ssh straight to the proxy as limited-user (no target): for negative tests
        such as asking for a shell, -R, -A. args follow the destination."""
        return ["ssh", "-p", str(self.port), "-i", self.proxy_key_path, *NO_PROMPT_OPTS,
                "-o", f"ConnectTimeout={self.connect_timeout}", *opts,
                f"{self.proxy_user}@{self.proxy_host}", *args]

    # -- running

    @staticmethod
    def run(argv: Sequence[str], input: str | bytes | None = None, timeout: float = 60,
            check: bool = False, env: Mapping[str, str] | None = None,
            text: bool = True) -> subprocess.CompletedProcess:
        """Runs argv, output captured; a timeout returns returncode -9 and what was
        captured instead of raising. check=True fails the test on a non-zero exit."""
        full_env = {**os.environ, **(env or {})}
        stdin = None if input is not None else subprocess.DEVNULL
        if text and isinstance(input, bytes):
            input = input.decode()
        elif not text and isinstance(input, str):
            input = input.encode()
        try:
            proc = subprocess.run(list(argv), input=input, stdin=stdin, capture_output=True,
                                  text=text, timeout=timeout, env=full_env)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout if not text else _text(exc.stdout)
            err = (exc.stderr if not text else _text(exc.stderr))
            proc = subprocess.CompletedProcess(list(argv), -9, out, err)
            if check:
                pytest.fail(f"`{shlex.join(argv)}` timed out after {timeout} s; stderr:\n{_text(err)}",
                            pytrace=False)
            return proc
        if check and proc.returncode != 0:
            pytest.fail(f"`{shlex.join(argv)}` exited {proc.returncode}; stderr:\n{_text(proc.stderr)}",
                        pytrace=False)
        return proc

    def ssh(self, host: str, *cmd: str, opts: Sequence[str] = (), **run_kw) -> subprocess.CompletedProcess:
        """Runs `ssh ... root@HOST CMD` through the proxy."""
        return self.run(self.ssh_argv(host, *cmd, opts=opts), **run_kw)

    def direct_proxy(self, *args: str, opts: Sequence[str] = (), **run_kw) -> subprocess.CompletedProcess:
        """Runs ssh straight against the proxy as limited-user (see direct_argv)."""
        return self.run(self.direct_argv(*args, opts=opts), **run_kw)


def wait_for_login(client: SshClient, host: str, deadline: float = 30,
                   interval: float = 0.5) -> float:
    """Retries `ssh ... root@HOST true` through the proxy until it succeeds (the proxy
    learns keys asynchronously); returns the seconds it took. Fails with the last stderr."""
    started = time.monotonic()
    last: subprocess.CompletedProcess | None = None
    while True:
        remaining = deadline - (time.monotonic() - started)
        last = client.ssh(host, "true", timeout=max(5.0, min(30.0, remaining + 5)))
        if last.returncode == 0:
            return time.monotonic() - started
        if time.monotonic() - started >= deadline:
            pytest.fail(f"no login to {host} through the proxy within {deadline} s; last exit "
                        f"{last.returncode}, stderr:\n{_text(last.stderr).strip()}", pytrace=False)
        time.sleep(interval)


@contextlib.contextmanager
def sshfs_mount(client: SshClient, host: str, remote_path: str, mountpoint: str | Path,
                opts: Sequence[str] = ()) -> Iterator[Path]:
    """Mounts root@HOST:REMOTE_PATH on mountpoint through the proxy for the `with` body,
    then unmounts (lazily when still busy). Fails the test when the mount fails."""
    mnt = Path(mountpoint)
    mnt.mkdir(parents=True, exist_ok=True)
    client.run(client.sshfs_argv(host, remote_path, mnt, opts=opts), timeout=60, check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
