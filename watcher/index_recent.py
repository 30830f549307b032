"""The index's file of recent changes (pure).

Under churn at 100k keys a flush changes a few lines in nearly every one of the index's 64
group files, and rewriting them all (~24 MB) was ~35% of the loop's CPU (bench/ANALYSIS.md,
round 19). Instead, a flush writes one small file, RECENT_NAME, with the current lines of
every key changed since the group files were last written, sorted by fingerprint like a
group. sshd's keys command looks a fingerprint up there first: a key found there is
answered from there alone (a key that lost every line has one line "<fingerprint> #", a
comment sshd skips); any other key from its group file, which still holds its lines. The
groups are written again, and the file removed, once it holds a RECENT_SHARE-th of the
index or the index has been quiet for a while (the writer decides).

A reader opens this file before the group file, and a writer replaces the groups before it
removes this file: whichever versions a lookup meets, it gets a key's lines as one write or
a later one left them.
"""

from __future__ import annotations

import bisect
from .render import index_shard

RECENT_NAME = ".recent"
"""The file of recent changes in the index directory (hidden, like the group files)."""

RECENT_QUIET = 1.0
"""Seconds without an index write after which the groups take in the file's keys (the
supervisor's heartbeat does it, every 2 s), so that a quiet index costs a login one `look`."""

RECENT_SHARE = 16
"""The groups are written again once this file holds a RECENT_SHARE-th of the index's
bytes: a flush then writes at most that much here, and the groups at most once per that
much churn."""

GONE = b" #\n"
"""What follows the fingerprint of a key that lost every line: a comment for sshd."""

LEAST_BYTES = len("SHA256:") + 43 + len(GONE)
"""The fewest bytes a key takes in the file (a SHA256 fingerprint and GONE)."""


class RecentLines:
    """Fingerprint -> its lines now (index lines, or its GONE line), for the keys changed
    since the groups were written; kept sorted, so the file is a join."""

    def __init__(self) -> None:
        self._parts: dict[bytes, bytes] = {}
        self._order: list[bytes] = []  # the fingerprints, sorted
        self.size = 0  # bytes of the file

    def __bool__(self) -> bool:
        return bool(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def note(self, fingerprint: str, part: bytes) -> None:
        """`fingerprint`'s lines now, as in the index (b"": it has none)."""
        fp = fingerprint.encode()
        line = part or fp + GONE
        old = self._parts.get(fp)
        if old is None:
            bisect.insort(self._order, fp)
        else:
            self.size -= len(old)
        self._parts[fp] = line
        self.size += len(line)

    def data(self) -> bytes:
        """The file's bytes."""
        return b"".join(map(self._parts.__getitem__, self._order))

    def shards(self) -> set[str]:
        """The shard names of the keys held: what the groups must be written again for."""
        return {index_shard(fp.decode()) for fp in self._order}

    def full(self, index_bytes: int, more: int = 0, per_key: int = LEAST_BYTES) -> bool:
        """Whether the groups are due to be written again (see RECENT_SHARE); with `more`
        keys still to note at `per_key` bytes each, whether they would be. A churn flush at
        1k keys changes more than a sixteenth of the index: looking its keys up first, to
        write the groups anyway, was ~0.015 ms of CPU per event (bench/ANALYSIS.md, round 19)."""
        return (self.size + more * per_key) * RECENT_SHARE > index_bytes

    def clear(self) -> None:
        self._parts.clear()
        self._order.clear()
        self.size = 0


def key_bytes(index_bytes: int, lines: int) -> int:
    """What a changed key is taken to add to the file: a restart removes one key (its GONE
    line) and adds another (an index line of average size)."""
    return (LEAST_BYTES + index_bytes // max(1, lines)) // 2


def overlay(base: bytes, recent: bytes) -> bytes:
    """The index as the keys command answers it: `base` (the group files' lines, sorted)
    with every fingerprint `recent` holds answered from `recent` alone (GONE lines
    dropped). For readers that want the whole index (tests, benchmarks, `read_index`)."""
    if not recent:
        return base
    lines = recent.splitlines(keepends=True)
    held = {_fp(line) for line in lines}
    kept = [line for line in base.splitlines(keepends=True) if _fp(line) not in held]
    kept += (line for line in lines if not line.endswith(GONE))
    kept.sort(key=_fp)  # stable: a key's lines keep their order
    return b"".join(kept)


def _fp(line: bytes) -> bytes:
    return line[:line.index(b" ")]

