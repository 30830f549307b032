"""Admin-maintained key files, hot-reloaded: watchdog events, plus a stat poll as fallback.

Inputs (authorized_keys format): every `*.pub`, `*.keys` and `authorized_keys*` file in the
keys directory (a ConfigMap/Secret mount or a bind-mounted directory), and in manual mode
the seed-compatible single file. Each line goes through the same strict validator as
discovered keys; a bad line is reported once with `file:line` and skipped, every other line
keeps working. A file that cannot be read keeps serving its last good content; a deleted
file revokes its keys.

Level-triggered like the rest: any relevant event (create, modify, move, delete, the
ConfigMap `..data` symlink swap) just triggers a rescan (a file whose inode, size and times are
unchanged is not read again: a one-line edit reads one file). A file read again is diffed,
as bytes, against its last parse: only the edited lines are parsed, and every line outside
the edit keeps its ManualLine object (a line that moved gets its new number in place), so
the reconciler's diff, by identity, sees only the edited lines. The poll catches what
inotify cannot see, e.g. a host-side write to a single bind-mounted file.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from ..errors import KeyRejected
from ..keys import parse_authorized_keys_line
from ..model import LineNumber, ManualLine

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 1024 * 1024  # 100,000 keys with options fit many times over


# ---- pure ------------------------------------------------------------------------------------
Result = Any  # None (blank or comment), str (why the line is rejected) or (options, key)


def line_result(raw: str) -> Result:
    """What one raw line of a key file holds (its `\\r` and surrounding blanks ignored)."""
    if raw.endswith("\r"):
        raw = raw[:-1]
    text = raw.strip(" \t")
    if not text or text.startswith("#"):
        return None
    try:
        return parse_authorized_keys_line(text)
    except KeyRejected as exc:
        return str(exc)


def parse_key_file(data: bytes, origin: str) -> tuple[list[ManualLine], list[str]]:
    """Valid lines of one file, and `origin:line: reason` for each rejected one.

    The from-scratch reference; `reparse` gives the same result incrementally."""
    lines: list[ManualLine] = []
    errors: list[str] = []
    # Decoded once (a bad byte becomes U+FFFD, which the validator rejects on its line).
    for number, raw in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
        result = line_result(raw)
        if isinstance(result, str):
            errors.append(f"{origin}:{number}: {result}")
        elif result is not None:
            options, key = result
            lines.append(ManualLine(origin, options, key, LineNumber(number)))
    return lines, errors


class LineOffsets:
    """Byte offset of each line of a file, kept as line lengths (`\\n` included) with a sum
    per block: an edit that keeps the line count updates a block or two instead of shifting
    every later offset, and a lookup sums a few hundred numbers in C."""

    BLOCK = 512

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths
        self.sums = self._block_sums(0)

    def _block_sums(self, first: int) -> list[int]:
        size, lengths = self.BLOCK, self.lengths
        return [sum(lengths[i:i + size]) for i in range(first * size, len(lengths), size)]

    @property
    def count(self) -> int:
        return len(self.lengths)

    def start(self, line: int) -> int:
        """Offset of `line` (0-based); of line `count`, the file length + 1."""
        block = line // self.BLOCK
        return sum(self.sums[:block]) + sum(self.lengths[block * self.BLOCK:line])

    def line_at(self, offset: int) -> int:
        """The line holding byte `offset` (0 <= offset <= file length)."""
        ends = list(accumulate(self.sums))
        block = bisect_right(ends, offset)
        base = ends[block - 1] if block else 0
        first = block * self.BLOCK
        starts = list(accumulate(self.lengths[first:first + self.BLOCK], initial=base))
        return first + bisect_right(starts, offset) - 1

    def replace(self, first: int, end: int, lengths: list[int]) -> None:
        """Lines [first, end) become lines of `lengths`."""
        self.lengths[first:end] = lengths
        block = first // self.BLOCK
        if len(lengths) == end - first:  # later lines keep their blocks
            last = (end - 1) // self.BLOCK + 1
            self.sums[block:last] = [sum(self.lengths[i * self.BLOCK:(i + 1) * self.BLOCK])
                                     for i in range(block, last)]
        else:
            del self.sums[block:]
            self.sums.extend(self._block_sums(block))


@dataclass
class ParsedFile:
    """One file as parsed, kept (and updated in place) so the next version is parsed as a diff.

    `lines` and `errors` are what the file serves; `line_at`/`error_at` give the (0-based)
    line of each, so a line range maps to a slice of them by bisection."""

    origin: str
    data: bytes
    offsets: LineOffsets
    lines: list[ManualLine]
    line_at: list[int]
    errors: list[str]  # `origin:line: reason`
    error_at: list[int]


def empty_file(origin: str) -> ParsedFile:
    return ParsedFile(origin, b"", LineOffsets([1]), [], [], [], [])


COMPARE_STEP = 1 << 16  # bytes compared per call: small enough to stop soon after a difference


def common_prefix(old: bytes, new: bytes) -> int:
    """Length of the longest common prefix, by memcmp (no copies) over steps of the file,
    then over halves of the step that differs: about one pass up to the first difference."""
    view, limit = memoryview(old), min(len(old), len(new))
    low = 0
    while low < limit and new.startswith(view[low:min(low + COMPARE_STEP, limit)], low):
        low += COMPARE_STEP
    if low >= limit:
        return limit
    high = min(low + COMPARE_STEP, limit)  # equal up to `low`; a difference in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if new.startswith(view[low:middle], low):
            low = middle
        else:
            high = middle
    return low


def common_suffix(old: bytes, new: bytes, limit: int) -> int:
    """Length (at most `limit`) of the longest common suffix, as `common_prefix`."""
    view, old_end, new_end = memoryview(old), len(old), len(new)

    def same(low: int, high: int) -> bool:  # the bytes from `high` to `low` before each end
        return new.startswith(view[old_end - high:old_end - low], new_end - high)

    low = 0
    while low < limit and same(low, min(low + COMPARE_STEP, limit)):
        low += COMPARE_STEP
    if low >= limit:
        return limit
    high = min(low + COMPARE_STEP, limit)  # the last `low` bytes are equal, not the last `high`
    while high - low > 1:
        middle = (low + high) // 2
        if same(low, middle):
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class _Edit:
    """Old lines [first, end) became `raw` (the new file's lines from `first` on)."""

    first: int
    end: int
    raw: list[bytes]
    old_raw: list[bytes]

    @property
    def shift(self) -> int:  # how far the lines after the edit moved
        return self.first + len(self.raw) - self.end


def _find_edit(old: ParsedFile, data: bytes) -> _Edit:
    """The run of whole lines holding every byte that differs between `old` and `data`
    (found by comparing bytes, so the lines around it are never split or decoded).

    Lines inserted or deleted whole leave every old line out of the edit, even where the
    bytes around them look alike (a key inserted above another starts as it does)."""
    old_size, offsets = len(old.data), old.offsets
    first = offsets.line_at(common_prefix(old.data, data))  # lines before it are common
    start = offsets.start(first)
    suffix = common_suffix(old.data, data, min(old_size, len(data)) - start)
    tail, new_tail = old_size - suffix, len(data) - suffix  # common from here on
    end = offsets.line_at(tail)
    if not (offsets.start(end) == tail and (new_tail == 0 or data[new_tail - 1] == 10)):
        end += 1  # line `end` differs at its start: it is in the edit (`\n` = 10)
    if end == offsets.count:
        old_stop, new_stop = old_size, len(data)
    else:
        old_stop = offsets.start(end) - 1  # the `\n` ending the edit
        new_stop = old_stop + len(data) - old_size
    return _Edit(first, end, _lines(data, start, new_stop), _lines(old.data, start, old_stop))


def _lines(data: bytes, start: int, stop: int) -> list[bytes]:
    """The lines of data[start:stop] (none when stop is before start: nothing there)."""
    return data[start:stop].split(b"\n") if stop >= start else []


def reparse(old: ParsedFile | None, data: bytes, origin: str) -> ParsedFile:
    """`data` parsed as `parse_key_file` would, by updating `old` (the previous version of
    the same file) in place and returning it: copies of its lists are the caller's business.

    Only the edited lines are read; a line outside the edit keeps its ManualLine object (one
    that moved, with its number updated in place). An edited line is validated unless it was
    in the old edit."""
    if old is None or old.origin != origin:
        old = empty_file(origin)
    edit = _find_edit(old, data)
    middle: list[ManualLine] = []
    middle_at: list[int] = []
    rejected: list[str] = []
    rejected_at: list[int] = []
    for number, result in enumerate(_parse_edit(old, edit), edit.first):
        if isinstance(result, str):
            rejected.append(f"{origin}:{number + 1}: {result}")
            rejected_at.append(number)
        elif result is not None:
            if not isinstance(result, ManualLine):  # not the same line at the same place
                result = ManualLine(origin, result[0], result[1], LineNumber(number + 1))
            middle.append(result)
            middle_at.append(number)
    after = _splice(old.lines, old.line_at, edit, middle, middle_at)
    _move(old.lines, old.line_at, after, edit.shift)
    after = _splice(old.errors, old.error_at, edit, rejected, rejected_at)
    if edit.shift:  # an error is text: it names its line again
        old.errors[after:] = [f"{origin}:{number + 1}: {_reason(origin, number - edit.shift, error)}"
                              for error, number in zip(old.errors[after:], old.error_at[after:])]
    old.offsets.replace(edit.first, edit.end, [len(raw) + 1 for raw in edit.raw])
    old.data = data
    return old


def _reason(origin: str, number: int, error: str) -> str:
    return error[len(f"{origin}:{number + 1}: "):]


def _parse_edit(old: ParsedFile, edit: _Edit) -> list[Result]:
    """Parse result of each new edited line: an unchanged line at the same place keeps its
    old result (its ManualLine object when valid); a text seen before in the edit is not
    validated again."""
    previous = _old_results(old, edit)
    known: dict[bytes, Result] = {}
    for number, raw in enumerate(edit.old_raw, edit.first):
        result = previous.get(number)
        known[raw] = (result.options, result.key) if isinstance(result, ManualLine) else result
    results: list[Result] = []
    for number, raw in enumerate(edit.raw, edit.first):
        if number < edit.end and edit.old_raw[number - edit.first] == raw:
            results.append(previous.get(number))
            continue
        if raw not in known:  # decoded alone as in the whole: no UTF-8 sequence holds `\n`
            known[raw] = line_result(raw.decode("utf-8", errors="replace"))
        results.append(known[raw])
    return results


def _old_results(old: ParsedFile, edit: _Edit) -> dict[int, Result]:
    """Parse results of the old edited lines, by line (blank and comment lines absent)."""
    low, high = bisect_left(old.line_at, edit.first), bisect_left(old.line_at, edit.end)
    results: dict[int, Result] = dict(zip(old.line_at[low:high], old.lines[low:high]))
    low, high = bisect_left(old.error_at, edit.first), bisect_left(old.error_at, edit.end)
    results.update((number, _reason(old.origin, number, error))
                   for number, error in zip(old.error_at[low:high], old.errors[low:high]))
    return results


def _splice(items: list, at: list[int], edit: _Edit, middle: list, middle_at: list[int]) -> int:
    """Replaces, in place, the `items` (on lines `at`) of the edit by `middle`, and moves the
    line numbers in `at` of the ones after it by the edit's shift; returns where those start
    now. In place: a 100,000-line list is not copied."""
    low, high = bisect_left(at, edit.first), bisect_left(at, edit.end)
    if edit.shift:
        at[high:] = [number + edit.shift for number in at[high:]]
    items[low:high] = middle
    at[low:high] = middle_at
    return low + len(middle)


def _move(lines: list[ManualLine], at: list[int], after: int, shift: int) -> None:
    """Lines from `after` on, moved by `shift`, get their new (0-based) numbers `at` in place:
    the reconciler finds an edit by identity, so a line that only moved is no change (see
    LineNumber). Farthest first when they move down, nearest first when up: a reader on
    another thread meanwhile never sees two of them out of order."""
    if not shift:
        return
    order = range(len(lines) - 1, after - 1, -1) if shift > 0 else range(after, len(lines))
    for i in order:
        lines[i].number.value = at[i] + 1


def is_key_file_name(name: str) -> bool:
    """Hidden names are skipped: ConfigMap mounts keep their real files under `..data`."""
    if name.startswith("."):
        return False
    return name.endswith((".pub", ".keys")) or name.startswith("authorized_keys")


# ---- adapter ---------------------------------------------------------------------------------
@dataclass
class _FileState:
    lines: list[ManualLine] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stamp: tuple | None = None  # the file as parsed (None: not read, try again)
    parsed: ParsedFile | None = None  # its last good parse, the base of the next one


class _Trigger(FileSystemEventHandler):
    def __init__(self, relevant: Any, fired: threading.Event) -> None:
        self.relevant = relevant
        self.fired = fired

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # our own reads: counting them would rescan forever
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        if any(p and self.relevant(os.fsdecode(p)) for p in paths):
            self.fired.set()


class ManualKeySource:
    """Feeds the reconciler's manual lines from the key directory (and the seed file)."""

    def __init__(self, sink: Any, keys_dir: Path, seed_file: Path | None = None,
                 poll_interval: float = 0.5, settle: float = 0.1) -> None:
        self.sink = sink
        self.keys_dir = keys_dir
        self.seed_file = seed_file
        self.poll_interval = poll_interval
        self.settle = settle
        self._files: dict[Path, _FileState] = {}
        self._reported: set[str] = set()
        self._fired = threading.Event()
        self._signature: tuple = ()

    def files(self) -> list[Path]:
        found: list[Path] = []
        if self.seed_file is not None and self.seed_file.is_file():
            found.append(self.seed_file)
        try:
            entries = sorted(os.scandir(self.keys_dir), key=lambda e: e.name)
        except OSError:
            entries = []
        for entry in entries:
            if is_key_file_name(entry.name) and Path(entry.path).is_file():
                found.append(Path(entry.path))
        return found

    def signature(self) -> tuple:
        """What changes when any input changes: names, inodes, sizes, mtimes (symlinks
        followed, so a ConfigMap swap shows up too)."""
        sig = []
        for path in self.files():
            try:
                st = path.stat()
            except OSError:
                continue
            sig.append((str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(sig)

    def scan(self) -> list[ManualLine]:
        """Re-read every input; returns all valid lines (and logs new errors once)."""
        current: dict[Path, _FileState] = {}
        for path in self.files():
            previous = self._files.get(path)
            stamp = _stamp(path)
            if previous is not None and stamp is not None and previous.stamp == stamp:
                current[path] = previous  # unchanged since parsed: only edited files are read
                continue
            try:
                data = _read_capped(path)
            except OSError as exc:
                state = _FileState(previous.lines if previous else [],
                                   [f"{path}: cannot read ({exc.strerror or exc}); "
                                    "serving its last good content"],
                                   parsed=previous.parsed if previous else None)
            else:
                # Parsed as a diff against its last good parse: an edit reads its own lines.
                parsed = reparse(previous.parsed if previous else None, data, str(path))
                state = _FileState(parsed.lines, parsed.errors, stamp, parsed)
            current[path] = state
        self._files = current
        errors = [e for s in current.values() for e in s.errors]
        for error in errors:
            if error not in self._reported:
                log.warning("manual key line rejected: %s", error)
        self._reported = set(errors)
        lines: list[ManualLine] = []
        for state in current.values():
            lines.extend(state.lines)
        return lines

    def errors(self) -> list[str]:
        return sorted(self._reported)

    def load(self) -> None:
        """Scan now and hand the lines to the sink (start-up, and after every change)."""
        self._signature = self.signature()
        lines = self.scan()
        self.sink.set_manual(lines)
        self.sink.set_manual_status({"files": len(self._files), "keys": len(lines),
                                     "errors": self.errors()})

    def _relevant(self, path: str) -> bool:
        p = Path(path)
        return (p == self.seed_file or p == self.keys_dir or self.keys_dir in p.parents)

    def run(self, stop: threading.Event) -> None:
        observer = Observer()
        handler = _Trigger(self._relevant, self._fired)
        watched = {self.keys_dir.parent}
        if self.seed_file is not None:
            watched.add(self.seed_file.parent)
        for directory in sorted(watched):
            try:
                # Recursive on the parent: deleting and re-creating the key directory,
                # or a ConfigMap swapping its `..data` link, is seen without re-arming.
                observer.schedule(handler, str(directory), recursive=True)
            except OSError as exc:
                log.warning("cannot watch %s (%s): falling back to polling", directory, exc)
        observer.start()
        try:
            while not stop.is_set():
                fired = self._fired.wait(self.poll_interval)
                if fired:
                    self._settle(stop)
                if fired or self.signature() != self._signature:
                    self.load()
        finally:
            observer.stop()
            observer.join(timeout=5)

    def _settle(self, stop: threading.Event) -> None:
        """Let a burst of events (an editor's save, a ConfigMap swap) finish first."""
        deadline = time.monotonic() + 5 * self.settle
        while time.monotonic() < deadline and not stop.is_set():
            self._fired.clear()
            if not self._fired.wait(self.settle):
                return


def _stamp(path: Path) -> tuple | None:
    """What changes when a file's content may have (symlinks followed)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read_capped(path: Path) -> bytes:
    with open(path, "rb") as handle:
        # Asked for its size, not the cap: a 64 MB request costs 64 MB of memory and time.
        expected = min(os.fstat(handle.fileno()).st_size, MAX_FILE_BYTES) + 1
        data = handle.read(expected)
        if len(data) == expected:  # it grew meanwhile: read on, up to the cap
            data += handle.read(MAX_FILE_BYTES + 1 - len(data))
    if len(data) > MAX_FILE_BYTES:
        raise OSError(f"larger than {MAX_FILE_BYTES} bytes")
    return data
