"""IdMultimap: the name -> ids tables behave as a dict of ordered sets."""

from __future__ import annotations

import random

from watcher.multimap import IdMultimap


def test_one_id_is_kept_and_read_back_as_a_tuple():
    table = IdMultimap()
    table.add("web", "a")
    assert table.get("web") == ("a",)
    assert "web" in table and len(table) == 1
    assert table.get("other") == ()


def test_ids_keep_the_order_they_were_added_and_are_not_repeated():
    table = IdMultimap()
    for tid in ("b", "a", "b", "c", "a"):
        table.add("web", tid)
    assert table.get("web") == ("b", "a", "c")


def test_discarding_the_last_id_removes_the_key():
    table = IdMultimap()
    table.add("web", "a")
    table.add("web", "b")
    table.discard("web", "a")
    assert table.get("web") == ("b",)
    table.discard("web", "b")
    assert "web" not in table and table.get("web") == ()


def test_discarding_what_is_not_there_changes_nothing():
    table = IdMultimap()
    table.discard("web", "a")
    table.add("web", "a")
    table.discard("web", "b")
    table.add("web", "c")
    table.discard("web", "z")
    assert table.get("web") == ("a", "c") and list(table) == ["web"]


def test_random_operations_match_a_dict_of_ordered_sets():
    rng = random.Random(7)
    table = IdMultimap()
    model: dict[str, dict[str, None]] = {}
    for _ in range(5000):
        key, tid = rng.choice("xyz"), rng.choice("abcd")
        if rng.random() < 0.55:
            table.add(key, tid)
            model.setdefault(key, {})[tid] = None
        else:
            table.discard(key, tid)
            if key in model:
                model[key].pop(tid, None)
                if not model[key]:
                    del model[key]
        assert sorted(table) == sorted(model)
        for k in "xyz":
            assert table.get(k) == tuple(model.get(k, ()))
