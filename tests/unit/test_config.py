"""watcher.config: defaults, every accepted form, every rejected form (named in the error)."""

from __future__ import annotations

import dataclasses

import pytest

from watcher.config import RunMode, Settings, load_settings
from watcher.errors import ConfigError


# --- defaults -------------------------------------------------------------------------

def test_empty_environment_gives_every_default() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.permit_hosts == ("*",)
    assert settings.permit_ports == ("*",)
    assert settings.labels == ()
    assert settings.publickey_api_port == 8080
    assert settings.key_path == "~/.ssh/id_ed25519.pub"
    assert (settings.mode is RunMode.MANUAL) is False
    assert settings.key_sources == ("api", "exec")
    assert settings.any_host is True
    assert settings.any_port is True


def test_unrelated_variables_are_ignored() -> None:
    assert load_settings({"PATH": "/bin", "HOME": "/root", "SSH_PERMIT": "x"}) == Settings()


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.permit_ports = ("22",)  # type: ignore[misc]


# --- SSH_PERMIT_TARGET_HOST -----------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("*", ("*",)),
    ("db-1", ("db-1",)),
    ("workspace-*", ("workspace-*",)),
    ("db-1,web-*", ("db-1", "web-*")),
    (" db-1 , web-* ", ("db-1", "web-*")),
    ("db-1,,web-*,", ("db-1", "web-*")),
    ("db-1,db-1,web", ("db-1", "web")),
    ("web-?", ("web-?",)),
    ("web-[0-9]", ("web-[0-9]",)),
    ("web-[!a]", ("web-[!a]",)),
    ("my_app.example", ("my_app.example",)),
    # '*' anywhere in the list means every target: the list collapses.
    ("db-1,*", ("*",)),
    ("*,web-*", ("*",)),
])
def test_permit_hosts_valid(value: str, expected: tuple[str, ...]) -> None:
    settings = load_settings({"SSH_PERMIT_TARGET_HOST": value})
    assert settings.permit_hosts == expected
    assert settings.any_host is (expected == ("*",))


@pytest.mark.parametrize("value", ["", " ", ",", " , ", "a b", "[abc", "abc]", "db;rm",
                                   "db/1", "db:22", "db'1", 'db"1', "db\n1", "db$x"])
def test_permit_hosts_invalid(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"SSH_PERMIT_TARGET_HOST": value})
    message = str(info.value)
    assert "SSH_PERMIT_TARGET_HOST" in message
    assert repr(value) in message


# --- SSH_PERMIT_TARGET_PORT -----------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("*", ("*",)),
    ("22", ("22",)),
    ("1", ("1",)),
    ("65535", ("65535",)),
    ("22,2222", ("22", "2222")),
    (" 22 , 2222 ", ("22", "2222")),
    ("022", ("22",)),
    ("22,22,0022", ("22",)),
    ("22,*", ("*",)),
    ("*,443", ("*",)),
])
def test_permit_ports_valid(value: str, expected: tuple[str, ...]) -> None:
    settings = load_settings({"SSH_PERMIT_TARGET_PORT": value})
    assert settings.permit_ports == expected
    assert settings.any_port is (expected == ("*",))


@pytest.mark.parametrize("value", ["70000", "65536", "0", "abc", "", " ", "-22", "22.0",
                                   "22,abc", "22 23", "0x16", "+22", "1e3"])
def test_permit_ports_invalid(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"SSH_PERMIT_TARGET_PORT": value})
    message = str(info.value)
    assert "SSH_PERMIT_TARGET_PORT" in message
    assert repr(value) in message


# Regression: str.isdigit() accepts these, int() cannot parse them.
@pytest.mark.parametrize("name", ["SSH_PERMIT_TARGET_PORT", "SSH_TARGET_PUBLICKEY_API_PORT"])
@pytest.mark.parametrize("value", ["\u00b2", "2\u00b2", "\u0662\u0662", "\uff12\uff12"])
def test_port_non_ascii_digits_are_a_config_error(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: value})
    assert name in str(info.value)
    assert repr(value) in str(info.value)


# --- SSH_TARGET_LABELS ----------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("", ()),
    ("   ", ()),
    ("ssh-proxy=enabled", (("ssh-proxy", "enabled"),)),
    ("team", (("team", None),)),
    ("k=v,k2", (("k", "v"), ("k2", None))),
    (" k = v , k2 ", (("k", "v"), ("k2", None))),
    ("com.example.role=db,env=prod", (("com.example.role", "db"), ("env", "prod"))),
    ("k=", (("k", ""),)),
    ("url=http://x:8080/a@b+c", (("url", "http://x:8080/a@b+c"),)),
    ("a/b=c", (("a/b", "c"),)),
])
def test_labels_valid(value: str, expected: tuple) -> None:
    assert load_settings({"SSH_TARGET_LABELS": value}).labels == expected


@pytest.mark.parametrize("value", ["=v", "a=b c", "=", ".a=b", "-a", "a b", "k=v'", 'k="v"',
                                   "k=v;w", "k=v,=x", "k=v\nx"])
def test_labels_invalid(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"SSH_TARGET_LABELS": value})
    message = str(info.value)
    assert "SSH_TARGET_LABELS" in message
    assert repr(value) in message


# --- SSH_TARGET_PUBLICKEY_API_PORT ----------------------------------------------------

@pytest.mark.parametrize("value, expected", [("8080", 8080), ("1", 1), ("65535", 65535),
                                             (" 9000 ", 9000), ("0080", 80)])
def test_api_port_valid(value: str, expected: int) -> None:
    assert load_settings({"SSH_TARGET_PUBLICKEY_API_PORT": value}).publickey_api_port == expected


@pytest.mark.parametrize("value", ["0", "65536", "70000", "", "abc", "*", "-1", "80,81",
                                   "8080 8081"])
def test_api_port_invalid(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"SSH_TARGET_PUBLICKEY_API_PORT": value})
    message = str(info.value)
    assert "SSH_TARGET_PUBLICKEY_API_PORT" in message
    assert repr(value) in message


# --- SSH_TARGET_KEY_PATH --------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("~/.ssh/id_ed25519.pub", "~/.ssh/id_ed25519.pub"),
    ("/etc/ssh/key.pub", "/etc/ssh/key.pub"),
    ("~/my keys/it's.pub", "~/my keys/it's.pub"),
    ("  /a/b.pub  ", "/a/b.pub"),
    ("/a/..b/c", "/a/..b/c"),
])
def test_key_path_valid(value: str, expected: str) -> None:
    assert load_settings({"SSH_TARGET_KEY_PATH": value}).key_path == expected


@pytest.mark.parametrize("value", [
    "relative/path", "id.pub", "~/../x", "/etc/../x", "/a/..", "~/..", "~", "~user/x",
    "/a/b\nc", "/a/\tb", "/a/b\x00", "/a/b\x7f", "/", "~/", "/etc/ssh/", "",
])
def test_key_path_invalid(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"SSH_TARGET_KEY_PATH": value})
    message = str(info.value)
    assert "SSH_TARGET_KEY_PATH" in message
    assert repr(value) in message


# --- MANUAL_AUTH_FILE -----------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True), (" On ", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("off", False), ("", False),
])
def test_manual_auth_file_valid(value: str, expected: bool) -> None:
    assert (load_settings({"MANUAL_AUTH_FILE": value}).mode is RunMode.MANUAL) is expected


@pytest.mark.parametrize("value", ["maybe", "2", "y", "n", "tru", "enabled"])
def test_manual_auth_file_invalid(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"MANUAL_AUTH_FILE": value})
    message = str(info.value)
    assert "MANUAL_AUTH_FILE" in message
    assert repr(value) in message


# --- SSH_TARGET_KEY_SOURCE ------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("api,exec", ("api", "exec")),
    (" api , exec ", ("api", "exec")),
    ("API,Exec", ("api", "exec")),
    ("api", ("api",)),
    ("exec", ("exec",)),
    (" exec ", ("exec",)),
])
def test_key_source_valid(value: str, expected: tuple[str, ...]) -> None:
    assert load_settings({"SSH_TARGET_KEY_SOURCE": value}).key_sources == expected


@pytest.mark.parametrize("value", ["", " ", ",", "http", "file", "exec,api", "api,api",
                                   "api,exec,api", "api;exec", "api exec", "apiexec", "*",
                                   "api,\x00exec", "exec\x1b[2J"])
def test_key_source_invalid(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"SSH_TARGET_KEY_SOURCE": value})
    message = str(info.value)
    assert message.startswith(f"SSH_TARGET_KEY_SOURCE={value!r}: ")
    # The message lists every accepted form.
    for form in ("'api,exec'", "'api'", "'exec'"):
        assert form in message


# --- everything at once -----------------------------------------------------------------

def test_full_environment() -> None:
    settings = load_settings({
        "SSH_PERMIT_TARGET_HOST": "db-*,web-1",
        "SSH_PERMIT_TARGET_PORT": "22,5432",
        "SSH_TARGET_LABELS": "ssh-proxy=on,team",
        "SSH_TARGET_PUBLICKEY_API_PORT": "9090",
        "SSH_TARGET_KEY_PATH": "/keys/id.pub",
        "MANUAL_AUTH_FILE": "no",
        "SSH_TARGET_KEY_SOURCE": "exec",
    })
    assert settings == Settings(permit_hosts=("db-*", "web-1"), permit_ports=("22", "5432"),
                                labels=(("ssh-proxy", "on"), ("team", None)),
                                publickey_api_port=9090, key_path="/keys/id.pub",
                                mode=RunMode.DOCKER, key_sources=("exec",))
    assert settings.any_host is False
    assert settings.any_port is False


def test_first_bad_variable_is_the_one_reported() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"SSH_PERMIT_TARGET_PORT": "abc", "MANUAL_AUTH_FILE": "maybe"})
    assert "SSH_PERMIT_TARGET_PORT" in str(info.value)
    assert "MANUAL_AUTH_FILE" not in str(info.value)


@pytest.mark.parametrize("value, expected", [
    ("cluster.local", "cluster.local"), (" Corp.Example. ", "corp.example"), ("k8s", "k8s")])
def test_cluster_domain(value: str, expected: str) -> None:
    assert load_settings({"KUBERNETES_CLUSTER_DOMAIN": value}).cluster_domain == expected


@pytest.mark.parametrize("value", ["", "a..b", "-x.local", "x_y.local", "c\n.local", "a b"])
def test_cluster_domain_invalid(value: str) -> None:
    with pytest.raises(ConfigError, match="KUBERNETES_CLUSTER_DOMAIN"):
        load_settings({"KUBERNETES_CLUSTER_DOMAIN": value})


def test_host_permitted() -> None:
    assert load_settings({}).host_permitted("anything")
    settings = load_settings({"SSH_PERMIT_TARGET_HOST": "ws-*,db-1"})
    assert settings.host_permitted("ws-a") and settings.host_permitted("db-1")
    assert not settings.host_permitted("db-2") and not settings.host_permitted("WS-a")
