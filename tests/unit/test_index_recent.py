"""The index's file of recent changes: a flush writes the keys that changed to one small
file, which sshd's keys command reads before the group files; the groups take the keys in
once the file is a RECENT_SHARE-th of the index, or once the index is quiet."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from watcher import app, cache, index_layout
from watcher.app import OutputWriter, Paths
from watcher.config import RunMode
from watcher.index_recent import GONE, LEAST_BYTES, RECENT_NAME, RECENT_SHARE, RecentLines, key_bytes, overlay
from watcher.render import HostsBlock, shards_of
from watcher.sshd import SshdPaths

REPO = Path(__file__).resolve().parents[2]
KEYS_COMMAND = REPO / "sshd" / "authorized-keys-command"
LOOK = "/usr/bin/look"
needs_look = pytest.mark.skipif(not os.access(LOOK, os.X_OK), reason=f"{LOOK} (bsdextrautils) not installed")


# --- the pure part ------------------------------------------------------------------------

def test_recent_lines_hold_each_key_once_sorted_and_a_gone_line_for_a_key_without_lines() -> None:
    recent = RecentLines()
    assert not recent and recent.data() == b"" and recent.size == 0
    recent.note("SHA256:b", b"SHA256:b one\nSHA256:b two\n")
    recent.note("SHA256:a", b"")
    recent.note("SHA256:c", b"SHA256:c x\n")
    recent.note("SHA256:c", b"SHA256:c longer\n")  # the newest lines win
    assert recent.data() == b"SHA256:a #\nSHA256:b one\nSHA256:b two\nSHA256:c longer\n"
    assert recent.size == len(recent.data()) and len(recent) == 3
    assert recent.shards() == {"a", "b", "c"}
    assert recent.full(recent.size * RECENT_SHARE - 1) and not recent.full(recent.size * RECENT_SHARE)
    recent.clear()
    assert not recent and recent.data() == b"" and recent.size == 0


def test_keys_about_to_be_noted_count_at_least_a_gone_line_each() -> None:
    recent = RecentLines()
    assert LEAST_BYTES == len(b"SHA256:" + b"A" * 43 + GONE)
    assert recent.full(10 * LEAST_BYTES * RECENT_SHARE - 1, more=10)
    assert not recent.full(10 * LEAST_BYTES * RECENT_SHARE, more=10)
    recent.note("SHA256:a", b"SHA256:a line\n")
    assert recent.full(recent.size * RECENT_SHARE + LEAST_BYTES * RECENT_SHARE - 1, more=1)
    assert recent.full((recent.size + 2 * 300) * RECENT_SHARE - 1, more=2, per_key=300)
    assert not recent.full((recent.size + 2 * 300) * RECENT_SHARE, more=2, per_key=300)
    # A restart: one key's GONE line and another key's line of the index's average size.
    assert key_bytes(1000 * 247, 1000) == (LEAST_BYTES + 247) // 2 and key_bytes(0, 0) == LEAST_BYTES // 2


def test_recent_lines_name_the_shard_of_a_slash_fingerprint() -> None:
    recent = RecentLines()
    recent.note("SHA256:/x", b"SHA256:/x line\n")
    assert recent.shards() == {","}


def test_overlay_answers_a_recent_key_from_the_recent_file_alone() -> None:
    base = b"SHA256:a 1\nSHA256:b 2\nSHA256:b 3\nSHA256:c 4\nSHA256:d 5\n"
    recent = b"SHA256:b new\nSHA256:c #\nSHA256:e 6\n"
    assert overlay(base, recent) == b"SHA256:a 1\nSHA256:b new\nSHA256:d 5\nSHA256:e 6\n"
    assert overlay(base, b"") == base
    assert overlay(b"", b"SHA256:a #\n") == b""


# --- the writer ---------------------------------------------------------------------------

def _render(index: str, changed: frozenset[str] | None = None) -> Any:
    """What OutputWriter reads of a Rendered (changed None: a render from scratch)."""
    lines = [tuple(line.split(" ", 1)) for line in index.splitlines()]
    return SimpleNamespace(shards=shards_of(lines), hosts=HostsBlock(), changed=changed,
                           cache_chunks=lambda: iter([b"cache\n"]))


def _changed(old: str, new: str) -> frozenset[str]:
    """The fingerprints whose lines differ between two indexes."""
    def parts(index: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for line in index.splitlines():
            out.setdefault(line.split(" ", 1)[0], []).append(line)
        return out
    a, b = parts(old), parts(new)
    return frozenset(fp for fp in {*a, *b} if a.get(fp) != b.get(fp))


def _index(directory: Path) -> str:
    return cache.read_index(directory).decode()


def _group_files(directory: Path) -> dict[str, str]:
    """Group file -> the version it leads to."""
    return {p.name: os.readlink(p) for p in directory.iterdir() if index_layout.parse_group_name(p.name)}


def _answer(directory: Path, fingerprint: str) -> list[str]:
    """What the real keys command prints for a key."""
    out = subprocess.run(["sh", str(KEYS_COMMAND), str(directory), fingerprint],
                         capture_output=True, text=True, check=True)
    assert out.stderr == ""
    return out.stdout.splitlines()


def _expected(index: str, fingerprint: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in index.splitlines() if line.split(" ", 1)[0] == fingerprint]


BASE = "".join(f"SHA256:{c}{n:02d} line-{c}{n:02d}\n" for c in "+,0Aaz" for n in range(40))


@pytest.fixture
def writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OutputWriter:
    monkeypatch.setattr(index_layout, "GROUP_BYTES", 0)  # a group per shard: what is rewritten shows
    paths = Paths(cache=tmp_path / "authorized_keys_cache", hosts=tmp_path / "hosts",
                  sshd=SshdPaths(index_dir=tmp_path / "authorized_keys.index.d"))
    return OutputWriter(paths, RunMode.DOCKER, pin_names=False)


def _edit(index: str) -> str:
    """a03's line changed, z05 gone, zz added (sorts last)."""
    return (index.replace("line-a03\n", "line-a03 changed\n").replace("SHA256:z05 line-z05\n", "")
            + "SHA256:zz line-zz\n")


@needs_look
def test_a_flush_writes_only_the_changed_keys_and_the_keys_command_answers_them(writer) -> None:
    directory = writer.paths.sshd.index_dir
    assert writer(_render(BASE))
    groups = _group_files(directory)
    new = _edit(BASE)
    assert writer(_render(new, _changed(BASE, new)))
    assert _group_files(directory) == groups  # no group file written again
    assert (directory / RECENT_NAME).read_text() == (
        "SHA256:a03 line-a03 changed\nSHA256:z05 #\nSHA256:zz line-zz\n")
    assert _index(directory) == new
    for fp in ("SHA256:a03", "SHA256:zz", "SHA256:a04", "SHA256:z06", "SHA256:b00"):
        assert _answer(directory, fp) == _expected(new, fp), fp
    assert _answer(directory, "SHA256:z05") == ["#"]  # a comment: sshd takes no key from it


def test_a_flush_that_changes_nothing_writes_nothing(writer) -> None:
    directory = writer.paths.sshd.index_dir
    writer(_render(BASE))
    new = _edit(BASE)
    writer(_render(new, _changed(BASE, new)))
    version = os.readlink(directory / RECENT_NAME)
    assert not writer(_render(new, frozenset()))
    assert os.readlink(directory / RECENT_NAME) == version


@needs_look
def test_the_groups_take_the_keys_in_once_the_recent_file_is_full(writer) -> None:
    directory = writer.paths.sshd.index_dir
    writer(_render(BASE))
    groups = _group_files(directory)
    index, n = BASE, 0
    while (directory / RECENT_NAME).exists() or n == 0:
        new = index.replace(f"line-z{n:02d}\n", f"line-z{n:02d} v2\n")
        assert writer(_render(new, _changed(index, new)))
        assert _index(directory) == new
        index, n = new, n + 1
    # Folded when the file passed a RECENT_SHARE-th of the index: only the z group was
    # written again, and the file is gone.
    assert n > 5  # several flushes wrote only the file first
    moved = {g for g, v in _group_files(directory).items() if groups[g] != v}
    assert moved == {index_layout.group_name(64, index_layout.SHARD_NAMES.index("z"))}
    assert _answer(directory, "SHA256:z00") == ["line-z00 v2"]


@needs_look
def test_a_quiet_index_folds_the_recent_file_into_the_groups(writer, monkeypatch) -> None:
    directory = writer.paths.sshd.index_dir
    writer(_render(BASE))
    new = _edit(BASE)
    writer(_render(new, _changed(BASE, new)))
    monkeypatch.setattr(app, "RECENT_QUIET", 3600.0)
    writer.retry()  # not quiet long enough
    assert (directory / RECENT_NAME).exists()
    monkeypatch.setattr(app, "RECENT_QUIET", 0.0)
    writer.retry()
    assert not (directory / RECENT_NAME).exists()
    assert _index(directory) == new
    assert "".join(cache.read_bytes(p).decode() for p in cache.index_files(directory)) == new
    for fp in ("SHA256:a03", "SHA256:z05", "SHA256:zz"):
        assert _answer(directory, fp) == _expected(new, fp)
    later = new.replace("line-A01\n", "line-A01 again\n")  # the next change: a new file
    writer(_render(later, _changed(new, later)))
    assert (directory / RECENT_NAME).read_text() == "SHA256:A01 line-A01 again\n"
    assert _index(directory) == later


def test_a_render_from_scratch_writes_the_groups_and_removes_the_recent_file(writer) -> None:
    directory = writer.paths.sshd.index_dir
    writer(_render(BASE))
    new = _edit(BASE)
    writer(_render(new, _changed(BASE, new)))
    assert (directory / RECENT_NAME).exists()
    newer = new.replace("line-,07\n", "line-,07 b\n")
    assert writer(_render(newer))  # a resync: every group compared, what differs written
    assert not (directory / RECENT_NAME).exists()
    assert "".join(cache.read_bytes(p).decode() for p in cache.index_files(directory)) == newer


def test_a_restart_keeps_the_recent_file_until_the_groups_are_written(writer, tmp_path) -> None:
    directory = writer.paths.sshd.index_dir
    writer(_render(BASE))
    new = _edit(BASE)
    writer(_render(new, _changed(BASE, new)))
    again = OutputWriter(writer.paths, RunMode.DOCKER, pin_names=False)
    again._shard_files.prepare()
    assert _index(directory) == new  # what sshd answers until the first write
    assert again(_render(new))
    assert not (directory / RECENT_NAME).exists() and _index(directory) == new


@needs_look
def test_a_full_disk_withdraws_from_the_recent_file_too(writer, monkeypatch) -> None:
    """A revocation must not wait for space: lines the newest render lacks go from the
    recent file (in place) and from the groups; a key whose recent lines went is answered
    from its group, shrunk the same way."""
    directory = writer.paths.sshd.index_dir
    writer(_render(BASE))
    new = _edit(BASE)
    writer(_render(new, _changed(BASE, new)))
    real_open = cache.os.open

    def full(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, mode, dir_fd=dir_fd)
    monkeypatch.setattr(cache.os, "open", full)
    # zz and a04 revoked, a03 back to its first line, A07 added (waits for space).
    newest = (new.replace("SHA256:zz line-zz\n", "").replace("SHA256:a04 line-a04\n", "")
              .replace("line-a03 changed\n", "line-a03\n").replace("line-A07\n", "line-A07 more\n"))
    assert not writer(_render(newest, _changed(new, newest)))
    assert "No space left" in writer.error
    assert _answer(directory, "SHA256:zz") == []
    assert _answer(directory, "SHA256:a04") == []
    assert _answer(directory, "SHA256:a03") == ["line-a03"]  # the group's line, still granted
    assert _answer(directory, "SHA256:A07") == []  # withdrawn, the new line waits for space
    assert _answer(directory, "SHA256:z05") == []
    monkeypatch.setattr(cache.os, "open", real_open)
    writer.retry()
    assert writer.error == "" and _index(directory) == newest
    assert not (directory / RECENT_NAME).exists()  # written whole after the failure


KEYS = [f"SHA256:{c}{n}" for c in "+/0Aaz" for n in range(6)]


@settings(max_examples=120, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.lists(st.tuples(st.sampled_from(KEYS), st.integers(0, 3)), max_size=8),
                          st.sampled_from(["flush", "scratch", "quiet"])), min_size=1, max_size=12),
       st.sampled_from([0, 1 << 30]))
def test_what_the_files_answer_is_the_newest_render_whatever_the_sequence(tmp_path_factory, steps,
                                                                           group_bytes) -> None:
    """Incremental writes, renders from scratch and quiet spells in any order: the index as
    the keys command answers it (read_index) is the newest render's."""
    directory = tmp_path_factory.mktemp("index")
    saved = index_layout.GROUP_BYTES
    index_layout.GROUP_BYTES = group_bytes
    quiet = app.RECENT_QUIET
    app.RECENT_QUIET = 0.0
    try:
        paths = Paths(cache=directory / "cache", hosts=directory / "hosts",
                      sshd=SshdPaths(index_dir=directory / "index.d"))
        writer = OutputWriter(paths, RunMode.DOCKER, pin_names=False)
        lines: dict[str, int] = {k: 1 for k in KEYS[::2]}  # key -> how many lines (0: none)
        index = _index_of(lines)
        writer(_render(index))
        rng = random.Random(len(steps))
        for edits, how in steps:
            for key, count in edits:
                lines[key] = count
            new = _index_of(lines, rng.randrange(3))
            if how == "scratch":
                writer(_render(new))
            else:
                writer(_render(new, _changed(index, new)))
                if how == "quiet":
                    writer.retry()
            index = new
            assert _index(paths.sshd.index_dir) == index
    finally:
        index_layout.GROUP_BYTES = saved
        app.RECENT_QUIET = quiet


def _index_of(lines: dict[str, int], version: int = 0) -> str:
    return "".join(f"{k} line-{k[7:]}-{i}-v{version}\n" for k in sorted(lines) for i in range(lines[k]))


def test_gone_is_a_comment_for_sshd() -> None:
    assert GONE.lstrip().startswith(b"#") and GONE.endswith(b"\n")
