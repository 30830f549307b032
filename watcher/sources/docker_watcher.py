"""Docker, the watcher half: one list, then the events stream; reconnect + resync when it breaks.

docker-py's `events()` generator ends silently when the daemon goes away and has no read
timeout, so a half-open socket would hang it: a pinger closes the stream when the daemon
stops answering, and every (re)connect is followed by a full relist (level-triggered).

The stream is read by one thread that only notes which containers an event is about
(`DirtyKeys`); INSPECTORS threads inspect them, each container by one thread at a time and
again if an event came during its inspect. The engine drops the events of a subscriber
that reads too slowly, so the reader never waits on an inspect.

Outages: reconnects back off to at most RECONNECT_CAP seconds, so an engine that comes back
is followed within seconds. A restarted engine makes a new socket file; a bind mount of the
old file never sees it, so an engine that stays unreachable for `outage_limit` seconds ends
the watcher with a SourceError: the proxy exits non-zero and its restart policy mounts anew.
sshd serves the last good keys all the while.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import docker.errors
import requests
import tenacity

from ..config import Settings
from ..errors import SourceError
from .base import TargetSink
from .dirty import DirtyKeys
from .docker_client import DockerClient
from .outage import Outage

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


def event_health(event: dict[str, Any]) -> str:
    """The status of a `health_status: <status>` event ("healthy", "unhealthy", "starting")."""
    action = event.get("Action") or event.get("status") or ""
    return action.split(":", 1)[1].strip() if ":" in action else ""


RECONNECT_CAP = 3.0  # seconds: the longest wait between two reconnect attempts
INSPECTORS = 4  # containers inspected at once after their events (each waits on the engine)
RELIST = "relist"  # the dirty key that relists everything (not a container id: not hex)


class DockerWatcher:
    """Feeds a sink (the reconciler) from a Docker engine until `stop` is set."""

    def __init__(self, client: DockerClient, sink: TargetSink, ping_interval: float = 10.0,
                 outage_limit: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] | None = None) -> None:
        self.client = client
        self.sink = sink
        self.ping_interval = ping_interval
        self.outage = Outage(outage_limit)
        self.clock = clock
        self._sleep = sleep
        self._stream: Any = None
        self._failure: Exception | None = None  # what ended the current stream's threads
        self._failure_lock = threading.Lock()
        self._destroyed: set[str] = set()  # ids destroyed and not yet removed by an inspector
        self.inspectors = INSPECTORS
        self.connected = False
        self.reconnects = 0

    def run(self, stop: threading.Event) -> None:
        """Connect, resync, follow events; on any break reconnect with backoff, until
        `stop` is set or the engine has been unreachable for the outage limit (SourceError)."""
        retrying = tenacity.Retrying(
            wait=tenacity.wait_exponential(multiplier=0.5, max=RECONNECT_CAP),
            retry=tenacity.retry_if_exception_type((docker.errors.DockerException,
                                                    requests.RequestException, SourceError,
                                                    OSError, _StreamEnded)),
            after=self._after_failure,
            stop=lambda state: stop.is_set() or self.outage.over(self.clock()),
            before_sleep=self._before_sleep,
            sleep=self._sleep or (lambda seconds: stop.wait(seconds)))
        try:
            retrying(self._follow_once, stop)
        except tenacity.RetryError as exc:
            if stop.is_set():
                log.debug("docker source stopped: %s", exc.last_attempt.exception())
                return
            raise SourceError(
                f"the Docker engine at {self.client.base_url} has not answered for "
                f"{self.outage.limit:.0f} s ({self.outage.attempts} attempts; last error: "
                f"{self.outage.error}): exiting so the restart policy starts the proxy again "
                "with a fresh mount of the socket (a restarted engine makes a new socket file "
                "that an old bind mount never sees); run it with --restart unless-stopped, "
                "and check that the engine is up and the socket is mounted") from None
        except Exception as exc:  # reached when stopping (the stream was closed under us)
            if not stop.is_set():
                raise
            log.debug("docker source stopped: %s", exc)

    def _after_failure(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self.outage.failed(str(exc) or type(exc).__name__, self.clock())

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        self.connected = False
        self.reconnects += 1
        self.client.reset()
        exc = state.outcome.exception() if state.outcome else None
        # Quiet: the first failure is worth a warning; the status has the attempt count.
        log.log(logging.WARNING if self.outage.attempts == 1 else logging.DEBUG,
                "docker engine at %s: %s; reconnect attempt %d in %.1fs",
                self.client.base_url, exc or "events stream ended",
                self.outage.attempts + 1, state.upcoming_sleep)
        self.sink.set_source_status({"kind": "docker", "connected": False,
                                     "reconnects": self.reconnects,
                                     **self.outage.status(self.clock())})

    def _follow_once(self, stop: threading.Event) -> None:
        self.client.ping()
        # Subscribe before listing so nothing between the two is missed; the relist then
        # makes the state exact, and later events only refine it.
        stream = self.client.events()
        self._stream = stream
        self._failure = None
        self._destroyed = set()  # the relist below has the rest right
        dirty = DirtyKeys()
        # The stream is drained from the start, by a thread that only notes which
        # containers changed: the engine buffers 1,024 events for a subscriber and then
        # drops what it cannot deliver within 100 ms (moby's pubsub), so a reader that
        # inspected each container itself fell minutes behind under churn on a loaded
        # host and lost events for good.
        reader = threading.Thread(target=self._read_events, args=(stream, dirty, stop),
                                  daemon=True, name="docker-events")
        inspectors = [threading.Thread(target=self._inspect_loop, args=(dirty, stream),
                                       daemon=True, name=f"docker-inspect-{i}")
                      for i in range(self.inspectors)]
        pinger = threading.Thread(target=self._ping_loop, args=(stream, stop),
                                  daemon=True, name="docker-ping")
        started: list[threading.Thread] = []
        try:
            reader.start()
            started.append(reader)
            self.sink.set_proxy_identity(self.client.discover_identity())
            self.sink.replace_all(self.client.list_targets())
            self.connected = True
            if self.outage.attempts > 1:
                log.info("docker engine at %s answers again after %d failed attempts",
                         self.client.base_url, self.outage.attempts)
            self.outage.ended()
            self.sink.set_source_status({"kind": "docker", "connected": True, "error": "",
                                         "state": "connected",
                                         "reconnects": self.reconnects,
                                         "since": time.time()})
            # Only now: what changed during the relist is inspected after it, never
            # before it (an older inspect posted after the list would undo it).
            for thread in inspectors:
                thread.start()
                started.append(thread)
            pinger.start()
            reader.join()
        finally:
            self._stream = None
            _close_quietly(stream)
            dirty.close()
            # Before the next relist: an inspect of this stream posted after it could
            # bring back a container that the relist no longer has.
            for thread in started:
                thread.join()
        if self._failure is not None and not stop.is_set():
            raise self._failure
        if not stop.is_set():
            raise _StreamEnded("events stream ended")

    def _read_events(self, stream: Any, dirty: DirtyKeys, stop: threading.Event) -> None:
        try:
            for event in stream:
                if stop.is_set():
                    return
                key = self._key_of(event)
                if key:
                    dirty.mark(key)
        except Exception as exc:  # closed under us, or the engine went away
            self._fail(exc, stream)

    def _inspect_loop(self, dirty: DirtyKeys, stream: Any) -> None:
        while (key := dirty.take()) is not None:
            try:
                self._refresh(key)
            except Exception as exc:  # the engine does not answer: reconnect and relist
                self._fail(exc, stream)
                return
            finally:
                dirty.done(key)

    def _fail(self, exc: Exception, stream: Any) -> None:
        """The first failure of a stream's threads ends the stream (and is raised by
        `_follow_once`, which reconnects and relists); the later ones are its echoes."""
        with self._failure_lock:
            if self._failure is None and self._stream is stream:
                self._failure = exc
        _close_quietly(stream)

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
        """One event, handled now: re-inspect the container it is about and upsert or
        remove it (the stream goes through `_key_of` and the inspectors instead)."""
        key = self._key_of(event)
        if key:
            self._refresh(key)

    def _key_of(self, event: dict[str, Any]) -> str:
        """What to read again after this event: a container id, RELIST, or "" (nothing;
        a health event is passed on here, it needs no inspect)."""
        cid = event_container_id(event)
        if not cid:
            return ""
        action = event_action(event)
        if action == "health_status":
            if event_health(event) == "healthy":
                self.sink.ready(cid)
            return ""  # unhealthy changes nothing: a served key stays served until it stops
        if action == "destroy":
            self._destroyed.add(cid)  # ids are never reused: gone for good, no inspect
        if event.get("Type") == "network" and cid == self.client.identity.container_id:
            # The proxy itself joined or left a network: which targets it shares changes.
            return RELIST
        return cid

    def _refresh(self, key: str) -> None:
        if key == RELIST:
            self.sink.set_proxy_identity(self.client.discover_identity())
            self.sink.replace_all(self.client.list_targets())
            return
        if key in self._destroyed:
            self._destroyed.discard(key)
            self.sink.remove(key)
            return
        target = self.client.inspect_target(key)
        if target is None:
            self.sink.remove(key)
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
    return DockerWatcher(client, sink, outage_limit=settings.source_outage_seconds)
