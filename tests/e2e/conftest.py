"""Fixtures of the end-to-end tests (Docker required; tests/run.sh starts it).

Session scope (built/created once): docker_ready, target_image, proxy_image, images,
test_network. Function scope (factories; whatever they start is removed when the test
ends, failed or not): keypair, start_target, start_proxy, run_proxy_expect_exit.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import pytest

from helpers import (
    PROXY_IMAGE,
    REPO_ROOT,
    SESSION_LABEL,
    TARGET_CONTEXT,
    TARGET_IMAGE,
    TEST_LABEL,
    KeyPair,
    Proxy,
    Target,
    build_image,
    docker,
    make_keypair,
    proxy_run_args,
    remove_container,
    remove_containers,
    run_proxy_container,
    run_target_container,
    unique_name,
    wait_for_exit,
)

_timings: dict[str, float] = {}


# --------------------------------------------------------------------------- reporting


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Lets finalizers know whether the test failed (they then print container logs).
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
               for when in ("setup", "call"))


def pytest_terminal_summary(terminalreporter):
    if _timings:
        terminalreporter.write_sep("-", "e2e image builds")
        for tag, seconds in _timings.items():
            terminalreporter.write_line(f"{tag}: {seconds:.1f} s")


# --------------------------------------------------------------------------- session


@pytest.fixture(scope="session")
def session_id() -> str:
    """Random id of this pytest session, a label on everything it creates."""
    return secrets.token_hex(4)


@pytest.fixture(scope="session")
def docker_ready() -> None:
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"Docker is not usable ({exc}); run the tests with tests/run.sh, which "
                    f"installs and starts it", pytrace=False)
    if proc.returncode != 0:
        pytest.fail("`docker info` failed: the Docker daemon is not reachable; run the tests "
                    f"with tests/run.sh, which starts it.\n{proc.stderr.strip()}", pytrace=False)


@pytest.fixture(scope="session")
def target_image(docker_ready) -> str:
    """Builds ssh-proxy-target:test from tests/images/target; returns the tag."""
    _timings[TARGET_IMAGE] = build_image(TARGET_IMAGE, TARGET_CONTEXT)
    return TARGET_IMAGE


@pytest.fixture(scope="session")
def proxy_image(docker_ready) -> str:
    """Builds ssh-proxy:test from the repository's Dockerfile; returns the tag."""
    if not (REPO_ROOT / "Dockerfile").is_file():
        pytest.fail(f"{REPO_ROOT / 'Dockerfile'} does not exist: cannot build {PROXY_IMAGE}",
                    pytrace=False)
    _timings[PROXY_IMAGE] = build_image(PROXY_IMAGE, REPO_ROOT)
    return PROXY_IMAGE


@pytest.fixture(scope="session")
def images(target_image, proxy_image) -> dict[str, str]:
    """Both images: {"target": tag, "proxy": tag}."""
    return {"target": target_image, "proxy": proxy_image}


@pytest.fixture(scope="session")
def test_network(docker_ready, session_id) -> Iterator[str]:
    """A user-defined bridge network (Docker DNS resolves container names on it)."""
    name = f"sshproxy-test-{session_id}"
    docker("network", "create", "--label", f"{TEST_LABEL}=1", "--label", f"{SESSION_LABEL}={session_id}", name)
    yield name
    # Whatever a test left on it (the factories remove their own; this is the backstop).
    leftovers = docker("ps", "-aq", "--filter", f"label={SESSION_LABEL}={session_id}", check=False).stdout.split()
    for cid in leftovers:
        remove_container(cid)
    docker("network", "rm", name, check=False)


@pytest.fixture(scope="session")
def xvfb_display() -> Iterator[str]:
    """A virtual X server on the host for X11-forwarding tests: yields its DISPLAY (`:N`,
    a free display number). Pass env={"DISPLAY": display} to SshClient.run/ssh."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-nolisten", "tcp", "-screen", "0", "640x480x24"],
                            pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    os.close(write_fd)
    number = b""
    with os.fdopen(read_fd, "rb") as pipe:
        while not number.endswith(b"\n"):
            chunk = pipe.read(1)
            if not chunk:
                break
            number += chunk
    if not number.strip():
        proc.kill()
        pytest.fail(f"Xvfb did not start: {proc.communicate(timeout=10)[1].decode(errors='replace')}",
                    pytrace=False)
    yield f":{number.decode().strip()}"
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- factories


@pytest.fixture
def keypair(tmp_path_factory) -> Callable[..., KeyPair]:
    """keypair(name, comment=None) -> KeyPair(.private path, .public text, .fingerprint)."""
    directory = tmp_path_factory.mktemp("keys")

    def make(name: str = "id_ed25519", comment: str | None = None) -> KeyPair:
        return make_keypair(directory, name, comment)

    return make


@pytest.fixture
def start_target(request, target_image, test_network, session_id) -> Iterator[Callable[..., Target]]:
    """start_target(name, pubkey, serve_publickey=True, labels=None, env=None,
    body_file=None, network=None, hostname=None, network_aliases=None, publickey_port=8080,
    docker_args=None) -> Target

    `pubkey`: a KeyPair or a public key line (None: no key at all). The container is
    named exactly `name` (Docker DNS name on the network) and has hostname `hostname`
    (default `name`). Returns once its sshd answers on IP:22; when serving /publickey,
    that port answers too.
    """
    started: list[Target] = []

    def start(name: str, pubkey: KeyPair | str | None, serve_publickey: bool = True,
              labels: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None,
              body_file: str | Path | None = None, network: str | None = None,
              hostname: str | None = None, network_aliases: Sequence[str] | None = None,
              publickey_port: int = 8080, docker_args: Sequence[str] | None = None) -> Target:
        return run_target_container(name, pubkey, network or test_network, session_id, image=target_image,
                                    serve_publickey=serve_publickey, labels=labels, env=env,
                                    body_file=body_file, hostname=hostname, network_aliases=network_aliases,
                                    publickey_port=publickey_port, docker_args=docker_args,
                                    track=started.append)

    yield start
    remove_containers(started, failed=_failed(request))


@pytest.fixture
def start_proxy(request, proxy_image, test_network, session_id) -> Iterator[Callable[..., Proxy]]:
    """start_proxy(env=None, name=None, volumes=None, docker_args=None) -> Proxy

    docker run -d --network <test net> -p 127.0.0.1::22 -v /var/run/docker.sock:... -e K=V
    ssh-proxy:test; returns once 127.0.0.1:<port> sends an SSH-2.0- banner (60 s).
    `volumes`: extra `-v` specs; `docker_args`: extra `docker run` options.
    """
    started: list[Proxy] = []

    def start(env: Mapping[str, str] | None = None, name: str | None = None,
              volumes: Sequence[str] | None = None, docker_args: Sequence[str] | None = None) -> Proxy:
        return run_proxy_container(test_network, session_id, name=name, image=proxy_image, env=env,
                                   volumes=volumes, docker_args=docker_args, track=started.append)

    yield start
    remove_containers(started, failed=_failed(request))


@pytest.fixture
def run_proxy_expect_exit(proxy_image, test_network, session_id) -> Iterator[Callable[..., tuple[int, str]]]:
    """run_proxy_expect_exit(env, timeout=30, volumes=None, docker_args=None, docker_socket=True)
    -> (exit_code, logs)

    Starts the proxy like start_proxy and waits for it to exit on its own (configuration
    errors); fails the test, with the logs, when it still runs after `timeout` s.
    """
    names: list[str] = []

    def run(env: Mapping[str, str] | None = None, timeout: float = 30,
            volumes: Sequence[str] | None = None, docker_args: Sequence[str] | None = None,
            docker_socket: bool = True) -> tuple[int, str]:
        name = unique_name("ssh-proxy-test-exit")
        names.append(name)
        docker(*proxy_run_args(name, test_network, session_id, image=proxy_image, env=env, volumes=volumes,
                               docker_args=docker_args, docker_socket=docker_socket))
        code = wait_for_exit(name, timeout)
        logs = docker("logs", name, check=False)
        if code is None:
            pytest.fail(f"proxy with env {dict(env or {})} still running after {timeout} s; "
                        f"logs:\n{logs.stdout}{logs.stderr}", pytrace=False)
        return code, logs.stdout + logs.stderr

    yield run
    for name in names:
        remove_container(name)
