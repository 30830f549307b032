"""`watcher known-hosts`: recorded files rendered into a narrow Console, compared as text."""

from __future__ import annotations

import argparse
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from watcher.commands import known_hosts
from watcher.commands.common import EXIT_NOT_RUNNING, EXIT_OK
from watcher.hostkeys import HEADER
from watcher.snapshot import StatusDocument, to_json

from test_hostkeys import ed25519

NOW = 1_700_000_000.0


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(known_hosts.time, "time", lambda: NOW + 1)


def files(tmp_path: Path, learned: str | None, proxy_keys: list[str],
          heartbeat: float = NOW) -> argparse.Namespace:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "status.json").write_text(to_json(StatusDocument(heartbeat=heartbeat, mode="docker")))
    if learned is not None:
        (tmp_path / "target_known_hosts").write_text(learned)
    keys = tmp_path / "host_keys"
    keys.mkdir()
    for n, key in enumerate(proxy_keys):
        (keys / f"ssh_host_{n}_key.pub").write_text(f"{key} ssh-proxy\n")
        (keys / f"ssh_host_{n}_key").write_text("private: never read\n")
    parser = argparse.ArgumentParser()
    known_hosts.add_parser(parser.add_subparsers())
    return parser.parse_args(["known-hosts", "--status", str(tmp_path / "status.json"),
                              "--file", str(tmp_path / "target_known_hosts"),
                              "--host-keys", str(keys)])


def run(args: argparse.Namespace) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    code = known_hosts.run(args, Console(file=out, width=30, color_system=None), errors=err)
    return code, out.getvalue(), err.getvalue()


LEARNED = (HEADER + "# ws-a\n"
           f"ws-a,aaaaaaaaaaaa,172.18.0.5 {ed25519(1)}\n"
           "# evil\n"
           f"evil,SSH-Proxy,bbbbbbbbbbbb {ed25519(2)}\n"
           f"ssh-proxy {ed25519(3)}\n")


def test_rendering_matches_the_recording(tmp_path: Path) -> None:
    code, out, err = run(files(tmp_path, LEARNED, [ed25519(7), "not a key"]))
    assert (code, err) == (EXIT_OK, "")
    assert out == (
        "# ssh-proxy host keys (`watcher known-hosts`): the proxy as 'ssh-proxy', then the targets\n"
        "# (learned by the proxy from each target; keyed by its names).\n"
        f"ssh-proxy {ed25519(7)}\n"
        "# ws-a\n"
        f"ws-a,aaaaaaaaaaaa,172.18.0.5 {ed25519(1)}\n"
        "# evil\n"
        f"evil,bbbbbbbbbbbb {ed25519(2)}\n")


def test_a_target_name_never_carries_a_key_for_the_proxy_alias(tmp_path: Path) -> None:
    _, out, _ = run(files(tmp_path, LEARNED, [ed25519(7)]))
    proxy_keys = [line.split(" ", 1)[1] for line in out.splitlines()
                  if not line.startswith("#") and "ssh-proxy" in line.lower().split(" ")[0].split(",")]
    assert proxy_keys == [ed25519(7)]


def test_bracketed_names_are_filtered_too() -> None:
    lines = known_hosts.target_lines(f"[ssh-proxy]:2222,[ws]:2222 {ed25519(1)}\n", "ssh-proxy")
    assert lines == [f"[ws]:2222 {ed25519(1)}"]


def test_missing_proxy_keys_are_said(tmp_path: Path) -> None:
    _, out, _ = run(files(tmp_path, LEARNED, []))
    assert "# The proxy's own host keys: none found (no .pub file in" in out


def test_not_written_yet_or_not_running_is_one_line_on_stderr(tmp_path: Path) -> None:
    code, out, err = run(files(tmp_path / "a", None, []))
    assert code == EXIT_NOT_RUNNING and out == ""
    assert "target_known_hosts does not exist yet" in err and len(err.splitlines()) == 1
    code, out, err = run(files(tmp_path / "b", LEARNED, [], heartbeat=NOW - 600))
    assert code == EXIT_NOT_RUNNING and out == ""
    assert "not running" in err and len(err.splitlines()) == 1
