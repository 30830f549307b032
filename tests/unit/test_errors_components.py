"""A component crashes (issue 13): an exception escaping the reconciler loop, the syslog
listener or the manual-key source stops the proxy with exit 1 and one clear line, sshd
stopped; an exception inside a key fetch becomes a failed fetch with backoff, never a
target left `fetching` forever."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from watcher.app import Supervisor
from watcher.fetch import FetchPolicy, KeyFetcher
from watcher.model import Target
from watcher.reconcile import retry_delay

from test_errors_startup import MANUAL, _paths
from test_reconcile import Harness, target


@pytest.fixture(autouse=True)
def _no_real_connections(monkeypatch) -> None:
    """The drain looks at every sshd on the machine: never at other tests' containers."""
    monkeypatch.setattr("watcher.app.open_connections", lambda proc: [])


class Boom(RuntimeError):
    pass


def _crash(*_: object) -> None:
    raise Boom("disk controller on fire")


@pytest.mark.parametrize(("component", "method"), [
    ("reconcile", "watcher.app.Reconciler.run"),
    ("syslog", "watcher.app.SyslogListener.serve"),
    ("manual-keys", "watcher.app.ManualKeySource.run"),
    ("sshd", "watcher.app.SshdProcess.supervise"),
])
def test_a_crashing_component_stops_the_proxy_with_exit_1(component: str, method: str,
                                                         tmp_path: Path, monkeypatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    paths = _paths(tmp_path)
    monkeypatch.setattr(method, _crash)
    supervisor = Supervisor(MANUAL, paths)
    with caplog.at_level(logging.DEBUG, logger="watcher.app"):
        code = supervisor.run()  # returns by itself: the crash stops everything
    assert code == 1
    assert supervisor.sshd.pid is None, "sshd still runs after a component crashed"
    assert supervisor.sshd.process is not None and supervisor.sshd.process.returncode is not None
    assert not paths.syslog_socket.exists(), "the log socket outlived the proxy"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    line = errors[0].getMessage()
    assert component in line and "Boom" in line and "disk controller on fire" in line
    assert "exit" in line and "restart" in line  # what happens, what acts on it
    assert errors[0].exc_info is None  # one line: the traceback only at debug level
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)


def test_a_bug_in_a_key_source_is_a_failed_fetch_not_an_exception() -> None:
    def broken_exec(target: Target, argv: list[str], limit: int) -> bytes:
        raise KeyError("an adapter bug")

    fetcher = KeyFetcher(8080, "/k.pub", broken_exec, policy=FetchPolicy(attempts=1),
                         sources=("exec",))
    state = fetcher.fetch(target("web", 1))
    assert state.status == "failed" and "KeyError" in state.error and "exec" in state.error


class Abort(BaseException):
    """Not an Exception: what `except Exception` in a worker lets through."""


@pytest.mark.parametrize("raised", [RuntimeError("adapter bug"), Abort("worker torn down")],
                         ids=["Exception", "BaseException"])
def test_a_fetch_worker_that_raises_leaves_a_failed_fetch_with_backoff(raised: BaseException) -> None:
    harness = Harness()
    try:
        def fetch(t: Target):
            raise raised

        harness.fetch.results["web"] = fetch
        harness.rec.upsert(target("web", 1))
        harness.settle()
        entry = next(iter(harness.rec.entries.values()))
        assert not entry.fetching, "the target stays `fetching` forever"
        assert entry.keys.status == "failed" and str(raised) in entry.keys.error
        assert entry.failures == 1
        assert entry.retry_at == pytest.approx(harness.clock() + retry_delay(1))
    finally:
        harness.rec.pool.shutdown(wait=True, cancel_futures=True)
