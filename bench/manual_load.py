"""How long a manual key file takes to load, from 1,000 to 100,000 lines.

Loads each size side by side in one run (parse + validate every line, render the index) and
prints the time and the cost per line relative to the smallest file, so the number that
matters -- does per-line cost stay flat? -- does not depend on how fast this machine is today.

    .venv/bin/python bench/manual_load.py [--sizes 1000,10000,100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from watcher.render import render  # noqa: E402
from watcher.sources.manual import ManualKeySource  # noqa: E402


class _Sink:
    def set_manual(self, lines):
        self.lines = lines

    def set_manual_status(self, status):
        self.status = status


def key_lines(count: int) -> bytes:
    """Distinct valid ed25519 lines, some with admin options, as users write them."""
    out = []
    for i in range(count):
        blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + os.urandom(32)
        options = f'permitopen="host-{i % 97}:22" ' if i % 3 == 0 else ""
        out.append(f"{options}ssh-ed25519 {base64.b64encode(blob).decode()} user{i}@bench")
    return ("\n".join(out) + "\n").encode()


def load_once(directory: Path) -> tuple[float, float, int]:
    """Seconds for the first load, seconds to reload after appending one line, lines served."""
    sink = _Sink()
    source = ManualKeySource(sink, directory)
    started = time.perf_counter()
    source.load()
    render([], ("*",), sink.lines)
    first = time.perf_counter() - started
    path = directory / "keys.pub"
    original = path.read_bytes()
    path.write_bytes(original + key_lines(1))
    started = time.perf_counter()
    source.load()
    rendered = render([], ("*",), sink.lines)
    reload = time.perf_counter() - started
    path.write_bytes(original)
    return first, reload, rendered.index.count("\n") - 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for size in sizes:
            d = Path(tmp) / str(size)
            d.mkdir()
            (d / "keys.pub").write_bytes(key_lines(size))
            dirs[size] = d
        firsts: dict[int, list[float]] = {size: [] for size in sizes}
        reloads: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(args.repeat):  # interleaved, so drift hits every size alike
            for size in sizes:
                first, reload, served = load_once(dirs[size])
                if served != size:
                    print(f"error: {size} lines gave {served} index lines", file=sys.stderr)
                    return 1
                firsts[size].append(first)
                reloads[size].append(reload)
    base = statistics.median(firsts[sizes[0]]) / sizes[0]
    base_reload = statistics.median(reloads[sizes[0]])
    print(f"{'lines':>8} {'load s':>8} {'us/line':>8} {'per-line vs ' + str(sizes[0]):>18} "
          f"{'reload after 1-line edit s':>27} {'reload vs ' + str(sizes[0]):>16}")
    for size in sizes:
        first = statistics.median(firsts[size])
        reload = statistics.median(reloads[size])
        print(f"{size:>8} {first:>8.3f} {first / size * 1e6:>8.1f} {first / size / base:>18.2f} "
              f"{reload:>27.3f} {reload / base_reload:>15.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
