"""watcher.sources.manual: a changed key file is parsed as a diff against its last version.

Random edit sequences check that the incremental parse (`reparse`) always equals the
from-scratch `parse_key_file` of the same bytes (lines, origins, errors, in order); further
tests check what the diff buys: unchanged lines keep their ManualLine objects and only the
edited lines are validated.
"""

from __future__ import annotations

import base64
import os
import random
from pathlib import Path

import pytest

from watcher.sources import manual as manual_mod
from watcher.sources.manual import (LineOffsets, ManualKeySource, ParsedFile, common_prefix,
                                    common_suffix, parse_key_file, reparse)

ORIGIN = "/keys/team.pub"


def key_line(rng: random.Random, comment: str = "") -> bytes:
    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + rng.randbytes(32)
    return b"ssh-ed25519 " + base64.b64encode(blob) + (b" " + comment.encode() if comment else b"")


def line_pool(rng: random.Random) -> list[bytes]:
    """Lines of every kind the parser tells apart, few enough that duplicates are common."""
    keys = [key_line(rng, f"user{i}") for i in range(6)]
    return keys + [
        b'permitopen="db-1:22",no-pty ' + keys[0],
        b"  \t" + keys[1] + b"\r",           # blanks around, CRLF
        b"command=\"/bin/sh\" " + keys[2],   # forbidden option
        b"garbage",
        b"ssh-ed25519 not-base64!!",
        b"\xff\xfe" + keys[3],                # not UTF-8
        b"\xef\xbb\xbf" + keys[4],            # a BOM
        b"# a comment", b"\t# indented comment", b"", b"   ", b"\r",
    ]


def lines_of(data: bytes) -> list[bytes]:
    return data.split(b"\n")


def edit(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One random edit, by lines (insert, delete, replace, append) or by bytes."""
    lines = lines_of(data)
    kind = rng.choice(["insert", "delete", "replace", "append", "bytes", "swap", "block"])
    at = rng.randrange(len(lines) + 1)
    if kind == "insert":
        lines.insert(at, rng.choice(pool))
    elif kind == "delete" and len(lines) > 1:
        del lines[min(at, len(lines) - 1)]
    elif kind == "replace":
        lines[min(at, len(lines) - 1)] = rng.choice(pool)
    elif kind == "append":
        return data + b"".join(rng.choice(pool) + b"\n" for _ in range(rng.randint(1, 3)))
    elif kind == "swap":
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "block":  # several lines at once, e.g. a pasted or deleted paragraph
        end = min(len(lines), at + rng.randint(0, 4))
        lines[at:end] = [rng.choice(pool) for _ in range(rng.randint(0, 4))]
    else:  # a byte inserted or removed anywhere, newlines included
        position = rng.randrange(len(data) + 1)
        if rng.random() < 0.5 or not data:
            return data[:position] + rng.choice([b"\n", b"x", b"\r", b"#", b" "]) + data[position:]
        return data[:position] + data[position + 1:]
    return b"\n".join(lines)


def texts(lines: list) -> list[tuple]:
    """What lines say and where (lines compare by identity)."""
    return [(line.origin, line.options, line.key) for line in lines]


def assert_same_as_scratch(parsed: ParsedFile, data: bytes) -> None:
    lines, errors = parse_key_file(data, ORIGIN)
    assert texts(parsed.lines) == texts(lines)
    assert len({id(line) for line in parsed.lines}) == len(parsed.lines)  # each line once
    assert parsed.errors == errors
    assert parsed.line_at == [int(l.origin.rsplit(":", 1)[1]) - 1 for l in lines]
    assert parsed.error_at == [int(e.split(":")[1]) - 1 for e in errors]
    raw = lines_of(data)
    assert parsed.offsets.lengths == [len(r) + 1 for r in raw]


@pytest.mark.parametrize("seed", range(12))
def test_random_edit_sequences_match_a_parse_from_scratch(seed: int) -> None:
    rng = random.Random(seed)
    pool = line_pool(rng)
    data = b"".join(rng.choice(pool) + b"\n" for _ in range(rng.randint(0, 30)))
    parsed = reparse(None, data, ORIGIN)
    assert_same_as_scratch(parsed, data)
    for _ in range(150):
        data = edit(rng, data, pool)
        parsed = reparse(parsed, data, ORIGIN)
        assert_same_as_scratch(parsed, data)


def test_whole_rewrites_and_empty_file() -> None:
    rng = random.Random(7)
    pool = line_pool(rng)
    versions = [b"", b"\n", pool[0], pool[0] + b"\n" + pool[9], b"", b"\n\n\n",
                b"\n".join(pool), b"\n".join(reversed(pool)), b"x"]
    parsed = None
    for data in versions:
        parsed = reparse(parsed, data, ORIGIN)
        assert_same_as_scratch(parsed, data)


def test_another_origin_is_parsed_from_scratch() -> None:
    rng = random.Random(3)
    data = key_line(rng, "a") + b"\n"
    parsed = reparse(reparse(None, data, "/keys/a.pub"), data, "/keys/b.pub")
    assert [l.origin for l in parsed.lines] == ["/keys/b.pub:1"]


def big_file(rng: random.Random, count: int) -> list[bytes]:
    return [key_line(rng, f"user{i}") for i in range(count)]


def test_append_keeps_every_earlier_line_object() -> None:
    rng = random.Random(1)
    lines = big_file(rng, 200)
    before = reparse(None, b"\n".join(lines) + b"\n", ORIGIN)
    kept = list(before.lines)
    after = reparse(before, b"\n".join(lines + [key_line(rng, "new")]) + b"\n", ORIGIN)
    assert len(after.lines) == 201
    assert all(a is b for a, b in zip(after.lines, kept))
    assert after.lines[-1].origin == f"{ORIGIN}:201"


def test_same_count_replace_keeps_every_other_line_object() -> None:
    rng = random.Random(2)
    lines = big_file(rng, 200)
    before = reparse(None, b"\n".join(lines) + b"\n", ORIGIN)
    kept = list(before.lines)
    lines[100] = b'permitopen="db:22" ' + key_line(rng, "longer replacement line")
    after = reparse(before, b"\n".join(lines) + b"\n", ORIGIN)
    assert [i for i, (a, b) in enumerate(zip(after.lines, kept)) if a is not b] == [100]
    assert after.lines[100].origin == f"{ORIGIN}:101"
    assert after.lines[100].options == ('permitopen="db:22"',)


def test_unchanged_content_keeps_every_line_object() -> None:
    rng = random.Random(4)
    data = b"\n".join(big_file(rng, 50)) + b"\n" + key_line(rng, "last, no newline")
    before = reparse(None, data, ORIGIN)
    kept = list(before.lines)
    after = reparse(before, data, ORIGIN)  # e.g. a touch: new stamp, same bytes
    assert len(after.lines) == 51 and all(a is b for a, b in zip(after.lines, kept))


def test_insert_at_top_renumbers_every_line_without_validating_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    lines = big_file(rng, 100) + [b"garbage"]
    before = reparse(None, b"\n".join(lines), ORIGIN)
    validated: list[str] = []
    real = manual_mod.parse_authorized_keys_line
    monkeypatch.setattr(manual_mod, "parse_authorized_keys_line",
                        lambda text: validated.append(text) or real(text))
    after = reparse(before, b"# header\n" + b"\n".join(lines), ORIGIN)
    assert validated == []
    assert [l.origin for l in after.lines] == [f"{ORIGIN}:{i}" for i in range(2, 102)]
    assert after.errors == [f"{ORIGIN}:102: " + before.errors[0].split(": ", 1)[1]]


def test_insert_at_top_keeps_every_line_object_and_moves_its_number() -> None:
    """A line that only moved is the same object with its new number: the reconciler,
    which finds an edit by identity, sees one new line (not 100 changed ones)."""
    rng = random.Random(7)
    lines = big_file(rng, 100)
    before = reparse(None, b"\n".join(lines) + b"\n", ORIGIN)
    kept = list(before.lines)
    after = reparse(before, b"\n".join([key_line(rng, "new")] + lines) + b"\n", ORIGIN)
    assert all(a is b for a, b in zip(after.lines[1:], kept))
    assert [l.origin for l in after.lines] == [f"{ORIGIN}:{i}" for i in range(1, 102)]
    assert after.lines[0].key.comment == "new"
    # Deleting it moves them back, still the same objects.
    again = reparse(after, b"\n".join(lines) + b"\n", ORIGIN)
    assert all(a is b for a, b in zip(again.lines, kept))
    assert [l.origin for l in again.lines] == [f"{ORIGIN}:{i}" for i in range(1, 101)]


def test_moved_lines_are_renumbered_without_passing_each_other() -> None:
    """The reconciler's thread may read the numbers while the source moves them: lines that
    move down are renumbered from the farthest, lines that move up from the nearest, so no
    two of them are ever out of order."""
    from watcher.model import LineNumber

    written: list[int] = []

    class Watched(LineNumber):
        __slots__ = ()

        def __setattr__(self, name: str, value: int) -> None:
            written.append(value)
            super().__setattr__(name, value)

    rng = random.Random(8)
    lines = big_file(rng, 5)
    parsed = reparse(None, b"\n".join(lines) + b"\n", ORIGIN)
    for line in parsed.lines:
        object.__setattr__(line, "number", Watched(line.number.value))
    written.clear()
    reparse(parsed, b"# one\n# two\n" + b"\n".join(lines) + b"\n", ORIGIN)
    assert written == [7, 6, 5, 4, 3]
    written.clear()
    reparse(parsed, b"\n".join(lines) + b"\n", ORIGIN)
    assert written == [1, 2, 3, 4, 5]


def test_only_edited_lines_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(6)
    lines = big_file(rng, 1000)
    parsed = reparse(None, b"\n".join(lines) + b"\n", ORIGIN)
    validated: list[str] = []
    real = manual_mod.parse_authorized_keys_line
    monkeypatch.setattr(manual_mod, "parse_authorized_keys_line",
                        lambda text: validated.append(text) or real(text))
    lines[500] = key_line(rng, "replaced")
    parsed = reparse(parsed, b"\n".join(lines) + b"\n", ORIGIN)
    lines.append(key_line(rng, "appended"))
    parsed = reparse(parsed, b"\n".join(lines) + b"\n", ORIGIN)
    assert [t.rsplit(" ", 1)[1] for t in validated] == ["replaced", "appended"]


def test_scan_keeps_line_objects_and_recovers_after_a_failed_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(8)
    path = tmp_path / "team.pub"
    lines = big_file(rng, 20)
    path.write_bytes(b"\n".join(lines) + b"\n")
    source = ManualKeySource(sink=None, keys_dir=tmp_path)
    first = source.scan()
    served = list(first)
    lines.append(key_line(rng, "second"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    second = source.scan()
    assert all(a is b for a, b in zip(second, first)) and len(second) == 21
    assert texts(first) == texts(served)  # what the sink was handed is its own: the next scan leaves it

    real = manual_mod._read_capped
    monkeypatch.setattr(manual_mod, "_read_capped", lambda p: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))
    lines.insert(0, key_line(rng, "third"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert source.scan() == second  # the same lines, while it cannot be read
    monkeypatch.setattr(manual_mod, "_read_capped", real)
    third = source.scan()
    assert texts(third) == texts(parse_key_file(path.read_bytes(), str(path))[0])
    assert source.errors() == []


def test_common_prefix_and_suffix_match_a_plain_loop() -> None:
    rng = random.Random(9)
    for _ in range(500):
        old = rng.randbytes(rng.randint(0, 40)).replace(b"\x00", b"a")
        new = bytearray(old)
        for _ in range(rng.randint(0, 3)):
            at = rng.randint(0, len(new))
            new[at:at + rng.randint(0, 2)] = rng.randbytes(rng.randint(0, 2))
        new = bytes(new)
        prefix = 0
        while prefix < min(len(old), len(new)) and old[prefix] == new[prefix]:
            prefix += 1
        assert common_prefix(old, new) == prefix
        limit = min(len(old), len(new)) - prefix
        suffix = 0
        while suffix < limit and old[-1 - suffix] == new[-1 - suffix]:
            suffix += 1
        assert common_suffix(old, new, limit) == suffix


def test_line_offsets_follow_replacements(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LineOffsets, "BLOCK", 4)  # many blocks in a small file
    rng = random.Random(10)
    lengths = [rng.randint(1, 9) for _ in range(30)]
    offsets = LineOffsets(list(lengths))
    for _ in range(300):
        first = rng.randrange(len(lengths))
        end = rng.randint(first + 1, min(len(lengths), first + 5))
        count = end - first if rng.random() < 0.5 else rng.randint(1, 6)
        new = [rng.randint(1, 9) for _ in range(count)]
        lengths[first:end] = new
        offsets.replace(first, end, new)
        starts = [sum(lengths[:k]) for k in range(len(lengths) + 1)]
        assert [offsets.start(k) for k in range(len(lengths) + 1)] == starts
        for offset in range(starts[-1]):
            assert offsets.line_at(offset) == max(k for k in range(len(lengths))
                                                  if starts[k] <= offset)


def test_read_is_capped_and_follows_a_file_that_grows(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manual_mod, "MAX_FILE_BYTES", 100)
    path = tmp_path / "k.pub"
    path.write_bytes(b"x" * 100)
    assert manual_mod._read_capped(path) == b"x" * 100
    path.write_bytes(b"x" * 101)
    with pytest.raises(OSError, match="larger than 100 bytes"):
        manual_mod._read_capped(path)
    # The size seen before reading is stale (the file grew since): it is read on.
    path.write_bytes(b"y" * 60)
    real_fstat = manual_mod.os.fstat
    monkeypatch.setattr(manual_mod.os, "fstat", lambda fd: os.stat_result(
        tuple(real_fstat(fd))[:6] + (10,) + tuple(real_fstat(fd))[7:]))
    assert manual_mod._read_capped(path) == b"y" * 60
