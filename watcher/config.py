"""Environment -> Settings. Pure: takes a mapping, returns a frozen value or raises ConfigError.

Every error names the variable, the value it got and the form it expects, so a typo stops
start-up with one clear line before sshd listens.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Mapping

from .errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}
# Always used with fullmatch: with match, `$` also matches before a final newline.
# A host pattern: Docker/Kubernetes name characters plus the glob characters * ? [ ].
_HOST_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]*")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9_./:@+-]*")
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits only: str.isdigit() accepts '²'
_DOMAIN = re.compile(r"(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_KEY_PATH = re.compile(r"(~/|/)[^\x00-\x1f\x7f]*")


class RunMode(str, Enum):
    """Where targets come from: the one value every component reads to decide its behaviour."""

    DOCKER = "docker"
    KUBERNETES = "kubernetes"
    MANUAL = "manual"

    @property
    def discovers(self) -> bool:
        """Targets are discovered: the watcher renders the cache, pins names in /etc/hosts and
        scopes admin lines to the discovered targets. Without discovery (manual) the cache is
        the admin's input and sshd_config's PermitOpen is the only host check."""
        return self is not RunMode.MANUAL


@dataclass(frozen=True)
class PlatformFacts:
    """What exists on this machine, gathered by an adapter (`cli`), so choosing is pure."""

    in_cluster: bool = False  # KUBERNETES_SERVICE_HOST set and a service-account token mounted
    kube_config: str = ""  # the kube config file found ($KUBECONFIG or /root/.kube/config)
    docker_socket: bool = False  # /var/run/docker.sock exists


DOCKER_SOCKET = "/var/run/docker.sock"
KUBE_CONFIG = "/root/.kube/config"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

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
    key_sources: tuple[KeySource, ...] = ("api", "exec")
    """SSH_TARGET_KEY_SOURCE: where a target's key is read, in order: `api` = its
    GET /publickey over plain HTTP, `exec` = its key file read by the platform's exec
    (docker exec, or a pod exec through the Kubernetes API)."""
    mode: RunMode = RunMode.DOCKER
    """SSH_PROXY_MODE, else detected: MANUAL_AUTH_FILE=true -> manual (no discovery, the admin
    maintains the key files), else kubernetes or docker (see `choose_mode`)."""

    cluster_domain: str = "cluster.local"
    """KUBERNETES_CLUSTER_DOMAIN: the cluster's DNS domain, for `svc.ns.svc.<domain>` names."""

    docker_host: str = "unix://" + DOCKER_SOCKET
    """DOCKER_HOST: the engine's API (`unix:///path` or `tcp://host:port`), as the docker CLI."""
    source_outage_seconds: int = 60
    """SSH_PROXY_SOURCE_OUTAGE_SECONDS: how long the platform may stay unreachable before the
    proxy exits non-zero, so its restart policy recreates it (and its socket mount)."""
    drain_seconds: int = 8
    """SSH_PROXY_DRAIN_SECONDS: on stop, how long open tunnels may go on (new logins are refused
    at once); inside Docker's default 10 s stop timeout."""
    access_log_max_bytes: int = 10 * 1024 * 1024
    """ACCESS_LOG_MAX_BYTES: access.log is rotated when a line would take it past this size."""
    access_log_backups: int = 5
    """ACCESS_LOG_BACKUPS: rotated access logs kept (access.log.1 ... .N)."""
    log_level: str = "info"
    """WATCHER_LOG_LEVEL: the watcher's own log, one of LOG_LEVELS (lower case)."""
    metrics_port: int | None = None
    """WATCHER_METRICS_PORT: the TCP port of the Prometheus metrics endpoint, on all of the
    container's addresses; None (unset or empty) = no endpoint."""

    @property
    def any_host(self) -> bool:
        return "*" in self.permit_hosts

    def host_permitted(self, name: str) -> bool:
        """SSH_PERMIT_TARGET_HOST matches `name` (a target's or a Service's name)."""
        return self.any_host or any(fnmatch.fnmatchcase(name, p) for p in self.permit_hosts)

    @property
    def any_port(self) -> bool:
        return "*" in self.permit_ports


LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_log_level(value: str) -> str:
    """WATCHER_LOG_LEVEL, any case; only the levels the watcher logs at (not every name
    the logging module happens to have)."""
    level = value.lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"WATCHER_LOG_LEVEL={value!r}: expected one of {', '.join(LOG_LEVELS)}")
    return level


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_permit_hosts(value: str) -> tuple[str, ...]:
    name = "SSH_PERMIT_TARGET_HOST"
    parts = _split(value)
    if not parts:
        raise ConfigError(f"{name}={value!r}: expected a glob on target names such as '*', "
                          "'workspace-*' or a comma list 'db-1,web-*'")
    for part in parts:
        if not _HOST_PATTERN.fullmatch(part):
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
        if not _PORT.fullmatch(part) or not 1 <= int(part) <= 65535:
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
        if not _LABEL_KEY.fullmatch(key):
            raise ConfigError(f"{name}={value!r}: {part!r} is not 'key=value' or 'key' "
                              "(a label key starts with a letter or digit)")
        if sep:
            val = val.strip()
            if not _LABEL_VALUE.fullmatch(val):
                raise ConfigError(f"{name}={value!r}: the value in {part!r} has characters "
                                  "a label value cannot have")
            out.append((key, val))
        else:
            out.append((key, None))
    return tuple(out)


def parse_port(name: str, value: str) -> int:
    text = value.strip()
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{name}={value!r}: expected a TCP port 1-65535")
    return int(text)


def parse_optional_port(name: str, value: str) -> int | None:
    """A port 1-65535, or None for an empty value (the feature is off)."""
    return parse_port(name, value) if value.strip() else None


def parse_key_path(value: str) -> str:
    name = "SSH_TARGET_KEY_PATH"
    text = value.strip()
    if not _KEY_PATH.fullmatch(text) or "/../" in text + "/" or text.endswith("/"):
        raise ConfigError(f"{name}={value!r}: expected an absolute file path or one under the "
                          "target user's home such as '~/.ssh/id_ed25519.pub'")
    return text


def parse_domain(name: str, value: str) -> str:
    text = value.strip().lower().rstrip(".")
    if not _DOMAIN.fullmatch(text):
        raise ConfigError(f"{name}={value!r}: expected a DNS domain such as 'cluster.local'")
    return text


def parse_key_source(value: str) -> tuple[KeySource, ...]:
    name = "SSH_TARGET_KEY_SOURCE"
    text = ",".join(_split(value.lower()))
    if text not in KEY_SOURCES:
        raise ConfigError(f"{name}={value!r}: expected 'api,exec' (GET /publickey, then the key "
                          "file by exec; the default), 'api' (GET /publickey only) or "
                          "'exec' (the key file by exec only)")
    return KEY_SOURCES[text]


def parse_int(name: str, value: str, low: int, high: int, what: str) -> int:
    """A whole number in [low, high]; `what` says what it counts, for the error."""
    text = value.strip()
    if not re.fullmatch(r"[0-9]{1,12}", text) or not low <= int(text) <= high:
        raise ConfigError(f"{name}={value!r}: expected {what}, a whole number {low}-{high}")
    return int(text)


_DOCKER_HOST = re.compile(r"unix:///[^\x00-\x1f\x7f]+|tcp://[A-Za-z0-9.:\[\]-]+:[0-9]{1,5}")


def parse_docker_host(value: str) -> str:
    text = value.strip()
    if not _DOCKER_HOST.fullmatch(text):
        raise ConfigError(f"DOCKER_HOST={value!r}: expected 'unix:///path/to/docker.sock' or "
                          "'tcp://host:port' (the default is unix:///var/run/docker.sock)")
    return text


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
    if settings.mode.discovers or settings.any_host:
        return
    patterns = [h for h in settings.permit_hosts if _GLOB_CHARS & set(h)]
    if patterns:
        raise ConfigError(
            f"SSH_PERMIT_TARGET_HOST={','.join(settings.permit_hosts)!r}: with "
            f"MANUAL_AUTH_FILE=true, {patterns[0]!r} cannot be enforced (stock sshd's "
            "PermitOpen takes only '*' or exact hosts, and there is no discovery to expand "
            "the pattern). List the hosts exactly (e.g. 'workspace-a,workspace-b'), or set "
            "'*' and give each key its own permitopen=\"host:port\" option")


def choose_mode(env: Mapping[str, str], facts: PlatformFacts) -> RunMode:
    """`SSH_PROXY_MODE` when set; else MANUAL_AUTH_FILE=true -> manual; else in-cluster config
    or a kube config -> kubernetes; else the Docker socket -> docker; else a ConfigError that
    names everything looked for."""
    manual = parse_bool("MANUAL_AUTH_FILE", env.get("MANUAL_AUTH_FILE", "false"))
    forced = env.get("SSH_PROXY_MODE", "").strip().lower()
    if forced:
        try:
            mode = RunMode(forced)
        except ValueError:
            raise ConfigError(f"SSH_PROXY_MODE={env['SSH_PROXY_MODE']!r}: expected one of "
                              f"{', '.join(m.value for m in RunMode)}") from None
        if manual and mode is not RunMode.MANUAL:
            raise ConfigError(f"SSH_PROXY_MODE={forced!r} contradicts MANUAL_AUTH_FILE=true: "
                              "unset one of them")
        return mode
    if manual:
        return RunMode.MANUAL
    if facts.in_cluster or facts.kube_config:
        return RunMode.KUBERNETES
    if facts.docker_socket:
        return RunMode.DOCKER
    raise ConfigError(
        "no platform to discover targets on: looked for a Kubernetes in-cluster service account "
        f"({SERVICE_ACCOUNT_DIR}), a kube config ($KUBECONFIG or {KUBE_CONFIG}) and the Docker "
        f"socket ({DOCKER_SOCKET}); mount one (e.g. -v {DOCKER_SOCKET}:{DOCKER_SOCKET}), or set "
        "MANUAL_AUTH_FILE=true to serve only the keys you maintain")


def load_settings(env: Mapping[str, str], facts: PlatformFacts | None = None) -> Settings:
    """Read and validate every variable; the first bad one raises ConfigError.

    `facts`: what exists on this machine, to choose the run mode; None (a config check
    without a platform) assumes Docker unless the environment says otherwise."""
    settings = _read_settings(env, facts or PlatformFacts(docker_socket=True))
    check_manual_mode(settings)
    return settings


def _read_settings(env: Mapping[str, str], facts: PlatformFacts) -> Settings:
    return Settings(
        permit_hosts=parse_permit_hosts(env.get("SSH_PERMIT_TARGET_HOST", "*")),
        permit_ports=parse_permit_ports(env.get("SSH_PERMIT_TARGET_PORT", "*")),
        labels=parse_labels(env.get("SSH_TARGET_LABELS", "")),
        publickey_api_port=parse_port("SSH_TARGET_PUBLICKEY_API_PORT",
                                      env.get("SSH_TARGET_PUBLICKEY_API_PORT", "8080")),
        key_path=parse_key_path(env.get("SSH_TARGET_KEY_PATH", "~/.ssh/id_ed25519.pub")),
        key_sources=parse_key_source(env.get("SSH_TARGET_KEY_SOURCE", "api,exec")),
        cluster_domain=parse_domain("KUBERNETES_CLUSTER_DOMAIN",
                                    env.get("KUBERNETES_CLUSTER_DOMAIN", "cluster.local")),
        mode=choose_mode(env, facts),
        docker_host=parse_docker_host(env.get("DOCKER_HOST") or "unix://" + DOCKER_SOCKET),
        source_outage_seconds=parse_int("SSH_PROXY_SOURCE_OUTAGE_SECONDS",
                                        env.get("SSH_PROXY_SOURCE_OUTAGE_SECONDS", "60"),
                                        5, 86400, "seconds"),
        drain_seconds=parse_int("SSH_PROXY_DRAIN_SECONDS", env.get("SSH_PROXY_DRAIN_SECONDS", "8"),
                                0, 3600, "seconds"),
        access_log_max_bytes=parse_int("ACCESS_LOG_MAX_BYTES",
                                       env.get("ACCESS_LOG_MAX_BYTES", str(10 * 1024 * 1024)),
                                       4096, 2**40, "bytes"),
        access_log_backups=parse_int("ACCESS_LOG_BACKUPS", env.get("ACCESS_LOG_BACKUPS", "5"),
                                     0, 100, "rotated files kept"),
        log_level=parse_log_level(env.get("WATCHER_LOG_LEVEL", "info")),
        metrics_port=parse_optional_port("WATCHER_METRICS_PORT",
                                         env.get("WATCHER_METRICS_PORT", "")),
    )
