"""Environment -> Settings. Pure: takes a mapping, returns a frozen value or raises ConfigError.

Every error names the variable, the value it got and the form it expects, so a typo stops
start-up with one clear line before sshd listens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping

from .errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}
# A host pattern: Docker/Kubernetes name characters plus the glob characters * ? [ ].
_HOST_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]+$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_./:@+-]*$")
_PORT = re.compile(r"^[0-9]{1,5}$")  # ASCII digits only: str.isdigit() accepts '²'
_KEY_PATH = re.compile(r"^(~/|/)[^\x00-\x1f\x7f]*$")

KeySource = Literal["api", "exec"]
# The accepted spellings, each an order of sources. No `exec,api`: preferring exec gains
# nothing over `exec` alone but lets a target that breaks its key file reach HTTP.
KEY_SOURCES: dict[str, tuple[KeySource, ...]] = {
    "api,exec": ("api", "exec"),
    "api": ("api",),
    "exec": ("exec",),
}


@dataclass(frozen=True)
class Settings:
    """What the user configured, validated."""

    permit_hosts: tuple[str, ...] = ("*",)
    """SSH_PERMIT_TARGET_HOST: globs on the target's name (comma list); `*` = every target."""
    permit_ports: tuple[str, ...] = ("*",)
    """SSH_PERMIT_TARGET_PORT: ports a tunnel may open on a target; `*` = any port."""
    labels: tuple[tuple[str, str | None], ...] = ()
    """SSH_TARGET_LABELS: `k=v` (label equals) or `k` (label present); all must match."""
    publickey_api_port: int = 8080
    """SSH_TARGET_PUBLICKEY_API_PORT: the port of the target's `GET /publickey`."""
    key_path: str = "~/.ssh/id_ed25519.pub"
    """SSH_TARGET_KEY_PATH: key file read by exec when HTTP fails; `~` = exec user's home."""
    manual_auth_file: bool = False
    """MANUAL_AUTH_FILE: true = no discovery, the admin maintains the key files."""
    key_sources: tuple[KeySource, ...] = ("api", "exec")
    """SSH_TARGET_KEY_SOURCE: where a target's key is read, in order: `api` = its
    GET /publickey over plain HTTP, `exec` = its key file by docker exec."""

    @property
    def any_host(self) -> bool:
        return "*" in self.permit_hosts

    @property
    def any_port(self) -> bool:
        return "*" in self.permit_ports


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_permit_hosts(value: str) -> tuple[str, ...]:
    name = "SSH_PERMIT_TARGET_HOST"
    parts = _split(value)
    if not parts:
        raise ConfigError(f"{name}={value!r}: expected a glob on target names such as '*', "
                          "'workspace-*' or a comma list 'db-1,web-*'")
    for part in parts:
        if not _HOST_PATTERN.match(part):
            raise ConfigError(f"{name}={value!r}: {part!r} is not a host name or glob "
                              "(letters, digits, '.', '-', '_' and the globs '*', '?', '[...]')")
        if part.count("[") != part.count("]"):
            raise ConfigError(f"{name}={value!r}: {part!r} has an unbalanced '[' ... ']'")
    return ("*",) if "*" in parts else tuple(dict.fromkeys(parts))


def parse_permit_ports(value: str) -> tuple[str, ...]:
    name = "SSH_PERMIT_TARGET_PORT"
    parts = _split(value)
    if not parts:
        raise ConfigError(f"{name}={value!r}: expected '*', a port such as '22' "
                          "or a comma list '22,2222'")
    for part in parts:
        if part == "*":
            continue
        if not _PORT.match(part) or not 1 <= int(part) <= 65535:
            raise ConfigError(f"{name}={value!r}: {part!r} is not '*' or a port 1-65535")
    if "*" in parts:
        return ("*",)
    return tuple(dict.fromkeys(str(int(p)) for p in parts))


def parse_labels(value: str) -> tuple[tuple[str, str | None], ...]:
    name = "SSH_TARGET_LABELS"
    out: list[tuple[str, str | None]] = []
    for part in _split(value):
        key, sep, val = part.partition("=")
        key = key.strip()
        if not _LABEL_KEY.match(key):
            raise ConfigError(f"{name}={value!r}: {part!r} is not 'key=value' or 'key' "
                              "(a label key starts with a letter or digit)")
        if sep:
            val = val.strip()
            if not _LABEL_VALUE.match(val):
                raise ConfigError(f"{name}={value!r}: the value in {part!r} has characters "
                                  "a label value cannot have")
            out.append((key, val))
        else:
            out.append((key, None))
    return tuple(out)


def parse_port(name: str, value: str) -> int:
    text = value.strip()
    if not _PORT.match(text) or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{name}={value!r}: expected a TCP port 1-65535")
    return int(text)


def parse_key_path(value: str) -> str:
    name = "SSH_TARGET_KEY_PATH"
    text = value.strip()
    if not _KEY_PATH.match(text) or "/../" in text + "/" or text.endswith("/"):
        raise ConfigError(f"{name}={value!r}: expected an absolute file path or one under the "
                          "target user's home such as '~/.ssh/id_ed25519.pub'")
    return text


def parse_key_source(value: str) -> tuple[KeySource, ...]:
    name = "SSH_TARGET_KEY_SOURCE"
    text = ",".join(_split(value.lower()))
    if text not in KEY_SOURCES:
        raise ConfigError(f"{name}={value!r}: expected 'api,exec' (GET /publickey, then the key "
                          "file by docker exec; the default), 'api' (GET /publickey only) or "
                          "'exec' (the key file by docker exec only)")
    return KEY_SOURCES[text]


def parse_bool(name: str, value: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r}: expected 'true' or 'false'")


_GLOB_CHARS = set("*?[]!")


def check_manual_mode(settings: Settings) -> None:
    """Without discovery, sshd_config's PermitOpen is the only host check, and it takes
    `*` or exact hosts: a pattern would have to be widened to `*`. Refuse instead."""
    if not settings.manual_auth_file or settings.any_host:
        return
    patterns = [h for h in settings.permit_hosts if _GLOB_CHARS & set(h)]
    if patterns:
        raise ConfigError(
            f"SSH_PERMIT_TARGET_HOST={','.join(settings.permit_hosts)!r}: with "
            f"MANUAL_AUTH_FILE=true, {patterns[0]!r} cannot be enforced (stock sshd's "
            "PermitOpen takes only '*' or exact hosts, and there is no discovery to expand "
            "the pattern). List the hosts exactly (e.g. 'workspace-a,workspace-b'), or set "
            "'*' and give each key its own permitopen=\"host:port\" option")


def load_settings(env: Mapping[str, str]) -> Settings:
    """Read and validate every variable; the first bad one raises ConfigError."""
    settings = _read_settings(env)
    check_manual_mode(settings)
    return settings


def _read_settings(env: Mapping[str, str]) -> Settings:
    return Settings(
        permit_hosts=parse_permit_hosts(env.get("SSH_PERMIT_TARGET_HOST", "*")),
        permit_ports=parse_permit_ports(env.get("SSH_PERMIT_TARGET_PORT", "*")),
        labels=parse_labels(env.get("SSH_TARGET_LABELS", "")),
        publickey_api_port=parse_port("SSH_TARGET_PUBLICKEY_API_PORT",
                                      env.get("SSH_TARGET_PUBLICKEY_API_PORT", "8080")),
        key_path=parse_key_path(env.get("SSH_TARGET_KEY_PATH", "~/.ssh/id_ed25519.pub")),
        manual_auth_file=parse_bool("MANUAL_AUTH_FILE", env.get("MANUAL_AUTH_FILE", "false")),
        key_sources=parse_key_source(env.get("SSH_TARGET_KEY_SOURCE", "api,exec")),
    )
