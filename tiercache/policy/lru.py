"""Least recently used: one intrusive list, oldest first; every step O(1).

It takes a block's parent and position and ignores them: LRU stays the plain
baseline the other policies are measured against. A pinned block (``retain(key,
math.inf)``) leaves the list until it is released (``retain(key, None)``), when it
goes back as just used: pinned blocks cost the walk nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

from tiercache.keys import BlockKey
from tiercache.policy.base import check_pin
from tiercache.policy.links import Link, Links


class LRUPolicy:
    name = "lru"

    def __init__(self) -> None:
        self._order: Links[Link] = Links()
        self._links: dict[BlockKey, Link] = {}
        self._held: set[BlockKey] = set()  # pinned: out of the order until released

    def insert(self, key: BlockKey, parent: BlockKey | None = None, position: int = 0) -> None:
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = Link(key)
        elif key in self._held:
            return
        else:
            self._order.unlink(link)
        self._order.push(link)

    def touch(self, key: BlockKey) -> None:
        link = self._links.get(key)
        if link is not None and key not in self._held:
            self._order.unlink(link)
            self._order.push(link)

    def remove(self, key: BlockKey) -> None:
        link = self._links.pop(key, None)
        self._held.discard(key)
        if link is not None and link.owner is not None:
            self._order.unlink(link)

    def retain(self, key: BlockKey, seconds: float | None) -> None:
        """Pin ``key`` (``math.inf``) or release it (``None``); unknown keys are ignored."""
        link = self._links.get(key)
        if link is None:
            return
        check_pin(self.name, seconds)
        if seconds is not None and key not in self._held:
            self._held.add(key)
            self._order.unlink(link)
        elif seconds is None and key in self._held:
            self._held.discard(key)
            self._order.push(link)

    def victims(self) -> Iterator[BlockKey]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._links)
