"""A name -> ids table for the per-target indexes the reconciler keeps at 100k targets."""

from __future__ import annotations

from collections.abc import Iterator


class IdMultimap:
    """key -> the ids that have it, in the order they were added.

    Almost every key has one id: that id is stored as itself, and a tuple only when there
    are more. A set or a 1-tuple per key would cost 50-200 bytes more each, and these
    tables have several keys per target (100k targets: ~500k keys)."""

    __slots__ = ("_table",)

    def __init__(self) -> None:
        self._table: dict[str, str | tuple[str, ...]] = {}

    def get(self, key: str) -> tuple[str, ...]:
        ids = self._table.get(key)
        if ids is None:
            return ()
        return (ids,) if isinstance(ids, str) else ids

    def add(self, key: str, id_: str) -> None:
        ids = self._table.get(key)
        if ids is None:
            self._table[key] = id_
        elif isinstance(ids, str):
            if ids != id_:
                self._table[key] = (ids, id_)
        elif id_ not in ids:
            self._table[key] = (*ids, id_)

    def discard(self, key: str, id_: str) -> None:
        ids = self._table.get(key)
        if ids is None:
            return
        if isinstance(ids, str):
            if ids == id_:
                del self._table[key]
            return
        rest = tuple(i for i in ids if i != id_)
        if len(rest) == len(ids):
            return
        self._table[key] = rest[0] if len(rest) == 1 else rest

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)
