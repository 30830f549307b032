"""Errors a person reads at start-up (issue 13): each failure is one line naming what failed
and what to do, raised as a WatcherError (printed once by the CLI), never a traceback."""

from __future__ import annotations

import errno
import os
import socket
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from watcher import cli
from watcher.app import Paths, Supervisor
from watcher.config import LOG_LEVELS, RunMode, Settings, load_settings
from watcher.errors import ConfigError, WatcherError, explain_os_error
from watcher.sshd import SshdPaths, ensure_host_keys
from watcher.syslog_listener import SyslogListener, any_sender

# ---------------------------------------------------------------- ssh-keygen


def _failing_keygen(tmp_path: Path, monkeypatch, stderr: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    keygen = bin_dir / "ssh-keygen"
    keygen.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit 1\n")
    keygen.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_ssh_keygen_failing_is_one_line_with_its_stderr(tmp_path: Path, monkeypatch) -> None:
    _failing_keygen(tmp_path, monkeypatch, "Saving key failed: No space left on device")
    directory = tmp_path / "host_keys"
    with pytest.raises(WatcherError) as raised:
        ensure_host_keys(directory)
    message = str(raised.value)
    assert "\n" not in message
    assert "ssh-keygen" in message and "No space left on device" in message
    assert str(directory) in message
    assert "mount" in message  # what to do: a writable directory, or keys made elsewhere


def test_host_key_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    directory = tmp_path / "host_keys"
    directory.write_text("not a directory\n")
    with pytest.raises(WatcherError) as raised:
        ensure_host_keys(directory)
    message = str(raised.value)
    assert str(directory) in message and "not a directory" in message and "\n" not in message


# ---------------------------------------------------------------- /dev/log


def test_log_socket_held_by_a_live_process_is_not_stolen(tmp_path: Path) -> None:
    path = tmp_path / "log"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # another syslog daemon
    other.bind(str(path))
    try:
        with pytest.raises(WatcherError) as raised:
            SyslogListener(path, admit=any_sender)
        message = str(raised.value)
        assert str(path) in message and "another" in message and "\n" not in message
        # Still the other daemon's: what it is sent still reaches it.
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.sendto(b"hello", str(path))
        sender.close()
        assert other.recv(16) == b"hello"
    finally:
        other.close()


def test_log_path_that_is_not_a_socket_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text("a regular file\n")
    with pytest.raises(WatcherError) as raised:
        SyslogListener(path, admit=any_sender)
    assert str(path) in str(raised.value) and "not a socket" in str(raised.value)
    assert path.read_text() == "a regular file\n"  # left alone


def test_log_path_in_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "log"
    with pytest.raises(WatcherError) as raised:
        SyslogListener(path, admit=any_sender)
    assert str(path) in str(raised.value)


# ---------------------------------------------------------------- OSError at start-up


@pytest.mark.parametrize(("code", "hint"), [
    (errno.EROFS, "tmpfs"),
    (errno.EACCES, "writable"),
    (errno.ENOTDIR, "directory"),
    (errno.ENOSPC, "free space"),
])
def test_os_errors_are_explained_in_one_line(code: int, hint: str) -> None:
    exc = OSError(code, os.strerror(code), "/etc/ssh/access.log")
    message = explain_os_error(exc)
    assert "/etc/ssh/access.log" in message and os.strerror(code) in message
    assert hint in message and "\n" not in message


def test_an_os_error_without_a_path_still_says_what_failed() -> None:
    assert "Too many open files" in explain_os_error(OSError(errno.EMFILE, "Too many open files"))


@pytest.fixture(autouse=True)
def _no_real_connections(monkeypatch) -> None:
    """The drain looks at every sshd on the machine: never at other tests' containers."""
    monkeypatch.setattr("watcher.app.open_connections", lambda proc: [])


def fake_sshd(tmp_path: Path) -> Path:
    """`sshd -t` accepts any config; `sshd -D` runs until terminated."""
    script = tmp_path / "fake-sshd"
    script.write_text('#!/bin/sh\n[ "$1" = -t ] && exit 0\nexec sleep 60\n')
    script.chmod(0o755)
    return script


def _paths(tmp_path: Path) -> Paths:
    ssh = tmp_path / "etc-ssh"
    ssh.mkdir()
    template = tmp_path / "sshd_config.template"
    template.write_text("# empty\n")
    return Paths(cache=ssh / "authorized_keys_cache", hosts=tmp_path / "hosts",
                 access_log=ssh / "access.log", status=tmp_path / "run" / "status.json",
                 syslog_socket=tmp_path / "log", keys_dir=ssh / "authorized_keys.d",
                 sshd=SshdPaths(template=template, config=ssh / "sshd_config",
                                host_key_dir=ssh / "host_keys", index_dir=ssh / "authorized_keys.index.d",
                                sshd=str(fake_sshd(tmp_path))))


MANUAL = Settings(mode=RunMode.MANUAL, permit_hosts=("db",), permit_ports=("22",))


def _run_expecting_error(paths: Paths) -> str:
    supervisor = Supervisor(MANUAL, paths)
    with pytest.raises(WatcherError) as raised:
        supervisor.run()
    supervisor.stop.set()
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_start_up_with_etc_ssh_a_file_is_one_line(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    ssh = paths.access_log.parent
    ssh.rmdir()
    ssh.write_text("a file where /etc/ssh should be\n")
    message = _run_expecting_error(paths)
    assert str(ssh) in message


def test_start_up_with_a_host_key_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    paths.sshd.host_key_dir.write_text("a file\n")
    message = _run_expecting_error(paths)
    assert str(paths.sshd.host_key_dir) in message


def test_a_failed_sshd_start_stops_what_started_before_it(tmp_path: Path) -> None:
    """The reconciler (and a platform's watcher) start before sshd, while the host keys are
    made: when sshd cannot start, they are stopped too, not left running."""
    paths = _paths(tmp_path)
    paths.sshd.host_key_dir.write_text("a file\n")
    before = {t.name for t in threading.enumerate()}
    supervisor = Supervisor(MANUAL, paths)
    with pytest.raises(WatcherError):
        supervisor.run()
    assert supervisor.stop.is_set()
    reconcile = [t for t in threading.enumerate() if t.name == "reconcile" and t.name not in before]
    for thread in reconcile:
        thread.join(timeout=5)
    assert not any(t.is_alive() for t in reconcile)


def test_start_up_with_the_status_dir_a_file_is_one_line(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    paths.status.parent.write_text("a file where the status directory should be\n")
    message = _run_expecting_error(paths)
    assert str(paths.status.parent) in message


def test_start_up_with_the_log_socket_taken_is_one_line(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    other.bind(str(paths.syslog_socket))
    try:
        message = _run_expecting_error(paths)
    finally:
        other.close()
    assert str(paths.syslog_socket) in message


def test_start_up_with_an_unreadable_manual_keys_dir_goes_on(tmp_path: Path) -> None:
    """The manual keys dir is watched and read again: a bad one is logged, not fatal."""
    paths = _paths(tmp_path)
    paths.keys_dir.write_text("a file where the keys directory should be\n")
    supervisor = Supervisor(MANUAL, paths)
    supervisor.stop.set()  # start everything, then stop at once
    assert supervisor.run() == 0
    assert paths.status.exists() and supervisor.sshd.pid is None


# ---------------------------------------------------------------- sshd_config


def test_sshd_config_is_replaced_atomically(tmp_path: Path, monkeypatch) -> None:
    """sshd may read its config while the watcher writes it (a restart): a new file renamed
    over the old one, never the old file truncated and rewritten."""
    paths = _paths(tmp_path)
    paths.sshd.host_key_dir.mkdir()
    paths.sshd.config.write_text("old\n")
    old_inode = paths.sshd.config.stat().st_ino
    monkeypatch.setattr("watcher.app.check_config", lambda p: None)
    supervisor = Supervisor(MANUAL, paths)
    monkeypatch.setattr(supervisor.sshd, "start", lambda: None)
    host_keys: Future[list[Path]] = Future()
    host_keys.set_result(ensure_host_keys(paths.sshd.host_key_dir))
    supervisor._start_sshd(host_keys)
    assert paths.sshd.config.stat().st_ino != old_inode
    assert "HostKey" not in "old" and paths.sshd.config.read_text() == "# empty\n"
    assert oct(paths.sshd.config.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in paths.sshd.config.parent.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- WATCHER_LOG_LEVEL


def test_log_level_is_validated_with_the_other_settings() -> None:
    assert load_settings({"WATCHER_LOG_LEVEL": "DEBUG"}).log_level == "debug"
    assert load_settings({}).log_level == "info"
    with pytest.raises(ConfigError) as raised:
        load_settings({"WATCHER_LOG_LEVEL": "verbose"})
    message = str(raised.value)
    assert "WATCHER_LOG_LEVEL" in message and "'verbose'" in message
    assert all(level in message for level in LOG_LEVELS)


def test_log_level_names_that_logging_would_take_are_refused() -> None:
    """getattr(logging, value.upper()) took anything logging has: 'basic_format', 'root'."""
    for value in ("basic_format", "root", "critical ", "5"):
        with pytest.raises(ConfigError):
            load_settings({"WATCHER_LOG_LEVEL": value})


def test_check_config_exits_2_on_a_bad_log_level(monkeypatch, capsys) -> None:
    monkeypatch.setenv("WATCHER_LOG_LEVEL", "loud")
    assert cli.main(["check-config"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "WATCHER_LOG_LEVEL='loud'" in err[0]


def test_run_exits_2_on_a_bad_log_level(monkeypatch, capsys) -> None:
    monkeypatch.setenv("WATCHER_LOG_LEVEL", "loud")
    monkeypatch.setenv("MANUAL_AUTH_FILE", "true")

    class NotStarted:
        def __init__(self, *args: object) -> None:
            raise AssertionError("the supervisor started despite a bad WATCHER_LOG_LEVEL")

    monkeypatch.setattr("watcher.app.Supervisor", NotStarted)
    assert cli.main(["run"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "WATCHER_LOG_LEVEL" in err[0]


def test_read_only_commands_fall_back_to_info_on_a_bad_log_level(monkeypatch, capsys,
                                                                   tmp_path: Path) -> None:
    """`watcher health/status/logs` only read: a bad level (the container would not have
    started with it) must not hide what they show; they log at info."""
    import logging
    monkeypatch.setenv("WATCHER_LOG_LEVEL", "loud")
    assert cli.main(["health", "--status", str(tmp_path / "none.json")]) == cli.EXIT_ERROR
    assert "unhealthy" in capsys.readouterr().out
    assert logging.getLogger().level == logging.INFO
    monkeypatch.setenv("WATCHER_LOG_LEVEL", "debug")
    cli.main(["health", "--status", str(tmp_path / "none.json")])
    assert logging.getLogger().level == logging.DEBUG
