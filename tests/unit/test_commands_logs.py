"""`watcher logs`: the access log read back, filtered and shown."""

from __future__ import annotations

import argparse
import json
import threading
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from watcher.accesslog import AccessEvent, format_event, parse_line
from watcher.cli import main
from watcher.commands import logs as logs_command
from watcher.commands.logs import LogsError, follow, parse_duration

T0 = 1_764_860_000.0  # 2025-12-04T14:53:20Z
LINES = [
    format_event(AccessEvent(T0, "accepted", "172.18.0.1:1", "SHA256:a", "ED25519"), "web"),
    format_event(AccessEvent(T0 + 1, "tunnel", "172.18.0.1:1", "SHA256:a", "ED25519",
                             dest="web:22"), "web"),
    format_event(AccessEvent(T0 + 600, "denied", "172.18.0.1:2", reason="unknown-key"), "-"),
    "not an event line",
    format_event(AccessEvent(T0 + 900, "tunnel-denied", "172.18.0.1:3", "SHA256:b", "RSA",
                             dest="db:5432", reason="not-permitted"), "db,web"),
    format_event(AccessEvent(T0 + 901, "denied", "172.18.0.1:4",
                             reason='odd "quote"\x1b[2J'), "-"),
]


def args(tmp_path: Path, *argv: str) -> argparse.Namespace:
    (tmp_path / "access.log").write_text("".join(line + "\n" for line in LINES))
    parser = argparse.ArgumentParser()
    logs_command.add_parser(parser.add_subparsers())
    return parser.parse_args(["logs", "--access-log", str(tmp_path / "access.log"), *argv])


def run(namespace: argparse.Namespace, now: float = T0 + 1000) -> list[str]:
    out = StringIO()
    code = logs_command.run(namespace, Console(file=out, width=200, color_system=None),
                            now=lambda: now)
    assert code == 0
    return out.getvalue().splitlines()


def test_every_event_readable(tmp_path: Path) -> None:
    assert run(args(tmp_path)) == [
        "2025-12-04 14:53:20Z  accepted        client=172.18.0.1:1 fp=SHA256:a key=ED25519 target=web",
        "2025-12-04 14:53:21Z  tunnel          client=172.18.0.1:1 fp=SHA256:a key=ED25519 target=web dest=web:22",
        "2025-12-04 15:03:20Z  denied          client=172.18.0.1:2 target=- reason=unknown-key",
        "2025-12-04 15:08:20Z  tunnel-denied   client=172.18.0.1:3 fp=SHA256:b key=RSA target=db,web dest=db:5432 reason=not-permitted",
        '2025-12-04 15:08:21Z  denied          client=172.18.0.1:4 target=- reason="odd \\"quote\\"\\x1b[2J"',
    ]


def test_filters(tmp_path: Path) -> None:
    def clients(*argv: str) -> list[str]:
        return [line.split("client=")[1].split()[0] for line in run(args(tmp_path, *argv))]

    assert clients("--target", "web") == ["172.18.0.1:1", "172.18.0.1:1", "172.18.0.1:3"]
    assert clients("--target", "db") == ["172.18.0.1:3"]
    assert clients("--target", "we") == []  # whole names only
    assert clients("--event", "denied") == ["172.18.0.1:2", "172.18.0.1:4"]
    assert clients("--event", "denied", "--event", "tunnel-denied") == [
        "172.18.0.1:2", "172.18.0.1:3", "172.18.0.1:4"]
    # now = T0 + 1000
    assert clients("--since", "10m") == ["172.18.0.1:2", "172.18.0.1:3", "172.18.0.1:4"]
    assert clients("--since", "5m", "--event", "denied", "--target", "-") == ["172.18.0.1:4"]


def test_json_lines(tmp_path: Path) -> None:
    lines = run(args(tmp_path, "--json", "--event", "denied"))
    assert [json.loads(line) for line in lines] == [
        {"time": "2025-12-04T15:03:20.000Z", "event": "denied", "client": "172.18.0.1:2",
         "target": "-", "reason": "unknown-key"},
        {"time": "2025-12-04T15:08:21.000Z", "event": "denied", "client": "172.18.0.1:4",
         "target": "-", "reason": 'odd "quote"\x1b[2J'},
    ]


def test_read_back_is_the_inverse_of_the_writer() -> None:
    reason = 'a "b" \\ c=d\n\t\x00\x7f\u2028 \U0001f600'
    event = parse_line(format_event(AccessEvent(T0, "denied", "[::1]:22", reason=reason), "-"))
    assert event is not None
    assert event.time == T0 and event.event == "denied"
    assert event.get("reason") == reason and event.get("client") == "[::1]:22"
    assert parse_line("garbage") is None and parse_line("") is None


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("10m", 600), ("2h", 7200),
                                           ("1d", 86400), ("1h30m", 5400)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "m", "10x", "-5m", "10m "])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_follow_prints_what_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text("first\n")
    stop = threading.Event()
    seen: list[str] = []
    with open(path) as handle:
        handle.read()  # at the end, as `logs -f` is after the history
        lines = follow(handle, stop, poll=0.01)

        def writer() -> None:
            with open(path, "a") as out:
                out.write("second\nthi")
                out.flush()
                out.write("rd\n")
        threading.Thread(target=writer).start()
        for line in lines:
            seen.append(line)
            if len(seen) == 2:
                path.write_text("")  # truncated (copytruncate rotation): starts over
                with open(path, "a") as out:
                    out.write("after rotation\n")
            if len(seen) == 3:
                stop.set()
    assert seen == ["second\n", "third\n", "after rotation\n"]


def test_missing_log_says_what_to_do(tmp_path: Path) -> None:
    namespace = args(tmp_path)
    namespace.access_log = str(tmp_path / "nope.log")
    with pytest.raises(LogsError, match="cannot read .*nope.log: No such file or directory"):
        run(namespace)
    err = StringIO()
    assert main(["logs", "--access-log", str(tmp_path / "nope.log")],
                Console(file=err, color_system=None)) == 1


@pytest.mark.parametrize("command, options", [
    ("logs", ("--follow", "--target", "--event", "--since", "--json", "--access-log")),
    ("status", ("--json", "--watch", "--status", "--access-log", "not running")),
    ("health", ("--status", "--port", "--liveness")),
])
def test_help_lists_every_option(command: str, options: tuple[str, ...],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for option in options:
        assert option in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == "watcher 0.1.0\n"
