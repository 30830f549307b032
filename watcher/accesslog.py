"""sshd's syslog lines -> access events -> one logfmt line each. Pure: no I/O, no threads.

sshd runs at `LogLevel DEBUG1` and sends every message to the watcher's `/dev/log` as an
RFC 3164 datagram; glibc writes `<PRI>Mmm dd hh:mm:ss sshd[PID]: MESSAGE` (no hostname).
Per connection two processes log (formats below are OpenSSH 9.2p1 Debian, recorded into
tests/unit/data/sshd-*.log):

* the monitor (pid M, the re-exec'd per-connection sshd) logs
  `Connection from IP port P on IP port P rdomain ""`, `Accepted publickey for U from IP
  port P ssh2: ED25519 SHA256:...`, `Failed publickey ...`, `Invalid user U from ...`, the
  pre-auth child's lines with ` [preauth]` appended, and `User child is on pid C`;
* the unprivileged post-auth child (pid C) logs the channel and session requests
  (`server_request_direct_tcpip: ...`, `Received request ... denied.`,
  `session_input_channel_req: session 0 req shell`, ...) and, mostly, the end of the
  connection (`Connection closed by ...`, `Disconnected from user ...`, `Read error ...`).

`AccessTracker` follows these per connection and turns them into `AccessEvent`s; the
watcher gives each one to `format_event`. Events and their reasons:

* `accepted` (fp, key) - publickey login succeeded;
* `denied` (reason `unknown-key` | `no-signature` | `invalid-user` | `preauth-disconnect`,
  fp of the last key offered if any, duration) - once, when a connection that never logged
  in ends (instead of `closed`);
* `tunnel` (dest) - a direct-tcpip open sshd permitted, emitted when the connect to dest
  finished: no reason if it connected, else `connect-failed[: why]` or
  `closed-before-connect`;
* `tunnel-denied` (dest, reason `not-permitted`) - refused by permitopen;
* `session-refused` (reason `shell` | `exec` | `subsystem`) - the forced nologin answers;
* `forward-refused` (reason `remote-forward` | `remote-streamlocal` | `local-streamlocal`
  | `agent` | `x11` | `tun`, dest where sshd logs one);
* `closed` (duration) - a logged-in connection ended. Values taken from log lines are partly chosen
by the client (a tunnel's host name, ...): `format_event` escapes anything that is not
printable and quotes what needs it, so no value can start a second log line.

Which key a connection used is taken only from the lines in which the monitor (never the
pre-auth child, whose lines end in ` [preauth]`) gives its verdict on a key it checked:
`Accepted publickey ...`, `Failed publickey ...` (auth.c auth_log) and `Accepted key TYPE FP
found at ...` (auth2-pubkeyfile.c, an authorized key not yet signed with). Several fields of
sshd's lines are the client's own text, echoed: the user name (`for <user> from`, `Invalid
user <user>`), an unsupported algorithm name (`unsupported public key algorithm: <any text>`)
and a certificate's key ID. So the auth lines are matched whole, from sshd's fixed words to
its own trailing fields: a user name without spaces, the connection's own address and port,
then exactly `ssh2: TYPE FINGERPRINT` at the end; a line that does not fit names no key.
The pre-auth child's `test pkalg ... pkblob` line is never used: sshd has not checked that
key yet (and for an invalid user never does), so such a connection is denied without `fp`.

The tracker assumes the proxy's sshd policy: remote (-R) forwarding, agent, X11 and tun
forwarding are always disabled, so their requests are reported as `forward-refused` when
sshd logs them (sshd tells only the client, not the log, that it said no).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone

EVENTS = (
    "accepted",
    "denied",
    "tunnel",
    "tunnel-denied",
    "session-refused",
    "forward-refused",
    "closed",
    "revoked",
)

DEFAULT_MAX_IDLE = 3600.0
"""Seconds without a line from a connection after which it is forgotten (no event)."""
DEFAULT_MAX_PIDS = 10_000
"""At most this many pids (monitors and children) are tracked; the idlest go first."""
MAX_MESSAGE = 4096
"""Longer messages are ignored: sshd's own stop at 1 KiB (log.c MSGBUFSIZ), so a longer
one is not from sshd, and the patterns below need not scan it."""

# --- parsing one datagram -------------------------------------------------------------

_DATAGRAM = re.compile(
    r"(?:<\d{1,3}>)?"  # priority (facility * 8 + severity)
    r"(?:[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d )?"  # RFC 3164 timestamp, day space-padded
    r"(?:\S+ )??"  # hostname (glibc leaves it out)
    r"sshd\[(\d{1,10})\]: "
    r"(.*)",
    re.DOTALL,
)
_DEBUG_PREFIX = re.compile(r"debug[1-3]: ")
_PREAUTH = " [preauth]"


def parse_datagram(data: bytes) -> tuple[int, str] | None:
    """(pid, message) of one syslog datagram from sshd, or None for anything else.

    Accepts the datagram with or without priority, timestamp and hostname; the program
    must be `sshd` with a pid. A `debugN: ` prefix is removed (the message text is kept,
    including a trailing ` [preauth]`). Bytes that are not UTF-8 are kept as `\\xNN`.
    """
    text = data.decode("utf-8", errors="backslashreplace").rstrip("\x00\r\n")
    match = _DATAGRAM.fullmatch(text)
    if match is None:
        return None
    pid = int(match.group(1))
    if pid <= 0:
        return None
    message = match.group(2)
    prefix = _DEBUG_PREFIX.match(message)
    if prefix is not None:
        message = message[prefix.end():]
    return pid, message


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessEvent:
    """Something a client did or was refused, as the access log shows it."""

    time: float  # epoch seconds (the watcher's clock when the line arrived)
    event: str  # one of EVENTS
    client: str  # "ip:port" ("[v6]:port"), the client's side of the SSH connection
    fingerprint: str = ""  # "SHA256:..." accepted (or, for `denied`, last offered); "" unknown
    key_type: str = ""  # as sshd names it: "ED25519", "RSA", "ECDSA", ...
    dest: str = ""  # "host:port" (tunnels, -R listen address) or a socket path; "" if none
    reason: str = ""
    duration: float | None = None  # seconds since "Connection from" (`closed`, `denied`)


# --- the state machine ----------------------------------------------------------------

_IP = r"[0-9A-Fa-f.:%a-zA-Z]+"  # IPv4 / IPv6 (with zone), as sshd prints addresses

_CONNECTION_FROM = re.compile(rf'Connection from ({_IP}) port (\d+) on \S+ port \d+(?: rdomain ".*")?')
# The monitor's verdicts on a key (see the module docstring): sshd's words, a user name
# without spaces (only limited-user gets this far), address and port (compared with the
# connection's), then sshd's own `TYPE FP` ending the line; an sk key's signature count may
# follow. Nothing the client chose can stand where the fingerprint is read.
_SSHD_KEYTYPE = r"([A-Z0-9-]{2,40})"  # sshkey_type(): ED25519, ECDSA-SK, RSA, ...
_SSHD_FP = r"(SHA256:[A-Za-z0-9+/]{43}|MD5(?::[0-9a-f]{2}){16})"  # sshkey_fingerprint()
_VERDICT_TAIL = rf"[^ ]+ from ({_IP}) port (\d+) ssh2: {_SSHD_KEYTYPE} {_SSHD_FP}(?:, signature count = \d+)?"
_ACCEPTED = re.compile(rf"Accepted publickey for {_VERDICT_TAIL}")
_FAILED = re.compile(rf"Failed publickey for {_VERDICT_TAIL}")
_KEY_FOUND = re.compile(rf"Accepted key {_SSHD_KEYTYPE} {_SSHD_FP} found at .*")
_POSTPONED = re.compile(rf"Postponed publickey for .* from {_IP} port \d+ ssh2")
_INVALID_USER = re.compile(
    rf"Invalid user .* from {_IP} port \d+"
    rf"|User .* from {_IP} not allowed because .*"
    rf"|(?:Connection closed by|Disconnected from|Disconnecting) invalid user .*"
)
_USER_CHILD = re.compile(r"User child is on pid (\d{1,10})")

# A message that starts with one of these ends the connection (the process exits after it).
_END_PREFIXES = (
    "Connection closed by ",
    "Closing connection to ",
    "Disconnected from ",
    "Received disconnect from ",
    "Disconnecting ",
    "Read error from remote host ",
    "Connection reset by ",
    "Timeout, client not responding",
    "Unable to negotiate with ",
    "banner exchange: ",
    "ssh_dispatch_run_fatal: ",
    "fatal: ",
)
_MONITOR_EXIT = "do_cleanup"  # logged by the monitor as it exits (children's own is ignored)

_DIRECT_TCPIP = re.compile(r"server_request_direct_tcpip: originator .*, target (.*) port (\d+)")
_TCPIP_DENIED = re.compile(
    rf"Received request from {_IP} port \d+ to connect to host (.*) port (\d+), but the request was denied\."
)
_CHANNEL_NEW = re.compile(r"channel (\d+): new direct-tcpip \[.*")
_CHANNEL_CONNECTED = re.compile(r"channel (\d+): connected to (.*) port (\d+)")
_CHANNEL_CONNECT_FAILED = re.compile(r"channel (\d+): connection failed: (.*)")
_CHANNEL_FREE = re.compile(r"channel (\d+): free: direct-tcpip, .*")
_CONNECT_TO_FAILED = re.compile(r"error: connect_to (.*) port (\d+): failed\.")
_CONNECT_TO_UNKNOWN = re.compile(r"error: connect_to (.*): unknown host \((.*)\)")
_OPEN_FAILURE = re.compile(r"server_input_channel_open: failure (\S+)")
_SESSION_REQ = re.compile(r"session_input_channel_req: session \d+ req (\S+)")
_AGENT_REFUSED = "session_auth_agent_req: agent forwarding disabled"
_TCPIP_FORWARD = re.compile(r"server_input_global_request: tcpip-forward listen (.*) port (\d+)")
_STREAMLOCAL_FORWARD = re.compile(r"server_input_global_request: streamlocal-forward listen path (.*)")
_STREAMLOCAL_REFUSED = re.compile(r"refused streamlocal port forward: originator .*, target (.*)")

_SESSION_REQUESTS = {"shell": "shell", "exec": "exec", "subsystem": "subsystem"}


_IPV6 = re.compile(r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9_.-]+)?")


def _hostport(host: str, port: str) -> str:
    """"host:port", with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if _IPV6.fullmatch(host) else f"{host}:{port}"


@dataclass(frozen=True)
class _KeyVerdict:
    kind: str  # accepted | failed | found (authorized; a signature may follow)
    key_type: str
    fingerprint: str


@dataclass
class _Connection:
    monitor: int
    client: str
    start: float
    last_seen: float
    child: int | None = None
    accepted: bool = False
    fingerprint: str = ""
    key_type: str = ""
    auth_failure: str = ""  # what became of the last key offered: unknown-key | no-signature
    invalid_user: bool = False
    pending_dest: str = ""  # requested by the last direct-tcpip open, outcome not yet known
    connect_error: str = ""  # "unknown host (...)" just before an open failure
    channels: dict[int, str] = field(default_factory=dict)  # channel -> dest, connecting
    channel_errors: dict[int, str] = field(default_factory=dict)
    address: tuple[str, str] = ("", "")  # (ip, port) as sshd prints them

    def pids(self) -> tuple[int, ...]:
        return (self.monitor,) if self.child is None else (self.monitor, self.child)


def _key_verdict(conn: _Connection, message: str) -> _KeyVerdict | None:
    """The monitor's verdict on a key it checked, if `message` is one about `conn`."""
    for kind, pattern in (("accepted", _ACCEPTED), ("failed", _FAILED)):
        match = pattern.fullmatch(message)
        if match is not None:
            if (match.group(1), match.group(2)) != conn.address:
                return None  # not this connection's address: not sshd's line about it
            return _KeyVerdict(kind, match.group(3), match.group(4))
    match = _KEY_FOUND.fullmatch(message)
    return None if match is None else _KeyVerdict("found", match.group(1), match.group(2))


ORPHAN_MAX_AGE = 10.0  # seconds a line of a not-yet-linked pid is kept
ORPHAN_MAX_PIDS = 1000
ORPHAN_MAX_LINES = 64


class AccessTracker:
    """Turns sshd's (pid, message) stream into access events; memory stays bounded.

    Connections are keyed by their monitor pid; the post-auth child's pid is linked to
    it by `User child is on pid C`. A connection is forgotten when it ends, or when it has
    been silent for `max_idle` seconds, or to keep at most `max_pids` pids tracked
    (the idlest first); a forgotten connection gives no further events.
    """

    def __init__(self, max_idle: float = DEFAULT_MAX_IDLE, max_pids: int = DEFAULT_MAX_PIDS) -> None:
        if max_pids < 2:
            raise ValueError("max_pids must be at least 2 (a monitor and its child)")
        self._max_idle = max_idle
        self._max_pids = max_pids
        self._pids: OrderedDict[int, _Connection] = OrderedDict()  # idlest first
        # Lines from pids not linked yet: a busy sshd's child may log before its monitor
        # says `User child is on pid C`; they are replayed once the link arrives.
        self._orphans: OrderedDict[int, list[tuple[str, float]]] = OrderedDict()

    def __len__(self) -> int:
        """How many pids are tracked (monitors and linked children)."""
        return len(self._pids)

    def feed(self, pid: int, message: str, now: float) -> list[AccessEvent]:
        """Events caused by one message that process `pid` logged, received at `now`."""
        self._evict(now)
        if len(message) > MAX_MESSAGE:
            return []
        preauth = message.endswith(_PREAUTH)  # relayed from the pre-auth child
        if preauth:
            message = message[: -len(_PREAUTH)]

        match = _CONNECTION_FROM.fullmatch(message)
        if match is not None:
            self._forget_pid(pid)  # a reused pid: whatever it was is over
            conn = _Connection(pid, _hostport(match.group(1), match.group(2)), now, now,
                               address=(match.group(1), match.group(2)))
            self._pids[pid] = conn
            self._evict(now)
            return []

        conn = self._pids.get(pid)
        if conn is None:
            self._keep_orphan(pid, message, now)
            return []
        self._touch(conn, now)
        events: list[AccessEvent] = []
        self._dispatch(conn, pid, message, now, events, preauth)
        return events

    def _dispatch(self, conn: _Connection, pid: int, message: str, now: float,
                  events: list[AccessEvent], preauth: bool = False) -> None:
        if pid == conn.monitor:
            self._monitor_message(conn, message, now, events, preauth)
        else:
            self._child_message(conn, message, now, events)
        if message.startswith(_END_PREFIXES) or (pid == conn.monitor and message == _MONITOR_EXIT):
            self._end(conn, now, events)

    def _keep_orphan(self, pid: int, message: str, now: float) -> None:
        """Buffer a line of an unknown pid briefly (bounded in pids, lines and age)."""
        while self._orphans:
            oldest_pid, lines = next(iter(self._orphans.items()))
            if now - lines[0][1] <= ORPHAN_MAX_AGE and len(self._orphans) < ORPHAN_MAX_PIDS:
                break
            del self._orphans[oldest_pid]
        lines = self._orphans.setdefault(pid, [])
        if len(lines) < ORPHAN_MAX_LINES:
            lines.append((message, now))

    # -- per process ---------------------------------------------------------------------

    def _monitor_message(self, conn: _Connection, message: str, now: float, events: list[AccessEvent],
                         preauth: bool = False) -> None:
        verdict = None if preauth else _key_verdict(conn, message)
        if verdict is not None and verdict.kind == "accepted":
            conn.accepted = True
            conn.key_type, conn.fingerprint = verdict.key_type, verdict.fingerprint
            events.append(self._event(conn, now, "accepted"))
        elif conn.accepted:
            if (match := _USER_CHILD.fullmatch(message)) is not None:
                child = int(match.group(1))
                self._link_child(conn, child)
                for early, when in self._orphans.pop(child, []):
                    self._dispatch(conn, child, early, when, events)
        elif verdict is not None:
            if verdict.kind == "failed":
                conn.auth_failure = "unknown-key"
            conn.key_type, conn.fingerprint = verdict.key_type, verdict.fingerprint
        elif _POSTPONED.fullmatch(message) is not None:
            conn.auth_failure = "no-signature"  # authorized, but the client never signed
        elif _INVALID_USER.fullmatch(message) is not None:
            conn.invalid_user = True

    def _child_message(self, conn: _Connection, message: str, now: float, events: list[AccessEvent]) -> None:
        def emit(event: str, dest: str = "", reason: str = "") -> None:
            events.append(self._event(conn, now, event, dest=dest, reason=reason))

        if (match := _DIRECT_TCPIP.fullmatch(message)) is not None:
            conn.pending_dest = _hostport(match.group(1), match.group(2))
            conn.connect_error = ""
        elif (match := _TCPIP_DENIED.fullmatch(message)) is not None:
            emit("tunnel-denied", _hostport(match.group(1), match.group(2)), "not-permitted")
            conn.pending_dest = ""
        elif (match := _CHANNEL_NEW.fullmatch(message)) is not None:
            if conn.pending_dest:
                conn.channels[int(match.group(1))] = conn.pending_dest
                conn.pending_dest = ""
        elif (match := _CHANNEL_CONNECTED.fullmatch(message)) is not None:
            channel = int(match.group(1))
            if channel in conn.channels:
                conn.channel_errors.pop(channel, None)
                emit("tunnel", conn.channels.pop(channel))
        elif (match := _CHANNEL_CONNECT_FAILED.fullmatch(message)) is not None:
            # Not final yet: sshd tries the host's next address, if any.
            if int(match.group(1)) in conn.channels:
                conn.channel_errors[int(match.group(1))] = match.group(2)
        elif (match := _CONNECT_TO_FAILED.fullmatch(message)) is not None:
            dest = _hostport(match.group(1), match.group(2))
            for channel, wanted in sorted(conn.channels.items()):
                if wanted == dest:
                    del conn.channels[channel]
                    error = conn.channel_errors.pop(channel, "")
                    emit("tunnel", dest, f"connect-failed: {error}" if error else "connect-failed")
                    break
        elif (match := _CONNECT_TO_UNKNOWN.fullmatch(message)) is not None:
            conn.connect_error = f"unknown host ({match.group(2)})"
        elif (match := _OPEN_FAILURE.fullmatch(message)) is not None:
            ctype = match.group(1)
            if ctype == "direct-tcpip" and conn.pending_dest:
                # Permitted but not even started (the name did not resolve).
                error = conn.connect_error
                emit("tunnel", conn.pending_dest, f"connect-failed: {error}" if error else "connect-failed")
                conn.pending_dest = conn.connect_error = ""
            elif ctype == "tun@openssh.com":
                emit("forward-refused", reason="tun")
        elif (match := _CHANNEL_FREE.fullmatch(message)) is not None:
            channel = int(match.group(1))
            if channel in conn.channels:
                conn.channel_errors.pop(channel, None)
                emit("tunnel", conn.channels.pop(channel), "closed-before-connect")
        elif (match := _SESSION_REQ.fullmatch(message)) is not None:
            request = match.group(1)
            if request in _SESSION_REQUESTS:
                emit("session-refused", reason=_SESSION_REQUESTS[request])
            elif request == "x11-req":
                emit("forward-refused", reason="x11")
        elif message == _AGENT_REFUSED:
            emit("forward-refused", reason="agent")
        elif (match := _TCPIP_FORWARD.fullmatch(message)) is not None:
            emit("forward-refused", _hostport(match.group(1), match.group(2)), "remote-forward")
        elif (match := _STREAMLOCAL_FORWARD.fullmatch(message)) is not None:
            emit("forward-refused", match.group(1), "remote-streamlocal")
        elif (match := _STREAMLOCAL_REFUSED.fullmatch(message)) is not None:
            emit("forward-refused", match.group(1), "local-streamlocal")

    # -- connection life -----------------------------------------------------------------

    def _event(self, conn: _Connection, now: float, event: str, *, dest: str = "", reason: str = "",
               duration: float | None = None) -> AccessEvent:
        return AccessEvent(
            time=now,
            event=event,
            client=conn.client,
            fingerprint=conn.fingerprint,
            key_type=conn.key_type,
            dest=dest,
            reason=reason,
            duration=duration,
        )

    def _end(self, conn: _Connection, now: float, events: list[AccessEvent]) -> None:
        for channel, dest in sorted(conn.channels.items()):
            events.append(self._event(conn, now, "tunnel", dest=dest, reason="closed-before-connect"))
        duration = max(0.0, now - conn.start)
        if conn.accepted:
            events.append(self._event(conn, now, "closed", duration=duration))
        else:
            if conn.invalid_user:
                reason = "invalid-user"
            else:
                reason = conn.auth_failure or "preauth-disconnect"
            events.append(self._event(conn, now, "denied", reason=reason, duration=duration))
        self._forget(conn)

    def _link_child(self, conn: _Connection, child: int) -> None:
        if conn.child is not None or child == conn.monitor:
            return
        self._forget_pid(child)  # a reused pid: whatever it was is over
        conn.child = child
        self._pids[child] = conn
        self._evict(conn.last_seen)

    def _touch(self, conn: _Connection, now: float) -> None:
        conn.last_seen = max(conn.last_seen, now)
        for pid in conn.pids():
            self._pids.move_to_end(pid)

    def _forget(self, conn: _Connection) -> None:
        for pid in conn.pids():
            if self._pids.get(pid) is conn:
                del self._pids[pid]

    def _forget_pid(self, pid: int) -> None:
        old = self._pids.get(pid)
        if old is not None:
            self._forget(old)

    def _evict(self, now: float) -> None:
        while self._pids:
            oldest = next(iter(self._pids.values()))
            if len(self._pids) > self._max_pids or now - oldest.last_seen > self._max_idle:
                self._forget(oldest)
            else:
                break

    # -- revocation (sessions of a key whose grants shrank are closed) ------------------

    def sessions_of(self, *fingerprints: str) -> list[Session]:
        """The logged-in connections that authenticated with one of `fingerprints` (one pass
        over the tracked pids, however many keys are asked for)."""
        wanted = set(fingerprints)
        seen: dict[int, Session] = {}
        for conn in self._pids.values():
            if conn.accepted and conn.fingerprint in wanted and conn.monitor not in seen:
                seen[conn.monitor] = _session(conn)
        return list(seen.values())

    def session_of(self, pid: int) -> Session | None:
        """The logged-in connection process `pid` (monitor or child) belongs to, if any."""
        conn = self._pids.get(pid)
        return _session(conn) if conn is not None and conn.accepted else None

    def end_session(self, monitor: int, now: float) -> list[AccessEvent]:
        """The connection of `monitor` was killed (it logs no end): its `closed` event, and
        it is forgotten."""
        conn = self._pids.get(monitor)
        if conn is None or conn.monitor != monitor:
            return []
        events: list[AccessEvent] = []
        self._end(conn, now, events)
        return events


@dataclass(frozen=True)
class Session:
    """A logged-in connection, as `AccessTracker.sessions_of` reports it."""

    monitor: int  # pid of the per-connection sshd (root)
    child: int | None  # pid of the post-auth child (limited-user), once sshd logged it
    client: str  # "ip:port"
    fingerprint: str
    key_type: str
    start: float  # when its `Connection from` arrived (epoch seconds)


def _session(conn: _Connection) -> Session:
    return Session(conn.monitor, conn.child, conn.client, conn.fingerprint, conn.key_type, conn.start)


def revoked_event(session: Session, now: float, reason: str) -> AccessEvent:
    """`revoked`: the session's key lost a grant (`reason`), so the session was closed."""
    return AccessEvent(time=now, event="revoked", client=session.client,
                       fingerprint=session.fingerprint, key_type=session.key_type, reason=reason)


# --- output ------------------------------------------------------------------------------

_FIELD_ORDER = ("client", "fp", "key", "target", "dest", "reason", "duration")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def logfmt_value(value: str) -> str:
    """`value` as one logfmt value: bare when safe, else double-quoted with escapes.

    Quoted when empty or when it holds a space, `"`, `=`, `\\` or anything not printable;
    inside the quotes `\\`, `"` and every non-printable character are escaped, so the
    result is always one line of printable characters.
    """
    if value and all(char.isprintable() and char not in ' "=\\' for char in value):
        return value
    return '"' + "".join(_escape_char(char) for char in value) + '"'


def format_timestamp(epoch: float) -> str:
    """UTC ISO 8601 with milliseconds and `Z`: 2026-11-25T15:00:00.123Z."""
    millis = round(epoch * 1000)
    seconds, ms = divmod(millis, 1000)
    stamp = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{ms:03d}Z"


def format_event(event: AccessEvent, targets: str) -> str:
    """One logfmt line (no newline) for `event`; `targets` names what the key may reach.

    Field order: time, event, client, fp, key, target, dest, reason, duration; a field
    whose value is empty (or a duration of None) is left out.
    """
    values = {
        "client": event.client,
        "fp": event.fingerprint,
        "key": event.key_type,
        "target": targets,
        "dest": event.dest,
        "reason": event.reason,
        "duration": "" if event.duration is None else f"{event.duration:.3f}",
    }
    parts = [format_timestamp(event.time), f"event={logfmt_value(event.event)}"]
    parts.extend(f"{name}={logfmt_value(values[name])}" for name in _FIELD_ORDER if values[name])
    return " ".join(parts)


# --- reading the log back (`watcher logs`, `watcher status`) -------------------------------

_PAIR = re.compile(r'([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|[^\s"]*)')
_UNESCAPE = re.compile(r'\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)')
_UNESCAPES = {v[1]: k for k, v in _ESCAPES.items()}


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    if code[0] in "xuU" and len(code) > 1:
        return chr(int(code[1:], 16))
    return _UNESCAPES.get(code, code)


def parse_logfmt_value(raw: str) -> str:
    """The inverse of `logfmt_value`."""
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return _UNESCAPE.sub(_unescape, raw[1:-1])
    return raw


@dataclass(frozen=True)
class LoggedEvent:
    """One access.log line read back: its time and its fields in their order."""

    time: float  # epoch seconds
    event: str
    fields: tuple[tuple[str, str], ...]  # (name, value), `event` included

    def get(self, name: str) -> str:
        return next((v for k, v in self.fields if k == name), "")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in self.get("target").split(",") if t)


def parse_timestamp(stamp: str) -> float:
    """`format_timestamp`'s output back to epoch seconds (ValueError if it is not one)."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def parse_line(line: str) -> LoggedEvent | None:
    """One line of access.log, or None for a line that is not one (never raises)."""
    stamp, _, rest = line.strip().partition(" ")
    try:
        when = parse_timestamp(stamp)
    except ValueError:
        return None
    fields = tuple((key, parse_logfmt_value(raw)) for key, raw in _PAIR.findall(rest))
    event = next((v for k, v in fields if k == "event"), "")
    return LoggedEvent(when, event, fields) if event else None
