"""Intrusive doubly linked lists: the order every eviction policy keeps, O(1) per change.

A ``Link`` is the record itself (a policy subclasses it with its own fields),
so moving a key to the back or out of the middle needs no search and no second
structure, as in vLLM's free-block queue. A list is circular around a sentinel.
An unlinked link keeps its old neighbours, so a walk that has just handed it
out carries on after the caller removes it, and skips links removed ahead of
it: ``victims()`` stays lazy and O(1) per step. The rejected alternative was ``OrderedDict``: O(1) too, but its
iteration breaks on any change, so a lazy victim walk had to copy it first
(O(N) per eviction).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from tiercache.keys import BlockKey


@dataclass(slots=True, eq=False)
class Link:
    key: BlockKey
    prev: Link = field(init=False, repr=False)
    next: Link = field(init=False, repr=False)
    owner: Links[Any] | None = field(default=None, init=False, repr=False)  # the list it is in

    def __post_init__(self) -> None:
        self.prev = self.next = self


L = TypeVar("L", bound=Link)


class Links(Generic[L]):
    """Oldest first: ``push`` appends at the back, victims are taken from the front."""

    __slots__ = ("_len", "_root")

    def __init__(self) -> None:
        self._root = Link(b"")  # the sentinel: never handed out
        self._len = 0

    def push(self, link: L) -> None:
        self.insert_before(link, self._root)

    def push_front(self, link: L) -> None:
        self.insert_before(link, self._root.next)

    def insert_before(self, link: L, ref: Link) -> None:
        """Put ``link`` just ahead of ``ref`` (a member, or the sentinel for the back)."""
        prev = ref.prev
        link.prev, link.next = prev, ref
        prev.next = ref.prev = link
        link.owner = self
        self._len += 1

    def unlink(self, link: L) -> None:
        link.prev.next = link.next
        link.next.prev = link.prev
        link.owner = None  # prev/next stay: a walk standing on it still finds its way on
        self._len -= 1

    def first(self) -> L | None:
        return None if self._root.next is self._root else cast(L, self._root.next)

    def after(self, link: L) -> L | None:
        """The member behind ``link`` (a member), or None at the end."""
        return None if link.next is self._root else cast(L, link.next)

    def resume(self, link: Link) -> L | None:
        """The first member at or behind ``link``, skipping links unlinked since; None at the
        end, or if the trail leads into another list (``link`` was moved there)."""
        while link is not self._root:
            if link.owner is self:
                return cast(L, link)
            if link.owner is not None:
                return None
            link = link.next
        return None

    def walk(self) -> Iterator[L]:
        """Front to back, live: a link unlinked before the walk reaches it is not given, and
        the caller may unlink the link it was just given."""
        link = self.first()
        while link is not None:
            nxt = link.next
            yield link
            link = self.resume(nxt)

    def __iter__(self) -> Iterator[BlockKey]:
        return (link.key for link in self.walk())

    def __len__(self) -> int:
        return self._len
