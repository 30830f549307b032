"""Which targets and ports the proxy serves: SSH_PERMIT_TARGET_HOST, SSH_PERMIT_TARGET_PORT
and SSH_TARGET_LABELS.

Every "not served" check has a served control in the same test: the targets are started
before the proxy, so the proxy sees them in one listing; once the served one lets us in,
the proxy has decided about the others too.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess

import pytest

from helpers import Proxy, SshClient, access_events, status, wait_for_event, wait_for_login, wait_until

HTTP_GET = "GET /publickey HTTP/1.0\r\nHost: x\r\n\r\n"

# ---------------------------------------------------------------- helpers (proxy state)


def wait_for_ignored(proxy: Proxy, name: str, deadline: float = 10) -> str:
    """The reason status.json gives for not serving `name`."""
    reasons: dict[str, str] = {}

    def listed() -> bool:
        reasons.clear()
        reasons.update({i["name"]: i["reason"] for i in status(proxy).get("ignored", [])})
        return name in reasons

    if not wait_until(listed, deadline, interval=0.5):
        pytest.fail(f"{name} not listed under `ignored` in status.json within {deadline} s:\n"
                    f"{json.dumps(status(proxy), indent=1)}", pytrace=False)
    return reasons[name]


def cache_lines(proxy: Proxy) -> list[str]:
    text = proxy.read_file("/etc/ssh/authorized_keys_cache")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def permitopens(line: str) -> list[tuple[str, str]]:
    return [tuple(v.rsplit(":", 1)) for v in re.findall(r'permitopen="([^"]*)"', line)]


def assert_not_served(proxy: Proxy, key, target_name: str, expect_reason: str) -> None:
    """`key` (the excluded target's own) cannot even log in to the proxy, the proxy says
    why it ignores the target, and no cache line carries the key."""
    refused = SshClient(proxy, key).ssh(target_name, "true", timeout=30)
    assert refused.returncode == 255, (refused.returncode, refused.stderr)
    assert "Permission denied" in refused.stderr, refused.stderr
    wait_for_event(proxy, event="denied", fp=key.fingerprint, deadline=10)
    assert not access_events(proxy, event="accepted", fp=key.fingerprint)
    reason = wait_for_ignored(proxy, target_name)
    assert expect_reason in reason, reason
    assert target_name not in [t["name"] for t in status(proxy)["targets"]]
    assert not [line for line in cache_lines(proxy) if key.blob in line]


def tunnel(proxy: Proxy, key, host: str, port: int, payload: str = "") -> subprocess.CompletedProcess:
    """`ssh -W host:port limited-user@proxy` with `payload` on stdin (then EOF)."""
    return SshClient(proxy, key).direct_proxy(opts=["-W", f"{host}:{port}"], input=payload, timeout=30)


# ---------------------------------------------------------------- SSH_PERMIT_TARGET_HOST


def test_host_glob_serves_matching_names_only(start_target, start_proxy, keypair):
    sfx = secrets.token_hex(3)
    ws_key, db_key = keypair("ws"), keypair("db")
    ws = start_target(f"workspace-a-{sfx}", ws_key)
    db = start_target(f"db-1-{sfx}", db_key)
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": "workspace-*"})

    wait_for_login(SshClient(proxy, ws_key), ws.name)
    assert_not_served(proxy, db_key, db.name, "SSH_PERMIT_TARGET_HOST")
    # ... and the served key does not open the excluded target either.
    denied = tunnel(proxy, ws_key, db.name, 22)
    assert denied.returncode != 0 and "SSH-2.0-" not in denied.stdout, denied
    wait_for_event(proxy, event="tunnel-denied", fp=ws_key.fingerprint, dest=f"{db.name}:22", deadline=10)


def test_host_comma_list(start_target, start_proxy, keypair):
    sfx = secrets.token_hex(3)
    a_key, db_key, b_key = keypair("a"), keypair("db"), keypair("b")
    ws_a = start_target(f"workspace-a-{sfx}", a_key)
    db = start_target(f"db-1-{sfx}", db_key)
    ws_b = start_target(f"workspace-b-{sfx}", b_key)
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": f"workspace-a-{sfx},db-*"})

    wait_for_login(SshClient(proxy, a_key), ws_a.name)
    wait_for_login(SshClient(proxy, db_key), db.name)
    assert_not_served(proxy, b_key, ws_b.name, "SSH_PERMIT_TARGET_HOST")


# ---------------------------------------------------------------- SSH_PERMIT_TARGET_PORT


@pytest.mark.parametrize(("ports", "open_8080", "permitopen_ports", "sshd_permitopen"), [
    ("22", False, {"22"}, "*:22"),
    ("22,8080", True, {"22", "8080"}, "*:22 *:8080"),
    (None, True, {"*"}, "any"),
], ids=["22", "22,8080", "default"])
def test_permit_target_port(start_target, start_proxy, keypair, ports, open_8080, permitopen_ports,
                            sshd_permitopen):
    key = keypair("ws")
    target = start_target(f"workspace-p-{secrets.token_hex(3)}", key)  # serves 0.0.0.0:8080
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_PORT": ports} if ports else None)

    wait_for_login(SshClient(proxy, key), target.name)
    ssh22 = tunnel(proxy, key, target.name, 22)
    assert ssh22.returncode == 0 and ssh22.stdout.startswith("SSH-2.0-"), ssh22

    http = tunnel(proxy, key, target.name, 8080, HTTP_GET)
    if open_8080:
        assert http.returncode == 0, http
        assert http.stdout.startswith("HTTP/1.0 200"), http.stdout
        assert key.blob in http.stdout
        wait_for_event(proxy, event="tunnel", fp=key.fingerprint, dest=f"{target.name}:8080",
                       deadline=10)
    else:
        assert http.returncode == 255, http
        assert "HTTP/" not in http.stdout, http.stdout
        assert "forwarding failed" in http.stderr or "open failed" in http.stderr, http.stderr
        wait_for_event(proxy, event="tunnel-denied", fp=key.fingerprint, dest=f"{target.name}:8080",
                       deadline=10)

    # The key's own permitopen options carry exactly these ports ...
    lines = [line for line in cache_lines(proxy) if key.blob in line]
    assert len(lines) == 1, lines
    assert {port for _, port in permitopens(lines[0])} == permitopen_ports, lines[0]
    # ... and sshd_config's PermitOpen is the port ceiling on top.
    effective = proxy.exec("sshd -T -f /etc/ssh/sshd_config | grep -i '^permitopen '", check=True)
    assert effective.stdout.split(None, 1)[1].strip() == sshd_permitopen, effective.stdout


# ---------------------------------------------------------------- SSH_TARGET_LABELS


def test_labels_all_must_match(start_target, start_proxy, keypair):
    sfx = secrets.token_hex(3)
    keys = {n: keypair(n) for n in ("good", "bare", "team_b", "no_ssh")}
    good = start_target(f"lbl-good-{sfx}", keys["good"], labels={"team": "a", "ssh": "anything"})
    bare = start_target(f"lbl-bare-{sfx}", keys["bare"], labels={"team": "a", "ssh": None})
    team_b = start_target(f"lbl-team-b-{sfx}", keys["team_b"], labels={"team": "b", "ssh": "yes"})
    no_ssh = start_target(f"lbl-no-ssh-{sfx}", keys["no_ssh"], labels={"team": "a"})
    proxy = start_proxy(env={"SSH_TARGET_LABELS": "team=a,ssh"})

    wait_for_login(SshClient(proxy, keys["good"]), good.name)
    wait_for_login(SshClient(proxy, keys["bare"]), bare.name)  # `ssh` set with an empty value
    assert_not_served(proxy, keys["team_b"], team_b.name, "team")
    assert_not_served(proxy, keys["no_ssh"], no_ssh.name, "ssh")
