"""Full disks and access-log rotation (issue 13 item 3): the previous index and cache stay
whole and served, the error is logged once and shown, writing resumes by itself; access.log
rotates by size and survives ENOSPC without a flood."""

from __future__ import annotations

import errno
import io
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from watcher import cache, index_layout
from watcher.app import OutputWriter, Paths, RotatingFile
from watcher.config import RunMode
from watcher.index_layout import parse_group_name
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


def _render(index: str, cache_text: str, changed: frozenset[str] | None = None) -> Any:
    """What OutputWriter reads of a Rendered (changed None: a render from scratch)."""
    lines = [tuple(line.split(" ", 1)) for line in index.splitlines()]
    return SimpleNamespace(shards=shards_of(lines), cache=cache_text, hosts=HostsBlock(),
                           cache_chunks=lambda: iter([cache_text.encode()]), changed=changed)


def _groups(directory: Path) -> list[str]:
    """The group files (hidden: `ls` shows the shard names, each a link to its group)."""
    return sorted(p.name for p in directory.iterdir() if parse_group_name(p.name) is not None)


def _leftovers(directory: Path) -> set[str]:
    """Hidden entries other than .data and the group files, versions in .data of no group
    file (or more than its current one and the one before it), and shard names that do not
    lead to a group file."""
    groups = _groups(directory)
    versions = sorted((p.stat().st_mtime_ns, p.name) for p in (directory / cache.SHARD_DATA).iterdir())
    kept = {g: [v for _, v in versions if v.startswith(g + ".")][-2:] for g in groups}
    return ({p.name for p in directory.iterdir() if p.name.startswith(".") and p.name != cache.SHARD_DATA
             and parse_group_name(p.name) is None}
            | {v for _, v in versions if not any(v in names for names in kept.values())}
            | {name for name in SHARD_NAMES if os.readlink(directory / name) not in groups})


def _index(directory: Path) -> str:
    """The index as sshd sees it: every shard, in order."""
    return cache.read_index(directory).decode()


@pytest.fixture(params=["grouped", "a group per shard"])
def layout(request, monkeypatch) -> str:
    """The index in one group file (a small index), or in one per shard (a big one)."""
    if request.param != "grouped":
        monkeypatch.setattr(index_layout, "GROUP_BYTES", 0)
    return request.param


@pytest.fixture
def writer(tmp_path: Path) -> OutputWriter:
    paths = Paths(cache=tmp_path / "authorized_keys_cache", hosts=tmp_path / "hosts",
                  sshd=SshdPaths(index_dir=tmp_path / "authorized_keys.index.d"))
    return OutputWriter(paths, RunMode.DOCKER, pin_names=False)


def test_disk_full_keeps_the_previous_files_logs_once_and_resumes(writer, layout, monkeypatch, caplog) -> None:
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
    assert (index / "c").read_text() == ("SHA256:c line-c\n" if layout != "grouped" else _index(index))
    deadline = time.monotonic() + 5  # the cache follows, at most once a second (CACHE_EVERY)
    while cache_path.read_text() != "newer cache\n" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache_path.read_text() == "newer cache\n"
    assert writer.error == ""
    assert any("written again" in r.getMessage() for r in caplog.records)
    # Nothing pending any more: a later retry writes nothing.
    (index / "a").write_text("changed by hand\n")
    writer.retry()
    assert (index / "a").read_text() == "changed by hand\n"


def test_writer_removes_files_that_are_no_shard_and_links_every_shard_to_its_group(writer) -> None:
    directory = writer.paths.sshd.index_dir
    directory.mkdir()
    (directory / "authorized_keys.index").write_text("SHA256:z stale\n")
    (directory / ".a.tmp123").write_text("half")
    assert writer(_render("SHA256:a line-a\n", "cache\n"))
    assert _groups(directory) == [".g1.00"]  # a small index: one file
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) == sorted(SHARD_NAMES)
    assert _index(directory) == "SHA256:a line-a\n"
    assert writer(_render("SHA256:b line-b\n", "cache\n"))
    assert writer(_render("", "cache\n"))  # no keys: the group file is empty, its links lead to it
    assert _index(directory) == "" and (directory / "b").read_text() == ""
    assert _leftovers(directory) == set()  # the versions before the one before went
    assert oct(directory.stat().st_mode & 0o777) == oct(0o755)


def test_writer_rewrites_only_the_groups_that_changed(writer, monkeypatch) -> None:
    monkeypatch.setattr(index_layout, "GROUP_BYTES", 0)  # a group per shard
    directory = writer.paths.sshd.index_dir
    assert writer(_render("SHA256:a line-a\nSHA256:b line-b\n", "c1\n"))
    stamps = {p.name: p.stat().st_ino for p in directory.iterdir()}
    assert writer(_render("SHA256:a line-a\nSHA256:b line-B\n", "c2\n"))
    moved = {p.name for p in directory.iterdir() if p.stat().st_ino != stamps.get(p.name)}
    assert moved == {"b", index_layout.group_name(64, SHARD_NAMES.index("b"))}  # b leads to the new file
    assert not writer(_render("SHA256:a line-a\nSHA256:b line-B\n", "c2\n"))


def test_writer_moves_to_more_groups_as_the_index_grows_and_back(writer, monkeypatch) -> None:
    """Readers follow the old layout or the new one, each whole; the old group files go a
    write later."""
    directory = writer.paths.sshd.index_dir
    lines = "".join(f"SHA256:{c}{n} line-{c}{n}\n" for c in "+,0Aaz" for n in range(10))
    monkeypatch.setattr(index_layout, "GROUP_BYTES", len(lines) // 12)  # 16 groups of 4 shards
    assert writer(_render(lines, "c1\n"))
    assert _groups(directory) == [index_layout.group_name(16, n) for n in range(16)]
    assert _index(directory) == lines and _leftovers(directory) == set()
    monkeypatch.setattr(index_layout, "GROUP_BYTES", len(lines) * 8)  # now one group is plenty
    writer(_render(lines, "c1\n"))  # the same lines, in a new file
    assert _index(directory) == lines
    assert all(os.readlink(directory / name) == ".g1.00" for name in SHARD_NAMES)
    assert len(_groups(directory)) == 17  # the 16 stay for a reader on its way to one
    more = lines + "SHA256:zz0 line-zz0\n"  # sorts last
    assert writer(_render(more, "c2\n"))
    assert _groups(directory) == [".g1.00"] and _index(directory) == more
    assert _leftovers(directory) == set()
    # Nothing of the 16 groups is kept (their blocks were ~10 MB at a load of 100k keys).
    assert {p.name for p in writer._written if p.parent == directory} == set()


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
