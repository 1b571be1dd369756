"""Least recently used: one ordered dict, oldest first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from tiercache.keys import BlockKey


class LRUPolicy:
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[BlockKey, None] = OrderedDict()

    def insert(self, key: BlockKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: BlockKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: BlockKey) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[BlockKey]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)
