"""Least recently used: one intrusive list, oldest first; every step O(1).

It takes a block's parent and position and ignores them: LRU stays the plain
baseline the other policies are measured against.
"""

from __future__ import annotations

from collections.abc import Iterator

from tiercache.keys import BlockKey
from tiercache.policy.links import Link, Links


class LRUPolicy:
    name = "lru"

    def __init__(self) -> None:
        self._order: Links[Link] = Links()
        self._links: dict[BlockKey, Link] = {}

    def insert(self, key: BlockKey, parent: BlockKey | None = None, position: int = 0) -> None:
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = Link(key)
        else:
            self._order.unlink(link)
        self._order.push(link)

    def touch(self, key: BlockKey) -> None:
        link = self._links.get(key)
        if link is not None:
            self._order.unlink(link)
            self._order.push(link)

    def remove(self, key: BlockKey) -> None:
        link = self._links.pop(key, None)
        if link is not None:
            self._order.unlink(link)

    def victims(self) -> Iterator[BlockKey]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._links)
