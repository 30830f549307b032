"""The compose quick start (compose.yaml + examples/workspace): `up -d`, then the README's
own `ssh` line reaches the demo workspace through the proxy; `down -v` cleans up.

Runs with Compose v2 (`docker compose`) or Debian's `docker-compose`, whichever exists.
An override file adds the test label to every service and network and pins this
checkout's image tags, so parallel checkouts and tests/run.sh clean-up both work.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import PROXY_IMAGE, REPO_ROOT, TARGET_IMAGE, TEST_LABEL, free_port, wait_until

README = REPO_ROOT / "README.md"
WORKSPACE_IMAGE = TARGET_IMAGE.replace("ssh-proxy-target", "ssh-proxy-workspace", 1)
LOGIN_DEADLINE = 60


def compose_argv() -> list[str]:
    """Compose v2 if the docker CLI has it, else Debian's docker-compose."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` exists: "
                "apt-get install docker-compose (tests/run.sh does)", pytrace=False)


def readme_ssh_line() -> list[str]:
    """The quick start's `ssh -J ...` line, split as a shell would."""
    text = README.read_text()
    start = text.index("## Quick start")
    section = text[start:text.index("\n## ", start + 1)]
    lines = [ln.strip() for ln in section.splitlines() if ln.strip().startswith("ssh -J ")]
    assert len(lines) == 1, f"expected one `ssh -J` line in the README quick start, got {lines}"
    return shlex.split(lines[0])


def test_compose_quick_start(proxy_image, keypair, tmp_path: Path) -> None:
    key = keypair("quickstart")
    port = free_port()
    project = f"sshproxytest{secrets.token_hex(4)}"
    override = tmp_path / "compose.test.yaml"
    override.write_text(
        'version: "2.4"\n'
        "services:\n"
        f"  proxy:\n    labels:\n      {TEST_LABEL}: \"1\"\n"
        f"  workspace:\n    labels:\n      {TEST_LABEL}: \"1\"\n"
        f"networks:\n  default:\n    labels:\n      {TEST_LABEL}: \"1\"\n")
    env = {**os.environ, "SSH_PROXY_PORT": str(port), "WORKSPACE_PUBKEY": key.public,
           "SSH_PROXY_IMAGE": proxy_image, "SSH_PROXY_WORKSPACE_IMAGE": WORKSPACE_IMAGE}
    base = [*compose_argv(), "-p", project, "-f", str(REPO_ROOT / "compose.yaml"), "-f", str(override)]

    def compose(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=300)

    # The README line, with the test's free port; -F gives both hops the test key and a
    # throwaway known_hosts (ssh passes -F on to the -J hop).
    argv = [a.replace("8091", str(port)) for a in readme_ssh_line()]
    config = tmp_path / "ssh_config"
    config.write_text(f"Host *\n  IdentityFile {key.private}\n  IdentitiesOnly yes\n"
                      f"  UserKnownHostsFile {tmp_path / 'known_hosts'}\n"
                      "  StrictHostKeyChecking no\n  BatchMode yes\n  ConnectTimeout 10\n")
    ssh = [argv[0], "-F", str(config), *argv[1:], "cat", "/root/.ssh/authorized_keys"]
    ssh_env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    last: list[subprocess.CompletedProcess[str]] = []

    def logs_in() -> bool:
        proc = subprocess.run(ssh, env=ssh_env, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        last[:] = [proc]
        return proc.returncode == 0

    try:
        built = compose("build", "workspace")
        assert built.returncode == 0, f"compose build failed:\n{built.stderr}"
        up = compose("up", "-d", "--no-build")
        assert up.returncode == 0, f"compose up failed:\n{up.stderr}"
        ok = wait_until(logs_in, LOGIN_DEADLINE, interval=1)
        assert ok, (f"`{shlex.join(ssh)}` did not log in within {LOGIN_DEADLINE} s: "
                    f"{last[0].stderr if last else ''}\n{compose('logs', '--tail', '40').stdout}")
        assert last[0].stdout.strip() == key.public
    finally:
        down = compose("down", "-v", "--remove-orphans")
        assert down.returncode == 0, f"compose down failed:\n{down.stderr}"
