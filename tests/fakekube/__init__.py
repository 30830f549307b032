"""A fake Kubernetes API server for tests, driven by the real `kubernetes` client."""

from .objects import make_pod, make_service, set_ready, with_changes
from .server import V4, V5, ExecCall, ExecResult, FakeKube, Recorded

__all__ = ["FakeKube", "ExecCall", "ExecResult", "Recorded", "V4", "V5", "make_pod",
           "make_service", "set_ready", "with_changes"]
