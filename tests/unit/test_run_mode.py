"""The run mode: chosen once in config (pure), read by every component; platforms by mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher import platforms
from watcher.config import PlatformFacts, RunMode, choose_mode, load_settings
from watcher.errors import ConfigError

DOCKER = PlatformFacts(docker_socket=True)
KUBE = PlatformFacts(kube_config="/root/.kube/config")
IN_CLUSTER = PlatformFacts(in_cluster=True)
BOTH = PlatformFacts(kube_config="/root/.kube/config", docker_socket=True)
NOTHING = PlatformFacts()


@pytest.mark.parametrize("env, facts, expected", [
    ({}, DOCKER, RunMode.DOCKER),
    ({}, KUBE, RunMode.KUBERNETES),
    ({}, IN_CLUSTER, RunMode.KUBERNETES),
    ({}, BOTH, RunMode.KUBERNETES),  # a kube config wins over a socket
    ({"MANUAL_AUTH_FILE": "true"}, BOTH, RunMode.MANUAL),
    ({"MANUAL_AUTH_FILE": "true"}, NOTHING, RunMode.MANUAL),  # manual needs no platform
    ({"SSH_PROXY_MODE": "docker"}, BOTH, RunMode.DOCKER),
    ({"SSH_PROXY_MODE": " Kubernetes "}, DOCKER, RunMode.KUBERNETES),
    ({"SSH_PROXY_MODE": "docker"}, NOTHING, RunMode.DOCKER),  # forced: the source says why
    ({"SSH_PROXY_MODE": "manual"}, DOCKER, RunMode.MANUAL),
    ({"SSH_PROXY_MODE": "manual", "MANUAL_AUTH_FILE": "true"}, DOCKER, RunMode.MANUAL),
    ({"SSH_PROXY_MODE": ""}, DOCKER, RunMode.DOCKER),
])
def test_choose_mode(env: dict[str, str], facts: PlatformFacts, expected: RunMode) -> None:
    assert choose_mode(env, facts) is expected
    assert load_settings(env, facts).mode is expected


def test_no_platform_names_everything_looked_for() -> None:
    with pytest.raises(ConfigError) as info:
        choose_mode({}, NOTHING)
    message = str(info.value)
    for looked_for in ("/var/run/secrets/kubernetes.io/serviceaccount", "KUBECONFIG",
                       "/root/.kube/config", "/var/run/docker.sock", "MANUAL_AUTH_FILE=true"):
        assert looked_for in message


@pytest.mark.parametrize("value", ["swarm", "dockerr", "auto"])
def test_bad_mode_names_variable_and_choices(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        choose_mode({"SSH_PROXY_MODE": value}, DOCKER)
    assert f"SSH_PROXY_MODE={value!r}" in str(info.value)
    assert "docker, kubernetes, manual" in str(info.value)


def test_forced_mode_contradicting_manual_is_refused() -> None:
    with pytest.raises(ConfigError, match="contradicts MANUAL_AUTH_FILE=true"):
        choose_mode({"SSH_PROXY_MODE": "docker", "MANUAL_AUTH_FILE": "true"}, DOCKER)


def test_bad_manual_flag_is_reported_before_mode() -> None:
    with pytest.raises(ConfigError, match="MANUAL_AUTH_FILE='maybe'"):
        choose_mode({"MANUAL_AUTH_FILE": "maybe", "SSH_PROXY_MODE": "x"}, DOCKER)


def test_only_manual_mode_does_not_discover() -> None:
    assert [m for m in RunMode if not m.discovers] == [RunMode.MANUAL]


def test_settings_without_facts_assume_docker() -> None:
    """`watcher check-config` checks variables without any platform mounted."""
    assert load_settings({}).mode is RunMode.DOCKER


# --- platforms ------------------------------------------------------------------------------

def test_manual_mode_has_no_platform() -> None:
    assert platforms.platform_for(RunMode.MANUAL) is None


def test_every_registered_platform_loads_its_two_parts() -> None:
    for mode, platform in platforms.PLATFORMS.items():
        assert mode.discovers
        for spec in (platform.client, platform.watcher):
            assert callable(platforms._load(spec)), spec


def test_unregistered_mode_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(platforms, "PLATFORMS", {RunMode.DOCKER: platforms.PLATFORMS[RunMode.DOCKER]})
    with pytest.raises(ConfigError, match="'kubernetes' is not available"):
        platforms.platform_for(RunMode.KUBERNETES)


def test_docker_platform_builds_client_and_watcher() -> None:
    settings = load_settings({})
    platform = platforms.platform_for(RunMode.DOCKER)
    client = platform.make_client(settings)
    sink = object()
    watcher = platform.make_watcher(client, sink, settings)
    assert watcher.client is client and watcher.sink is sink


# --- facts (files only) ---------------------------------------------------------------------

def test_gather_facts_kubeconfig_env(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "config"
    config.write_text("apiVersion: v1\n")
    monkeypatch.setattr(platforms, "DOCKER_SOCKET", str(tmp_path / "absent.sock"))
    facts = platforms.gather_facts({"KUBECONFIG": f"{tmp_path / 'missing'}:{config}"})
    assert facts == PlatformFacts(kube_config=str(config))


def test_gather_facts_in_cluster_needs_token(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(platforms, "SERVICE_ACCOUNT_DIR", str(tmp_path))
    monkeypatch.setattr(platforms, "KUBE_CONFIG", str(tmp_path / "no-config"))
    monkeypatch.setattr(platforms, "DOCKER_SOCKET", str(tmp_path / "docker.sock"))
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert platforms.gather_facts(env).in_cluster is False
    (tmp_path / "token").write_text("t")
    (tmp_path / "docker.sock").write_text("")
    assert platforms.gather_facts(env) == PlatformFacts(in_cluster=True, docker_socket=True)
    assert platforms.gather_facts({}).in_cluster is False
