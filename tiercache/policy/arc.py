"""Adaptive replacement cache (Megiddo & Modha, FAST '03), driven from outside.

T1 holds keys seen once recently, T2 keys seen at least twice; B1 and B2 are
ghost lists of keys recently evicted from each. A re-insert of a B1 ghost
means T1 was too small, so the target size of T1 grows; a B2 ghost shrinks
it. Victims come from T1 while it is above its target, else from T2. Scans of
one-time blocks (a long prompt nobody resumes) pass through T1 without flushing
the frequently resumed prefixes in T2, which is why it is offered beside LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from tiercache.keys import BlockKey


class ARCPolicy:
    name = "arc"

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks <= 0:
            raise ValueError("ARC needs a positive capacity in blocks")
        self.capacity = capacity_blocks
        self.target_t1 = 0.0
        self.t1: OrderedDict[BlockKey, None] = OrderedDict()
        self.t2: OrderedDict[BlockKey, None] = OrderedDict()
        self.b1: OrderedDict[BlockKey, None] = OrderedDict()
        self.b2: OrderedDict[BlockKey, None] = OrderedDict()

    def insert(self, key: BlockKey) -> None:
        if key in self.t1 or key in self.t2:
            self.touch(key)
            return
        if key in self.b1:
            self.target_t1 = min(
                self.capacity, self.target_t1 + max(1.0, len(self.b2) / len(self.b1))
            )
            del self.b1[key]
            self.t2[key] = None
        elif key in self.b2:
            self.target_t1 = max(0.0, self.target_t1 - max(1.0, len(self.b1) / len(self.b2)))
            del self.b2[key]
            self.t2[key] = None
        else:
            self.t1[key] = None

    def touch(self, key: BlockKey) -> None:
        if key in self.t1:
            del self.t1[key]
            self.t2[key] = None
        elif key in self.t2:
            self.t2.move_to_end(key)

    def remove(self, key: BlockKey) -> None:
        if key in self.t1:
            del self.t1[key]
            self._ghost(self.b1, key)
        elif key in self.t2:
            del self.t2[key]
            self._ghost(self.b2, key)

    def _ghost(self, ghosts: OrderedDict[BlockKey, None], key: BlockKey) -> None:
        ghosts[key] = None
        while len(self.b1) + len(self.b2) > self.capacity:
            (self.b1 if len(self.b1) >= len(self.b2) and self.b1 else self.b2).popitem(last=False)

    def victims(self) -> Iterator[BlockKey]:
        first, second = (self.t1, self.t2) if len(self.t1) > self.target_t1 else (self.t2, self.t1)
        return iter([*first, *second])

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2)
