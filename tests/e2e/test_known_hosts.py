"""`watcher ssh-config` + `watcher known-hosts`, used as they are by a real OpenSSH client
with strict host-key checking: no key is ever trusted on first use, and a target re-created
with a new host key is trusted with the new key only."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import KeyPair, Proxy, Target, unique_name, wait_until

STRICT = ["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentityAgent=none",
          "-o", "ConnectTimeout=10"]


def known_hosts(proxy: Proxy) -> str:
    proc = proxy.exec(["watcher", "known-hosts"])
    return proc.stdout if proc.returncode == 0 else ""


def key_lines(text: str, name: str) -> set[str]:
    """The key parts (`type blob`) of the lines whose names include `name`."""
    out = set()
    for line in text.splitlines():
        if line and not line.startswith("#") and name in line.split(" ", 1)[0].split(","):
            out.add(line.split(" ", 1)[1])
    return out


def target_host_keys(target: Target) -> set[str]:
    """The target's own public host keys, read inside it (`type blob`)."""
    proc = target.exec("cat /etc/ssh/ssh_host_*_key.pub", check=True)
    return {" ".join(line.split()[:2]) for line in proc.stdout.splitlines() if line.strip()}


def wait_for_keys(proxy: Proxy, target: Target, deadline: float = 90) -> str:
    """Until known-hosts lists exactly the target's current host keys on its name."""
    expected = target_host_keys(target)
    seen = {"text": ""}

    def learned() -> bool:
        seen["text"] = known_hosts(proxy)
        return key_lines(seen["text"], target.name) == expected

    if not wait_until(learned, deadline, interval=1.0):
        pytest.fail(f"known-hosts never listed {target.name}'s host keys {sorted(expected)}; last "
                    f"output:\n{seen['text']}\nproxy logs:\n{proxy.logs()}", pytrace=False)
    return seen["text"]


def install(proxy: Proxy, key: KeyPair, home: Path, name: str, deadline: float = 30) -> Path:
    """What a user does on a laptop: save both outputs; returns the config file. Waits for
    `name`'s Host entry: status.json (what ssh-config reads) is written every 2 s."""
    known = home / "known_hosts"
    known.write_text(known_hosts(proxy))
    argv = ["watcher", "ssh-config", "--proxy-host", "127.0.0.1", "--proxy-port",
            str(proxy.port), "--identity-file", str(key.private), "--known-hosts-file", str(known)]
    config = {"text": ""}

    def listed() -> bool:
        config["text"] = proxy.exec(argv, check=True).stdout
        return f"\nHost {name} " in config["text"]

    if not wait_until(listed, deadline, interval=1.0):
        pytest.fail(f"ssh-config has no Host entry for {name}:\n{config['text']}", pytrace=False)
    path = home / "config"
    path.write_text(config["text"])
    return path


def ssh(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["ssh", "-F", str(config), *STRICT, *args], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(exc.cmd, -9, "", str(exc.stderr or ""))


def wait_for_strict_login(config: Path, host: str, deadline: float = 60) -> None:
    last: dict[str, subprocess.CompletedProcess[str]] = {}

    def login() -> bool:
        last["proc"] = ssh(config, host, "true")
        return last["proc"].returncode == 0

    if not wait_until(login, deadline, interval=1.0):
        pytest.fail(f"strict ssh to {host} failed: {last['proc'].stderr.strip()}\nconfig:\n"
                    f"{config.read_text()}", pytrace=False)


def test_strict_login_with_generated_config_and_rekeyed_target(
        start_proxy, start_target, keypair, tmp_path) -> None:
    key = keypair("ws")
    name = unique_name("ws-kh")
    target = start_target(name, key)
    proxy = start_proxy()

    text = wait_for_keys(proxy, target)
    old_keys = key_lines(text, name)
    assert key_lines(text, "ssh-proxy"), text  # the proxy's own keys, for the jump hop
    config = install(proxy, key, tmp_path, name)
    wait_for_strict_login(config, name)  # strict, BatchMode: never a prompt to accept a key

    (tmp_path / "file.txt").write_text("copied through the proxy\n")
    scp = subprocess.run(["scp", "-F", str(config), *STRICT, str(tmp_path / "file.txt"),
                          f"{name}:/tmp/file.txt"], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert scp.returncode == 0, scp.stderr
    assert target.exec("cat /tmp/file.txt", check=True).stdout == "copied through the proxy\n"

    # Re-created: a new container with the same name, and new host keys.
    target.remove()
    target = start_target(name, key)
    text = wait_for_keys(proxy, target)
    new_keys = key_lines(text, name)
    assert new_keys and not new_keys & old_keys, text
    assert not any(k in text for k in old_keys), "an old host key is still listed"

    # The old known-hosts file is refused now (the check is real), the new one logs in.
    stale = ssh(config, name, "true")
    assert stale.returncode != 0 and "HOST IDENTIFICATION HAS CHANGED" in stale.stderr, stale.stderr
    config = install(proxy, key, tmp_path, name)
    wait_for_strict_login(config, name)


def test_commands_refuse_when_the_watcher_is_not_running(start_proxy) -> None:
    proxy = start_proxy()
    for command in (["watcher", "known-hosts"], ["watcher", "ssh-config"]):
        # status.json is rewritten every 2 s; a missing or stale one means "not running".
        proc = proxy.exec([*command, "--status", "/nonexistent/status.json"])
        assert proc.returncode == 3, proc
        assert proc.stdout == ""
        assert "/nonexistent/status.json" in proc.stderr and len(proc.stderr.splitlines()) == 1
