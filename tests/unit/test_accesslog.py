"""watcher.accesslog: real sshd 9.2 datagrams (tests/unit/data/sshd-*.log) -> exact events.

The fixtures are the raw datagrams a throwaway `sshd -D` (LogLevel DEBUG1, no -e) sent to
a recording /dev/log, one per line, for one scenario each. Replay gives line i the time
T0 + i, so every time and duration below is a line number of the fixture.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from watcher.accesslog import (
    EVENTS,
    MAX_MESSAGE,
    AccessEvent,
    AccessTracker,
    Session,
    format_event,
    format_timestamp,
    logfmt_value,
    parse_datagram,
    revoked_event,
)

DATA = Path(__file__).parent / "data"
T0 = 1000.0
FP = "SHA256:NooFWc0ljlloWEM4+IDMvhX35FoGF8TmLtxahuXmqck"  # the authorized test key
BAD_FP = "SHA256:bEB9oC+SxE4imT7Yhr2QIQZkvo65aa8pssJ6dHXHmNk"  # a key nobody authorized


def datagrams(name: str) -> list[bytes]:
    return (DATA / name).read_bytes().splitlines()


def replay(name: str, tracker: AccessTracker | None = None) -> list[AccessEvent]:
    tracker = tracker if tracker is not None else AccessTracker()
    events: list[AccessEvent] = []
    for index, raw in enumerate(datagrams(name)):
        parsed = parse_datagram(raw)
        if parsed is not None:
            events.extend(tracker.feed(*parsed, T0 + index))
    return events


def ev(line: int, event: str, client: str, *, fp: str = FP, key: str = "ED25519", dest: str = "",
       reason: str = "", duration: float | None = None) -> AccessEvent:
    return AccessEvent(T0 + line, event, client, fp, key, dest, reason, duration)


def accepted_session(port: int, accepted: int, *events: AccessEvent) -> list[AccessEvent]:
    return [ev(accepted, "accepted", f"127.0.0.1:{port}"), *events]


# --- scenarios, from recorded datagrams ----------------------------------------------


def test_a_permitted_stdio_tunnel() -> None:
    client = "127.0.0.1:48788"
    assert replay("sshd-tunnel-permitted.log") == [
        ev(58, "accepted", client),
        ev(84, "tunnel", client, dest="127.0.0.1:2300"),
        ev(85, "closed", client, duration=81.0),
    ]


def test_b_denied_stdio_tunnel() -> None:
    client = "127.0.0.1:48794"
    assert replay("sshd-tunnel-denied.log") == [
        ev(58, "accepted", client),
        ev(79, "tunnel-denied", client, dest="127.0.0.1:2301", reason="not-permitted"),
        ev(82, "closed", client, duration=78.0),
    ]


def test_c_unknown_key_is_denied_once_with_the_offered_fingerprint() -> None:
    assert replay("sshd-unknown-key.log") == [
        ev(39, "denied", "127.0.0.1:48806", fp=BAD_FP, reason="unknown-key", duration=35.0),
    ]


@pytest.mark.parametrize(
    ("fixture", "port", "request_line", "reason", "close_line"),
    [
        ("sshd-shell.log", 48808, 90, "shell", 97),
        ("sshd-command.log", 48820, 90, "exec", 97),
        ("sshd-subsystem.log", 48830, 90, "subsystem", 92),
    ],
)
def test_d_shell_command_and_subsystem_are_session_refused(
    fixture: str, port: int, request_line: int, reason: str, close_line: int
) -> None:
    client = f"127.0.0.1:{port}"
    assert replay(fixture) == [
        ev(58, "accepted", client),
        ev(request_line, "session-refused", client, reason=reason),
        ev(close_line, "closed", client, duration=close_line - 4.0),
    ]


def test_e_remote_forward_is_refused() -> None:
    client = "127.0.0.1:55088"
    assert replay("sshd-remote-forward.log") == [
        ev(58, "accepted", client),
        ev(78, "forward-refused", client, dest="127.0.0.1:2310", reason="remote-forward"),
        ev(80, "closed", client, duration=76.0),
    ]


def test_f_agent_forwarding_is_refused_and_the_command_too() -> None:
    client = "127.0.0.1:55090"
    assert replay("sshd-agent-forward.log") == [
        ev(58, "accepted", client),
        ev(88, "forward-refused", client, reason="agent"),
        ev(94, "session-refused", client, reason="exec"),
        ev(101, "closed", client, duration=97.0),
    ]


def test_g_local_forward_without_session() -> None:
    client = "127.0.0.1:55100"
    assert replay("sshd-local-forward.log") == [
        ev(58, "accepted", client),
        ev(84, "tunnel", client, dest="127.0.0.1:2300"),
        ev(86, "closed", client, duration=82.0),
    ]


def test_h_two_concurrent_connections_keep_their_own_state() -> None:
    first, second = "127.0.0.1:56290", "127.0.0.1:56292"  # sshd pids 14425 and 14426
    assert replay("sshd-concurrent.log") == [
        ev(102, "accepted", second),
        ev(119, "accepted", first),
        ev(162, "tunnel", first, dest="127.0.0.1:2300"),
        ev(170, "tunnel", second, dest="127.0.0.1:2300"),
        ev(172, "closed", first, duration=163.0),
        ev(181, "closed", second, duration=173.0),
    ]


def test_i_client_killed_mid_tunnel() -> None:
    client = "127.0.0.1:60410"
    assert replay("sshd-killed.log") == [
        ev(58, "accepted", client),
        ev(84, "tunnel", client, dest="127.0.0.1:2300"),
        ev(85, "closed", client, duration=81.0),
    ]


def test_streamlocal_forwards_both_ways_are_refused() -> None:
    first, second = "127.0.0.1:38700", "127.0.0.1:38708"
    assert replay("sshd-streamlocal.log") == [
        ev(58, "accepted", first),
        ev(78, "forward-refused", first, dest="/tmp/sshrec/remote.sock", reason="remote-streamlocal"),
        ev(80, "closed", first, duration=76.0),
        ev(144, "accepted", second),
        ev(166, "forward-refused", second, dest="/tmp/sshrec/x.sock", reason="local-streamlocal"),
        ev(168, "closed", second, duration=78.0),
    ]


def test_x11_request_is_refused_and_pty_alone_is_not_an_event() -> None:
    client = "127.0.0.1:38724"
    assert replay("sshd-x11-pty.log") == [
        ev(58, "accepted", client),
        ev(87, "forward-refused", client, reason="x11"),
        ev(97, "session-refused", client, reason="exec"),
        ev(99, "closed", client, duration=95.0),
    ]


def test_tun_device_forwarding_is_refused() -> None:
    client = "127.0.0.1:35216"
    assert replay("sshd-tun.log") == [
        ev(58, "accepted", client),
        ev(78, "forward-refused", client, reason="tun"),
        ev(80, "closed", client, duration=76.0),
    ]


def test_permitted_tunnels_that_fail_to_connect_say_why() -> None:
    refused, unknown = "127.0.0.1:38736", "127.0.0.1:38740"
    assert replay("sshd-connect-failed.log") == [
        ev(58, "accepted", refused),
        ev(85, "tunnel", refused, dest="127.0.0.1:2302", reason="connect-failed: Connection refused"),
        ev(87, "closed", refused, duration=83.0),
        ev(151, "accepted", unknown),
        ev(173, "tunnel", unknown, dest="no-such-host.invalid:22",
           reason="connect-failed: unknown host (Name or service not known)"),
        ev(175, "closed", unknown, duration=78.0),
    ]


def test_hostile_originator_and_target_names_do_not_confuse_the_dest() -> None:
    # Sent with paramiko: originator "x port 1, target 10.9.9.9 port 99" for a permitted
    # open, and a denied target that imitates the end of sshd's own message.
    client = "127.0.0.1:49056"
    evil = 'evil\\nevent=accepted client="1.2.3.4:5" \\033[31m port 9, but the request was denied.'
    events = replay("sshd-evil-host.log")
    assert events == [
        ev(42, "accepted", client),
        ev(67, "tunnel", client, dest="127.0.0.1:2300"),
        ev(71, "tunnel-denied", client, dest=f"{evil}:22", reason="not-permitted"),
        ev(73, "closed", client, duration=69.0),
    ]
    line = format_event(events[2], "-")
    assert "\n" not in line and line.isprintable()
    assert line.endswith(
        ' dest="evil\\\\nevent=accepted client=\\"1.2.3.4:5\\" \\\\033[31m port 9, but the request'
        ' was denied.:22" reason=not-permitted'
    )


def test_invalid_users_are_denied_without_a_key() -> None:
    # sshd never checks the key of an invalid user: only the pre-auth child's "test pkalg"
    # line shows it, and that line names no key (see test_a_key_sshd_never_checked_...).
    assert replay("sshd-invalid-user.log") == [
        ev(35, "denied", "127.0.0.1:41346", fp="", key="", reason="invalid-user", duration=31.0),  # not in AllowUsers
        ev(76, "denied", "127.0.0.1:41360", fp="", key="", reason="invalid-user", duration=31.0),  # no such user
    ]


@pytest.mark.parametrize(
    ("fixture", "client", "line"),
    [
        ("sshd-no-key.log", "127.0.0.1:41342", 31),  # client offered no key at all
        ("sshd-preauth-nc.log", "127.0.0.1:60420", 7),  # TCP connect, read banner, close
        ("sshd-preauth-garbage.log", "127.0.0.1:60422", 7),  # an HTTP request instead of SSH
    ],
)
def test_connections_that_end_before_offering_a_key(fixture: str, client: str, line: int) -> None:
    assert replay(fixture) == [
        ev(line, "denied", client, fp="", key="", reason="preauth-disconnect", duration=line - 4.0),
    ]


def test_an_unknown_key_then_the_right_one_is_just_accepted() -> None:
    client = "127.0.0.1:41424"
    assert replay("sshd-second-key.log") == [
        ev(66, "accepted", client),
        ev(92, "tunnel", client, dest="127.0.0.1:2300"),
        ev(93, "closed", client, duration=89.0),
    ]


def test_an_authorized_key_never_signed_with_is_no_signature() -> None:
    # ssh in BatchMode with a passphrase-protected authorized key: the server says the key
    # would do ("Postponed publickey"), the client cannot sign and leaves.
    assert replay("sshd-unsigned-key.log") == [
        ev(43, "denied", "127.0.0.1:54812", fp="SHA256:oe0GiWLPdLdwqggNguPCLccQ4C4l8A6FTTf9H8KQHCU",
           reason="no-signature", duration=39.0),
    ]


def test_too_many_unknown_keys_is_one_denied_with_the_last_key() -> None:
    assert replay("sshd-too-many-keys.log") == [
        ev(80, "denied", "127.0.0.1:37798", fp="SHA256:GQQxtEnuZ3vC6GGQslb6tz0QWfZIB5jsdruslQGaN14",
           reason="unknown-key", duration=76.0),
    ]


def test_listener_lines_give_no_events() -> None:
    assert replay("sshd-startup.log") == []


ALL_FIXTURES = sorted(path.name for path in DATA.glob("sshd-*.log"))


def test_fixtures_are_all_here() -> None:
    assert len(ALL_FIXTURES) == 25


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_every_connection_is_forgotten_when_it_ends(fixture: str) -> None:
    tracker = AccessTracker()
    replay(fixture, tracker)
    assert len(tracker) == 0


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_every_recorded_sshd_datagram_parses(fixture: str) -> None:
    for raw in datagrams(fixture):
        if b" sshd[" in raw:
            assert parse_datagram(raw) is not None, raw
        else:
            assert raw.startswith(b"<34>") and b" nologin: " in raw  # the forced command's own line
            assert parse_datagram(raw) is None


def test_all_fixtures_interleaved_give_the_same_events() -> None:
    """One tracker fed every fixture round-robin sees what separate trackers see."""
    streams = {name: datagrams(name) for name in ALL_FIXTURES}
    tracker = AccessTracker()
    together: list[AccessEvent] = []
    for index in range(max(len(lines) for lines in streams.values())):
        for name in ALL_FIXTURES:
            if index < len(streams[name]) and (parsed := parse_datagram(streams[name][index])):
                together.extend(tracker.feed(*parsed, T0 + index))
    separately = [event for name in ALL_FIXTURES for event in replay(name)]
    assert sorted(together, key=repr) == sorted(separately, key=repr)
    assert len(together) == 70
    assert len(tracker) == 0


# --- synthetic sequences in the recorded formats -------------------------------------


def feed_all(tracker: AccessTracker, lines: list[tuple[int, str]], start: float = T0) -> list[AccessEvent]:
    events: list[AccessEvent] = []
    for index, (pid, message) in enumerate(lines):
        events.extend(tracker.feed(pid, message, start + index))
    return events


def login(monitor: int, child: int, ip: str = "172.18.0.1", port: int = 50000) -> list[tuple[int, str]]:
    return [
        (monitor, f'Connection from {ip} port {port} on 172.18.0.2 port 22 rdomain ""'),
        (monitor, f"Accepted publickey for limited-user from {ip} port {port} ssh2: ED25519 {FP}"),
        (monitor, f"User child is on pid {child}"),
    ]


@pytest.mark.parametrize(
    ("order", "reason", "fp"),
    [(("unknown", "authorized"), "no-signature", FP), (("authorized", "unknown"), "unknown-key", BAD_FP)],
)
def test_the_last_key_offered_decides_why_a_login_was_denied(
    order: tuple[str, str], reason: str, fp: str
) -> None:
    offers = {
        "unknown": [
            (10, f"userauth_pubkey: publickey test pkalg ssh-ed25519 pkblob ED25519 {BAD_FP} [preauth]"),
            (10, f"Failed publickey for limited-user from 172.18.0.1 port 50000 ssh2: ED25519 {BAD_FP}"),
        ],
        "authorized": [
            (10, f"userauth_pubkey: publickey test pkalg ssh-ed25519 pkblob ED25519 {FP} [preauth]"),
            (10, f"Accepted key ED25519 {FP} found at /etc/ssh/authorized_keys.index:1"),
            (10, "Postponed publickey for limited-user from 172.18.0.1 port 50000 ssh2 [preauth]"),
        ],
    }
    events = feed_all(AccessTracker(), [
        (10, 'Connection from 172.18.0.1 port 50000 on 172.18.0.2 port 22 rdomain ""'),
        *offers[order[0]],
        *offers[order[1]],
        (10, "Connection closed by authenticating user limited-user 172.18.0.1 port 50000 [preauth]"),
    ])
    assert events == [ev(6, "denied", "172.18.0.1:50000", fp=fp, reason=reason, duration=6.0)]


def test_ipv6_client_is_bracketed() -> None:
    events = feed_all(AccessTracker(), login(10, 11, ip="2001:db8::7"))
    assert events == [ev(1, "accepted", "[2001:db8::7]:50000")]


def test_second_address_connects_after_the_first_failed() -> None:
    client = "172.18.0.1:50000"
    events = feed_all(AccessTracker(), login(10, 11) + [
        (11, "server_request_direct_tcpip: originator 127.0.0.1 port 65535, target workspace-a port 22"),
        (11, "channel 0: new direct-tcpip [direct-tcpip] (inactive timeout: 0)"),
        (11, "server_input_channel_open: confirm direct-tcpip"),
        (11, "channel 0: connection failed: Network is unreachable"),
        (11, "channel 0: connected to workspace-a port 22"),
        (11, "Connection closed by 172.18.0.1 port 50000"),
    ])
    assert events == [
        ev(1, "accepted", client),
        ev(7, "tunnel", client, dest="workspace-a:22"),
        ev(8, "closed", client, duration=8.0),
    ]


def test_a_tunnel_still_connecting_when_the_client_leaves() -> None:
    client = "172.18.0.1:50000"
    events = feed_all(AccessTracker(), login(10, 11) + [
        (11, "server_request_direct_tcpip: originator 127.0.0.1 port 65535, target workspace-a port 22"),
        (11, "channel 0: new direct-tcpip [direct-tcpip] (inactive timeout: 0)"),
        (11, "server_input_channel_open: confirm direct-tcpip"),
        (11, "server_request_direct_tcpip: originator 127.0.0.1 port 65535, target workspace-b port 22"),
        (11, "channel 1: new direct-tcpip [direct-tcpip] (inactive timeout: 0)"),
        (11, "channel 1: free: direct-tcpip, nchannels 2"),
        (11, "Read error from remote host 172.18.0.1 port 50000: Connection reset by peer"),
    ])
    assert events == [
        ev(1, "accepted", client),
        ev(8, "tunnel", client, dest="workspace-b:22", reason="closed-before-connect"),
        ev(9, "tunnel", client, dest="workspace-a:22", reason="closed-before-connect"),
        ev(9, "closed", client, duration=9.0),
    ]


def test_monitor_exit_ends_a_connection_whose_child_said_nothing() -> None:
    events = feed_all(AccessTracker(), login(10, 11) + [(10, "do_cleanup")])
    assert events[-1] == ev(3, "closed", "172.18.0.1:50000", duration=3.0)


def test_the_childs_own_do_cleanup_does_not_end_it() -> None:
    tracker = AccessTracker()
    assert feed_all(tracker, login(10, 11) + [(11, "do_cleanup")]) == [ev(1, "accepted", "172.18.0.1:50000")]
    assert len(tracker) == 2


def test_lines_after_the_end_and_from_unknown_pids_are_ignored() -> None:
    tracker = AccessTracker()
    feed_all(tracker, login(10, 11) + [(11, "Disconnected from user limited-user 172.18.0.1 port 50000")])
    assert tracker.feed(11, "session_input_channel_req: session 0 req shell", T0 + 9) == []
    assert tracker.feed(10, "Accepted publickey for limited-user from 172.18.0.1 port 50000 ssh2: "
                            f"ED25519 {FP}", T0 + 9) == []
    assert tracker.feed(99, "Connection closed by 172.18.0.1 port 50000", T0 + 9) == []
    assert len(tracker) == 0


def test_a_reused_monitor_pid_starts_afresh() -> None:
    tracker = AccessTracker()
    feed_all(tracker, login(10, 11))
    events = feed_all(tracker, [
        (10, 'Connection from 172.18.0.9 port 40000 on 172.18.0.2 port 22 rdomain ""'),
        (10, "Connection closed by 172.18.0.9 port 40000 [preauth]"),
    ], start=T0 + 10)
    assert events == [ev(11, "denied", "172.18.0.9:40000", fp="", key="", reason="preauth-disconnect",
                         duration=1.0)]
    assert len(tracker) == 0  # the old child 11 went with the old connection


def test_user_child_line_before_acceptance_is_not_trusted() -> None:
    tracker = AccessTracker()
    feed_all(tracker, [
        (10, 'Connection from 172.18.0.1 port 50000 on 172.18.0.2 port 22 rdomain ""'),
        (10, "User child is on pid 11"),
    ])
    assert len(tracker) == 1


# --- bounded memory --------------------------------------------------------------------


def test_cap_evicts_the_idlest_connection() -> None:
    tracker = AccessTracker(max_pids=4)
    for pid in range(1, 6):
        tracker.feed(pid, f'Connection from 10.0.0.{pid} port 1000 on 10.0.0.254 port 22 rdomain ""', T0 + pid)
    assert len(tracker) == 4
    accept = "Accepted publickey for limited-user from 10.0.0.{} port 1000 ssh2: ED25519 " + FP
    assert tracker.feed(1, accept.format(1), T0 + 10) == []  # evicted: forgotten
    assert tracker.feed(2, accept.format(2), T0 + 10) != []  # still tracked


def test_recent_activity_protects_from_the_cap() -> None:
    tracker = AccessTracker(max_pids=3)
    tracker.feed(1, 'Connection from 10.0.0.1 port 1000 on 10.0.0.254 port 22 rdomain ""', T0)
    tracker.feed(2, 'Connection from 10.0.0.2 port 1000 on 10.0.0.254 port 22 rdomain ""', T0 + 1)
    tracker.feed(1, "userauth_pubkey: publickey test pkalg ssh-ed25519 pkblob ED25519 " + FP, T0 + 2)
    tracker.feed(3, 'Connection from 10.0.0.3 port 1000 on 10.0.0.254 port 22 rdomain ""', T0 + 3)
    tracker.feed(4, 'Connection from 10.0.0.4 port 1000 on 10.0.0.254 port 22 rdomain ""', T0 + 4)
    assert tracker.feed(2, "Connection closed by 10.0.0.2 port 1000", T0 + 5) == []
    assert [e.event for e in tracker.feed(1, "Connection closed by 10.0.0.1 port 1000", T0 + 5)] == ["denied"]


def test_a_child_counts_against_the_cap_and_goes_with_its_monitor() -> None:
    tracker = AccessTracker(max_pids=3)
    feed_all(tracker, login(10, 11))
    assert len(tracker) == 2
    tracker.feed(20, 'Connection from 10.0.0.2 port 1000 on 10.0.0.254 port 22 rdomain ""', T0 + 5)
    tracker.feed(30, 'Connection from 10.0.0.3 port 1000 on 10.0.0.254 port 22 rdomain ""', T0 + 6)
    assert len(tracker) == 2  # 10 and its child 11 went together
    assert tracker.feed(11, "session_input_channel_req: session 0 req shell", T0 + 7) == []


def test_idle_connections_are_forgotten() -> None:
    tracker = AccessTracker(max_idle=60.0)
    feed_all(tracker, login(10, 11))  # last line at T0 + 2
    tracker.feed(11, "server_init_dispatch", T0 + 50)  # activity on the child keeps it
    tracker.feed(99, "anything", T0 + 110)
    assert len(tracker) == 2
    tracker.feed(99, "anything", T0 + 111)
    assert len(tracker) == 0


def test_a_flood_of_connections_stays_bounded() -> None:
    tracker = AccessTracker()
    for pid in range(1, 30_001):
        tracker.feed(pid, f'Connection from 10.0.{pid // 250}.{pid % 250} port 2222 on 10.0.0.1 port 22', T0)
    assert len(tracker) == 10_000


def test_overlong_messages_are_ignored_quickly() -> None:
    tracker = AccessTracker()
    feed_all(tracker, login(10, 11)[:1])
    hostile = "Accepted publickey for " + " from 1 port 1 ssh2: A " * 2500 + FP
    started = time.perf_counter()
    assert tracker.feed(10, hostile, T0 + 1) == []
    assert time.perf_counter() - started < 0.05
    longest = "Accepted publickey for " + "u" * (MAX_MESSAGE - 200) + f" from 172.18.0.1 port 50000 ssh2: ED25519 {FP}"
    assert len(longest) <= MAX_MESSAGE
    assert [e.event for e in tracker.feed(10, longest, T0 + 2)] == ["accepted"]


def test_cap_below_two_is_refused() -> None:
    with pytest.raises(ValueError):
        AccessTracker(max_pids=1)


# --- parse_datagram --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"<38>Nov 25 15:31:49 sshd[9823]: Connection from 127.0.0.1 port 56828 on 127.0.0.1 port 2299",
         (9823, "Connection from 127.0.0.1 port 56828 on 127.0.0.1 port 2299")),
        (b"<39>Nov 25 15:31:49 sshd[9846]: debug1: channel 0: connected to 127.0.0.1 port 2300",
         (9846, "channel 0: connected to 127.0.0.1 port 2300")),
        (b"<39>Nov 25 15:31:49 sshd[1]: debug3: x", (1, "x")),
        (b"<39>Nov 25 15:31:49 sshd[9823]: debug1: do_cleanup [preauth]", (9823, "do_cleanup [preauth]")),
        (b"<35>Nov 25 15:31:49 sshd[9823]: error: connect_to x port 22: failed.",
         (9823, "error: connect_to x port 22: failed.")),
        (b"<38>Nov  5 01:02:03 sshd[7]: Closing connection to 1.2.3.4 port 5", (7, "Closing connection to 1.2.3.4 port 5")),
        (b"<38>Nov 25 15:31:49 proxy-host sshd[7]: Received disconnect", (7, "Received disconnect")),
        (b"<38>proxy-host sshd[7]: hello", (7, "hello")),
        (b"<38>sshd[7]: hello\x00", (7, "hello")),  # logging.handlers.SysLogHandler style
        (b"Nov 25 15:31:49 sshd[7]: hello\n", (7, "hello")),
        (b"sshd[7]: hello", (7, "hello")),
        (b"<38>Nov 25 15:31:49 sshd[7]: ", (7, "")),
        (b"<38>Nov 25 15:31:49 sshd[7]: caf\xc3\xa9 \xff", (7, "caf\u00e9 \\xff")),
    ],
)
def test_parse_datagram_accepts_sshd(raw: bytes, expected: tuple[int, str]) -> None:
    assert parse_datagram(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"<34>Nov 25 15:32:24 nologin: Attempted login by UNKNOWN (UID: 1001) on UNKNOWN",
        b"<38>Nov 25 15:31:49 notsshd[7]: Accepted publickey for x",
        b"<38>Nov 25 15:31:49 sshd-keygen[7]: hello",
        b"<38>Nov 25 15:31:49 sshd: no pid",
        b"<38>Nov 25 15:31:49 sshd[]: empty pid",
        b"<38>Nov 25 15:31:49 sshd[0]: pid zero",
        b"<38>Nov 25 15:31:49 sshd[12]:no space",
        b"<38>Nov 25 15:31:49 a b sshd[7]: two words before the program",
        b"",
        b"\x00\x01garbage",
    ],
)
def test_parse_datagram_rejects_everything_else(raw: bytes) -> None:
    assert parse_datagram(raw) is None


# --- format_event ----------------------------------------------------------------------


def test_format_event_full_line() -> None:
    event = AccessEvent(
        time=1795618800.123,  # 2026-11-25T15:00:00.123Z
        event="closed",
        client="172.18.0.1:50000",
        fingerprint=FP,
        key_type="ED25519",
        dest="workspace-a:22",
        reason="connect-failed: Connection refused",
        duration=12.3456,
    )
    assert format_event(event, "workspace-a,workspace-b") == (
        f"2026-11-25T15:00:00.123Z event=closed client=172.18.0.1:50000 fp={FP} key=ED25519"
        ' target=workspace-a,workspace-b dest=workspace-a:22 reason="connect-failed: Connection refused"'
        " duration=12.346"
    )


def test_format_event_leaves_out_empty_fields() -> None:
    event = AccessEvent(time=0.0, event="denied", client="10.0.0.1:22", reason="preauth-disconnect")
    assert format_event(event, "") == "1970-01-01T00:00:00.000Z event=denied client=10.0.0.1:22 reason=preauth-disconnect"
    assert format_event(event, "-") == (
        "1970-01-01T00:00:00.000Z event=denied client=10.0.0.1:22 target=- reason=preauth-disconnect"
    )


def test_zero_duration_is_kept() -> None:
    event = AccessEvent(time=0.0, event="closed", client="10.0.0.1:22", duration=0.0)
    assert format_event(event, "").endswith(" duration=0.000")


@pytest.mark.parametrize(
    ("epoch", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1795618800.123, "2026-11-25T15:00:00.123Z"),
        (1795618800.9996, "2026-11-25T15:00:01.000Z"),
        (1795618800.0004, "2026-11-25T15:00:00.000Z"),
    ],
)
def test_timestamps_are_utc_with_milliseconds(epoch: float, text: str) -> None:
    assert format_timestamp(epoch) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("workspace-a:22", "workspace-a:22"),
        ("SHA256:ab+/cd", "SHA256:ab+/cd"),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("back\\slash", '"back\\\\slash"'),
        ("", '""'),
        ("evil\nevent=accepted", '"evil\\nevent=accepted"'),
        ("cr\rlf", '"cr\\rlf"'),
        ("tab\there", '"tab\\there"'),
        ("esc\x1b[31m", '"esc\\x1b[31m"'),
        ("nul\x00del\x7f", '"nul\\x00del\\x7f"'),
        ("c1\x85", '"c1\\x85"'),
        ("line\u2028sep", '"line\\u2028sep"'),
        ("caf\u00e9", "caf\u00e9"),
    ],
)
def test_logfmt_value_quotes_and_escapes(value: str, text: str) -> None:
    assert logfmt_value(value) == text


def test_an_attacker_cannot_add_a_log_line_or_a_field() -> None:
    event = AccessEvent(
        time=0.0,
        event="tunnel-denied",
        client="10.0.0.1:22",
        fingerprint=FP,
        dest='evil\nevent=accepted client="1.2.3.4:5"\r\n\x1b[2K\u2029x:22',
        reason="not-permitted",
    )
    line = format_event(event, "t1\nevent=accepted")
    assert line.isprintable()
    assert len(line.splitlines()) == 1
    assert line == (
        "1970-01-01T00:00:00.000Z event=tunnel-denied client=10.0.0.1:22 fp=" + FP
        + ' target="t1\\nevent=accepted"'
        + ' dest="evil\\nevent=accepted client=\\"1.2.3.4:5\\"\\r\\n\\x1b[2K\\u2029x:22"'
        + " reason=not-permitted"
    )


@pytest.mark.parametrize("name", EVENTS)
def test_event_names_are_bare(name: str) -> None:
    assert f" event={name}" in format_event(AccessEvent(0.0, name, "10.0.0.1:22"), "")


def test_child_lines_logged_before_the_link_are_replayed() -> None:
    # Under load the post-auth child may log its tunnel before the monitor logs
    # `User child is on pid C`: those lines are kept briefly and replayed at the link.
    recorded = [parse_datagram(raw) for raw in datagrams("sshd-tunnel-permitted.log")]
    recorded = [r for r in recorded if r is not None]
    monitor = recorded[0][0] if "Connection from" in recorded[0][1] else None
    link = next(i for i, (pid, msg) in enumerate(recorded) if msg.startswith("User child is on pid"))
    child = int(recorded[link][1].rsplit(" ", 1)[1])
    after = recorded[link + 1:]
    early = [r for r in after if r[0] == child][:6]  # the tunnel, before the link line
    rest = [r for r in after if r not in early]
    reordered = [r for r in recorded[:link] if r[0] != child] + early + [recorded[link]] + rest
    tracker = AccessTracker()
    events = [e for i, r in enumerate(reordered) for e in tracker.feed(*r, T0 + i)]
    kinds = [(e.event, e.dest) for e in events]
    assert ("tunnel", "127.0.0.1:2300") in kinds, kinds
    assert kinds[0][0] == "accepted" and kinds[-1][0] == "closed"
    assert monitor is None or monitor != child


def test_orphan_buffer_is_bounded() -> None:
    from watcher.accesslog import ORPHAN_MAX_LINES, ORPHAN_MAX_PIDS

    tracker = AccessTracker()
    for pid in range(ORPHAN_MAX_PIDS * 3):
        for n in range(ORPHAN_MAX_LINES * 2):
            tracker.feed(100000 + pid, f"debug1: noise {n}", T0)
    assert len(tracker._orphans) <= ORPHAN_MAX_PIDS
    assert all(len(lines) <= ORPHAN_MAX_LINES for lines in tracker._orphans.values())
    # Old orphans expire.
    tracker.feed(1, "debug1: late", T0 + 3600)
    assert list(tracker._orphans) == [1]


# --- revocation queries ------------------------------------------------------------------


def feed_lines(tracker: AccessTracker, name: str, start: int, stop: int) -> None:
    """Feeds the fixture's lines start+1..stop (the one at index i at T0 + i, as replay does)."""
    for index, raw in enumerate(datagrams(name)[start:stop], start=start):
        parsed = parse_datagram(raw)
        if parsed is not None:
            tracker.feed(*parsed, T0 + index)


def test_sessions_of_a_key_are_its_logged_in_connections() -> None:
    tracker = AccessTracker()
    feed_lines(tracker, "sshd-concurrent.log", 0, 101)  # both connected, none accepted yet
    assert tracker.sessions_of(FP) == []
    feed_lines(tracker, "sshd-concurrent.log", 101, 141)  # both accepted, children linked
    sessions = sorted(tracker.sessions_of(FP), key=lambda s: s.monitor)
    assert sessions == [
        Session(14425, 14430, "127.0.0.1:56290", FP, "ED25519", T0 + 9),
        Session(14426, 14429, "127.0.0.1:56292", FP, "ED25519", T0 + 8),
    ]
    assert tracker.sessions_of(BAD_FP) == []
    assert sorted(tracker.sessions_of(BAD_FP, FP), key=lambda s: s.monitor) == sessions
    assert tracker.session_of(14430) == sessions[0] == tracker.session_of(14425)
    assert tracker.session_of(99999) is None


def test_session_known_before_its_child_is() -> None:
    tracker = AccessTracker()
    feed_lines(tracker, "sshd-concurrent.log", 0, 103)  # 14426 accepted (line 103), no child yet
    [session] = tracker.sessions_of(FP)
    assert (session.monitor, session.child) == (14426, None)


def test_end_session_gives_closed_and_forgets_it() -> None:
    tracker = AccessTracker()
    feed_lines(tracker, "sshd-concurrent.log", 0, 141)
    assert tracker.end_session(14429, T0 + 500) == []  # a child pid is not a monitor
    assert tracker.end_session(14426, T0 + 500) == [
        ev(500, "closed", "127.0.0.1:56292", duration=492.0)]
    assert tracker.session_of(14426) is None and tracker.session_of(14429) is None
    assert [s.monitor for s in tracker.sessions_of(FP)] == [14425]
    assert tracker.end_session(14426, T0 + 501) == []


def test_revoked_event_format() -> None:
    session = Session(14426, 14429, "127.0.0.1:56292", FP, "ED25519", T0)
    line = format_event(revoked_event(session, T0 + 1, "target-removed,target-renamed"), "web,db")
    assert line == (f"{format_timestamp(T0 + 1)} event=revoked client=127.0.0.1:56292 fp={FP} "
                    "key=ED25519 target=web,db reason=target-removed,target-renamed")


# --- client-chosen text never supplies a fingerprint ------------------------------------

VICTIM_FP = "SHA256:VictimVictimVictimVictimVictimVictimVictim0"  # someone else's key


def connect(pid: int = 10, port: int = 50000) -> tuple[int, str]:
    return pid, f'Connection from 172.18.0.1 port {port} on 172.18.0.2 port 22 rdomain ""'


def test_an_unsupported_algorithm_name_cannot_name_a_key() -> None:
    # sshd echoes the client's algorithm name verbatim (auth2-pubkey.c, verbose_f
    # "unsupported public key algorithm: %s"): it may contain spaces and look like a pkblob.
    events = feed_all(AccessTracker(), [
        connect(),
        (10, f"userauth_pubkey: unsupported public key algorithm: x pkblob ED25519 {VICTIM_FP} [preauth]"),
        (10, "userauth_pubkey: unsupported public key algorithm: ssh-ed25519 pkblob ED25519 "
             f"{VICTIM_FP} CA ED25519 {VICTIM_FP} [preauth]"),
        (10, "Connection closed by authenticating user limited-user 172.18.0.1 port 50000 [preauth]"),
    ])
    assert events == [ev(3, "denied", "172.18.0.1:50000", fp="", key="", reason="preauth-disconnect",
                         duration=3.0)]


def test_recorded_client_text_imitating_sshd_names_no_key() -> None:
    # Recorded with paramiko against the proxy's sshd config (sshd-forged-fields.log): the
    # algorithm name "x pkblob ED25519 <the authorized key's fp>", then a user name that
    # imitates an auth line's tail (sshd cuts it at ':', the user:style separator).
    assert replay("sshd-forged-fields.log") == [
        ev(35, "denied", "172.17.0.1:45680", fp="", key="", reason="preauth-disconnect", duration=30.0),
        ev(78, "denied", "172.17.0.1:34362", fp="", key="", reason="invalid-user", duration=31.0),
    ]


def test_a_key_sshd_never_checked_names_no_fingerprint() -> None:
    # The "test pkalg ... pkblob" debug line comes before sshd checks anything (and from the
    # pre-auth child): only the monitor's verdict on a key names it.
    events = feed_all(AccessTracker(), [
        connect(),
        (10, f"userauth_pubkey: publickey test pkalg ssh-ed25519 pkblob ED25519 {VICTIM_FP} [preauth]"),
        (10, "Connection closed by authenticating user limited-user 172.18.0.1 port 50000 [preauth]"),
    ])
    assert events == [ev(2, "denied", "172.18.0.1:50000", fp="", key="", reason="preauth-disconnect",
                         duration=2.0)]


@pytest.mark.parametrize("user", [
    f"x from 172.18.0.1 port 50000 ssh2: ED25519 {VICTIM_FP}",
    f"limited-user from 172.18.0.1 port 50000 ssh2: ED25519 {VICTIM_FP} from",
])
def test_a_user_name_cannot_name_a_key(user: str) -> None:
    # `Failed publickey for <user> from ...`: the user name is the client's (up to 100 chars);
    # the fingerprint is taken from sshd's own trailing fields only.
    events = feed_all(AccessTracker(), [
        connect(),
        (10, f"Failed publickey for {user} from 172.18.0.1 port 50000 ssh2: ED25519 {BAD_FP}"),
        (10, "Connection closed by authenticating user limited-user 172.18.0.1 port 50000 [preauth]"),
    ])
    assert [e.fingerprint for e in events] in ([BAD_FP], [""])
    assert VICTIM_FP not in repr(events)


def test_a_cert_key_id_cannot_name_a_key() -> None:
    # A certificate's key ID is the client's text too (its own CA signs anything).
    line = (f"Failed publickey for limited-user from 172.18.0.1 port 50000 ssh2: ED25519-CERT {BAD_FP} "
            f"ID x from 172.18.0.1 port 50000 ssh2: ED25519 {VICTIM_FP} (serial 1) CA ED25519 {VICTIM_FP}")
    events = feed_all(AccessTracker(), [
        connect(), (10, line),
        (10, "Connection closed by authenticating user limited-user 172.18.0.1 port 50000 [preauth]"),
    ])
    assert VICTIM_FP not in repr(events)


def test_an_auth_line_about_another_connection_is_ignored() -> None:
    events = feed_all(AccessTracker(), [
        connect(),
        (10, f"Accepted publickey for limited-user from 172.18.0.9 port 50000 ssh2: ED25519 {VICTIM_FP}"),
        (10, f"Failed publickey for limited-user from 172.18.0.1 port 50001 ssh2: ED25519 {VICTIM_FP}"),
        (10, "Connection closed by authenticating user limited-user 172.18.0.1 port 50000 [preauth]"),
    ])
    assert events == [ev(3, "denied", "172.18.0.1:50000", fp="", key="", reason="preauth-disconnect",
                         duration=3.0)]


@pytest.mark.parametrize("line", [
    f"Accepted publickey for limited-user from 172.18.0.1 port 50000 ssh2: ED25519 {VICTIM_FP} [preauth]",
    f"Accepted key ED25519 {VICTIM_FP} found at /etc/ssh/authorized_keys.index:1 [preauth]",
    f"Failed publickey for limited-user from 172.18.0.1 port 50000 ssh2: ED25519 {VICTIM_FP} [preauth]",
])
def test_the_preauth_child_cannot_accept_or_name_a_key(line: str) -> None:
    # The sandboxed pre-auth child's lines reach syslog through the monitor, suffixed
    # ` [preauth]`; the verdicts on keys are the monitor's own lines, never suffixed.
    events = feed_all(AccessTracker(), [
        connect(), (10, line),
        (10, "Connection closed by authenticating user limited-user 172.18.0.1 port 50000 [preauth]"),
    ])
    assert [e.event for e in events] == ["denied"]
    assert VICTIM_FP not in repr(events)


def test_a_key_sshd_found_authorized_but_never_signed_with_is_named() -> None:
    events = feed_all(AccessTracker(), [
        connect(),
        (10, f"userauth_pubkey: publickey test pkalg ssh-ed25519 pkblob ED25519 {FP} [preauth]"),
        (10, f"Accepted key ED25519 {FP} found at AuthorizedKeysCommand:1"),
        (10, "Postponed publickey for limited-user from 172.18.0.1 port 50000 ssh2 [preauth]"),
        (10, "Connection closed by authenticating user limited-user 172.18.0.1 port 50000 [preauth]"),
    ])
    assert events == [ev(4, "denied", "172.18.0.1:50000", reason="no-signature", duration=4.0)]
