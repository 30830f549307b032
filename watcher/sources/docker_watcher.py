"""Docker, the watcher half: one list, then the events stream; reconnect + resync when it breaks.

docker-py's `events()` generator ends silently when the daemon goes away and has no read
timeout, so a half-open socket would hang it: a pinger closes the stream when the daemon
stops answering, and every (re)connect is followed by a full relist (level-triggered).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import docker.errors
import requests
import tenacity

from ..config import Settings
from ..errors import SourceError
from .base import TargetSink
from .docker_client import DockerClient

log = logging.getLogger(__name__)


def event_container_id(event: dict[str, Any]) -> str:
    """The container an event is about (network events carry it as an attribute)."""
    actor = event.get("Actor") or {}
    if event.get("Type") == "network":
        return (actor.get("Attributes") or {}).get("container", "")
    return actor.get("ID") or event.get("id", "")


def event_action(event: dict[str, Any]) -> str:
    """`Action` without docker's suffix (e.g. `exec_start: cat ...` -> `exec_start`)."""
    return (event.get("Action") or event.get("status") or "").split(":", 1)[0].strip()


class DockerWatcher:
    """Feeds a sink (the reconciler) from a Docker engine until `stop` is set."""

    def __init__(self, client: DockerClient, sink: TargetSink, ping_interval: float = 10.0) -> None:
        self.client = client
        self.sink = sink
        self.ping_interval = ping_interval
        self._stream: Any = None
        self.connected = False
        self.reconnects = 0

    def run(self, stop: threading.Event) -> None:
        """Forever: connect, resync, follow events; on any break reconnect with backoff."""
        retrying = tenacity.Retrying(
            wait=tenacity.wait_exponential(multiplier=0.5, max=30),
            retry=tenacity.retry_if_exception_type((docker.errors.DockerException,
                                                    requests.RequestException, SourceError,
                                                    OSError, _StreamEnded)),
            stop=lambda state: stop.is_set(),
            before_sleep=self._before_sleep,
            sleep=lambda seconds: stop.wait(seconds))
        try:
            retrying(self._follow_once, stop)
        except Exception as exc:  # only reached when stopping
            if not stop.is_set():
                raise
            log.debug("docker source stopped: %s", exc)

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        self.connected = False
        self.reconnects += 1
        self.client.reset()
        exc = state.outcome.exception() if state.outcome else None
        log.warning("docker events stream lost (%s); reconnecting in %.1fs",
                    exc or "ended", state.upcoming_sleep)
        self.sink.set_source_status({"kind": "docker", "connected": False,
                                     "error": str(exc), "reconnects": self.reconnects})

    def _follow_once(self, stop: threading.Event) -> None:
        self.client.ping()
        # Subscribe before listing so nothing between the two is missed; the relist then
        # makes the state exact, and later events only refine it.
        stream = self.client.events()
        self._stream = stream
        pinger = threading.Thread(target=self._ping_loop, args=(stream, stop),
                                  daemon=True, name="docker-ping")
        try:
            self.sink.set_proxy_identity(self.client.discover_identity())
            self.sink.replace_all(self.client.list_targets())
            self.connected = True
            self.sink.set_source_status({"kind": "docker", "connected": True, "error": "",
                                         "reconnects": self.reconnects,
                                         "since": time.time()})
            pinger.start()
            for event in stream:
                if stop.is_set():
                    return
                self.handle_event(event)
        finally:
            self._stream = None
            _close_quietly(stream)
        if not stop.is_set():
            raise _StreamEnded("events stream ended")

    def _ping_loop(self, stream: Any, stop: threading.Event) -> None:
        while not stop.wait(self.ping_interval):
            if self._stream is not stream:
                return
            try:
                self.client.ping()
            except Exception as exc:  # any failure means the stream cannot be trusted
                log.warning("docker daemon did not answer a ping (%s): resyncing", exc)
                _close_quietly(stream)
                return
        _close_quietly(stream)  # stop requested: unblock the reader

    def handle_event(self, event: dict[str, Any]) -> None:
        """One event touches one target: re-inspect it and upsert or remove."""
        cid = event_container_id(event)
        if not cid:
            return
        action = event_action(event)
        if action == "destroy":
            self.sink.remove(cid)
            return
        if event.get("Type") == "network" and cid == self.client.identity.container_id:
            # The proxy itself joined or left a network: which targets it shares changes.
            self.sink.set_proxy_identity(self.client.discover_identity())
            self.sink.replace_all(self.client.list_targets())
            return
        target = self.client.inspect_target(cid)
        if target is None:
            self.sink.remove(cid)
        else:
            self.sink.upsert(target)


class _StreamEnded(Exception):
    """The events stream ended (daemon restart, socket closed)."""


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception:  # closing a dead stream may raise anything; it is dead either way
        pass


def from_settings(client: DockerClient, sink: TargetSink, settings: Settings) -> DockerWatcher:
    """The platform entry point (see watcher.platforms)."""
    return DockerWatcher(client, sink)
