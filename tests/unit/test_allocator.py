"""The watcher keeps big blocks in mmap (watcher/allocator.py), so freed texts go back to
the system instead of fragmenting the heap."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from watcher.allocator import HeapTrimmer, fix_mmap_threshold, malloc_trim

# In a process of its own: free a 4 MiB block (glibc then raises its threshold to 4 MiB),
# then allocate 300 KB and see whether that block was mmapped (mallinfo2's hblks).
PROBE = textwrap.dedent("""
    import ctypes, sys
    from watcher.allocator import fix_mmap_threshold
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    if sys.argv[1] == "fixed":
        fix_mmap_threshold()
    big = bytearray(4 * 1024 * 1024)
    del big
    before = libc.mallinfo2().hblks
    text = bytearray(300_000)
    print(libc.mallinfo2().hblks - before)
""")


def _mmapped_blocks(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    return int(out.stdout)


def test_the_threshold_is_taken_on_glibc() -> None:
    assert fix_mmap_threshold() is True


def test_a_big_block_stays_mmapped_after_a_bigger_one_was_freed() -> None:
    assert _mmapped_blocks("fixed") == 1
    assert _mmapped_blocks("default") == 0  # what glibc does on its own: from the heap


# In a process of its own: 64 KiB blocks from the heap, every tenth kept (holes between them),
# then VmRSS before and after one HeapTrimmer.after_flush.
TRIM_PROBE = textwrap.dedent("""
    from watcher.allocator import HeapTrimmer, fix_mmap_threshold
    def rss():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    fix_mmap_threshold()
    blocks = [bytearray(64 * 1024) for _ in range(3000)]
    kept = blocks[::10]
    del blocks
    before = rss()
    HeapTrimmer().after_flush()
    print(before - rss())
""")


def test_the_free_pages_between_kept_blocks_go_back_to_the_system() -> None:
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert int(out.stdout) > 100 * 1024  # KiB: most of the ~170 MiB freed between kept blocks


def test_the_heap_is_trimmed_at_most_once_per_interval() -> None:
    now = [0.0]
    trims: list[float] = []
    trimmer = HeapTrimmer(every=1.0, clock=lambda: now[0], trim=lambda: trims.append(now[0]))
    for t in (0.0, 0.2, 0.9, 1.0, 1.5, 2.2, 2.3):
        now[0] = t
        trimmer.after_flush()
    assert trims == [0.0, 1.0, 2.2] and trimmer.trims == 3
    assert malloc_trim() is not None  # glibc (Debian): the trim is real here
