"""The operator's commands against a really running watcher in Docker mode:
`docker exec <proxy> watcher status | logs`, as an operator types them (no tty: no colour)."""

from __future__ import annotations

import re

import json

import jsonschema
import pytest

from helpers import (SshClient, docker, run_proxy_container, unique_name, wait_for_event,
                     wait_for_login, wait_for_status)
from watcher.snapshot import JSON_SCHEMA, from_json


@pytest.fixture
def served(start_target, start_proxy, keypair):
    """A proxy serving one target, after one login and one refused key."""
    key, stranger = keypair("cmd"), keypair("stranger")
    target = start_target(unique_name("cmd-target"), key)
    proxy = start_proxy()
    wait_for_login(SshClient(proxy, key), target.name)
    SshClient(proxy, stranger).ssh(target.name, "true", timeout=30)
    wait_for_event(proxy, event="denied", fp=stranger.fingerprint, deadline=10)
    # status.json lags the proxy by up to 2 s: wait until it shows what happened
    wait_for_status(proxy, lambda d: d["source"]["connected"] and any(
        t["name"] == target.name and t["key_status"] == "ok" for t in d["targets"]))
    return proxy, target, key, stranger


def test_status_shows_targets_keys_and_access(served):
    proxy, target, key, _ = served
    result = proxy.exec(["watcher", "status"])
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    assert "\x1b[" not in text  # not a terminal: plain text
    lines = text.splitlines()
    assert any(line.split()[:2] == ["mode", "docker"] for line in lines), text
    assert "connected since" in text, text
    [row] = [line for line in lines if line.lstrip().startswith(target.name + " ")]
    assert key.fingerprint in row and " api " in row and " ok, " in row, row
    assert "event=accepted" not in text  # readable form, not the raw log
    assert any("accepted" in line and key.fingerprint in line for line in lines), text
    assert lines[-1] == "healthy"


def test_status_json_is_the_documented_schema(served):
    proxy, target, key, _ = served
    result = proxy.exec(["watcher", "status", "--json"])
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), JSON_SCHEMA)
    doc = from_json(result.stdout)
    assert doc.mode == "docker" and doc.state.source.connected
    [row] = [t for t in doc.state.targets if t.name == target.name]
    assert row.fingerprints == (key.fingerprint,) and row.via == "http"
    assert row.keys[0].key_type == "ssh-ed25519"
    assert doc.state.last_event > 0 and doc.state.last_write > 0


def test_logs_filters(served):
    proxy, target, key, stranger = served
    result = proxy.exec(["watcher", "logs", "--json", "--event", "denied", "--since", "10m"])
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events and {e["event"] for e in events} == {"denied"}
    assert stranger.fingerprint in {e.get("fp") for e in events}
    mine = proxy.exec(["watcher", "logs", "--target", target.name])
    assert mine.returncode == 0, mine.stderr
    assert mine.stdout and all(f"target={target.name}" in line for line in mine.stdout.splitlines())
    assert any("accepted" in line and key.fingerprint in line for line in mine.stdout.splitlines())


def test_not_running_exit_code(proxy_image):
    """The proxy's image without its watcher: no snapshot, one line, exit 3."""
    result = docker("run", "--rm", "--entrypoint", "watcher", proxy_image, "status", check=False)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.count("\n") == 1
    assert result.stdout.startswith(
        "the watcher is not running: /run/ssh-proxy/status.json does not exist")


def test_unhealthy_exit_code(test_network, session_id, proxy_image, request):
    """Docker mode without a reachable Docker: sshd serves, the source cannot connect."""
    started = []
    try:
        proxy = run_proxy_container(test_network, session_id, image=proxy_image,
                                    env={"SSH_PROXY_MODE": "docker"}, docker_socket=False,
                                    track=started.append)
        wait_for_status(proxy, lambda d: d["source"]["reconnects"] > 0 or d["source"]["error"],
                        deadline=60)
        result = proxy.exec(["watcher", "status"])
        assert result.returncode == 1, result.stdout + result.stderr
        last = result.stdout.splitlines()[-1]
        assert re.match(r"unhealthy: docker source is (not connected|reconnecting \(attempt \d+\)): ",
                        last), result.stdout
        assert "reconnecting" in result.stdout or "connecting" in result.stdout
    finally:
        for proxy in started:
            proxy.remove()


def test_status_shows_admin_keys_with_their_file_line(start_target, start_proxy, keypair, tmp_path):
    own, admin = keypair("own"), keypair("admin")
    target = start_target(unique_name("cmd-admin"), own)
    keys_dir = tmp_path / "keys.d"
    keys_dir.mkdir()
    (keys_dir / "admin.pub").write_text("# the on-call admin\n" + admin.public + "\n")
    proxy = start_proxy(volumes=[f"{keys_dir}:/etc/ssh/authorized_keys.d"])
    wait_for_login(SshClient(proxy, own), target.name)
    wait_for_status(proxy, lambda d: d["manual"]["keys"] == 1 and d["source"]["connected"])
    result = proxy.exec(["watcher", "status"])
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.lstrip().startswith("admin key ")]
    assert len(rows) == 1, result.stdout
    row = rows[0]
    assert admin.fingerprint in row, row
    assert "manual /etc/ssh/authorized_keys.d/admin.pub:2" in row, row
    assert "discovered targets" in row, row
