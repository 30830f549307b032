"""The C allocator's policy for the watcher's heap: 100k small long-lived objects, and texts
of 100 KiB to 20 MiB (index shards, the cache, the hosts block) made and dropped on every
write."""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt(3) parameter (glibc malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept


def fix_mmap_threshold() -> bool:
    """Keep blocks of MMAP_THRESHOLD and more in mmap, given back to the system when freed.

    glibc raises the threshold each time such a block is freed (up to 32 MiB), and from then
    on carves the big texts out of the heap, between long-lived small objects: freed, they
    leave holes the heap cannot give back. B6 at 100k targets: peak RSS 669 -> 518 MiB.
    Returns whether the allocator took it (False: not glibc, whose policy then applies)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
