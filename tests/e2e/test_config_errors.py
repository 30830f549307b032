"""Start-up configuration errors: a bad environment variable stops the proxy before sshd
listens, with exit code 2 and one line naming the variable and the form it expects;
`watcher check-config` validates a set of variables without starting anything."""

from __future__ import annotations

import re

import pytest

from helpers import TEST_LABEL, docker

# (variable, bad value, pattern of the expected form the message must describe)
BAD_VALUES = [
    ("SSH_PERMIT_TARGET_PORT", "70000", r"1-65535"),
    ("SSH_PERMIT_TARGET_PORT", "abc", r"1-65535"),
    ("SSH_PERMIT_TARGET_HOST", "bad host", r"glob"),
    ("SSH_TARGET_LABELS", "=x", r"key=value"),
    ("SSH_TARGET_PUBLICKEY_API_PORT", "0", r"1-65535"),
    ("SSH_TARGET_KEY_PATH", "relative", r"absolute"),
    ("MANUAL_AUTH_FILE", "maybe", r"true.*false"),
    ("SSH_TARGET_KEY_SOURCE", "exec,api", r"'api,exec'.*'api'.*'exec'"),
    ("SSH_PROXY_MODE", "swarm", r"docker, kubernetes, manual"),
    ("KUBERNETES_CLUSTER_DOMAIN", "a..b", r"DNS domain"),
]


@pytest.mark.parametrize(("variable", "value", "expected_form"), BAD_VALUES,
                         ids=[f"{v}={x!r}" for v, x, _ in BAD_VALUES])
def test_bad_value_stops_startup_before_sshd(run_proxy_expect_exit, variable, value, expected_form):
    # How fast it gives up is measured by bench/shutdown.py; here: that it does, by itself.
    code, logs = run_proxy_expect_exit(env={variable: value}, timeout=60)

    assert code == 2, f"exit code {code} (expected 2); logs:\n{logs}"
    lines = [line for line in logs.splitlines() if variable in line]
    assert len(lines) == 1, f"expected one line naming {variable}; logs:\n{logs}"
    assert value in lines[0], f"the message does not show the bad value {value!r}: {lines[0]}"
    assert re.search(expected_form, lines[0], re.IGNORECASE), \
        f"the message does not say what is expected ({expected_form!r}): {lines[0]}"
    # Nothing was started: sshd never listened, no host key was made.
    assert "sshd started" not in logs, logs
    assert "host key" not in logs, logs


GOOD_ENV = {
    "SSH_PERMIT_TARGET_HOST": "workspace-*,db-1",
    "SSH_PERMIT_TARGET_PORT": "22,8080",
    "SSH_TARGET_LABELS": "team=a,ssh",
    "SSH_TARGET_PUBLICKEY_API_PORT": "9090",
    "SSH_TARGET_KEY_PATH": "/etc/ssh-keys/id.pub",
    "MANUAL_AUTH_FILE": "false",
}


def _check_config(image: str, env: dict[str, str]):
    args = ["run", "--rm", "--label", f"{TEST_LABEL}=1"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    return docker(*args, image, "watcher", "check-config", check=False, timeout=60)


def test_check_config_command(proxy_image):
    good = _check_config(proxy_image, GOOD_ENV)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "OK" in good.stdout, good.stdout + good.stderr

    # The same command refuses a bad set (one bad variable among good ones).
    bad = _check_config(proxy_image, {**GOOD_ENV, "SSH_PERMIT_TARGET_PORT": "22,abc"})
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "SSH_PERMIT_TARGET_PORT" in bad.stderr
    assert "OK" not in bad.stdout


def test_no_platform_at_all_is_one_line_naming_what_was_looked_for(run_proxy_expect_exit):
    """No Docker socket, no kube config, not in a cluster, not manual: exit 2 at once."""
    code, logs = run_proxy_expect_exit(docker_socket=False, timeout=20)
    assert code == 2, f"exit code {code} (expected 2); logs:\n{logs}"
    lines = [line for line in logs.splitlines() if "no platform" in line]
    assert len(lines) == 1, logs
    for looked_for in ("/var/run/docker.sock", "/root/.kube/config", "serviceaccount",
                       "MANUAL_AUTH_FILE=true"):
        assert looked_for in lines[0], lines[0]
    assert "Traceback" not in logs and "sshd started" not in logs, logs


def test_unusable_kube_config_is_one_line_naming_it(run_proxy_expect_exit, tmp_path):
    """A kube config that is not one (the socket is there too: the kube config wins)."""
    config = tmp_path / "config"
    config.write_text("this: [is not a kube config\n")
    config.chmod(0o644)
    code, logs = run_proxy_expect_exit(volumes=[f"{config}:/root/.kube/config:ro"], timeout=20)
    assert code != 0, logs
    lines = [line for line in logs.splitlines() if line.startswith("ssh-proxy:")]
    assert len(lines) == 1 and "kube" in lines[0].lower(), logs
    assert "Traceback" not in logs and "sshd started" not in logs, logs


def _one_error_line(logs: str) -> str:
    assert "Traceback" not in logs and "sshd started" not in logs, logs
    lines = [line for line in logs.splitlines() if line.startswith("ssh-proxy:")]
    assert len(lines) == 1, logs
    return lines[0]


def test_bad_log_level_is_a_configuration_error(run_proxy_expect_exit):
    code, logs = run_proxy_expect_exit(env={"WATCHER_LOG_LEVEL": "loud"}, timeout=20)
    assert code == 2, logs
    line = _one_error_line(logs)
    assert "WATCHER_LOG_LEVEL='loud'" in line and "debug, info, warning, error" in line


def test_read_only_etc_ssh_is_one_line_naming_it(run_proxy_expect_exit, tmp_path):
    empty = tmp_path / "etc-ssh"
    (empty / "host_keys").mkdir(parents=True)  # the image's VOLUME mounts over it
    code, logs = run_proxy_expect_exit(volumes=[f"{empty}:/etc/ssh:ro"], timeout=30)
    assert code == 1, logs
    line = _one_error_line(logs)
    assert "/etc/ssh" in line and "read-only" in line.lower() and "tmpfs" in line, line

