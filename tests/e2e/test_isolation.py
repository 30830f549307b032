"""A target's key opens tunnels to that target and nothing else: not another target, not
the proxy itself, not an undiscovered host, no shell, no -R / agent / unix-socket
forwarding; unknown and revoked keys are refused; every outcome is in the access log.

One proxy for the module (SSH_TARGET_LABELS restricts it to this module's targets), two
targets A and B with different keys, and an `outsider` container that publishes a key but
lacks the label, so it is never a target.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Mapping

import pytest

from helpers import (
    SESSION_LABEL,
    TARGET_IMAGE,
    TEST_LABEL,
    PROXY_USER,
    KeyPair,
    Proxy,
    SshClient,
    Target,
    docker,
    label_args,
    listening_inside,
    make_keypair,
    port_open,
    wait_for_login,
    wait_for_proxy_banner,
    wait_for_target_sshd,
    wait_until,
)

DOCKER_SOCKET = "/var/run/docker.sock"
ISO_LABEL = "ssh-proxy-isolation"
NO_SHELL_MESSAGE = "only opens tunnels"
REVOKE_DEADLINE = 10.0


# --------------------------------------------------------------------------- access log


def parse_logfmt(line: str) -> dict[str, str]:
    """One access-log line -> {"time": ..., "event": ..., "fp": ...}; quoted values unescaped."""
    fields: dict[str, str] = {}
    head, _, rest = line.partition(" ")
    fields["time"] = head
    for match in re.finditer(r'([A-Za-z_][A-Za-z0-9_-]*)=("(?:[^"\\]|\\.)*"|\S*)', rest):
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        fields[match.group(1)] = value
    return fields


def test_parse_logfmt():
    line = ('2026-11-25T15:42:27.219Z event=tunnel-denied client=172.18.0.1:40000 fp=SHA256:abc+/d '
            'key=ED25519 target=ws-a dest="we ird\\"x:22" reason=not-permitted')
    assert parse_logfmt(line) == {
        "time": "2026-11-25T15:42:27.219Z", "event": "tunnel-denied", "client": "172.18.0.1:40000",
        "fp": "SHA256:abc+/d", "key": "ED25519", "target": "ws-a", "dest": 'we ird"x:22',
        "reason": "not-permitted"}


def access_events(proxy: Proxy) -> list[dict[str, str]]:
    return [parse_logfmt(line) for line in proxy.access_log().splitlines() if line.strip()]


def log_mark(proxy: Proxy) -> int:
    """Number of access-log lines now: pass it as `since` to look only at what follows."""
    return len(access_events(proxy))


def wait_for_event(proxy: Proxy, since: int, deadline: float = 5, **want: str) -> dict[str, str]:
    """The first access-log event after line `since` whose fields include `want` (the log is
    written asynchronously from sshd's syslog); fails with the log lines since `since`."""
    found: list[dict[str, str]] = []

    def seen() -> bool:
        for event in access_events(proxy)[since:]:
            if all(event.get(k) == v for k, v in want.items()):
                found.append(event)
                return True
        return False

    if not wait_until(seen, deadline):
        # AssertionError, not pytest.fail: a missing event is a finding about the product
        raise AssertionError(f"no access-log event with {want} within {deadline} s; log since line "
                             f"{since}:\n" + "\n".join(proxy.access_log().splitlines()[since:])
                             + f"\n(proxy state: {proxy.state()!r})")
    return found[0]


def events_since(proxy: Proxy, since: int, **want: str) -> list[dict[str, str]]:
    return [e for e in access_events(proxy)[since:] if all(e.get(k) == v for k, v in want.items())]


# --------------------------------------------------------------------------- clients


def client_for(proxy: Proxy, key: KeyPair, proxy_key: KeyPair | None = None) -> SshClient:
    return SshClient(proxy_port=proxy, key=key, proxy_key=proxy_key)


def stdio_forward(proxy: Proxy, key: KeyPair, dest: str) -> subprocess.CompletedProcess:
    """`ssh -W DEST limited-user@proxy` with `key`, stdin closed: whatever DEST sends
    first (an sshd's `SSH-2.0-...` banner) comes out on stdout if the tunnel opens."""
    c = client_for(proxy, key)
    return c.run(c.direct_argv(opts=["-W", dest]), input="", timeout=30, text=False)


def assert_tunnel_opens(proxy: Proxy, key: KeyPair, dest: str) -> None:
    proc = stdio_forward(proxy, key, dest)
    assert proc.stdout.startswith(b"SSH-2.0-"), (
        f"-W {dest} did not relay an sshd banner: exit {proc.returncode}, stdout {proc.stdout[:200]!r}, "
        f"stderr {proc.stderr.decode(errors='replace')}")


def assert_tunnel_refused(proxy: Proxy, key: KeyPair, dest: str,
                          target: str | None = None) -> dict[str, str]:
    """-W DEST with `key` relays nothing, and the access log shows tunnel-denied."""
    mark = log_mark(proxy)
    proc = stdio_forward(proxy, key, dest)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.stdout == b"", f"-W {dest} relayed {proc.stdout[:200]!r}"
    assert proc.returncode == 255, f"-W {dest}: exit {proc.returncode}, stderr {stderr}"
    assert "stdio forwarding failed" in stderr, stderr
    want = {"event": "tunnel-denied", "fp": key.fingerprint, "dest": dest,
            "reason": "not-permitted"}
    if target is not None:
        want["target"] = target
    event = wait_for_event(proxy, mark, **want)
    # and that connection opened no tunnel at all
    assert not events_since(proxy, mark, event="tunnel", client=event["client"]), proxy.access_log()
    return event


def wait_for_key_refused(proxy: Proxy, key: KeyPair, deadline: float = REVOKE_DEADLINE) -> float:
    """Polls a plain login to the proxy with `key` until the proxy refuses the key itself
    (`Permission denied (publickey)`, not the no-shell message); returns the seconds it took."""
    c = client_for(proxy, key)
    started = time.monotonic()
    last: list[subprocess.CompletedProcess] = []

    def refused() -> bool:
        proc = c.direct_proxy("true", timeout=20)
        last[:] = [proc]
        return proc.returncode == 255 and "Permission denied" in proc.stderr

    if not wait_until(refused, deadline, interval=0.3):
        pytest.fail(f"the proxy still accepts key {key.fingerprint} after {deadline} s: exit "
                    f"{last[0].returncode}, stderr {last[0].stderr.strip()}\naccess log:\n{proxy.access_log()}",
                    pytrace=False)
    return time.monotonic() - started


def assert_no_tunnel_login(client: SshClient, host: str) -> None:
    proc = client.ssh(host, "hostname", timeout=30)
    assert proc.returncode == 255, f"login to {host} exit {proc.returncode}: {proc.stdout} {proc.stderr}"
    assert proc.stdout == "", proc.stdout


# --------------------------------------------------------------------------- module fixtures


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, KeyPair]:
    directory = tmp_path_factory.mktemp("isolation-keys")
    return {name: make_keypair(directory, name) for name in ("a", "b", "c", "unknown", "outsider")}


@pytest.fixture(scope="module")
def label_value() -> str:
    return secrets.token_hex(4)


@pytest.fixture(scope="module")
def proxy(request, proxy_image, test_network, session_id, label_value) -> Iterator[Proxy]:
    """One ssh-proxy for the module, started like conftest's start_proxy, serving only
    containers labelled ssh-proxy-isolation=<this module's value>."""
    name = f"ssh-proxy-test-iso-{secrets.token_hex(4)}"
    cid = docker("run", "-d", "--name", name, "--network", test_network,
                 "--label", f"{TEST_LABEL}=1", "--label", f"{SESSION_LABEL}={session_id}",
                 "-p", "127.0.0.1::22", "-v", f"{DOCKER_SOCKET}:{DOCKER_SOCKET}",
                 "-e", f"SSH_TARGET_LABELS={ISO_LABEL}={label_value}", proxy_image).stdout.strip()
    started = Proxy(name=name, id=cid)
    failed_before = request.session.testsfailed
    try:
        wait_for_proxy_banner(started)
        yield started
    finally:
        if request.session.testsfailed > failed_before:
            print(f"\n===== logs of proxy {name} =====\n{started.logs()}")
            print(f"===== /etc/ssh/access.log of {name} =====\n{started.access_log()}")
        started.remove()


def run_target(name: str, key: KeyPair, network: str, session_id: str,
               labels: Mapping[str, str] | None = None, serve_publickey: bool = True) -> Target:
    cid = docker("run", "-d", "--name", name, "--hostname", name, "--network", network,
                 "--label", f"{TEST_LABEL}=1", "--label", f"{SESSION_LABEL}={session_id}",
                 *label_args(labels), "-e", f"SERVE_PUBLICKEY={1 if serve_publickey else 0}",
                 "-e", f"TARGET_PUBKEY={key.public}", TARGET_IMAGE).stdout.strip()
    target = Target(name=name, id=cid, network=network, hostname=name)
    try:
        target.refresh_ip()
        wait_for_target_sshd(target)
        if serve_publickey and not wait_until(lambda: port_open(target.ip, 8080), 10):
            pytest.fail(f"target {name}: /publickey port closed; logs:\n{target.logs()}", pytrace=False)
    except BaseException:
        target.remove()
        raise
    return target


@pytest.fixture(scope="module")
def targets(request, proxy, keys, target_image, test_network, session_id, label_value) -> Iterator[dict[str, Target]]:
    """{"a": A, "b": B, "outsider": O}: A serves /publickey, B's key is read by docker exec,
    O publishes its key by HTTP but lacks the label."""
    suffix = secrets.token_hex(3)
    labels = {ISO_LABEL: label_value}
    started: dict[str, Target] = {}
    failed_before = request.session.testsfailed
    try:
        started["a"] = run_target(f"iso-a-{suffix}", keys["a"], test_network, session_id, labels)
        started["b"] = run_target(f"iso-b-{suffix}", keys["b"], test_network, session_id, labels,
                                  serve_publickey=False)
        started["outsider"] = run_target(f"iso-outsider-{suffix}", keys["outsider"], test_network, session_id,
                                         {ISO_LABEL: "someone-else"})
        wait_for_login(client_for(proxy, keys["a"]), started["a"].name, deadline=20)
        wait_for_login(client_for(proxy, keys["b"]), started["b"].name, deadline=20)
        yield started
    finally:
        failed = request.session.testsfailed > failed_before
        for target in started.values():
            if failed:
                print(f"\n===== logs of target {target.name} =====\n{target.logs()}")
            target.remove()


@pytest.fixture(scope="module")
def proxy_ip(proxy, test_network) -> str:
    return docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{test_network}").IPAddress}}}}',
                  proxy.id).stdout.strip()


# --------------------------------------------------------------------------- tests


def test_own_target_reachable_by_its_aliases(proxy, keys, targets):
    a = targets["a"]
    for dest in (a.name, a.ip, a.id[:12]):
        assert_tunnel_opens(proxy, keys["a"], f"{dest}:22")
    mark = log_mark(proxy)
    proc = client_for(proxy, keys["a"]).ssh(a.name, "hostname", check=True)
    assert proc.stdout.strip() == a.hostname
    fp = keys["a"].fingerprint
    tunnel = wait_for_event(proxy, mark, event="tunnel", fp=fp, dest=f"{a.name}:22", target=a.name)
    assert "reason" not in tunnel, tunnel  # connected
    client = tunnel["client"]
    wait_for_event(proxy, mark, event="accepted", fp=fp, key="ED25519", target=a.name, client=client)
    closed = wait_for_event(proxy, mark, event="closed", fp=fp, target=a.name, client=client)
    assert float(closed["duration"]) >= 0


@pytest.mark.parametrize("alias", ["name", "ip", "short-id"])
def test_key_of_a_cannot_reach_b(proxy, keys, targets, alias):
    a, b = targets["a"], targets["b"]
    dest = {"name": b.name, "ip": b.ip, "short-id": b.id[:12]}[alias]
    # B is served under this alias (its own key opens it) ...
    assert_tunnel_opens(proxy, keys["b"], f"{dest}:22")
    # ... but not with A's key, not even with B's login key in hand for the target hop
    assert_tunnel_refused(proxy, keys["a"], f"{dest}:22", target=b.name)
    mark = log_mark(proxy)
    assert_no_tunnel_login(client_for(proxy, keys["b"], proxy_key=keys["a"]), dest)
    wait_for_event(proxy, mark, event="tunnel-denied", fp=keys["a"].fingerprint, dest=f"{dest}:22")
    assert_tunnel_refused(proxy, keys["a"], f"{dest}:8080", target=b.name)
    # B itself keeps working
    assert client_for(proxy, keys["b"]).ssh(dest, "hostname", check=True).stdout.strip() == b.hostname


@pytest.mark.parametrize("which", ["container-name", "short-id", "network-ip", "localhost",
                                   "127.0.0.1", "127.1", "0.0.0.0", "::1"])
def test_key_cannot_reach_the_proxy_itself(proxy, proxy_ip, keys, targets, which):
    host = {"container-name": proxy.name, "short-id": proxy.id[:12], "network-ip": proxy_ip,
            "localhost": "localhost"}.get(which, which)
    dest = f"[{host}]:22" if ":" in host else f"{host}:22"
    # the proxy's sshd does listen there: an opened tunnel would relay its banner
    assert listening_inside(proxy.id, 22)
    assert_tunnel_refused(proxy, keys["a"], dest, target=targets["a"].name)


def test_key_cannot_reach_undiscovered_hosts(proxy, keys, targets):
    outsider = targets["outsider"]
    # the outsider runs an sshd and publishes a key, but lacks the label: never a target
    assert port_open(outsider.ip, 22) and port_open(outsider.ip, 8080)
    for dest in ("nowhere:22", f"{outsider.name}:22", f"{outsider.ip}:22", f"{outsider.id[:12]}:22"):
        assert_tunnel_refused(proxy, keys["a"], dest, target=targets["a"].name)
    mark = log_mark(proxy)
    proc = client_for(proxy, keys["outsider"]).ssh(outsider.name, "true", timeout=30)
    assert proc.returncode == 255 and "Permission denied" in proc.stderr, proc.stderr
    wait_for_event(proxy, mark, event="denied", fp=keys["outsider"].fingerprint, reason="unknown-key",
                   target="-")
    assert keys["outsider"].public.split()[1] not in proxy.read_file("/etc/ssh/authorized_keys_cache")


@pytest.mark.parametrize("claim", ["hostname", "network-alias", "gateway-hostname"])
def test_ip_shaped_hostname_or_alias_grants_no_other_host(proxy, keys, targets, label_value, test_network,
                                                          start_target, keypair, claim):
    outsider = targets["outsider"]
    assert port_open(outsider.ip, 22)  # an sshd that is no target's: what is at stake
    if claim == "gateway-hostname":  # the Docker host, as seen from the test network
        stolen = docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}",
                        test_network).stdout.strip()
        assert stolen
    else:
        stolen = outsider.ip
    key = keypair(f"mallory-{claim}")
    kwargs = {"network_aliases": [stolen]} if claim == "network-alias" else {"hostname": stolen}
    mallory = start_target(f"iso-mallory-{secrets.token_hex(3)}", key, labels={ISO_LABEL: label_value},
                           **kwargs)
    wait_for_login(client_for(proxy, key), mallory.name, deadline=20)  # mallory is a target
    assert_tunnel_opens(proxy, key, f"{mallory.ip}:22")
    assert_tunnel_refused(proxy, key, f"{stolen}:22")
    assert f'permitopen="{stolen}:' not in proxy.read_file("/etc/ssh/authorized_keys_cache")


SHELL_PROBE = "echo PWNED-$((6*7)); id\n"


@pytest.mark.parametrize("mode", ["shell", "shell-tty", "command", "command-tty"])
def test_no_shell_and_no_command(proxy, keys, targets, mode):
    c = client_for(proxy, keys["a"])
    opts = ["-tt"] if mode.endswith("-tty") else ["-T"]
    args = ("echo", "PWNED-$((6*7))", ";", "id") if mode.startswith("command") else ()
    mark = log_mark(proxy)
    proc = c.direct_proxy(*args, opts=opts, input=SHELL_PROBE, timeout=30)
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, -9), f"exit {proc.returncode}: {out}"
    if mode.endswith("-tty"):
        # PermitTTY no: the client treats the refused (forced) pty as fatal and closes
        # before it prints what the forced command wrote; without a tty, the message shows.
        assert "PTY allocation request failed" in proc.stderr, out
    else:
        assert NO_SHELL_MESSAGE in proc.stderr, out
    assert "PWNED-42" not in out and "uid=" not in out, out
    assert not re.search(r"^\S*[#$] ", proc.stdout, re.M), proc.stdout
    reason = "exec" if mode.startswith("command") else "shell"
    refused = wait_for_event(proxy, mark, event="session-refused", fp=keys["a"].fingerprint, reason=reason,
                             target=targets["a"].name)
    wait_for_event(proxy, mark, event="closed", fp=keys["a"].fingerprint, target=targets["a"].name,
                   client=refused["client"])


def test_sftp_directly_to_proxy_fails(proxy, keys, targets, tmp_path):
    c = client_for(proxy, keys["a"])
    argv = ["sftp", "-P", str(proxy.port), "-i", str(keys["a"].private), "-F", "/dev/null",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "ConnectTimeout=10",
            "-b", "-", f"{c.proxy_user}@127.0.0.1"]
    mark = log_mark(proxy)
    proc = c.run(argv, input=f"ls /\nget /etc/passwd {tmp_path / 'passwd'}\n", timeout=30)
    assert proc.returncode not in (0, -9), proc
    assert not (tmp_path / "passwd").exists()
    assert "etc" not in proc.stdout.split()
    wait_for_event(proxy, mark, event="session-refused", fp=keys["a"].fingerprint, reason="subsystem",
                   target=targets["a"].name)


@pytest.mark.parametrize("spec,reason", [("0:127.0.0.1:9", "remote-forward"),
                                         ("/tmp/iso-remote.sock:127.0.0.1:9", "remote-streamlocal")])
def test_remote_forwarding_refused(proxy, keys, targets, spec, reason):
    c = client_for(proxy, keys["a"])
    mark = log_mark(proxy)
    proc = c.direct_proxy(opts=["-N", "-o", "ExitOnForwardFailure=yes", "-R", spec], timeout=30)
    # -N would wait forever if the forward were set up: -9 (timeout) is a failure too
    assert proc.returncode == 255, f"exit {proc.returncode}: {proc.stderr}"
    assert "forwarding failed" in proc.stderr, proc.stderr
    wait_for_event(proxy, mark, event="forward-refused", fp=keys["a"].fingerprint, reason=reason,
                   target=targets["a"].name)
    if reason == "remote-streamlocal":
        assert proxy.exec(["test", "-e", "/tmp/iso-remote.sock"]).returncode != 0


def test_agent_forwarding_refused(proxy, keys, targets, tmp_path):
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(sock.exists, 10), "ssh-agent did not start"
        subprocess.run(["ssh-add", str(keys["a"].private)], env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
                       check=True, capture_output=True, timeout=30)
        # not SshClient.direct_argv: its IdentityAgent=none makes ssh skip agent forwarding
        argv = ["ssh", "-v", "-A", "-p", str(proxy.port), "-i", str(keys["a"].private), "-F", "/dev/null",
                "-o", f"IdentityAgent={sock}", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                f"{PROXY_USER}@127.0.0.1", "echo SOCK=$SSH_AUTH_SOCK; ssh-add -L"]
        mark = log_mark(proxy)
        proc = SshClient.run(argv, timeout=30)
        assert "Requesting authentication agent forwarding" in proc.stderr, proc.stderr  # it was asked
        assert proc.returncode not in (0, -9)
        assert "SOCK=" not in proc.stdout and "ssh-ed25519" not in proc.stdout, proc.stdout
        wait_for_event(proxy, mark, event="forward-refused", fp=keys["a"].fingerprint, reason="agent",
                       target=targets["a"].name)
        # no agent socket was created in the proxy
        found = proxy.exec("find / -xdev \\( -name 'agent.*' -o -name 'auth-agent*' \\) -type s 2>/dev/null")
        assert found.stdout.strip() == ""
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def _unix_http_get(path: Path) -> bytes:
    """Sends `GET /version` to the unix socket at `path`; returns what came back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"GET /version HTTP/1.0\r\nHost: docker\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return data


def _tcp_http_get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(10)
        s.sendall(b"GET /version HTTP/1.0\r\nHost: docker\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return data


@pytest.mark.parametrize("local", ["unix", "tcp"])
def test_docker_socket_never_reachable(proxy, keys, targets, tmp_path, local):
    """-L <local>:/var/run/docker.sock: the listener is local, so ssh starts; every
    connection through it must be refused by the proxy (the socket is mounted there)."""
    assert proxy.exec(["test", "-S", DOCKER_SOCKET]).returncode == 0  # what is at stake
    if local == "unix":
        listen = tmp_path / "docker.sock"
        spec, ready = f"{listen}:{DOCKER_SOCKET}", lambda: listen.exists()
        get = lambda: _unix_http_get(listen)  # noqa: E731
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spec, ready = f"127.0.0.1:{port}:{DOCKER_SOCKET}", lambda: port_open("127.0.0.1", port)
        get = lambda: _tcp_http_get(port)  # noqa: E731
    c = client_for(proxy, keys["a"])
    mark = log_mark(proxy)
    ssh = subprocess.Popen(c.direct_argv(opts=["-N", "-o", "ExitOnForwardFailure=yes", "-L", spec]),
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: ready() or ssh.poll() is not None, 20), "ssh -L did not start"
        assert ssh.poll() is None, f"ssh -L exited {ssh.returncode}: {ssh.stderr.read().decode(errors='replace')}"
        for _ in range(2):  # the listener survives a refused connection; the second is refused too
            answer = get()
            assert b"ApiVersion" not in answer and b"HTTP/" not in answer, answer[:300]
        refused = wait_for_event(proxy, mark, event="forward-refused", fp=keys["a"].fingerprint,
                                 reason="local-streamlocal", dest=DOCKER_SOCKET, target=targets["a"].name)
        assert len(events_since(proxy, mark, event="forward-refused", client=refused["client"])) >= 1
    finally:
        ssh.terminate()
        ssh.communicate(timeout=10)
    assert not events_since(proxy, mark, event="tunnel", client=refused["client"]), proxy.access_log()


def test_unknown_key_denied(proxy, keys, targets):
    a = targets["a"]
    mark = log_mark(proxy)
    # the target hop would accept A's key: only the proxy hop can refuse
    assert_no_tunnel_login(client_for(proxy, keys["a"], proxy_key=keys["unknown"]), a.name)
    proc = stdio_forward(proxy, keys["unknown"], f"{a.name}:22")
    assert proc.returncode == 255 and proc.stdout == b""
    assert b"Permission denied (publickey)" in proc.stderr, proc.stderr
    event = wait_for_event(proxy, mark, event="denied", fp=keys["unknown"].fingerprint, reason="unknown-key")
    assert event["target"] == "-", event
    assert not events_since(proxy, mark, event="accepted", fp=keys["unknown"].fingerprint)


def test_stopped_removed_and_restarted_target(proxy, keys, targets, label_value, start_target):
    """A target's key is revoked when it stops and when it is removed, and authorised again
    when it starts; another target keeps working throughout."""
    b = targets["b"]
    b_client = client_for(proxy, keys["b"])
    c = start_target(f"iso-c-{secrets.token_hex(3)}", keys["c"], labels={ISO_LABEL: label_value})
    c_client = client_for(proxy, keys["c"])
    fp = keys["c"].fingerprint

    def b_works() -> None:
        assert b_client.ssh(b.name, "hostname", check=True).stdout.strip() == b.hostname

    wait_for_login(c_client, c.name, deadline=20)
    mark = log_mark(proxy)
    assert c_client.ssh(c.name, "hostname", check=True).stdout.strip() == c.name
    wait_for_event(proxy, mark, event="accepted", fp=fp, target=c.name)

    # stop -> revoked
    c.stop(timeout=2)
    mark = log_mark(proxy)
    assert wait_for_key_refused(proxy, keys["c"]) < REVOKE_DEADLINE
    wait_for_event(proxy, mark, event="denied", fp=fp, reason="unknown-key", target="-")
    assert_no_tunnel_login(c_client, c.name)
    b_works()

    # start -> authorised again (key fetched again)
    c.start()
    mark = log_mark(proxy)
    assert wait_for_login(c_client, c.name, deadline=REVOKE_DEADLINE) < REVOKE_DEADLINE
    assert c_client.ssh(c.name, "hostname", check=True).stdout.strip() == c.name
    wait_for_event(proxy, mark, event="accepted", fp=fp, target=c.name)
    wait_for_event(proxy, mark, event="tunnel", fp=fp, target=c.name, dest=f"{c.name}:22")
    b_works()

    # removed -> revoked
    c.remove()
    mark = log_mark(proxy)
    assert wait_for_key_refused(proxy, keys["c"]) < REVOKE_DEADLINE
    wait_for_event(proxy, mark, event="denied", fp=fp, reason="unknown-key", target="-")
    assert keys["c"].public.split()[1] not in proxy.read_file("/etc/ssh/authorized_keys_cache")
    b_works()
