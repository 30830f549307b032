"""Run mode -> the platform's client and watcher. The only place that knows them all.

Each entry names the two modules' factories lazily, so a mode imports only its own client
library (no `kubernetes` import in Docker mode). A new platform is its two modules plus one
entry here and one RunMode value.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .config import (DOCKER_SOCKET, KUBE_CONFIG, SERVICE_ACCOUNT_DIR, PlatformFacts, RunMode,
                     Settings)
from .errors import ConfigError
from .sources.base import PlatformClient, TargetSink, TargetWatcher


@dataclass(frozen=True)
class Platform:
    client: str  # "module:callable" taking (settings) -> PlatformClient
    watcher: str  # "module:callable" taking (client, sink, settings) -> TargetWatcher

    def make_client(self, settings: Settings) -> PlatformClient:
        return _load(self.client)(settings)

    def make_watcher(self, client: PlatformClient, sink: TargetSink,
                     settings: Settings) -> TargetWatcher:
        return _load(self.watcher)(client, sink, settings)


PLATFORMS: dict[RunMode, Platform] = {
    RunMode.DOCKER: Platform("watcher.sources.docker_client:from_settings",
                             "watcher.sources.docker_watcher:from_settings"),
    RunMode.KUBERNETES: Platform("watcher.sources.kubernetes_client:from_settings",
                                 "watcher.sources.kubernetes_watcher:from_settings"),
}


def platform_for(mode: RunMode) -> Platform | None:
    """The platform of a discovering mode; None for manual mode (no discovery)."""
    if not mode.discovers:
        return None
    if mode not in PLATFORMS:
        raise ConfigError(f"run mode {mode.value!r} is not available in this build; "
                          f"use one of: {', '.join(m.value for m in PLATFORMS)} or manual")
    return PLATFORMS[mode]


def gather_facts(env: Mapping[str, str] = os.environ) -> PlatformFacts:
    """Which platforms this machine offers (files only; nothing is contacted)."""
    token = Path(SERVICE_ACCOUNT_DIR) / "token"
    in_cluster = bool(env.get("KUBERNETES_SERVICE_HOST")) and token.is_file()
    candidates = [p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p] or [KUBE_CONFIG]
    kube_config = next((p for p in candidates if Path(p).is_file()), "")
    return PlatformFacts(in_cluster=in_cluster, kube_config=kube_config,
                         docker_socket=os.path.exists(DOCKER_SOCKET))


def _load(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
