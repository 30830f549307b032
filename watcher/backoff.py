"""Backoff delays from tenacity's wait strategies, for loops that sleep between rounds
themselves (a key fetched again later, sshd restarted) rather than retrying one call."""

from __future__ import annotations

import tenacity
from tenacity.wait import wait_base


def delay(wait: wait_base, attempt: int) -> float:
    """Seconds `wait` prescribes before attempt number `attempt` + 1 (attempt >= 1)."""
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = max(1, attempt)
    return float(wait(state))
