"""`watcher ssh-config`: a recorded status rendered into a narrow Console, compared as text;
names that could break out of a `Host` line never reach it."""

from __future__ import annotations

import argparse
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from watcher.cli import main
from watcher.commands import ssh_config
from watcher.commands.common import EXIT_NOT_RUNNING, EXIT_OK
from watcher.snapshot import SettingsView, StatusDocument, TargetStatus, WatcherState, to_json

NOW = 1_700_000_000.0


def doc(*targets: TargetStatus, ports: tuple[str, ...] = ("*",)) -> StatusDocument:
    return StatusDocument(heartbeat=NOW, mode="docker", settings=SettingsView(("*",), ports),
                          state=WatcherState(targets=targets))


WS_A = TargetStatus("aaaaaaaaaaaa", "ws-a", "172.18.0.5",
                    ("ws-a", "aaaaaaaaaaaa", "172.18.0.5", "ws-a.dev"))
HOSTILE = TargetStatus("bbbbbbbbbbbb", "evil", "172.18.0.6",
                       ("evil\n    ProxyCommand sh", "evil", "*", "x y", "!ws-a", "a,b", "ssh-proxy",
                        "SSH-PROXY", "172.18.0.6"))


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssh_config.time, "time", lambda: NOW + 1)


def run(tmp_path: Path, document: StatusDocument | None, *argv: str) -> tuple[int, str, str]:
    status = tmp_path / "status.json"
    if document is not None:
        status.write_text(to_json(document))
    out, err = StringIO(), StringIO()
    console = Console(file=out, width=40, color_system=None)  # narrow: nothing may wrap
    parser = argparse.ArgumentParser()
    ssh_config.add_parser(parser.add_subparsers())
    args = parser.parse_args(["ssh-config", "--status", str(status), *argv])
    return ssh_config.run(args, console, errors=err), out.getvalue(), err.getvalue()


EXPECTED = """\
# ssh-proxy: written by `watcher ssh-config`; the host keys these entries trust:
#   docker exec <proxy> watcher known-hosts > ~/.ssh/proxy_hosts

Host ssh-proxy
    HostName proxy.example.com
    Port 2200
    User limited-user
    IdentityFile "~/.ssh/my key"
    IdentitiesOnly yes
    HostKeyAlias ssh-proxy
    UserKnownHostsFile ~/.ssh/proxy_hosts
    StrictHostKeyChecking yes

Host evil
    ProxyJump ssh-proxy
    User dev
    IdentityFile "~/.ssh/my key"
    IdentitiesOnly yes
    UserKnownHostsFile ~/.ssh/proxy_hosts
    StrictHostKeyChecking yes

Host ws-a aaaaaaaaaaaa ws-a.dev
    ProxyJump ssh-proxy
    User dev
    IdentityFile "~/.ssh/my key"
    IdentitiesOnly yes
    UserKnownHostsFile ~/.ssh/proxy_hosts
    StrictHostKeyChecking yes
"""


def test_rendering_matches_the_recording(tmp_path: Path) -> None:
    code, out, err = run(tmp_path, doc(WS_A, HOSTILE), "--proxy-host", "proxy.example.com",
                         "--proxy-port", "2200", "--identity-file", "~/.ssh/my key",
                         "--user", "dev", "--known-hosts-file", "~/.ssh/proxy_hosts")
    assert (code, err) == (EXIT_OK, "")
    assert out == EXPECTED


def test_hostile_names_never_reach_a_host_line(tmp_path: Path) -> None:
    """Only valid host names: no newline, glob, negation, comma or space, no address, and
    never the proxy's own alias (whatever its case)."""
    _, out, _ = run(tmp_path, doc(HOSTILE))
    host_lines = [line for line in out.splitlines() if line.startswith("Host ")]
    assert host_lines == ["Host ssh-proxy", "Host evil"]
    assert "ProxyCommand" not in out and "172.18.0.6" not in out


def test_defaults_are_said_and_a_single_port_is_the_targets_ssh_port(tmp_path: Path) -> None:
    _, out, _ = run(tmp_path, doc(WS_A, ports=("2222",)))
    assert "# The proxy's host and port are the defaults (localhost:8091)" in out
    assert "    HostName localhost\n    Port 8091\n" in out
    assert "Host ws-a aaaaaaaaaaaa ws-a.dev\n    ProxyJump ssh-proxy\n    User root\n    Port 2222\n" in out


def test_a_target_without_a_usable_name_is_counted_not_written(tmp_path: Path) -> None:
    nameless = TargetStatus("cccccccccccc", "x y", "172.18.0.7", ("172.18.0.7",))
    _, out, _ = run(tmp_path, doc(nameless))
    assert "# 1 target(s) left out: no name usable in a Host line." in out
    assert out.count("\nHost ") == 1


def test_no_target_yet(tmp_path: Path) -> None:
    _, out, _ = run(tmp_path, doc())
    assert "# No target is served yet (see `watcher status`)." in out


def test_not_running_is_one_line_on_stderr(tmp_path: Path) -> None:
    code, out, err = run(tmp_path, None)
    assert code == EXIT_NOT_RUNNING and out == ""
    assert len(err.splitlines()) == 1 and "status.json does not exist" in err
    code, out, err = run(tmp_path, StatusDocument(heartbeat=NOW - 600, mode="docker"))
    assert code == EXIT_NOT_RUNNING and out == "" and "not running" in err


@pytest.mark.parametrize("argv", [
    ["--proxy-host", "evil\nHost *"], ["--proxy-host", "a b"], ["--proxy-port", "0"],
    ["--proxy-port", "x"], ["--user", "-oProxyCommand=x"], ["--user", "a b"],
    ["--identity-file", 'a"b'], ["--identity-file", "a\nb"], ["--known-hosts-file", "a\\b"],
    ["--proxy-alias", "*"], ["--proxy-alias", "a b"]])
def test_bad_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ssh-config", *argv])
    assert exc.value.code == 2
    assert "argument" in capsys.readouterr().err


def test_ipv6_proxy_host_accepted(tmp_path: Path) -> None:
    _, out, _ = run(tmp_path, doc(WS_A), "--proxy-host", "fd00::1")
    assert "    HostName fd00::1\n" in out
