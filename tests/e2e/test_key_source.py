"""SSH_TARGET_KEY_SOURCE: where the proxy reads a target's key, with the real engine.

The target serves key A over HTTP (GET /publickey) and has key B in its key file; its own
sshd accepts both, so whichever key the proxy learns is the one that gets through. With
`api` only A logs in and the proxy never execs into a target (an exec-only target is not
served); with `exec` only B logs in and the proxy never sends the target a request; the
default `api,exec` takes A (HTTP first) and falls back to exec for the exec-only target.
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from helpers import (
    KeyPair,
    Proxy,
    SshClient,
    Target,
    access_events,
    docker,
    wait_for_event,
    wait_for_login,
    wait_for_status,
    wait_until,
)


def start_two_key_target(start_target, tmp_path: Path, name: str, http_key: KeyPair,
                         file_key: KeyPair) -> Target:
    """A target whose /publickey answers `http_key` while its key file holds `file_key`;
    its sshd accepts both."""
    body = tmp_path / f"{name}.publickey"
    body.write_text(http_key.public + "\n")
    body.chmod(0o644)
    target = start_target(name, file_key, body_file=body)
    target.exec(f"printf '%s\\n' '{http_key.public}' >>/root/.ssh/authorized_keys", check=True)
    return target


def assert_denied(proxy: Proxy, key: KeyPair, host: str) -> None:
    """`key` does not even get past the proxy."""
    refused = SshClient(proxy, key).ssh(host, "true", timeout=30)
    assert refused.returncode == 255, (refused.returncode, refused.stderr)
    assert "Permission denied" in refused.stderr, refused.stderr
    wait_for_event(proxy, event="denied", fp=key.fingerprint, deadline=10)
    assert not access_events(proxy, event="accepted", fp=key.fingerprint)


def served_fingerprints(proxy: Proxy, name: str, deadline: float = 40) -> dict:
    """The status row of target `name` once its key fetch has an outcome."""
    def decided(doc: dict) -> bool:
        return any(t["name"] == name and t["key_status"] in ("ok", "failed")
                   for t in doc.get("targets", []))

    doc = wait_for_status(proxy, decided, deadline=deadline)
    return next(t for t in doc["targets"] if t["name"] == name)


def exec_actions(container_id: str, since: float) -> list[str]:
    """The key-file reads (`cat -- …`) Docker recorded as execs in the container since `since`
    (a Unix time): the proxy's fetches, not the test's own set-up execs just before."""
    until = f"{time.time():.3f}"
    proc = docker("events", "--since", f"{since:.3f}", "--until", until,
                  "--filter", f"container={container_id}", "--format", "{{.Action}}", timeout=60)
    return [line for line in proc.stdout.splitlines()
            if line.startswith(("exec_create", "exec_start")) and "cat -- " in line]


def test_api_only_serves_the_http_key_and_never_execs(start_target, start_proxy, keypair, tmp_path):
    sfx = secrets.token_hex(3)
    key_a, key_b, key_c = keypair("a"), keypair("b"), keypair("c")
    both = start_two_key_target(start_target, tmp_path, f"ks-api-{sfx}", key_a, key_b)
    exec_only = start_target(f"ks-api-exec-only-{sfx}", key_c, serve_publickey=False)
    since = time.time() - 1
    proxy = start_proxy(env={"SSH_TARGET_KEY_SOURCE": "api"})

    wait_for_login(SshClient(proxy, key_a), both.name)
    assert_denied(proxy, key_b, both.name)

    # The exec-only target has no key over HTTP: with api alone it is not served.
    row = served_fingerprints(proxy, exec_only.name)
    assert row["key_status"] == "failed", row
    assert row["fingerprints"] == [], row
    assert "GET " in row["error"] and "exec" not in row["error"], row
    assert_denied(proxy, key_c, exec_only.name)

    # Neither target was ever exec'd into by the proxy.
    assert exec_actions(both.id, since) == []
    assert exec_actions(exec_only.id, since) == []


def test_exec_only_serves_the_file_key_and_never_sends_http(start_target, start_proxy, keypair,
                                                           tmp_path):
    sfx = secrets.token_hex(3)
    key_a, key_b = keypair("a"), keypair("b")
    both = start_two_key_target(start_target, tmp_path, f"ks-exec-{sfx}", key_a, key_b)
    proxy = start_proxy(env={"SSH_TARGET_KEY_SOURCE": "exec"})

    wait_for_login(SshClient(proxy, key_b), both.name)
    assert_denied(proxy, key_a, both.name)
    row = served_fingerprints(proxy, both.name)
    assert (row["key_status"], row["via"]) == ("ok", "exec"), row
    assert row["fingerprints"] == [key_b.fingerprint], row
    # The target's HTTP server logs every request it answers: the proxy sent none.
    assert "GET /publickey" not in both.logs(), both.logs()


def test_default_order_prefers_http_and_falls_back_to_exec(start_target, start_proxy, keypair,
                                                           tmp_path):
    sfx = secrets.token_hex(3)
    key_a, key_b, key_c = keypair("a"), keypair("b"), keypair("c")
    both = start_two_key_target(start_target, tmp_path, f"ks-dflt-{sfx}", key_a, key_b)
    exec_only = start_target(f"ks-dflt-exec-only-{sfx}", key_c, serve_publickey=False)
    since = time.time() - 1
    proxy = start_proxy()

    wait_for_login(SshClient(proxy, key_a), both.name)
    wait_for_login(SshClient(proxy, key_c), exec_only.name)
    assert_denied(proxy, key_b, both.name)
    row = served_fingerprints(proxy, exec_only.name)
    assert (row["key_status"], row["via"]) == ("ok", "exec"), row
    # The probes the api-only and exec-only tests rely on do see a fetch when there is one.
    assert exec_actions(exec_only.id, since), "no exec event recorded for the exec fetch"
    assert "GET /publickey" in both.logs(), both.logs()


@pytest.mark.parametrize("value", ["http", "exec,api"])
def test_bad_key_source_stops_startup(run_proxy_expect_exit, value):
    code, logs = run_proxy_expect_exit(env={"SSH_TARGET_KEY_SOURCE": value}, timeout=20)
    assert code == 2, f"exit code {code} (expected 2); logs:\n{logs}"
    lines = [line for line in logs.splitlines() if "SSH_TARGET_KEY_SOURCE" in line]
    assert len(lines) == 1, logs
    assert value in lines[0] and "'api,exec'" in lines[0] and "'exec'" in lines[0], lines[0]
    assert "sshd started" not in logs, logs


def log_time(line: str) -> float:
    """The Unix time of a watcher log line (`ts=2026-12-05T16:06:31.406Z ...`)."""
    stamp = line.split(" ", 1)[0].removeprefix("ts=")
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def test_key_published_late_is_fetched_when_the_target_turns_healthy(start_target, start_proxy,
                                                                     keypair):
    """A target whose key appears only after the proxy gave up for now is fetched as soon as
    Docker reports it healthy, not at its next scheduled retry (5 s, then 10, 20 ... 300)."""
    sfx = secrets.token_hex(3)
    key = keypair("late")
    late = "/root/late.pub"  # does not exist until the test writes it
    proxy = start_proxy(env={"SSH_TARGET_KEY_PATH": late, "SSH_PERMIT_TARGET_HOST": f"*-{sfx}"})
    target = start_target(f"ks-late-{sfx}", key, serve_publickey=False,
                          docker_args=["--health-cmd", f"test -s {late}",
                                       "--health-interval", "500ms", "--health-retries", "1"])
    # The first fetch gives up (its own attempts take ~12 s); the next one is 5 s later.
    def first_failure() -> str:
        return next((line for line in proxy.logs().splitlines()
                     if f"target {target.name}: no key" in line and "retrying in 5s" in line), "")

    assert wait_until(first_failure, 60), proxy.logs()
    failed_line = first_failure()
    target.exec(f"cp /root/.ssh/id_ed25519.pub {late}.tmp && mv {late}.tmp {late}", check=True)
    wait_for_login(SshClient(proxy, key), target.name)
    served = [line for line in proxy.logs().splitlines()
              if f"target {target.name}: 1 key(s) via exec" in line]
    assert served, proxy.logs()
    # Served before the retry the failure scheduled: the health event asked for it.
    assert log_time(served[0]) < log_time(failed_line) + 5, (failed_line, served[0])
    row = served_fingerprints(proxy, target.name)
    assert row["fingerprints"] == [key.fingerprint], row
