"""Property tests (hypothesis): hostile and odd inputs to the parsers and renderers (issue 13).

Only the documented error (KeyRejected) or a result; never a crash, never an output line
sshd, the resolver or a log reader would read differently from what the watcher meant.
"""

from __future__ import annotations

import base64
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from watcher.accesslog import (
    AccessEvent,
    AccessTracker,
    format_event,
    parse_datagram,
    parse_line,
)
from watcher.config import load_settings, parse_labels
from watcher.errors import ConfigError, KeyRejected
from watcher.keys import parse_authorized_keys_line, parse_key_body, parse_public_key
from watcher.model import Target
from watcher.render import HOSTS_BEGIN, HOSTS_END, ServedTarget, render
from watcher.targets import ProxyIdentity, resolve_aliases

# Deterministic for CI: same examples every run, no per-example deadline on a shared machine.
FAST = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _ed25519(seed: int) -> str:
    blob = _string(b"ssh-ed25519") + _string(seed.to_bytes(32, "big"))
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


KEY = _ed25519(1)

# Text with the characters that break lines, quotes and option lists, plus unicode.
HOSTILE = st.text(alphabet=st.sampled_from(list('ab-._:0"\\, \t\n\r=#\x00\x7fé\u2028\u0085K\u212a[]'))
                  | st.characters(), max_size=40)


@FAST
@given(st.binary(max_size=300))
def test_key_body_bytes_give_keys_or_keyrejected(body: bytes) -> None:
    try:
        keys, rejected = parse_key_body(body)
    except KeyRejected:
        return
    assert all(isinstance(r, str) for r in rejected)
    for key in keys:
        assert "\n" not in key.line() and "\r" not in key.line()


@FAST
@given(HOSTILE)
def test_public_key_with_hostile_comment_is_one_clean_line(comment: str) -> None:
    try:
        key = parse_public_key(f"{KEY} {comment}")
    except KeyRejected:
        return
    assert key.line() == KEY
    assert not any(c in key.comment for c in "\n\r\x00")


@FAST
@given(HOSTILE, st.sampled_from(["permitopen", "from", "expiry-time", "no-pty", "command"]))
def test_option_line_parser_keeps_only_wellformed_options(value: str, name: str) -> None:
    option = name if name == "no-pty" else f'{name}="{value}"'
    try:
        options, key = parse_authorized_keys_line(f"{option} {KEY}")
    except KeyRejected:
        return
    assert key.line() == KEY
    for kept in options:
        assert kept.isascii() and not any(c in kept for c in " \t\n\r")
        if "=" in kept:
            raw = kept.split("=", 1)[1]
            assert raw.startswith('"') and raw.endswith('"')
            inner = raw[1:-1].replace('\\"', "")
            assert '"' not in inner  # no quote breaks out of the value


@FAST
@given(HOSTILE, HOSTILE)
def test_option_line_parser_on_raw_prefix(prefix: str, tail: str) -> None:
    try:
        options, key = parse_authorized_keys_line(f"{prefix} {KEY}{tail}")
    except KeyRejected:
        return
    assert "command" not in " ".join(options).lower().split("=")[0]


NAME = st.text(alphabet=st.sampled_from(list('ab1-._"\\, \t\n\r=é\u2028')), min_size=1, max_size=12)


@st.composite
def _targets(draw: st.DrawFn) -> list[Target]:
    count = draw(st.integers(1, 4))
    out = []
    for n in range(count):
        out.append(Target(
            id=f"{n:02d}" + "f" * 62, name=draw(NAME), address=f"172.18.0.{n + 2}",
            hostname=draw(st.one_of(st.just(""), NAME)),
            aliases=tuple(draw(st.lists(NAME, max_size=2)))))
    return out


@FAST
@given(_targets())
def test_hostile_names_never_break_key_lines_or_hosts(targets: list[Target]) -> None:
    plan = resolve_aliases(targets, ProxyIdentity(names=frozenset({"proxy"}), addresses=frozenset({"172.18.0.1"})))
    served = [ServedTarget(t, plan.aliases[t.id], (parse_public_key(_ed25519(i + 5)),))
              for i, t in enumerate(targets)]
    rendered = render(served, ("22",))
    for line in rendered.index.splitlines():
        fp, options, _rest = line.split(" ", 2)
        assert fp.startswith("SHA256:")
        for opt in options.split(","):
            if opt.startswith("permitopen="):
                value = opt[len("permitopen="):]
                assert value.startswith('"') and value.endswith('"')
                assert '"' not in value[1:-1] and "\\" not in value[1:-1]
        assert parse_authorized_keys_line(line.split(" ", 1)[1])  # sshd-shaped, re-parses
    lines = rendered.hosts_block.splitlines()
    assert lines[0] == HOSTS_BEGIN and lines[-1] == HOSTS_END
    by_address = {t.address: t for t in targets}
    for row in lines[1:-1]:
        address, names = row.split("\t")
        for name in names.split(" "):
            assert name in plan.aliases[by_address[address].id]


EVENT_TEXT = st.text(max_size=30)


@FAST
@given(EVENT_TEXT, EVENT_TEXT, EVENT_TEXT, EVENT_TEXT)
def test_access_log_line_is_one_line_and_reads_back(client: str, dest: str, reason: str,
                                                    targets: str) -> None:
    event = AccessEvent(time=1.5, event="tunnel", client=client, dest=dest, reason=reason)
    line = format_event(event, targets)
    assert "\n" not in line and "\r" not in line and line.isprintable()
    back = parse_line(line)
    assert back is not None and back.event == "tunnel"
    for name, value in (("client", client), ("dest", dest), ("reason", reason), ("target", targets)):
        assert back.get(name) == value


@FAST
@given(st.binary(max_size=200))
def test_datagram_parser_never_crashes(data: bytes) -> None:
    result = parse_datagram(data)
    if result is not None:
        assert result[0] > 0


SSHD_MESSAGES = st.sampled_from([
    "Connection from 10.0.0.1 port 5000 on 10.0.0.2 port 22",
    "Accepted publickey for limited-user from 10.0.0.1 port 5000 ssh2: ED25519 SHA256:abc",
    "Received disconnect from 10.0.0.1 port 5000:11: bye",
    "Connection closed by 10.0.0.1 port 5000 [preauth]",
    "Invalid user x from 10.0.0.1 port 5000",
]) | st.text(max_size=80)


@FAST
@given(st.lists(st.tuples(st.integers(1, 4), SSHD_MESSAGES), max_size=25))
def test_tracker_feed_never_crashes_and_events_format(messages: list[tuple[int, str]]) -> None:
    tracker = AccessTracker()
    for step, (pid, message) in enumerate(messages):
        for event in tracker.feed(pid, message, float(step)):
            line = format_event(event, "t")
            assert "\n" not in line and line.isprintable()


ENV_NAMES = ["ACCESS_LOG_BACKUPS", "ACCESS_LOG_MAX_BYTES", "DOCKER_HOST", "KUBERNETES_CLUSTER_DOMAIN",
             "SSH_PERMIT_TARGET_HOST", "SSH_PERMIT_TARGET_PORT", "SSH_PROXY_DRAIN_SECONDS",
             "SSH_PROXY_SOURCE_OUTAGE_SECONDS", "SSH_TARGET_KEY_PATH", "SSH_TARGET_KEY_SOURCE",
             "SSH_TARGET_LABELS", "SSH_TARGET_PUBLICKEY_API_PORT"]


@FAST
@given(st.dictionaries(st.sampled_from(ENV_NAMES), HOSTILE, max_size=3))
def test_env_gives_settings_or_configerror(env: dict[str, str]) -> None:
    try:
        result = load_settings(env)
    except ConfigError as exc:
        assert str(exc)
        return
    # Ports go into permitopen="alias:port": nothing but '*' or digits.
    assert all(p == "*" or p.isdigit() for p in result.permit_ports)


@FAST
@given(HOSTILE)
def test_label_selector_parts_cannot_carry_separators(value: str) -> None:
    try:
        labels = parse_labels(value)
    except ConfigError:
        return
    for key, val in labels:
        assert not any(c in key for c in ",= \t\n\r")
        assert val is None or not any(c in val for c in ",= \t\n\r")
