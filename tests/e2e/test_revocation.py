"""Revocation ends sessions: a connection held open (`ssh -N -L`) after its key lost a grant
is closed by the proxy, with an `event=revoked` access-log line; sessions of keys that lost
nothing (the same grants from another source, or other keys) stay open and keep working."""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from helpers import (KeyPair, Proxy, SshClient, docker, free_port, parse_logfmt, read_banner,
                     wait_for_event, wait_for_login, wait_until)

KEYS_DIR = "/etc/ssh/authorized_keys.d"


@dataclass
class HeldTunnel:
    """`ssh -N -L 127.0.0.1:PORT:DEST` to the proxy, held open by the test."""

    process: subprocess.Popen
    port: int
    dest: str

    def alive(self) -> bool:
        return self.process.poll() is None

    def banner(self) -> str:
        """A new tunnel over the held connection: the destination's SSH banner, or ``."""
        return read_banner("127.0.0.1", self.port, timeout=5)

    def stop(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def hold():
    held: list[HeldTunnel] = []

    def start(proxy: Proxy, key: KeyPair, dest: str) -> HeldTunnel:
        port = free_port()
        argv = SshClient(proxy_port=proxy, key=key).direct_argv(
            opts=["-N", "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{port}:{dest}"])
        tunnel = HeldTunnel(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True), port, dest)
        held.append(tunnel)
        assert wait_until(lambda: tunnel.banner().startswith("SSH-2.0-") or not tunnel.alive(), 30), \
            f"the tunnel to {dest} did not open"
        assert tunnel.alive(), f"ssh -N -L {dest} exited: {tunnel.process.stderr.read()}"
        return tunnel

    yield start
    for tunnel in held:
        tunnel.stop()


def closed(tunnel: HeldTunnel, deadline: float = 15) -> bool:
    """Waits (generously) for the held ssh to exit; then no new tunnel can open over it."""
    if not wait_until(lambda: not tunnel.alive(), deadline):
        return False
    return not tunnel.banner()


def report_delay(proxy: Proxy, watcher_line: str, event: dict[str, str]) -> None:
    """Prints (never asserts: shared, noisy machines) the seconds from the watcher applying
    a change to the session being closed, both by the proxy's clock."""
    stamps = [parse_logfmt(line).get("ts", "") for line in proxy.logs().splitlines() if watcher_line in line]
    if stamps and stamps[0]:
        seen = datetime.fromisoformat(stamps[0].replace("Z", "+00:00"))
        closed_at = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
        print(f"\nchange applied -> session closed: {(closed_at - seen).total_seconds():.3f} s")


def test_removed_target_closes_held_session(start_target, start_proxy, keypair, hold):
    sfx = secrets.token_hex(3)
    key, other = keypair("ws"), keypair("other")
    target = start_target(f"rv-a-{sfx}", key)
    bystander = start_target(f"rv-o-{sfx}", other)
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": f"*-{sfx}"})
    wait_for_login(SshClient(proxy, key), target.name)
    wait_for_login(SshClient(proxy, other), bystander.name)
    held = hold(proxy, key, f"{target.name}:22")
    unrelated = hold(proxy, other, f"{bystander.name}:22")

    target.remove()  # docker rm -f

    assert closed(held), "the session of the removed target's key is still open"
    event = wait_for_event(proxy, event="revoked", fp=key.fingerprint, deadline=10)
    assert event["reason"] == "target-removed", event
    assert event["target"] == target.name, event
    assert event["client"] and event["key"] == "ED25519", event
    report_delay(proxy, f'msg="target removed: {target.name}"', event)
    wait_for_event(proxy, event="closed", fp=key.fingerprint, client=event["client"], deadline=10)
    # Another key's session is never touched.
    assert unrelated.alive() and unrelated.banner().startswith("SSH-2.0-")
    assert not [line for line in proxy.access_log().splitlines()
                if "event=revoked" in line and other.fingerprint in line]


def test_shared_key_loses_a_grant_admin_granted_key_keeps_its_session(start_target, start_proxy, keypair,
                                                                      hold, tmp_path: Path):
    sfx = secrets.token_hex(3)
    shared, own = keypair("shared"), keypair("own")
    one = start_target(f"rv-s1-{sfx}", shared)
    two = start_target(f"rv-s2-{sfx}", shared)
    mine = start_target(f"rv-m-{sfx}", own)
    keys_dir = tmp_path / "keys.d"
    keys_dir.mkdir()
    keys_dir.chmod(0o755)
    # The admin grants `own` what its target grants it anyway (plus nothing else).
    admin = keys_dir / "admin.pub"
    admin.write_text(f'permitopen="{mine.name}:22" {own.public}\n')
    admin.chmod(0o644)
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": f"*-{sfx}"}, volumes=[f"{keys_dir}:{KEYS_DIR}"])
    wait_for_login(SshClient(proxy, shared), one.name)
    wait_for_login(SshClient(proxy, shared), two.name)
    wait_for_login(SshClient(proxy, own), mine.name)
    on_one = hold(proxy, shared, f"{one.name}:22")
    kept = hold(proxy, own, f"{mine.name}:22")

    # The shared key still opens `one`, but lost `two`: a lost grant closes the session.
    two.remove()
    assert closed(on_one), "the shared key's session survived losing a grant"
    event = wait_for_event(proxy, event="revoked", fp=shared.fingerprint, deadline=10)
    assert event["reason"] == "target-removed" and event["target"] == two.name, event
    # ... and it may log in again for what it keeps.
    wait_for_login(SshClient(proxy, shared), one.name)

    # `own` is granted the same by its target and the admin file: an unrelated change
    # (a target of another key stopping) leaves its session open and working.
    one.remove()
    assert wait_until(lambda: shared.fingerprint + " " not in proxy.read_index(), 15)
    assert kept.alive() and kept.banner().startswith("SSH-2.0-")
    revoked = [line for line in proxy.access_log().splitlines() if "event=revoked" in line]
    assert not [line for line in revoked if own.fingerprint in line], revoked


def test_manual_line_removed_closes_session(start_target, start_proxy, keypair, hold, tmp_path: Path):
    sfx = secrets.token_hex(3)
    own, admin_key = keypair("own"), keypair("admin")
    target = start_target(f"rv-man-{sfx}", own)
    keys_dir = tmp_path / "keys.d"
    keys_dir.mkdir()
    keys_dir.chmod(0o755)
    admin = keys_dir / "admin.pub"
    admin.write_text(f'permitopen="{target.name}:22" {admin_key.public}\n')
    admin.chmod(0o644)
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": f"*-{sfx}"}, volumes=[f"{keys_dir}:{KEYS_DIR}"])
    wait_for_login(SshClient(proxy, own), target.name)
    by_admin = hold(proxy, admin_key, f"{target.name}:22")
    by_owner = hold(proxy, own, f"{target.name}:22")

    admin.unlink()

    assert closed(by_admin), "the removed admin line's session is still open"
    event = wait_for_event(proxy, event="revoked", fp=admin_key.fingerprint, deadline=10)
    assert event["reason"] == "manual-line-removed", event
    assert event["target"] == target.name, event
    # The target's own key is another key: untouched.
    assert by_owner.alive() and by_owner.banner().startswith("SSH-2.0-")


def test_renamed_and_disconnected_targets_close_sessions(start_target, start_proxy, keypair, hold,
                                                         test_network):
    sfx = secrets.token_hex(3)
    renamed_key, gone_key = keypair("renamed"), keypair("gone")
    # (its hostname is an alias of its own: another than the name, so the old name goes)
    renamed = start_target(f"rv-r-{sfx}", renamed_key, hostname=f"rv-host-{sfx}")
    leaving = start_target(f"rv-d-{sfx}", gone_key)
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": f"*-{sfx}"})
    wait_for_login(SshClient(proxy, renamed_key), renamed.name)
    wait_for_login(SshClient(proxy, gone_key), leaving.name)
    by_name = hold(proxy, renamed_key, f"{renamed.name}:22")
    on_network = hold(proxy, gone_key, f"{leaving.name}:22")

    old_name = renamed.name
    docker("rename", renamed.id, f"rv-r2-{sfx}")
    renamed.name = f"rv-r2-{sfx}"
    assert closed(by_name), "the session survived the rename of its target"
    event = wait_for_event(proxy, event="revoked", fp=renamed_key.fingerprint, deadline=10)
    assert event["reason"] == "target-renamed" and event["target"] == old_name, event
    assert on_network.alive()

    leaving.disconnect(test_network)
    assert closed(on_network), "the session survived its target leaving the proxy's network"
    event = wait_for_event(proxy, event="revoked", fp=gone_key.fingerprint, deadline=10)
    assert event["reason"] == "target-disconnected" and event["target"] == leaving.name, event
