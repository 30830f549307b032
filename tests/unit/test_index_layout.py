"""How the index shards are grouped into files (watcher.index_layout, pure)."""

from __future__ import annotations

import pytest

from watcher.index_layout import (COUNTS, GROUP_BYTES, group_count, group_name, groups, index_bytes,
                                  parse_group_name)
from watcher.render import SHARD_NAMES, Shard


@pytest.mark.parametrize("size, count", [
    (0, 1), (1, 1), (GROUP_BYTES, 1), (GROUP_BYTES + 1, 2), (3 * GROUP_BYTES, 4),
    (9 * GROUP_BYTES, 16), (64 * GROUP_BYTES, 64), (10_000 * GROUP_BYTES, 64)])
def test_a_new_layout_has_the_fewest_groups_of_at_most_group_bytes(size: int, count: int) -> None:
    assert group_count(size, None) == count


def test_the_layout_changes_only_past_twice_or_a_quarter_of_group_bytes() -> None:
    # Growing: 4 groups hold up to 8 GROUP_BYTES before more are made.
    assert group_count(8 * GROUP_BYTES, 4) == 4
    assert group_count(8 * GROUP_BYTES + 1, 4) == 16  # the fewest for the size, at once
    # Shrinking: 4 groups go down once they hold less than a quarter each.
    assert group_count(GROUP_BYTES, 4) == 4
    assert group_count(GROUP_BYTES - 1, 4) == 1
    assert group_count(0, 1) == 1 and group_count(10 ** 12, 64) == 64
    # Around a boundary, a few keys more or less change nothing.
    for size in range(2 * GROUP_BYTES - 100, 2 * GROUP_BYTES + 100):
        assert group_count(size, 2) == 2


def test_a_layout_on_disk_that_is_no_layout_is_replaced() -> None:
    assert group_count(GROUP_BYTES, 3) == 1
    assert group_count(GROUP_BYTES, 128) == 1


@pytest.mark.parametrize("count", COUNTS)
def test_groups_are_runs_of_consecutive_shards_covering_every_one_once(count: int) -> None:
    layout = groups(count)
    assert len(layout) == count
    assert [name for _, names in layout for name in names] == list(SHARD_NAMES)  # in order
    assert {len(names) for _, names in layout} == {64 // count}
    assert [group for group, _ in layout] == sorted(group for group, _ in layout)  # ls order
    assert all(group.startswith(".") and parse_group_name(group) == count for group, _ in layout)


def test_group_names_of_two_layouts_never_meet() -> None:
    names = [group for count in COUNTS for group, _ in groups(count)]
    assert len(names) == len(set(names)) == 127


@pytest.mark.parametrize("name", ["", ".g", ".g3.00", ".g4.04", ".g4.x", "g4.00", ".g4.00.link",
                                  ".g4.00.abcd.1", "A", ".data", ".g128.00"])
def test_other_names_are_no_group_files(name: str) -> None:
    assert parse_group_name(name) is None


def test_groups_of_a_count_that_is_no_layout_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="not 3"):
        groups(3)


def test_index_bytes_counts_every_block_of_every_shard() -> None:
    shards = {"A": Shard((b"SHA256:A1 x\n", b"SHA256:A2 yy\n"), 2), "b": Shard((b"SHA256:b1 z\n",), 1)}
    assert index_bytes(shards) == 12 + 13 + 12
    assert index_bytes({}) == 0
    assert group_name(16, 3) == ".g16.03"
