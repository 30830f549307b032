"""The C allocator's policy for the watcher's heap: 100k small long-lived objects, and texts
of 16 KiB to 20 MiB (index blocks, the cache, status.json's rows) made and dropped on every
write."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Callable

M_MMAP_THRESHOLD = -3  # mallopt(3) parameter (glibc malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def fix_mmap_threshold() -> bool:
    """Keep blocks of MMAP_THRESHOLD and more in mmap, given back to the system when freed.

    glibc raises the threshold each time such a block is freed (up to 32 MiB), and from then
    on carves the big texts out of the heap, between long-lived small objects: freed, they
    leave holes the heap cannot give back. B6 at 100k targets: peak RSS 669 -> 518 MiB.
    Returns whether the allocator took it (False: not glibc, whose policy then applies)."""
    libc = _libc()
    try:
        return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except AttributeError:
        return False


def malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None where there is none."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    return (lambda: trim(0)) if trim is not None else None


class HeapTrimmer:
    """Gives the C heap's free pages back to the system after a flush, at most every `every`
    seconds (malloc_trim: whole free pages anywhere in the heap, not only at its top).

    Why: the blocks below the mmap threshold that flushes make and drop (index blocks of
    16-32 KiB, dict tables, lists) leave holes between long-lived blocks, which the heap
    keeps. After a load of 100k targets they were ~25 MiB of RSS; a trim took ~1.5 ms and
    gave them back (bench/ANALYSIS.md, round 16)."""

    def __init__(self, every: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 trim: Callable[[], object] | None = None) -> None:
        self.every = every
        self.clock = clock
        self.trim = trim if trim is not None else malloc_trim()
        self._next = 0.0
        self.trims = 0

    def after_flush(self) -> None:
        if self.trim is None:
            return
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.every
        self.trim()
        self.trims += 1
