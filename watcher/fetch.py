"""A target's public keys: `GET /publickey` on the target and/or its key file read by exec,
in the order SSH_TARGET_KEY_SOURCE names (default: HTTP first, exec when HTTP gives no key).
A source not named is never tried: `api` never execs into a target, `exec` never sends it a
request (so a neighbour spoofing the target's address cannot answer for it).

Bounded everywhere: short connect/read timeouts, the body read with a byte cap (a hostile
target cannot make the watcher buffer 10 MiB), a capped number of tenacity retries while the
target boots, and between them a cheap poll of GET /publickey alone. Validation is the pure
`keys.parse_key_body`.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import requests
import tenacity
import urllib3

from .config import KeySource
from .errors import FetchError, FetchTimeout, KeyRejected
from .keys import parse_key_body
from .model import KeyState, Target

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
_DIGITS = re.compile(r"[0-9]{1,12}")  # fullmatch: `$` would allow a final newline
MAX_KEYS = 32


class ExecReader(Protocol):
    """Runs `argv` in the target and returns at most `limit` bytes of its stdout."""

    def __call__(self, target: Target, argv: list[str], limit: int) -> bytes: ...


def key_file_command(key_path: str) -> list[str]:
    """`cat` of the key path; `~/` is the exec user's home, resolved by the target's shell."""
    if key_path.startswith("~/"):
        return ["sh", "-c", 'exec cat -- "$HOME"/' + shlex.quote(key_path[2:])]
    return ["cat", "--", key_path]


@dataclass(frozen=True)
class FetchPolicy:
    connect_timeout: float = 2.0
    read_timeout: float = 3.0
    attempts: int = 5
    max_wait: float = 4.0  # between attempts: 0.5, 1, 2, 4 s while the target boots
    max_total: float = 12.0  # no new attempt after this many seconds
    # Between those attempts GET /publickey alone is tried this often, so a key served
    # while the target boots is taken within this, not up to max_wait later. A GET to a
    # port not listening yet is one refused connect; an exec is a process in the target,
    # so exec stays on the slower schedule.
    poll_interval: float = 0.2


def http_get_body(url: str, policy: FetchPolicy, limit: int = MAX_BODY) -> bytes:
    """GET with a byte cap; anything but 200 is a FetchError. One byte over the cap is read
    so the validator can say the body was too large."""
    total = policy.connect_timeout + policy.read_timeout
    try:
        with requests.Session() as session:
            session.trust_env = False  # targets are reached directly, never via HTTP_PROXY
            with session.get(url, timeout=(policy.connect_timeout, policy.read_timeout),
                             stream=True, allow_redirects=False) as response:
                if response.status_code != 200:
                    raise FetchError(f"GET {url} answered HTTP {response.status_code}")
                declared = response.headers.get("Content-Length", "")
                if _DIGITS.fullmatch(declared) and int(declared) > limit:
                    return b"\0" * (limit + 1)
                return _read_capped(response, url, limit, time.monotonic() + total)
    except requests.ReadTimeout as exc:
        # Connected, then no answer: a hang, not a target still booting (that refuses).
        raise FetchTimeout(f"GET {url} failed: {type(exc).__name__}") from exc
    except requests.RequestException as exc:
        raise FetchError(f"GET {url} failed: {type(exc).__name__}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise FetchError(f"GET {url} failed: {type(exc).__name__}") from exc


def _read_capped(response: requests.Response, url: str, limit: int, deadline: float) -> bytes:
    """Read at most limit+1 bytes before the deadline. Timeouts are per socket read, so a target
    dripping one byte at a time needs the overall deadline; read1 returns what has arrived
    instead of waiting for a full chunk, so the deadline is checked between small reads."""
    body = bytearray()
    while len(body) <= limit:
        chunk = response.raw.read1(limit + 1 - len(body), decode_content=True)
        if not chunk:
            break
        body += chunk
        if time.monotonic() > deadline:
            raise FetchTimeout(f"GET {url} did not finish within its deadline")
    return bytes(body[: limit + 1])


class KeyFetcher:
    """Gets and validates one target's keys; never raises, returns a KeyState."""

    def __init__(self, api_port: int, key_path: str, exec_reader: ExecReader | None,
                 policy: FetchPolicy = FetchPolicy(),
                 http_get: Callable[[str, FetchPolicy], bytes] = http_get_body,
                 sources: tuple[KeySource, ...] = ("api", "exec"),
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not sources or set(sources) - {"api", "exec"}:
            raise ValueError(f"key sources must be 'api' and/or 'exec', got {sources!r}")
        self.api_port = api_port
        self.key_path = key_path
        self.exec_reader = exec_reader
        self.policy = policy
        self.http_get = http_get
        self.sources = sources
        self._sleep = sleep
        self._clock = clock

    def fetch(self, target: Target) -> KeyState:
        try:
            for attempt in tenacity.Retrying(
                    # A fetch holds a pool worker: bounded in attempts and in time, so a few
                    # hostile targets cannot starve everyone else's key for long.
                    stop=(tenacity.stop_after_attempt(self.policy.attempts)
                          | tenacity.stop_after_delay(self.policy.max_total)),
                    wait=tenacity.wait_exponential(multiplier=0.5, max=self.policy.max_wait),
                    retry=(tenacity.retry_if_exception_type(FetchError)
                           & tenacity.retry_if_not_exception_type(FetchTimeout)),
                    sleep=lambda seconds: self._wait_polling(target, seconds),
                    reraise=True):
                with attempt:
                    return self._fetch_once(target)
        except (FetchError, KeyRejected) as exc:
            return KeyState(status="failed", error=str(exc))
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait_polling(self, target: Target, seconds: float) -> None:
        """Wait `seconds` before the next attempt, but end the wait as soon as GET
        /publickey answers (the next attempt then takes the key at once)."""
        deadline = self._clock() + seconds
        poll = "api" in self.sources and bool(target.address)
        while (left := deadline - self._clock()) > 0:
            self._sleep(min(self.policy.poll_interval, left) if poll else left)
            if not poll or self._clock() >= deadline:
                continue
            started = self._clock()
            try:
                self._via_http(target)
            except FetchError:
                # Not serving yet. A booting target refuses at once; one that makes the
                # poll wait (a hang, a dropped connect) is not polled again in this wait.
                poll = self._clock() - started < self.policy.poll_interval
            else:
                return

    def _fetch_once(self, target: Target) -> KeyState:
        """The configured sources in order, the first with a valid key wins; all failing is a
        FetchError (retried)."""
        errors: list[str] = []
        rejected: list[str] = []
        timed_out = False
        for via, getter in self._getters():
            try:
                body = getter(target)
            except FetchError as exc:
                errors.append(str(exc))
                timed_out = timed_out or isinstance(exc, FetchTimeout)
                continue
            except Exception as exc:  # a bug in an adapter: this source failed, not the pool
                log.debug("key fetch via %s for %s crashed", via, target.name, exc_info=True)
                errors.append(f"{via}: internal error ({type(exc).__name__}: {exc})")
                continue
            try:
                keys, bad = parse_key_body(body, max_bytes=MAX_BODY, max_keys=MAX_KEYS)
            except KeyRejected as exc:
                rejected.append(f"{via}: {exc}")
                continue
            rejected.extend(f"{via}: {reason}" for reason in bad)
            if keys:
                return KeyState(keys=tuple(keys), status="ok", via=via, rejected=tuple(rejected))
            rejected.append(f"{via}: no valid key")
        if rejected and not errors:
            # The target answered, with nothing usable: retrying now will not change that.
            raise KeyRejected("; ".join(rejected))
        if timed_out:
            # A source that hangs is not a target still booting: retry in a later round.
            raise FetchTimeout("; ".join(errors + rejected))
        raise FetchError("; ".join(errors + rejected))

    def _getters(self) -> list[tuple[str, Callable[[Target], bytes]]]:
        by_source = {"api": ("http", self._via_http), "exec": ("exec", self._via_exec)}
        return [by_source[source] for source in self.sources]

    def _via_http(self, target: Target) -> bytes:
        if not target.address:
            raise FetchError("no address on a network shared with the proxy")
        return self.http_get(f"http://{target.address}:{self.api_port}/publickey", self.policy)

    def _via_exec(self, target: Target) -> bytes:
        if self.exec_reader is None:
            raise FetchError("exec is not available for this source")
        return self.exec_reader(target, key_file_command(self.key_path), MAX_BODY + 1)
