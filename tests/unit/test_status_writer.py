"""watcher.status.StatusWriter: the heartbeat's status.json, with the target rows that did
not change copied from the file it wrote last."""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_snapshot import full_document
from watcher import snapshot
from watcher.snapshot import StatusDocument, TargetStatus, WatcherState, from_json, to_json
from watcher.status import StatusWriter, write_status


class Beat:
    """A StatusWriter writing to one path; each call returns the file's text."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "status.json"
        self.writer = StatusWriter()

    def __call__(self, doc: StatusDocument) -> str:
        write_status(self.path, doc, writer=self.writer)
        return self.path.read_text()


def with_targets(doc: StatusDocument, *targets: TargetStatus) -> StatusDocument:
    return replace(doc, state=replace(doc.state, targets=targets))


def test_rows_are_made_once_and_the_text_is_to_json_s(tmp_path: Path, monkeypatch) -> None:
    """A row is encoded again only when it is a new object (the reconciler keeps an
    unchanged target's row); the rest of the document is new at every beat."""
    made: list[str] = []
    real = snapshot._target_json
    monkeypatch.setattr(snapshot, "_target_json", lambda t: made.append(t.name) or real(t))
    beat, doc = Beat(tmp_path), full_document()
    web, db = doc.state.targets
    assert beat(doc) == to_json(doc)
    assert made == ["web", "db", "web", "db"]  # the writer's, then to_json's
    later = replace(doc, heartbeat=doc.heartbeat + 2, sshd_restarts=3)
    made.clear()
    assert beat(later) == to_json(later)
    assert made == ["web", "db"]  # to_json's only
    changed = replace(web, error="changed")
    made.clear()
    assert beat(with_targets(doc, changed, db)) == to_json(with_targets(doc, changed, db))
    assert made == ["web", "web", "db"]  # the writer: the changed row only
    made.clear()
    assert beat(with_targets(doc, db, changed)) == to_json(with_targets(doc, db, changed))
    assert made == ["db", "web"]  # moved rows are copied
    assert beat(with_targets(doc)) == to_json(with_targets(doc))
    assert beat(with_targets(doc, db)) == to_json(with_targets(doc, db))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 11), st.booleans()), max_size=12), max_size=8))
def test_the_text_is_to_json_s_over_any_sequence_of_snapshots(snapshots) -> None:
    """Rows kept, dropped, moved, repeated or new, in any order and count from one snapshot
    to the next (runs of old rows are copied by offset): the file is to_json's text."""
    pool = [TargetStatus(f"{i:012x}", f"t{i}" * (i % 4 + 1), f"10.0.0.{i}", (f"a{i}",) * (i % 3))
            for i in range(12)]
    doc = full_document()
    for in_place in (snapshot._IN_PLACE_SHARE, 0):  # 0: rows compared in place at every equal count
        with tempfile.TemporaryDirectory() as directory, \
                mock.patch.object(snapshot, "_IN_PLACE_SHARE", in_place):
            beat = Beat(Path(directory))
            for n, rows in enumerate(snapshots):
                targets = tuple(replace(pool[i], since=float(i)) if fresh else pool[i] for i, fresh in rows)
                later = replace(doc, heartbeat=doc.heartbeat + n, state=replace(doc.state, targets=targets))
                assert beat(later) == to_json(later)
                assert beat(later) == to_json(later)  # the same snapshot again
            beat.writer.close()


def test_a_value_that_spells_the_slot_is_left_alone(tmp_path: Path) -> None:
    """Strings are escaped in JSON, so a value that spells the targets' slot is only a value."""
    doc = full_document()
    hostile = replace(doc, state=replace(doc.state, source=replace(
        doc.state.source, error=f'"targets": "{snapshot._TARGETS_SLOT}"')))
    text = Beat(tmp_path)(hostile)
    assert text == to_json(hostile)
    assert from_json(text) == hostile


def test_copies_come_from_the_last_file_even_once_it_is_gone(tmp_path: Path) -> None:
    """The writer holds its last file open: removed or replaced under it (the next write
    renames over it), its rows are still there to copy; only one file is held."""
    beat, doc = Beat(tmp_path), full_document()
    beat(doc)
    fds = len(os.listdir("/proc/self/fd"))
    beat.path.unlink()
    for n in range(5):
        later = replace(doc, heartbeat=doc.heartbeat + n)
        assert beat(later) == to_json(later)
    assert len(os.listdir("/proc/self/fd")) == fds
    beat.writer.close()
    assert len(os.listdir("/proc/self/fd")) == fds - 1


def test_a_last_file_cut_short_by_someone_else_means_every_row_is_made_again(tmp_path: Path) -> None:
    beat, doc = Beat(tmp_path), full_document()
    beat(doc)
    os.truncate(beat.path, 10)  # the same file the writer holds
    later = replace(doc, heartbeat=doc.heartbeat + 2)
    assert beat(later) == to_json(later)


def test_without_copy_file_range_rows_are_copied_through_the_process(tmp_path: Path, monkeypatch) -> None:
    """copy_file_range across file systems fails with EXDEV on older kernels; ENOSYS where
    the kernel lacks it."""
    beat, doc = Beat(tmp_path), full_document()
    beat(doc)

    def unsupported(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    later = replace(doc, heartbeat=doc.heartbeat + 2)
    assert beat(later) == to_json(later)


def test_a_full_disk_keeps_the_last_file_and_the_next_beat_copies_from_it(tmp_path: Path, monkeypatch) -> None:
    beat, doc = Beat(tmp_path), full_document()
    first = beat(doc)
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        beat(replace(doc, heartbeat=doc.heartbeat + 2))
    assert beat.path.read_text() == first
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary file left
    monkeypatch.setattr(os, "write", real_write)
    later = replace(doc, heartbeat=doc.heartbeat + 4)
    assert beat(later) == to_json(later)


def test_the_heartbeat_never_waits_for_the_disk(tmp_path: Path, monkeypatch) -> None:
    """status.json is remade every 2 s: fsyncing its ~45 MB (100k targets) would queue the
    index writes sshd waits for behind it."""
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    Beat(tmp_path)(full_document())
    write_status(tmp_path / "status.json", full_document())
    assert synced == [] and from_json((tmp_path / "status.json").read_text()) == full_document()


def test_no_targets_is_an_empty_array(tmp_path: Path) -> None:
    beat, doc = Beat(tmp_path), full_document()
    empty = replace(doc, state=WatcherState())
    assert beat(empty) == to_json(empty) and from_json(beat(empty)) == empty
    assert beat(doc) == to_json(doc)


def test_new_rows_are_written_in_chunks_and_the_text_is_the_same(tmp_path: Path, monkeypatch) -> None:
    """After a load the new rows (~45 MB at 100k) go out in chunks, never held all at once."""
    from watcher import status
    writes: list[int] = []
    real_write = os.write
    monkeypatch.setattr(status, "_PENDING_BYTES", 1)
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    beat, doc = Beat(tmp_path), full_document()
    web, db = doc.state.targets
    assert beat(doc) == to_json(doc)
    assert len(writes) > 3  # head, each row and separator: more than head, array and tail
    changed = replace(db, error="changed")
    assert beat(with_targets(doc, web, changed)) == to_json(with_targets(doc, web, changed))
