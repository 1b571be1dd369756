"""Adaptive replacement cache (Megiddo & Modha, FAST '03), driven from outside.

T1 holds keys seen once recently, T2 keys seen at least twice; B1 and B2 are
ghost lists of keys recently evicted from each. A re-insert of a B1 ghost
means T1 was too small, so the target size of T1 grows; a B2 ghost shrinks
it. Victims come from T1 while it is above its target, else from T2. Scans of
one-time blocks (a long prompt nobody resumes) pass through T1 without flushing
the frequently resumed prefixes in T2, which is why it is offered beside LRU.

The directory keeps the paper's bounds: when a new key enters T1, T1 + B1 stays
within c (B1's oldest ghost goes; with T1 full that is the victim just removed,
which the paper drops unghosted) and all four lists within 2c (B2's oldest
goes). The one difference from the paper is the order a tier imposes: it
evicts before it inserts, so a ghost hit adapts the target after its victim
was chosen (the paper adapts first); ``tests/policy/test_arc.py`` replays random
traces against the paper's algorithm in that order, victim for victim. c is what the
tier holds when full; a tier of blocks of several sizes says so as its mix changes
(``resize``, from ``room.DiskRoom``).

The four lists are intrusive (``links.py``): every step, victims included, is
O(1). A block's parent and position are taken and ignored (ARC is a baseline).
A pinned block (``retain(key, math.inf)``) leaves T1 or T2 until it is released
(``retain(key, None)``), when it goes back to the end of the list it left: pinned
blocks cost the walk nothing and are outside the adaptation.
"""

from __future__ import annotations

from collections.abc import Iterator

from tiercache.keys import BlockKey
from tiercache.policy.base import check_pin
from tiercache.policy.links import Link, Links


class ARCPolicy:
    name = "arc"

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks <= 0:
            raise ValueError("ARC needs a positive capacity in blocks")
        self.capacity = capacity_blocks
        self.target_t1 = 0.0
        self.t1: Links[Link] = Links()
        self.t2: Links[Link] = Links()
        self.b1: Links[Link] = Links()
        self.b2: Links[Link] = Links()
        self._links: dict[BlockKey, Link] = {}  # every key in any of the four lists, or held
        self._held: dict[Link, Links[Link]] = {}  # pinned -> the list (T1 or T2) it left

    def _move(self, link: Link, to: Links[Link]) -> None:
        if link.owner is not None:
            link.owner.unlink(link)
        to.push(link)

    def insert(self, key: BlockKey, parent: BlockKey | None = None, position: int = 0) -> None:
        link = self._links.get(key)
        if link is None:
            self._directory_room()
            self._links[key] = link = Link(key)
            self.t1.push(link)
        elif link.owner is self.t1 or link.owner is self.t2 or link in self._held:
            self.touch(key)  # held: stays held
        elif link.owner is self.b1:
            self.target_t1 = min(
                self.capacity, self.target_t1 + max(1.0, len(self.b2) / len(self.b1))
            )
            self._move(link, self.t2)
        else:
            self.target_t1 = max(0.0, self.target_t1 - max(1.0, len(self.b1) / len(self.b2)))
            self._move(link, self.t2)

    def touch(self, key: BlockKey) -> None:
        link = self._links.get(key)
        if link is not None and (link.owner is self.t1 or link.owner is self.t2):
            self._move(link, self.t2)

    def remove(self, key: BlockKey) -> None:
        link = self._links.get(key)
        if link is None:
            return
        if (left := self._held.pop(link, None)) is not None:
            left.push(link)  # a held block leaves as it would have from its list
        if link.owner is self.t1:
            self._ghost(link, self.b1)
        elif link.owner is self.t2:
            self._ghost(link, self.b2)

    def _ghost(self, link: Link, ghosts: Links[Link]) -> None:
        assert link.owner is not None
        link.owner.unlink(link)  # a fresh link for the ghost: a walk standing on this one walks on
        self._links[link.key] = ghost = Link(link.key)
        ghosts.push(ghost)
        self._trim()

    def _trim(self) -> None:
        # A tier holding more blocks than ``capacity`` (resized down while its blocks leave)
        # still keeps the directory within 2c: the oldest ghost of the longer list goes.
        while len(self._links) > 2 * self.capacity and (self.b1 or self.b2):
            self._forget(self.b1 if len(self.b1) >= len(self.b2) else self.b2)

    def resize(self, capacity_blocks: int) -> None:
        """The tier holds ``capacity_blocks`` when full from now on (its mix of block sizes
        changed): the target stays within it, and the ghosts within the paper's bounds, T1 +
        B1 <= c and the directory <= 2c (the oldest ghosts go)."""
        if capacity_blocks <= 0:
            raise ValueError("ARC needs a positive capacity in blocks")
        self.capacity = capacity_blocks
        self.target_t1 = min(self.target_t1, capacity_blocks)
        while len(self.t1) + len(self.b1) > capacity_blocks and self.b1:
            self._forget(self.b1)
        self._trim()

    def _directory_room(self) -> None:
        """ARC's case IV, before a new key enters T1: L1 = T1 + B1 stays within c (its oldest
        ghost goes; with T1 full that is the T1 victim just removed, as the paper drops it
        unghosted) and the whole directory within 2c (the oldest B2 ghost goes)."""
        if len(self.t1) + len(self.b1) >= self.capacity and self.b1:
            self._forget(self.b1)
        if len(self._links) >= 2 * self.capacity and (self.b1 or self.b2):
            self._forget(self.b2 if self.b2 else self.b1)

    def _forget(self, ghosts: Links[Link]) -> None:
        oldest = ghosts.first()
        assert oldest is not None
        ghosts.unlink(oldest)
        del self._links[oldest.key]

    def retain(self, key: BlockKey, seconds: float | None) -> None:
        """Pin ``key`` (``math.inf``) or release it (``None``); ghosts and unknown keys are
        ignored."""
        link = self._links.get(key)
        if link is None:
            return
        check_pin(self.name, seconds)
        if seconds is not None and (link.owner is self.t1 or link.owner is self.t2):
            self._held[link] = link.owner
            link.owner.unlink(link)
        elif seconds is None and (left := self._held.pop(link, None)) is not None:
            left.push(link)

    def victims(self) -> Iterator[BlockKey]:
        first, second = (self.t1, self.t2) if len(self.t1) > self.target_t1 else (self.t2, self.t1)
        return self._walk(first, second)

    @staticmethod
    def _walk(first: Links[Link], second: Links[Link]) -> Iterator[BlockKey]:
        yield from first
        yield from second

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2) + len(self._held)
