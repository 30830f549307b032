"""How long a manual key file takes to load, and to reload after a one-line edit, from 1,000
to 100,000 lines.

Runs every size side by side, interleaved, in one run and prints medians plus each size's
cost relative to the smallest file, so the numbers that matter do not depend on how fast
this machine is today:

* first load: parse + validate every line, render the index; the cost per line should stay
  flat;
* reload after a 1-line edit, the source side only (stat, read, diff, hand the lines to the
  sink), for three edits: append a line, replace the middle line, insert a line at the top.
  Append and replace should cost about the same at every size; an insert at the top moves
  every later line (each origin names its line number), so it may grow with the file.
  The last column is the floor every edit pays: reading the file. Each timing starts after
  a garbage collection, so one owed to earlier work is not charged to it.

    .venv/bin/python bench/manual_load.py [--sizes 1000,10000,100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from watcher.render import render  # noqa: E402
from watcher.sources.manual import ManualKeySource  # noqa: E402

FILE = "keys.pub"


class _Sink:
    def set_manual(self, lines):
        self.lines = lines

    def set_manual_status(self, status):
        self.status = status


def key_line(number: int, comment: str = "bench") -> bytes:
    """A distinct valid ed25519 line, some with admin options, as users write them."""
    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + os.urandom(32)
    options = f'permitopen="host-{number % 97}:22" ' if number % 3 == 0 else ""
    return f"{options}ssh-ed25519 {base64.b64encode(blob).decode()} user{number}@{comment}".encode()


def key_lines(count: int) -> list[bytes]:
    return [key_line(i) for i in range(count)]


@dataclass(frozen=True)
class Edit:
    """A one-line edit: the new file, and where its new line is served (None: last)."""

    name: str
    marker: str  # how the new line's comment ends
    apply: Callable[[list[bytes]], tuple[list[bytes], int | None]]


def _append(lines: list[bytes]) -> tuple[list[bytes], int | None]:
    return lines + [key_line(len(lines), "appended")], None


def _replace_middle(lines: list[bytes]) -> tuple[list[bytes], int | None]:
    middle = len(lines) // 2  # a longer comment: the size differs, so the stamp does too
    return lines[:middle] + [key_line(middle, "replaced")] + lines[middle + 1:], middle


def _insert_top(lines: list[bytes]) -> tuple[list[bytes], int | None]:
    return [key_line(0, "inserted")] + lines, 0


EDITS = [Edit("append", "appended", _append), Edit("middle", "replaced", _replace_middle),
         Edit("top", "inserted", _insert_top)]


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def first_load(directory: Path) -> tuple[float, int, ManualKeySource, _Sink]:
    """Seconds to load and render from nothing, and the index lines rendered."""
    sink = _Sink()
    source = ManualKeySource(sink, directory)
    started = time.perf_counter()
    source.load()
    rendered = render([], ("*",), sink.lines)
    return time.perf_counter() - started, rendered.index.count("\n"), source, sink


def reload_after(edit: Edit, directory: Path, lines: list[bytes], source: ManualKeySource,
                 sink: _Sink) -> float:
    """Seconds for the source to serve the edited file; the original is restored after."""
    path = directory / FILE
    edited, served_at = edit.apply(lines)
    _write(path, edited)
    gc.collect()  # a collection owed to earlier work (the first load) is not this edit's
    started = time.perf_counter()
    source.load()
    seconds = time.perf_counter() - started
    line = sink.lines[-1 if served_at is None else served_at]
    if len(sink.lines) != len(edited) or not line.key.comment.endswith("@" + edit.marker):
        raise SystemExit(f"error: {edit.name} on {len(lines)} lines is not served")
    _write(path, lines)
    source.load()
    if len(sink.lines) != len(lines):
        raise SystemExit(f"error: restoring {len(lines)} lines served {len(sink.lines)}")
    return seconds


def read_floor(directory: Path) -> float:
    gc.collect()
    started = time.perf_counter()
    (directory / FILE).read_bytes()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    columns = ["load"] + [e.name for e in EDITS] + ["read"]
    times: dict[int, dict[str, list[float]]] = {s: {c: [] for c in columns} for s in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        contents = {}
        for size in sizes:
            (Path(tmp) / str(size)).mkdir()
            contents[size] = key_lines(size)
            _write(Path(tmp) / str(size) / FILE, contents[size])
        for _ in range(args.repeat):  # interleaved, so drift hits every size alike
            for size in sizes:
                directory = Path(tmp) / str(size)
                seconds, served, source, sink = first_load(directory)
                if served != size:
                    print(f"error: {size} lines gave {served} index lines", file=sys.stderr)
                    return 1
                times[size]["load"].append(seconds)
                for edit in EDITS:
                    times[size][edit.name].append(
                        reload_after(edit, directory, contents[size], source, sink))
                times[size]["read"].append(read_floor(directory))
    report(sizes, {s: {c: statistics.median(v) for c, v in t.items()} for s, t in times.items()})
    return 0


def report(sizes: list[int], median: dict[int, dict[str, float]]) -> None:
    small = median[sizes[0]]
    print("first load: parse + validate every line, render the index")
    print(f"{'lines':>8} {'load s':>8} {'us/line':>8} {'per-line vs ' + str(sizes[0]):>18}")
    for size in sizes:
        load = median[size]["load"]
        print(f"{size:>8} {load:>8.3f} {load / size * 1e6:>8.1f} "
              f"{load / size / (small['load'] / sizes[0]):>18.2f}")
    print(f"\nreload after a 1-line edit, source side only: ms (ratio to {sizes[0]} lines)")
    columns = ("append", "middle", "top", "read")
    print(f"{'lines':>8} " + " ".join(f"{c if c != 'read' else 'file read':>17}" for c in columns))
    for size in sizes:
        m = median[size]
        print(f"{size:>8} " + " ".join(f"{m[c] * 1e3:>9.3f} ({m[c] / small[c]:>5.1f}x)"
                                       for c in columns))


if __name__ == "__main__":
    sys.exit(main())
