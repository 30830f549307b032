"""The image on a read-only root filesystem (`docker run --read-only`) with exactly the
mounts the README gives: logins, a target added later, `watcher status`, and host keys
that persist in their volume across a restart and a re-creation."""

from __future__ import annotations

import secrets
import subprocess

from helpers import REPO_ROOT, Proxy, SshClient, docker, wait_for_login, wait_until

# The README's read-only command, less what every proxy in the tests gets anyway (the
# Docker socket, a published port, the test network): checked against the README below.
TMPFS = ["--tmpfs", "/run", "--tmpfs", "/etc/ssh:mode=0755"]
HOST_KEYS = "/etc/ssh/host_keys"


def host_keys(proxy: Proxy) -> set[tuple[str, str]]:
    proc = subprocess.run(["ssh-keyscan", "-T", "10", "-p", str(proxy.port), proxy.host],
                          capture_output=True, text=True, timeout=60)
    keys = {tuple(line.split()[1:3]) for line in proc.stdout.splitlines()
            if line and not line.startswith("#")}
    assert keys, f"ssh-keyscan found no host key: {proc.stderr}"
    return keys


def test_readme_shows_these_mounts():
    readme = (REPO_ROOT / "README.md").read_text()
    command = next((line for line in readme.splitlines() if "--read-only" in line and "--tmpfs" in line), "")
    assert " ".join(["--read-only", *TMPFS]) in command, command
    assert f"-v ssh-proxy-hostkeys:{HOST_KEYS}" in readme


def test_read_only_root_filesystem(start_target, start_proxy, keypair):
    sfx = secrets.token_hex(3)
    volume = f"sshproxy-test-ro-hostkeys-{sfx}"
    key, later_key = keypair("ro"), keypair("later")
    env = {"SSH_PERMIT_TARGET_HOST": f"ro-*-{sfx}"}
    run = dict(env=env, volumes=[f"{volume}:{HOST_KEYS}"], docker_args=["--read-only", *TMPFS])
    try:
        first = start_target(f"ro-a-{sfx}", key)
        proxy = start_proxy(**run)
        assert proxy.exec("touch /etc/ssh-proxy-probe").returncode != 0, "the root filesystem is writable"
        wait_for_login(SshClient(proxy, key), first.name, deadline=60)

        later = start_target(f"ro-b-{sfx}", later_key)
        wait_for_login(SshClient(proxy, later_key), later.name, deadline=60)
        assert SshClient(proxy, key).ssh(later.name, "true", timeout=30).returncode != 0

        status = proxy.exec(["watcher", "status"])
        assert status.returncode == 0, status.stdout + status.stderr
        assert first.name in status.stdout and later.name in status.stdout, status.stdout
        assert later_key.fingerprint in proxy.read_index()
        assert wait_until(lambda: later.name in proxy.read_file("/etc/ssh/authorized_keys_cache"), 10)
        assert wait_until(lambda: key.fingerprint in proxy.access_log(), 30), proxy.access_log()

        keys = host_keys(proxy)
        proxy.restart()  # the tmpfs mounts start empty again; the volume stays
        assert host_keys(proxy) == keys
        wait_for_login(SshClient(proxy, later_key), later.name, deadline=60)
        proxy.remove()
        again = start_proxy(**run)  # a new container on the same volume
        assert host_keys(again) == keys
        wait_for_login(SshClient(again, key), first.name, deadline=60)
        assert "Read-only file system" not in again.logs(), again.logs()
    finally:
        # the proxies go first (the fixture), the volume when no container uses it any more
        for container in docker("ps", "-aq", "--filter", f"volume={volume}", check=False).stdout.split():
            docker("rm", "-f", container, check=False)
        docker("volume", "rm", volume, check=False)
