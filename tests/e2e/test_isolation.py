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
from typing import Iterator

import pytest

from helpers import (
    DOCKER_SOCKET,
    PROXY_USER,
    KeyPair,
    Proxy,
    SshClient,
    Target,
    access_events,
    docker,
    free_port,
    listening_inside,
    log_mark,
    make_keypair,
    module_containers,
    parse_logfmt,
    port_open,
    run_proxy_container,
    run_target_container,
    unique_name,
    wait_for_event,
    wait_for_login,
    wait_until,
)

ISO_LABEL = "ssh-proxy-isolation"
NO_SHELL_MESSAGE = "only opens tunnels"
REVOKE_DEADLINE = 10.0


# --------------------------------------------------------------------------- access log


def test_parse_logfmt():
    line = ('2026-11-25T15:42:27.219Z event=tunnel-denied client=172.18.0.1:40000 fp=SHA256:abc+/d '
            'key=ED25519 target=ws-a dest="we ird\\"x:22" reason=not-permitted')
    assert parse_logfmt(line) == {
        "time": "2026-11-25T15:42:27.219Z", "event": "tunnel-denied", "client": "172.18.0.1:40000",
        "fp": "SHA256:abc+/d", "key": "ED25519", "target": "ws-a", "dest": 'we ird"x:22',
        "reason": "not-permitted"}


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
    assert not access_events(proxy, mark, event="tunnel", client=event["client"]), proxy.access_log()
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
    with module_containers(request) as started:
        yield run_proxy_container(test_network, session_id, name=unique_name("ssh-proxy-test-iso"),
                                  image=proxy_image, env={"SSH_TARGET_LABELS": f"{ISO_LABEL}={label_value}"},
                                  track=started.append)


@pytest.fixture(scope="module")
def targets(request, proxy, keys, target_image, test_network, session_id, label_value) -> Iterator[dict[str, Target]]:
    """{"a": A, "b": B, "outsider": O}: A serves /publickey, B's key is read by docker exec,
    O publishes its key by HTTP but lacks the label."""
    suffix = secrets.token_hex(3)
    labels = {ISO_LABEL: label_value}
    with module_containers(request) as started:
        def run(name: str, key: KeyPair, **kwargs) -> Target:
            return run_target_container(name, key, test_network, session_id, image=target_image,
                                        track=started.append, **kwargs)

        a = run(f"iso-a-{suffix}", keys["a"], labels=labels)
        b = run(f"iso-b-{suffix}", keys["b"], labels=labels, serve_publickey=False)
        outsider = run(f"iso-outsider-{suffix}", keys["outsider"], labels={ISO_LABEL: "someone-else"})
        wait_for_login(client_for(proxy, keys["a"]), a.name, deadline=20)
        wait_for_login(client_for(proxy, keys["b"]), b.name, deadline=20)
        yield {"a": a, "b": b, "outsider": outsider}


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
    assert keys["outsider"].blob not in proxy.read_file("/etc/ssh/authorized_keys_cache")


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


def _get_version(family: socket.AddressFamily, address: str | tuple[str, int]) -> bytes:
    """Sends `GET /version` to the unix socket path or TCP address; returns what came back."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(address)
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
        get = lambda: _get_version(socket.AF_UNIX, str(listen))  # noqa: E731
    else:
        port = free_port()
        spec, ready = f"127.0.0.1:{port}:{DOCKER_SOCKET}", lambda: port_open("127.0.0.1", port)
        get = lambda: _get_version(socket.AF_INET, ("127.0.0.1", port))  # noqa: E731
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
        assert len(access_events(proxy, mark, event="forward-refused", client=refused["client"])) >= 1
    finally:
        ssh.terminate()
        ssh.communicate(timeout=10)
    assert not access_events(proxy, mark, event="tunnel", client=refused["client"]), proxy.access_log()


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
    assert not access_events(proxy, mark, event="accepted", fp=keys["unknown"].fingerprint)


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
    assert keys["c"].blob not in proxy.read_file("/etc/ssh/authorized_keys_cache")
    b_works()
