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
  every later line: each keeps its object and gets its new number in place (LineNumber),
  which is the one part of this edit that grows with the file.
  The last column is the floor every edit pays: reading the file. Each timing starts after
  a garbage collection, so one owed to earlier work is not charged to it;
* end to end, what a user sees: from the edited file written to the index shard that
  serves the new line written, through the real pipeline (the watchdog-driven
  ManualKeySource, the Reconciler's loop and the OutputWriter, files in a temporary
  directory), for the same three edits. This includes the source's settle (0.1 s) and the
  reconciler's debounce (0.1 s), which every size pays alike.

    .venv/bin/python bench/manual_load.py [--sizes 1000,10000,100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import threading
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from watcher.app import OutputWriter, Paths  # noqa: E402
from watcher.config import RunMode, Settings  # noqa: E402
from watcher.reconcile import Reconciler  # noqa: E402
from watcher.render import Rendered, render  # noqa: E402
from watcher.sshd import SshdPaths  # noqa: E402
from watcher.sources.manual import ManualKeySource  # noqa: E402
from watcher.targets import ProxyIdentity  # noqa: E402

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


def fingerprint(line: bytes) -> str:
    blob = base64.b64decode(line.split()[-2])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class Pipeline:
    """The real manual-key path for one key directory: source thread, reconciler loop,
    writer; `until` waits for a fingerprint to be written to (or gone from) the index."""

    def __init__(self, root: Path) -> None:
        self.keys_dir = root / "keys.d"
        self.keys_dir.mkdir()
        paths = Paths(cache=root / "cache", hosts=root / "hosts", access_log=root / "access.log",
                      status=root / "status.json", keys_dir=self.keys_dir,
                      sshd=SshdPaths(index_dir=root / "index.d"))
        self.writer = OutputWriter(paths, RunMode.MANUAL, pin_names=False)
        self.rec = Reconciler(Settings(mode=RunMode.MANUAL), ProxyIdentity(), lambda t: None,
                              self._write, pin_names=False)
        self.source = ManualKeySource(self.rec, self.keys_dir)
        self.cond = threading.Condition()
        self.want: tuple[str, bool] | None = None
        self.reached: float | None = None
        self.stop = threading.Event()

    def _write(self, rendered: Rendered) -> bool:
        changed = self.writer(rendered)
        done = time.perf_counter()
        with self.cond:
            if self.want is not None and (self.want[0] in rendered.owners) == self.want[1]:
                self.reached = done  # the first write that has it (or no longer has it)
                self.want = None
                self.cond.notify_all()
        return changed

    def start(self) -> None:
        for target in (self.rec.run, self.source.run):
            threading.Thread(target=target, args=(self.stop,), daemon=True).start()

    def expect(self, fp: str, present: bool) -> None:
        """Watch the writes for `fp` becoming served (present) or withdrawn; call before
        the change that causes it."""
        with self.cond:
            self.want = (fp, present)
            self.reached = None

    def until(self, deadline: float = 60) -> float:
        """perf_counter of the write that made the expected change."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.reached is not None, deadline):
                raise SystemExit(f"error: {self.want} not written within {deadline} s")
            assert self.reached is not None
            return self.reached


def end_to_end(sizes: list[int], contents: dict[int, list[bytes]], repeat: int,
               root: Path) -> dict[int, dict[str, float]]:
    pipes = {}
    for size in sizes:
        (root / f"e2e-{size}").mkdir()
        pipe = Pipeline(root / f"e2e-{size}")
        _write(pipe.keys_dir / FILE, contents[size])
        pipe.expect(fingerprint(contents[size][-1]), True)
        pipe.start()
        pipe.until(deadline=300)
        pipes[size] = pipe
    times: dict[int, dict[str, list[float]]] = {s: {e.name: [] for e in EDITS} for s in sizes}
    try:
        for _ in range(repeat):
            for size in sizes:
                pipe, lines = pipes[size], contents[size]
                for edit in EDITS:
                    edited, at = edit.apply(lines)
                    new = fingerprint(edited[-1 if at is None else at])
                    gc.collect()
                    pipe.expect(new, True)
                    _write(pipe.keys_dir / FILE, edited)
                    written = time.perf_counter()
                    times[size][edit.name].append(pipe.until() - written)
                    pipe.expect(new, False)
                    _write(pipe.keys_dir / FILE, lines)
                    pipe.until()
                    time.sleep(0.3)  # the next edit is a new event, not part of this one
    finally:
        for pipe in pipes.values():
            pipe.stop.set()
    return {s: {c: statistics.median(v) for c, v in t.items()} for s, t in times.items()}


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
        report_end_to_end(sizes, end_to_end(sizes, contents, args.repeat, Path(tmp)))
    return 0


def report_end_to_end(sizes: list[int], median: dict[int, dict[str, float]]) -> None:
    small = median[sizes[0]]
    print(f"\nend to end, edited file written -> index shard written (median of the repeats): "
          f"ms (ratio to {sizes[0]} lines)")
    columns = [e.name for e in EDITS]
    print(f"{'lines':>8} " + " ".join(f"{c:>17}" for c in columns))
    for size in sizes:
        m = median[size]
        print(f"{size:>8} " + " ".join(f"{m[c] * 1e3:>9.1f} ({m[c] / small[c]:>5.2f}x)" for c in columns))


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
