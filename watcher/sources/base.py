"""What every platform provides, so the supervisor wires any of them the same way.

A platform is two parts (two modules): a client that answers questions about one target
(inspect, exec-read a key file) and a watcher that follows the platform's change stream and
feeds a sink (the reconciler): the proxy's own identity first, then Target values.
"""

from __future__ import annotations

import threading
from typing import Iterable, Protocol

from ..model import Target
from ..targets import ProxyIdentity


class TargetSink(Protocol):
    """Where a watcher sends what it sees (the reconciler; thread-safe)."""

    def upsert(self, target: Target) -> None: ...

    def remove(self, target_id: str) -> None: ...

    def replace_all(self, targets: Iterable[Target]) -> None: ...

    def ready(self, target_id: str) -> None:
        """The target reports ready (e.g. Docker health check passed): a key it did not
        have yet is fetched now."""
        ...

    def set_source_status(self, status: dict) -> None: ...

    def set_proxy_identity(self, proxy: ProxyIdentity) -> None: ...


class PlatformClient(Protocol):
    def exec_read(self, target: Target, argv: list[str], limit: int) -> bytes:
        """Run argv in the target; at most `limit` bytes of stdout (FetchError on failure)."""
        ...


class TargetWatcher(Protocol):
    def run(self, stop: threading.Event) -> None:
        """Follow the platform until `stop` is set; reconnect and resync on any break."""
        ...
