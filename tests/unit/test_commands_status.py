"""`watcher status`: rendered into a plain Console and compared as text."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from io import StringIO
from pathlib import Path

import jsonschema
import pytest
from rich.console import Console

from watcher.cli import main
from watcher.commands import status as status_command
from watcher.commands.common import EXIT_NOT_RUNNING, EXIT_OK, EXIT_UNHEALTHY, age
from watcher.snapshot import (JSON_SCHEMA, KeyStatus, ManualStatus, SourceStatus, TargetStatus, from_json,
                              to_json)

from test_snapshot import full_document

DATA = Path(__file__).parent / "data"
ACCESS_LINES = [
    '2023-11-14T22:13:10.000Z event=accepted client=172.18.0.1:48788 fp=SHA256:AAAA key=ED25519 target=web',
    '2023-11-14T22:13:11.000Z event=tunnel client=172.18.0.1:48788 fp=SHA256:AAAA key=ED25519 target=web dest=web:22',
    '2023-11-14T22:13:12.000Z event=denied client=172.18.0.1:48800 target=- reason="\\x1b[31mevil"',
]


def console(width: int = 220) -> tuple[Console, StringIO]:
    out = StringIO()
    return Console(file=out, width=width, color_system=None), out


def write_files(tmp_path: Path, doc=None, lines=ACCESS_LINES) -> argparse.Namespace:
    doc = doc or full_document()
    (tmp_path / "status.json").write_text(to_json(doc))
    (tmp_path / "access.log").write_text("".join(line + "\n" for line in lines))
    return argparse.Namespace(status=str(tmp_path / "status.json"), json=False, watch=False,
                              access_log=str(tmp_path / "access.log"))


def run(args: argparse.Namespace, listening: bool = True, width: int = 220) -> tuple[int, str]:
    out_console, out = console(width)
    code = status_command.run(args, out_console, listening=lambda: listening)
    return code, out.getvalue()


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    now = full_document().heartbeat + 1
    monkeypatch.setattr(status_command.time, "time", lambda: now)


def test_full_rendering_matches_the_recording(tmp_path: Path) -> None:
    code, text = run(write_files(tmp_path), width=140)  # narrow: cells wrap, never cut
    assert code == EXIT_OK
    expected = (DATA / "status-render.txt").read_text()
    assert [line.rstrip() for line in text.splitlines()] == expected.splitlines()


def test_what_an_operator_needs_is_there(tmp_path: Path) -> None:
    _, text = run(write_files(tmp_path))
    assert "connected since 16m ago (2 reconnect(s))" in text
    assert "last event      9s ago" in text
    assert "cache written   10s ago" in text
    assert "SHA256:" + "A" * 43 in text  # the full fingerprint, never cut
    assert "failed: GET answered HTTP 503" in text
    assert "manual /keys/admin:1" in text
    assert "belongs to target db" in text
    assert text.rstrip().endswith("healthy")


def test_nothing_from_a_file_reaches_the_terminal_raw(tmp_path: Path) -> None:
    doc = full_document()
    evil = replace(doc.state.targets[0], name="we\x1b]0;pwned\x07b", error="\x1b[2J")
    doc = replace(doc, state=replace(doc.state, targets=(evil,)))
    _, text = run(write_files(tmp_path, doc))
    assert "\x1b" not in text and "\x07" not in text
    assert "we\\x1b]0;pwned\\x07b" in text
    assert '\\x1b[31mevil' in text


def test_no_colour_without_a_terminal(tmp_path: Path) -> None:
    out = StringIO()
    code = status_command.run(write_files(tmp_path), Console(file=out, width=140),
                              listening=lambda: True)
    assert code == EXIT_OK and "\x1b[" not in out.getvalue()


def test_colour_on_a_terminal_marks_states(tmp_path: Path) -> None:
    out = StringIO()
    status_command.run(write_files(tmp_path),
                       Console(file=out, width=140, force_terminal=True, color_system="standard"),
                       listening=lambda: True)
    assert "\x1b[32mok" in out.getvalue()  # green
    assert "\x1b[31mfailed" in out.getvalue()  # red


def test_unhealthy_shows_everything_then_one_line(tmp_path: Path) -> None:
    doc = full_document()
    doc = replace(doc, state=replace(doc.state, source=SourceStatus(
        "docker", connected=False, error="Error while fetching server API version",
        reconnects=3)))
    code, text = run(write_files(tmp_path, doc), listening=False)
    assert code == EXIT_UNHEALTHY
    assert "reconnecting (attempt 3): Error while fetching server API version" in text
    assert text.splitlines()[-1] == (
        "unhealthy: sshd does not listen on port 22; docker source is not connected: "
        "Error while fetching server API version")


def test_not_running_without_a_snapshot(tmp_path: Path) -> None:
    args = write_files(tmp_path)
    args.status = str(tmp_path / "missing.json")
    code, text = run(args)
    assert code == EXIT_NOT_RUNNING
    assert text == (f"the watcher is not running: {tmp_path}/missing.json does not exist (run "
                    "this in the proxy's container, or pass --status PATH)\n")


def test_not_running_with_a_stale_snapshot(tmp_path: Path) -> None:
    doc = replace(full_document(), heartbeat=full_document().heartbeat - 600)
    code, text = run(write_files(tmp_path, doc))
    assert code == EXIT_NOT_RUNNING
    assert len(text.splitlines()) == 1
    assert text.startswith("the watcher is not running: its status was last written 10m ago")


def test_unreadable_snapshot_is_not_running(tmp_path: Path) -> None:
    args = write_files(tmp_path)
    Path(args.status).write_text('{"schema": 2}')
    code, text = run(args)
    assert code == EXIT_NOT_RUNNING
    assert text.startswith(f"{args.status}: status schema 2 is not supported")


def test_json_is_the_documented_document(tmp_path: Path) -> None:
    args = write_files(tmp_path)
    args.json = True
    code, text = run(args)
    assert code == EXIT_OK
    jsonschema.validate(json.loads(text), JSON_SCHEMA)
    assert from_json(text) == full_document()


def test_fetching_and_pending_targets(tmp_path: Path) -> None:
    doc = full_document()
    rows = (TargetStatus("c" * 12, "new", key_status=KeyStatus.FETCHING),)
    doc = replace(doc, state=replace(doc.state, targets=rows, manual_keys=()))
    _, text = run(write_files(tmp_path, doc, lines=[]))
    assert "fetching" in text
    assert "(none yet)" in text


def test_no_targets(tmp_path: Path) -> None:
    doc = full_document()
    doc = replace(doc, state=replace(doc.state, targets=(), manual_keys=(),
                                     manual=ManualStatus()))
    _, text = run(write_files(tmp_path, doc))
    assert "(none)" in text


def test_cli_reports_not_running(tmp_path: Path) -> None:
    out_console, out = console()
    code = main(["status", "--status", str(tmp_path / "none.json")], out_console)
    assert code == EXIT_NOT_RUNNING
    assert out.getvalue().startswith("the watcher is not running: ")


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59, "59s"), (60, "1m"), (7200, "2h"),
                                           (200000, "2d"), (-5, "0s")])
def test_age(seconds: float, text: str) -> None:
    assert age(seconds) == text


def test_watch_redraws_until_ctrl_c(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = write_files(tmp_path)
    args.watch = True
    sleeps = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt
        Path(args.status).unlink()  # the watcher stops between two redraws

    monkeypatch.setattr(status_command.time, "sleep", sleep)
    code, text = run(args)
    assert code == EXIT_OK
    assert sleeps == [2.0, 2.0]
    assert "the watcher is not running: " in text  # redrawn after the snapshot went away


def test_a_long_verdict_stays_one_line(tmp_path: Path) -> None:
    doc = full_document()
    doc = replace(doc, state=replace(doc.state, source=SourceStatus(
        "docker", connected=False, error="cannot reach the Docker engine: " + "x" * 300)))
    code, text = run(write_files(tmp_path, doc), width=80)
    assert code == EXIT_UNHEALTHY
    assert text.splitlines()[-1].startswith("unhealthy: docker source is not connected: ")
    assert text.splitlines()[-1].endswith("x" * 300)


def test_no_color_is_honoured_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    out = StringIO()
    status_command.run(write_files(tmp_path), Console(file=out, width=140, force_terminal=True),
                       listening=lambda: True)
    assert "\x1b[31m" not in out.getvalue() and "\x1b[32m" not in out.getvalue()
    assert "failed" in out.getvalue() and "HTTP 503" in out.getvalue()  # words carry the meaning
