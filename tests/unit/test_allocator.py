"""The watcher keeps big blocks in mmap (watcher/allocator.py), so freed texts go back to
the system instead of fragmenting the heap."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from watcher.allocator import fix_mmap_threshold

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
