"""watcher.sources.manual: admin-maintained key files, parsed strictly and hot-reloaded.

The pure part (parse_key_file, is_key_file_name) is tested on bytes; ManualKeySource is
driven for real on a temporary directory (real inotify through watchdog, real stat poll)
with a fake sink, and every change is timed: the issue asks for changes to be applied
within 1 s.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from watcher.model import ManualLine
from watcher.sources import manual as manual_mod
from watcher.sources.manual import ManualKeySource, is_key_file_name, parse_key_file

DEADLINE = 1.0  # the functional deadline for a change to be served
LOGGER = "watcher.sources.manual"
DELAYS: dict[str, float] = {}


# --------------------------------------------------------------------------- keys

def key_line(comment: str = "") -> str:
    """A fresh, valid ssh-ed25519 public key line (wire blob built by hand)."""
    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + os.urandom(32)
    return f"ssh-ed25519 {base64.b64encode(blob).decode()}" + (f" {comment}" if comment else "")


def blob_of(line: str) -> str:
    """The base64 blob of a key line (options, if any, come before the type)."""
    fields = line.split()
    return fields[fields.index("ssh-ed25519") + 1]


# --------------------------------------------------------------------------- pure: parse

def test_parse_good_lines_keep_origin_and_key() -> None:
    a, b = key_line("alice@laptop"), key_line()
    lines, errors = parse_key_file(f"{a}\n{b}\n".encode(), "/keys/team.pub")
    assert errors == []
    assert [l.origin for l in lines] == ["/keys/team.pub:1", "/keys/team.pub:2"]
    assert [l.key.blob_b64 for l in lines] == [blob_of(a), blob_of(b)]
    assert lines[0].key.comment == "alice@laptop"
    assert all(l.options == () for l in lines)
    assert all(isinstance(l, ManualLine) for l in lines)


def test_parse_skips_comments_and_blank_lines_but_counts_them() -> None:
    a = key_line("a")
    data = f"# team keys\n\n   \n\t# indented comment\n{a}\n\n".encode()
    lines, errors = parse_key_file(data, "f")
    assert errors == []
    assert [l.origin for l in lines] == ["f:5"]  # line numbers are the file's own


def test_parse_crlf_file() -> None:
    a, b = key_line("a"), key_line("b")
    lines, errors = parse_key_file(f"# crlf\r\n{a}\r\n{b}\r\n".encode(), "win.pub")
    assert errors == []
    assert [l.key.comment for l in lines] == ["a", "b"]
    assert [l.origin for l in lines] == ["win.pub:2", "win.pub:3"]


def test_parse_empty_file() -> None:
    assert parse_key_file(b"", "f") == ([], [])


def test_bad_line_among_good_ones_reported_with_origin_and_line() -> None:
    a, c = key_line("a"), key_line("c")
    data = f"{a}\nssh-ed25519 not-base64!!\n{c}\n".encode()
    lines, errors = parse_key_file(data, "/etc/ssh/authorized_keys.d/mixed.pub")
    assert [l.key.comment for l in lines] == ["a", "c"]
    assert [l.origin for l in lines] == ["/etc/ssh/authorized_keys.d/mixed.pub:1",
                                         "/etc/ssh/authorized_keys.d/mixed.pub:3"]
    assert len(errors) == 1
    assert errors[0].startswith("/etc/ssh/authorized_keys.d/mixed.pub:2: ")
    assert "base64" in errors[0]


@pytest.mark.parametrize("bad", [
    "garbage",
    "ssh-dss AAAAB3NzaC1kc3M=",
    "ssh-ed25519",
    f"ssh-ed25519 {base64.b64encode(b'short').decode()}",
    "permitopen=\"db-1:22\"",  # options, no key
])
def test_parse_rejects_malformed_lines(bad: str) -> None:
    good = key_line("ok")
    lines, errors = parse_key_file(f"{bad}\n{good}\n".encode(), "f")
    assert [l.key.comment for l in lines] == ["ok"]
    assert len(errors) == 1 and errors[0].startswith("f:1: "), errors


FORBIDDEN = [
    'command="/bin/sh"',
    'permitlisten="0.0.0.0:8080"',
    "agent-forwarding",
    "pty",
    "X11-forwarding",
    "user-rc",
    'tunnel="0"',
    'environment="A=b"',
    "cert-authority",
]


@pytest.mark.parametrize("option", FORBIDDEN)
def test_forbidden_options_reject_that_line_only(option: str) -> None:
    good = key_line("good")
    bad = f"{option} {key_line('bad')}"
    lines, errors = parse_key_file(f"{good}\n{bad}\n".encode(), "k.pub")
    assert [l.key.comment for l in lines] == ["good"]
    assert len(errors) == 1 and errors[0].startswith("k.pub:2: "), errors
    name = option.split("=")[0]
    assert name.lower() in errors[0].lower(), errors


@pytest.mark.parametrize("option", FORBIDDEN)
def test_forbidden_option_hidden_after_allowed_ones(option: str) -> None:
    line = f'restrict,permitopen="db-1:22",{option},from="10.0.0.0/8" {key_line()}'
    lines, errors = parse_key_file(line.encode(), "k.pub")
    assert lines == [] and len(errors) == 1, (lines, errors)


def test_admin_options_are_kept_as_written() -> None:
    line = f'permitopen="db-1:22",from="10.0.0.0/8",no-pty {key_line("admin")}'
    [kept], errors = parse_key_file(line.encode(), "admin.pub")
    assert errors == []
    assert kept.options == ('permitopen="db-1:22"', 'from="10.0.0.0/8"', "no-pty")
    assert kept.key.comment == "admin"


def test_option_names_are_lowercased_values_untouched() -> None:
    line = f'PermitOpen="DB-1:22",restrict,expiry-time="20991231" {key_line()}'
    [kept], errors = parse_key_file(line.encode(), "f")
    assert errors == []
    assert kept.options == ('permitopen="DB-1:22"', "restrict", 'expiry-time="20991231"')


def test_line_sshd_would_refuse_is_reported() -> None:
    line = f'from="10.0.0.0/8",from="192.168.0.0/16" {key_line()}'
    lines, errors = parse_key_file(line.encode(), "f")
    assert lines == [] and len(errors) == 1 and errors[0].startswith("f:1: "), (lines, errors)


def test_control_characters_and_nul_are_rejected() -> None:
    good = key_line("good")
    data = (f"{good}\n".encode() + key_line("x").encode() + b"\x00\n"
            + b"\x1b[2J" + key_line().encode() + b"\n")
    lines, errors = parse_key_file(data, "f")
    assert [l.key.comment for l in lines] == ["good"]
    assert [e.split(": ")[0] for e in errors] == ["f:2", "f:3"]


@pytest.mark.parametrize(("name", "expected"), [
    ("alice.pub", True),
    ("team.keys", True),
    ("authorized_keys", True),
    ("authorized_keys2", True),
    ("authorized_keys.admins", True),
    (".alice.pub", False),         # hidden
    (".alice.pub.swp", False),     # an editor's temporary file
    ("..data", False),             # ConfigMap machinery
    ("..2026_01_01_00_00_00.123", False),
    ("alice.pub.swp", False),
    ("alice.pub~", False),
    ("README", False),
    ("id_ed25519", False),
    ("notes.txt", False),
])
def test_is_key_file_name(name: str, expected: bool) -> None:
    assert is_key_file_name(name) is expected


# --------------------------------------------------------------------------- the adapter

class FakeSink:
    """Records what ManualKeySource hands to the reconciler, with the time of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, list[ManualLine]]] = []
        self.statuses: list[dict] = []
        self.lock = threading.Lock()

    def set_manual(self, lines) -> None:
        with self.lock:
            self.calls.append((time.monotonic(), list(lines)))

    def set_manual_status(self, status: dict) -> None:
        with self.lock:
            self.statuses.append(dict(status))

    def latest(self) -> list[ManualLine]:
        with self.lock:
            return list(self.calls[-1][1]) if self.calls else []

    def blobs(self) -> set[str]:
        return {l.key.blob_b64 for l in self.latest()}

    def count(self) -> int:
        with self.lock:
            return len(self.calls)


class Harness:
    def __init__(self, root: Path) -> None:
        self.parent = root / "ssh"
        self.keys_dir = self.parent / "authorized_keys.d"
        self.seed = self.parent / "authorized_keys_cache"
        self.keys_dir.mkdir(parents=True)
        self.sink = FakeSink()
        self.source: ManualKeySource | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, seed: bool = True) -> "Harness":
        self.source = ManualKeySource(self.sink, self.keys_dir,
                                      seed_file=self.seed if seed else None,
                                      poll_interval=0.5, settle=0.1)
        self.source.load()
        self.thread = threading.Thread(target=self.source.run, args=(self.stop,), daemon=True)
        self.thread.start()
        time.sleep(0.3)  # the observer is armed
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
            assert not self.thread.is_alive(), "ManualKeySource.run did not stop"

    def wait_for(self, expected: set[str], label: str, since: float,
                 deadline: float = 5.0) -> float:
        """Waits until the sink's latest lines are exactly `expected` (blobs); returns the
        seconds since `since` (the moment the change was made) and records it."""
        end = since + deadline
        while time.monotonic() < end:
            if self.sink.blobs() == expected:
                delay = time.monotonic() - since
                DELAYS[label] = delay
                return delay
            time.sleep(0.01)
        pytest.fail(f"{label}: sink never got {len(expected)} expected key(s) within "
                    f"{deadline} s; latest: {sorted(self.sink.blobs())}", pytrace=False)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


@pytest.fixture(scope="module", autouse=True)
def report_delays() -> Iterator[None]:
    yield
    if DELAYS:
        print("\nchange-to-sink delays (ManualKeySource, poll_interval=0.5, settle=0.1):")
        for label, delay in DELAYS.items():
            print(f"  {label:<28} {delay:.3f} s")


def changed(h: Harness, action: Callable[[], None], expected: set[str], label: str) -> float:
    started = time.monotonic()
    action()
    delay = h.wait_for(expected, label, started)
    assert delay < DEADLINE, f"{label}: applied after {delay:.3f} s (limit {DEADLINE} s)"
    return delay


def test_initial_load_and_status(h: Harness) -> None:
    a, b = key_line("a"), key_line("b")
    (h.keys_dir / "a.pub").write_text(a + "\n")
    (h.keys_dir / "authorized_keys").write_text(b + "\n")
    (h.keys_dir / "README").write_text(key_line("not a key file") + "\n")
    (h.keys_dir / ".hidden.pub").write_text(key_line("hidden") + "\n")
    h.start()
    assert h.sink.blobs() == {blob_of(a), blob_of(b)}
    assert h.sink.statuses[-1] == {"files": 2, "keys": 2, "errors": []}
    origins = sorted(l.origin for l in h.sink.latest())
    assert origins == [f"{h.keys_dir / 'a.pub'}:1", f"{h.keys_dir / 'authorized_keys'}:1"]


def test_add_file_then_append_line(h: Harness) -> None:
    h.start()
    assert h.sink.blobs() == set()
    a, b = key_line("a"), key_line("b")
    changed(h, lambda: (h.keys_dir / "a.pub").write_text(a + "\n"), {blob_of(a)}, "create file")

    def append() -> None:
        with open(h.keys_dir / "a.pub", "a") as handle:
            handle.write(b + "\n")
    changed(h, append, {blob_of(a), blob_of(b)}, "append line")


def test_editor_rename_save(h: Harness) -> None:
    a, b = key_line("a"), key_line("b")
    (h.keys_dir / "a.pub").write_text(a + "\n")
    h.start()
    assert h.sink.blobs() == {blob_of(a)}

    def save() -> None:
        swap = h.keys_dir / ".a.pub.swp"
        swap.write_text(b + "\n")
        os.replace(swap, h.keys_dir / "a.pub")
    changed(h, save, {blob_of(b)}, "rename-save")


def test_move_in_and_out_of_key_names(h: Harness) -> None:
    a = key_line("a")
    h.start()
    (h.keys_dir / "draft.txt").write_text(a + "\n")
    time.sleep(0.7)
    assert h.sink.blobs() == set()  # not a key file name
    changed(h, lambda: os.rename(h.keys_dir / "draft.txt", h.keys_dir / "a.keys"),
            {blob_of(a)}, "move to key name")
    changed(h, lambda: os.rename(h.keys_dir / "a.keys", h.keys_dir / "a.keys.disabled"),
            set(), "move to other name")


def test_configmap_symlink_swap(h: Harness) -> None:
    old, new = key_line("old"), key_line("new")
    d = h.keys_dir
    (d / "..2026_01").mkdir()
    (d / "..2026_01" / "keys.pub").write_text(old + "\n")
    os.symlink("..2026_01", d / "..data")
    os.symlink("..data/keys.pub", d / "keys.pub")
    h.start()
    assert h.sink.blobs() == {blob_of(old)}
    assert h.sink.statuses[-1]["files"] == 1  # the real file under ..2026_01 is not read twice

    def swap() -> None:
        (d / "..2026_02").mkdir()
        (d / "..2026_02" / "keys.pub").write_text(new + "\n")
        os.symlink("..2026_02", d / "..data_tmp")
        os.replace(d / "..data_tmp", d / "..data")
        shutil.rmtree(d / "..2026_01")
    changed(h, swap, {blob_of(new)}, "configmap ..data swap")


def test_delete_file_revokes(h: Harness) -> None:
    a, b = key_line("a"), key_line("b")
    (h.keys_dir / "a.pub").write_text(a + "\n")
    (h.keys_dir / "b.pub").write_text(b + "\n")
    h.start()
    assert h.sink.blobs() == {blob_of(a), blob_of(b)}
    changed(h, lambda: (h.keys_dir / "a.pub").unlink(), {blob_of(b)}, "delete file")


def test_delete_directory_and_recreate(h: Harness) -> None:
    a, b = key_line("a"), key_line("b")
    (h.keys_dir / "a.pub").write_text(a + "\n")
    h.start()
    changed(h, lambda: shutil.rmtree(h.keys_dir), set(), "delete directory")

    def recreate() -> None:
        h.keys_dir.mkdir()
        (h.keys_dir / "b.pub").write_text(b + "\n")
    changed(h, recreate, {blob_of(b)}, "recreate directory")
    # ... and the new directory is watched like the old one.
    c = key_line("c")
    changed(h, lambda: (h.keys_dir / "c.pub").write_text(c + "\n"),
            {blob_of(b), blob_of(c)}, "file in recreated dir")


def test_seed_file_in_place_overwrite(h: Harness) -> None:
    a, b, c = key_line("a"), key_line("b"), key_line("c")
    h.seed.write_text(a + "\n")
    (h.keys_dir / "c.pub").write_text(c + "\n")
    h.start()
    assert h.sink.blobs() == {blob_of(a), blob_of(c)}
    inode = h.seed.stat().st_ino

    def overwrite() -> None:
        with open(h.seed, "r+") as handle:  # same inode, as a host-side edit of a bind mount
            handle.truncate(0)
            handle.write(b + "\n")
    changed(h, overwrite, {blob_of(b), blob_of(c)}, "seed in-place overwrite")
    assert h.seed.stat().st_ino == inode
    assert h.seed.read_text() == b + "\n"  # the source only reads it


class BlindObserver:
    """An observer that sees nothing: what inotify gives for a host-side write to a
    single-file bind mount. Only the stat poll can notice such a change."""

    def schedule(self, *args, **kwargs) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass


def test_poll_fallback_sees_changes_inotify_misses(h: Harness,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manual_mod, "Observer", BlindObserver)
    a, b, c = key_line("a"), key_line("b"), key_line("c")
    h.seed.write_text(a + "\n")
    h.start()
    assert h.sink.blobs() == {blob_of(a)}

    def overwrite() -> None:
        with open(h.seed, "r+") as handle:
            handle.truncate(0)
            handle.write(b + "\n")
    changed(h, overwrite, {blob_of(b)}, "seed overwrite, poll only")
    changed(h, lambda: (h.keys_dir / "c.pub").write_text(c + "\n"),
            {blob_of(b), blob_of(c)}, "new file, poll only")
    changed(h, lambda: (h.keys_dir / "c.pub").unlink(), {blob_of(b)}, "delete, poll only")


def test_seed_file_ignored_without_seed(h: Harness) -> None:
    """With discovery (no seed), the rendered cache next to the directory is not an input."""
    h.seed.write_text(key_line("rendered") + "\n")
    a = key_line("a")
    (h.keys_dir / "a.pub").write_text(a + "\n")
    h.start(seed=False)
    assert h.sink.blobs() == {blob_of(a)}


def test_bad_line_reported_once_across_rescans(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    a, b = key_line("a"), key_line("b")
    bad_file = h.keys_dir / "mixed.pub"
    bad_file.write_text(f"{a}\ncommand=\"/bin/sh\" {key_line('bad')}\n{b}\n")
    h.start()
    assert h.sink.blobs() == {blob_of(a), blob_of(b)}
    assert h.sink.statuses[-1]["errors"] == [f"{bad_file}:2: option 'command' grants more than tunnels"]

    extra = []
    for i in range(3):  # three more rescans, each caused by an unrelated change
        extra.append(key_line(f"x{i}"))
        (h.keys_dir / f"x{i}.pub").write_text(extra[-1] + "\n")
        h.wait_for({blob_of(a), blob_of(b), *map(blob_of, extra)}, f"rescan {i}", time.monotonic())
    rejected = [r.getMessage() for r in caplog.records
                if r.name == LOGGER and "manual key line rejected" in r.getMessage()]
    assert rejected == [f"manual key line rejected: {bad_file}:2: option 'command' grants more "
                        "than tunnels"], rejected
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == LOGGER)


def test_fixed_line_is_forgotten_and_reported_again_if_broken_again(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    a, good = key_line("a"), key_line("good")
    path = h.keys_dir / "k.pub"
    path.write_text(f"{a}\npty {good}\n")
    h.start()
    changed(h, lambda: path.write_text(f"{a}\n{good}\n"), {blob_of(a), blob_of(good)}, "fix line")
    assert h.sink.statuses[-1]["errors"] == []
    changed(h, lambda: path.write_text(f"{a}\npty {good}\n"), {blob_of(a)}, "break line again")
    rejected = [r for r in caplog.records if "manual key line rejected" in r.getMessage()]
    assert len(rejected) == 2


def test_unreadable_file_keeps_last_good_content(h: Harness, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    a, b, other = key_line("a"), key_line("b"), key_line("other")
    path = h.keys_dir / "a.pub"
    path.write_text(a + "\n")
    h.start()
    assert h.sink.blobs() == {blob_of(a)}

    real_read = manual_mod._read_capped

    def failing_read(p: Path) -> bytes:
        if Path(p) == path:
            raise PermissionError(13, "Permission denied")
        return real_read(p)
    monkeypatch.setattr(manual_mod, "_read_capped", failing_read)

    # The file changes but cannot be read: its last good key stays; other files go on.
    path.write_text(b + "\n")
    changed(h, lambda: (h.keys_dir / "other.pub").write_text(other + "\n"),
            {blob_of(a), blob_of(other)}, "other file while unreadable")
    errors = h.sink.statuses[-1]["errors"]
    assert len(errors) == 1 and errors[0].startswith(f"{path}: cannot read (Permission denied)")
    warnings = [r for r in caplog.records if "cannot read" in r.getMessage()]
    assert len(warnings) == 1

    # Readable again: its current content is served.
    monkeypatch.setattr(manual_mod, "_read_capped", real_read)
    changed(h, lambda: path.touch(), {blob_of(b), blob_of(other)}, "readable again")
    assert h.sink.statuses[-1]["errors"] == []


def test_oversized_file_keeps_last_good_content(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    a = key_line("a")
    path = h.keys_dir / "a.pub"
    path.write_text(a + "\n")
    monkeypatch.setattr(manual_mod, "MAX_FILE_BYTES", 4096)
    h.start()
    assert h.sink.blobs() == {blob_of(a)}
    big = "".join(key_line() + "\n" for _ in range(100))  # > 4096 bytes
    started = time.monotonic()
    path.write_text(big)
    end = started + 3
    while time.monotonic() < end and not h.sink.statuses[-1]["errors"]:
        time.sleep(0.02)
    assert "larger than 4096 bytes" in h.sink.statuses[-1]["errors"][0]
    assert h.sink.blobs() == {blob_of(a)}


def test_directory_named_like_a_key_file_is_skipped(h: Harness) -> None:
    a = key_line("a")
    (h.keys_dir / "x.pub").mkdir()
    (h.keys_dir / "x.pub" / "inner.pub").write_text(key_line("inner") + "\n")
    (h.keys_dir / "a.pub").write_text(a + "\n")
    h.start()
    assert h.sink.blobs() == {blob_of(a)}
    assert h.sink.statuses[-1] == {"files": 1, "keys": 1, "errors": []}
    assert h.thread is not None and h.thread.is_alive()


def test_missing_directory_at_start_then_created(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    try:
        harness.keys_dir.rmdir()
        harness.start()
        assert harness.sink.blobs() == set()
        a = key_line("a")

        def create() -> None:
            harness.keys_dir.mkdir()
            (harness.keys_dir / "a.pub").write_text(a + "\n")
        changed(harness, create, {blob_of(a)}, "dir created after start")
    finally:
        harness.close()


def test_quiet_after_a_change(h: Harness) -> None:
    """Once a change has been applied, the source goes quiet: its own reads of the key
    files (inotify IN_OPEN / IN_CLOSE_NOWRITE) are not changes. (Regression: it used to
    rescan about every 0.1 s forever after the first change.)"""
    a = key_line("a")
    h.start()
    changed(h, lambda: (h.keys_dir / "a.pub").write_text(a + "\n"), {blob_of(a)}, "create (quiet)")
    time.sleep(0.8)  # the change and its settle are over
    before = h.sink.count()
    time.sleep(2.0)
    extra = h.sink.count() - before
    assert extra == 0, f"{extra} rescans in 2 s with no change to any file"


def test_100k_line_file(tmp_path: Path) -> None:
    keys_dir = tmp_path / "authorized_keys.d"
    keys_dir.mkdir()
    prefix = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20"
    random = os.urandom(32 * 100_000)
    lines = [b"ssh-ed25519 " + base64.b64encode(prefix + random[i * 32:(i + 1) * 32])
             + b" user%d" % i for i in range(100_000)]
    (keys_dir / "big.keys").write_bytes(b"\n".join(lines) + b"\n")
    sink = FakeSink()
    source = ManualKeySource(sink, keys_dir)
    started = time.monotonic()
    scanned = source.scan()
    DELAYS["scan 100k lines (info)"] = time.monotonic() - started
    assert len(scanned) == 100_000
    assert len({l.key.blob_b64 for l in scanned}) == 100_000
    assert scanned[-1].origin == f"{keys_dir / 'big.keys'}:100000"
    assert source.errors() == []
    source.load()
    assert sink.statuses[-1] == {"files": 1, "keys": 100_000, "errors": []}


def test_only_the_edited_file_is_read_again(tmp_path: Path, monkeypatch) -> None:
    keys_dir = tmp_path / "authorized_keys.d"
    keys_dir.mkdir()
    (keys_dir / "a.pub").write_text(key_line("a") + "\n")
    (keys_dir / "b.pub").write_text(key_line("b") + "\n")
    sink = FakeSink()
    source = ManualKeySource(sink, keys_dir)
    source.load()
    read: list[str] = []
    real = manual_mod._read_capped
    monkeypatch.setattr(manual_mod, "_read_capped", lambda p: read.append(p.name) or real(p))
    (keys_dir / "b.pub").write_text(key_line("b") + "\n" + key_line("b2") + "\n")
    source.load()
    assert read == ["b.pub"]
    assert sorted(l.key.comment for l in sink.latest()) == ["a", "b", "b2"]
