"""The fault settings (issue 13): defaults, accepted forms, and errors that name the variable."""

from __future__ import annotations

import pytest

from watcher.config import load_settings
from watcher.errors import ConfigError


def test_defaults() -> None:
    settings = load_settings({})
    assert settings.docker_host == "unix:///var/run/docker.sock"
    assert settings.source_outage_seconds == 60
    assert settings.drain_seconds == 8  # inside docker stop's default 10 s
    assert settings.access_log_max_bytes == 10 * 1024 * 1024
    assert settings.access_log_backups == 5


def test_accepted_values() -> None:
    settings = load_settings({"DOCKER_HOST": "unix:///var/run/dockerdir/docker.sock",
                              "SSH_PROXY_SOURCE_OUTAGE_SECONDS": " 5 ", "SSH_PROXY_DRAIN_SECONDS": "0",
                              "ACCESS_LOG_MAX_BYTES": "4096", "ACCESS_LOG_BACKUPS": "0"})
    assert settings.docker_host == "unix:///var/run/dockerdir/docker.sock"
    assert (settings.source_outage_seconds, settings.drain_seconds) == (5, 0)
    assert (settings.access_log_max_bytes, settings.access_log_backups) == (4096, 0)
    assert load_settings({"DOCKER_HOST": "tcp://socket-proxy:2375"}).docker_host == "tcp://socket-proxy:2375"
    assert load_settings({"DOCKER_HOST": ""}).docker_host == "unix:///var/run/docker.sock"


@pytest.mark.parametrize("name, value", [
    ("DOCKER_HOST", "ssh://user@host"),
    ("DOCKER_HOST", "unix://relative.sock"),
    ("DOCKER_HOST", "tcp://host"),
    ("SSH_PROXY_SOURCE_OUTAGE_SECONDS", "4"),
    ("SSH_PROXY_SOURCE_OUTAGE_SECONDS", "1m"),
    ("SSH_PROXY_SOURCE_OUTAGE_SECONDS", "-1"),
    ("SSH_PROXY_DRAIN_SECONDS", "3601"),
    ("SSH_PROXY_DRAIN_SECONDS", "8.5"),
    ("ACCESS_LOG_MAX_BYTES", "100"),
    ("ACCESS_LOG_MAX_BYTES", "10M"),
    ("ACCESS_LOG_BACKUPS", "101"),
    ("ACCESS_LOG_BACKUPS", "²"),
])
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({name: value})
    assert str(raised.value).startswith(f"{name}={value!r}: expected")
