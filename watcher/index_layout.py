"""How the 64 index shards are grouped into files on disk (pure).

sshd's keys command opens the shard named by a fingerprint's first character; each shard
name is a link to its group's file, which holds the lines of a run of consecutive shards
(so it is sorted too, and `look` finds a fingerprint in it as in the shard alone). Few
groups while the index is small, one per shard at 100k keys: a churn flush at 1k keys
changed ~50 of 64 shards of ~4 KB, and the ~9 system calls of each file written were
~30% of the loop's CPU (bench/ANALYSIS.md, round 17); one file of ~250 KB costs one write.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping

from .render import SHARD_NAMES, Shard

GROUP_BYTES = 256 * 1024
"""A group's size aimed at: the fewest groups (powers of two, up to one per shard) that
hold the index in files of at most this many bytes."""

COUNTS = tuple(2 ** n for n in range(7))  # 1 .. 64 groups: each a whole number of shards
_GROUP_NAME = re.compile(r"\.g([0-9]+)\.([0-9]+)")


def group_count(index_bytes: int, current: int | None) -> int:
    """How many groups an index of `index_bytes` is written in, given the layout on disk
    (`current`; None: none yet). The layout changes only when its groups are more than
    twice, or less than a quarter of, GROUP_BYTES: an index that grows and shrinks by a
    few keys around a boundary does not rewrite every file back and forth."""
    ideal = next((count for count in COUNTS if index_bytes <= count * GROUP_BYTES), COUNTS[-1])
    if current not in COUNTS:
        return ideal
    if index_bytes > 2 * current * GROUP_BYTES or index_bytes * 4 < current * GROUP_BYTES:
        return ideal
    return current


def index_bytes(shards: Mapping[str, Shard]) -> int:
    """The size of the index these shards make."""
    return sum(len(block) for shard in shards.values() for block in shard.blocks)


def group_name(count: int, number: int) -> str:
    """The file (a link to its current version) of group `number` of `count`: hidden, so
    that `ls` of the index directory shows the shard names."""
    return f".g{count}.{number:02d}"


def parse_group_name(name: str) -> int | None:
    """The group count a group file's name belongs to (None: not a group file's name)."""
    match = _GROUP_NAME.fullmatch(name)
    if match is None or int(match[1]) not in COUNTS or int(match[2]) >= int(match[1]):
        return None
    return int(match[1])


@functools.cache
def groups(count: int) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(group file, its shard names in order) of a layout of `count` groups, in order."""
    if count not in COUNTS:
        raise ValueError(f"an index is written in 1, 2, 4 ... 64 groups, not {count}")
    per = len(SHARD_NAMES) // count
    return tuple((group_name(count, n), SHARD_NAMES[n * per:(n + 1) * per]) for n in range(count))
