"""Full disks and access-log rotation (issue 13 item 3): the previous index and cache stay
whole and served, the error is logged once and shown, writing resumes by itself; access.log
rotates by size and survives ENOSPC without a flood."""

from __future__ import annotations

import errno
import io
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from watcher import cache
from watcher.app import OutputWriter, Paths, RotatingFile
from watcher.config import RunMode
from watcher.render import SHARD_NAMES, HostsBlock, shards_of
from watcher.sshd import SshdPaths


class DiskFull:
    """Makes writing a new file in watcher.cache fail with ENOSPC while `full` (the data of
    a new file needs blocks; overwriting an existing file with fewer bytes does not)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        real_fsync, real_fdopen = cache.os.fsync, cache.os.fdopen

        def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
            handle = real_fdopen(fd, *args, **kwargs)
            if self.full:
                def write(data: Any) -> int:
                    raise OSError(errno.ENOSPC, "No space left on device")
                handle.write = write  # type: ignore[method-assign]
                handle.writelines = write  # type: ignore[method-assign]  (the cache, in chunks)
            return handle

        def fsync(fd: int) -> None:
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)
        monkeypatch.setattr(cache.os, "fdopen", fdopen)
        monkeypatch.setattr(cache.os, "fsync", fsync)
        # Files made with os.open (O_CREAT | O_EXCL: the index shards' versions, mkstemp) and
        # written with os.write or os.writev.
        real_open, real_write, real_close = cache.os.open, cache.os.write, cache.os.close
        real_writev = cache.os.writev
        new_files: set[int] = set()

        def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            fd = real_open(path, flags, mode, dir_fd=dir_fd)
            if flags & os.O_CREAT and flags & os.O_EXCL:
                new_files.add(fd)
            else:
                new_files.discard(fd)
            return fd

        def write_(fd: int, data: Any) -> int:
            if self.full and fd in new_files:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        def writev_(fd: int, buffers: Any) -> int:  # the index shards, in blocks
            if self.full and fd in new_files:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_writev(fd, buffers)

        def close_(fd: int) -> None:
            new_files.discard(fd)
            real_close(fd)
        monkeypatch.setattr(cache.os, "open", open_)
        monkeypatch.setattr(cache.os, "write", write_)
        monkeypatch.setattr(cache.os, "writev", writev_)
        monkeypatch.setattr(cache.os, "close", close_)


def _render(index: str, cache_text: str) -> Any:
    """What OutputWriter reads of a Rendered."""
    lines = [tuple(line.split(" ", 1)) for line in index.splitlines()]
    return SimpleNamespace(shards=shards_of(lines), cache=cache_text, hosts=HostsBlock(),
                           cache_chunks=lambda: iter([cache_text.encode()]))


def _shards(directory: Path) -> list[str]:
    """What `ls` shows: the shards (their versions live in the hidden .data)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def _leftovers(directory: Path) -> set[str]:
    """Hidden entries other than .data, and versions in .data that no shard links to."""
    linked = {os.readlink(directory / name).rpartition("/")[2] for name in _shards(directory)}
    return ({p.name for p in directory.iterdir() if p.name.startswith(".") and p.name != cache.SHARD_DATA}
            | {p.name for p in (directory / cache.SHARD_DATA).iterdir() if p.name not in linked})


def _index(directory: Path) -> str:
    """The index as sshd sees it: every shard, in order."""
    return "".join((directory / name).read_text() for name in SHARD_NAMES if (directory / name).exists())


@pytest.fixture
def writer(tmp_path: Path) -> OutputWriter:
    paths = Paths(cache=tmp_path / "authorized_keys_cache", hosts=tmp_path / "hosts",
                  sshd=SshdPaths(index_dir=tmp_path / "authorized_keys.index.d"))
    return OutputWriter(paths, RunMode.DOCKER, pin_names=False)


def test_disk_full_keeps_the_previous_files_logs_once_and_resumes(writer, monkeypatch, caplog) -> None:
    disk = DiskFull(monkeypatch)
    index, cache_path = writer.paths.sshd.index_dir, writer.paths.cache
    assert writer(_render("SHA256:a line-a\nSHA256:b line-b\n", "old cache\n"))
    disk.full = True
    caplog.set_level(logging.INFO, logger="watcher.app")
    # b is revoked and c added: c waits for space, b goes at once (fail closed).
    assert not writer(_render("SHA256:a line-a\nSHA256:c line-c\n", "new cache\n"))
    assert not writer(_render("SHA256:a line-a\nSHA256:c line-c\nSHA256:d line-d\n", "newer cache\n"))
    writer.retry()
    writer.retry()
    assert _index(index) == "SHA256:a line-a\n" and cache_path.read_text() == "old cache\n"
    assert _leftovers(index) == set()  # no temp file or link left, no version unlinked
    assert "No space left" in writer.error
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "sshd keeps serving the previous" in errors[0].getMessage()

    disk.full = False
    writer.retry()  # the newest render, not the first that failed
    assert _index(index) == "SHA256:a line-a\nSHA256:c line-c\nSHA256:d line-d\n"
    assert (index / "c").read_text() == "SHA256:c line-c\n"
    assert cache_path.read_text() == "newer cache\n"
    assert writer.error == ""
    assert any("written again" in r.getMessage() for r in caplog.records)
    # Nothing pending any more: a later retry writes nothing.
    (index / "a").write_text("changed by hand\n")
    writer.retry()
    assert (index / "a").read_text() == "changed by hand\n"


def test_writer_removes_files_that_are_no_shard_and_writes_shards_with_keys(writer) -> None:
    directory = writer.paths.sshd.index_dir
    directory.mkdir()
    (directory / "authorized_keys.index").write_text("SHA256:z stale\n")
    (directory / ".a.tmp123").write_text("half")
    assert writer(_render("SHA256:a line-a\n", "cache\n"))
    assert _shards(directory) == ["a"]  # no file for an empty shard
    assert _index(directory) == "SHA256:a line-a\n"
    assert writer(_render("SHA256:b line-b\n", "cache\n"))  # a shard left without keys goes
    assert _shards(directory) == ["b"]
    assert _leftovers(directory) == set()  # the versions of "a" went with it
    assert oct(directory.stat().st_mode & 0o777) == oct(0o755)


def test_writer_rewrites_only_the_shards_that_changed(writer) -> None:
    directory = writer.paths.sshd.index_dir
    assert writer(_render("SHA256:a line-a\nSHA256:b line-b\n", "c1\n"))
    stamps = {p.name: p.stat().st_ino for p in directory.iterdir()}
    assert writer(_render("SHA256:a line-a\nSHA256:b line-B\n", "c2\n"))
    moved = {p.name for p in directory.iterdir() if p.stat().st_ino != stamps.get(p.name)}
    assert moved == {"b"}
    assert not writer(_render("SHA256:a line-a\nSHA256:b line-B\n", "c2\n"))


def test_shrink_in_place_keeps_only_lines_both_renders_have(tmp_path: Path) -> None:
    path = tmp_path / "index"
    path.write_bytes(b"SHA256:a 1\nSHA256:b 2\nSHA256:c 3\n")
    inode = path.stat().st_ino
    assert cache.shrink_in_place(path, b"SHA256:a 1\nSHA256:c 3 changed\nSHA256:d 4\n")
    assert path.read_bytes() == b"SHA256:a 1\n" and path.stat().st_ino == inode  # in place
    assert not cache.shrink_in_place(path, b"SHA256:a 1\n")  # nothing to withdraw
    assert not cache.shrink_in_place(tmp_path / "absent", b"")


class _FullHandle(io.RawIOBase):
    """A file handle on a full disk: every write fails with ENOSPC."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def fileno(self) -> int:
        return self.real.fileno()

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self.real.close()


def test_access_log_rotates_by_size_and_keeps_n_backups(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = RotatingFile(path, max_bytes=100, backups=2)
    for n in range(12):
        log.write(f"event=line{n:02d} " + "x" * 20)  # 33 bytes a line: 3 fit in 100
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["access.log", "access.log.1", "access.log.2"]
    assert all(p.stat().st_size <= 100 for p in tmp_path.iterdir())
    newest = path.read_text().splitlines()
    assert newest[-1].startswith("event=line11")
    all_lines = [line for name in ("access.log.2", "access.log.1", "access.log")
                 for line in (tmp_path / name).read_text().splitlines()]
    assert all_lines == [f"event=line{n:02d} " + "x" * 20 for n in range(12 - len(all_lines), 12)]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_access_log_without_backups_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = RotatingFile(path, max_bytes=50, backups=0)
    for n in range(5):
        log.write(f"line {n} " + "y" * 30)
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["access.log"]
    assert path.read_text() == "line 4 " + "y" * 30 + "\n"


def test_access_log_disk_full_logs_once_and_resumes(tmp_path: Path, caplog) -> None:
    path = tmp_path / "access.log"
    log = RotatingFile(path, max_bytes=10_000, backups=1)
    log.write("before")
    real = log._handle
    log._handle = _FullHandle(real)
    caplog.set_level(logging.INFO, logger="watcher.app")
    for n in range(20):
        log.write(f"lost {n}")
    assert "No space left" in log.error
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    log._handle = real  # space is back
    log.write("after")
    log.close()
    assert path.read_text() == "before\nafter\n"
    assert log.error == ""
    assert any("again" in r.getMessage() for r in caplog.records)
