"""How long a platform has kept refusing: shared by the Docker and Kubernetes sources, which
give up (SourceError, exit non-zero) after SSH_PROXY_SOURCE_OUTAGE_SECONDS of failures so
the restart policy starts the proxy afresh."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Outage:
    """Failed (re)connect attempts since the platform last answered. Pure: the caller gives
    the time, so a fake clock can drive it."""

    limit: float  # seconds of failing before giving up
    started: float | None = None  # clock value of the first failure, None while connected
    attempts: int = 0
    error: str = ""

    def failed(self, error: str, now: float) -> None:
        if self.started is None:
            self.started = now
        self.attempts += 1
        self.error = error

    def over(self, now: float) -> bool:
        """The platform has failed every attempt for `limit` seconds: time to give up."""
        return self.started is not None and now - self.started >= self.limit

    def ended(self) -> None:
        self.started, self.attempts, self.error = None, 0, ""

    def status(self, now: float) -> dict[str, Any]:
        return {"state": "reconnecting", "attempt": self.attempts, "error": self.error,
                "outage_seconds": round(now - (self.started or now), 1),
                "gives_up_after": self.limit}
