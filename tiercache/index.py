"""The index: block key -> where the block lives, its checksum, pins and leases.

One dict, O(1) lookup, one small slotted record per block (about 250 bytes with its key).
Where a block lives is one map on its entry, tier name -> location: the host slot (an
int), the disk record (``DiskRecord``); the device tier as ``True`` (it keeps its own slots), the
shared tier as the monotonic time the store was last known to hold the block (an object is named
by the key, and retention may delete it). A block is in the index only while host or disk
holds a verified copy of it (the device tier is a read cache over them and the shared tier
belongs to every daemon): an entry with neither is deleted at once.

Pins and leases are counts, so that several sessions (or clients) can protect the same
block: a block is evictable only when both are zero. Leases are held by readers and
writers in flight, on the entry (a connection's leases end with it), and counted only here
(``lease``/``unlease``, which refuses to go below zero); pins are held by pinned sessions,
on the key (``tiercache.sessions``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

from tiercache.errors import LeaseError
from tiercache.keys import BlockKey
from tiercache.tiers.disk import DiskRecord

DEVICE: Final = "device"
HOST: Final = "host"
DISK: Final = "disk"
REMOTE: Final = "remote"
TIERS: Final = (DEVICE, HOST, DISK, REMOTE)  # fastest first
LOCAL: Final = frozenset({HOST, DISK})  # the tiers whose copies keep an entry in the index

Location = int | DiskRecord | bool | float


@dataclass(slots=True)
class Entry:
    key: BlockKey
    array: str  # namespace array the block belongs to (ns/<namespace hex>)
    nbytes: int
    checksum: bytes = b""  # xxh3-128, set when the block is first written below host memory
    at: dict[str, Location] = field(default_factory=dict)  # tier -> location (module doc)
    leases: int = 0
    last_use: float = 0.0
    prefetched_at: float = 0.0  # monotonic time a prefetch promoted it; 0 once read

    @property
    def host_slot(self) -> int | None:
        slot = self.at.get(HOST)
        return slot if type(slot) is int else None  # never a bool (a flag of another tier)

    @property
    def disk(self) -> DiskRecord | None:
        rec = self.at.get(DISK)
        return rec if isinstance(rec, DiskRecord) else None

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(t for t in TIERS if t in self.at)

    @property
    def best_tier(self) -> str | None:
        """The fastest local tier that holds it (the device tier, a read cache, included)."""
        for t in (DEVICE, HOST, DISK):
            if t in self.at:
                return t
        return None


class Index:
    def __init__(self) -> None:
        self._entries: dict[BlockKey, Entry] = {}
        # Pin counts by key, held by pinned sessions (a key may be pinned before or after
        # its block is stored, and stays pinned if the block is dropped and saved again).
        self.pins: Counter[BlockKey] = Counter()
        # Told when a key's first pin comes or its last goes: the rooms take a pinned block
        # out of their policies' victims (``RetainingPolicy``), so pins cost the walk nothing.
        self.pin_changed: list[Callable[[BlockKey, bool], None]] = []

    def pin(self, key: BlockKey) -> None:
        self.pins[key] += 1
        if self.pins[key] == 1:
            for changed in self.pin_changed:
                changed(key, True)

    def unpin(self, key: BlockKey) -> None:
        self.pins[key] -= 1
        if self.pins[key] <= 0:
            del self.pins[key]
            for changed in self.pin_changed:
                changed(key, False)

    def evictable(self, entry: Entry) -> bool:
        return entry.leases == 0 and self.pins[entry.key] == 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def get(self, key: BlockKey) -> Entry | None:
        return self._entries.get(key)

    def drop_tier(self, key: BlockKey, tier: str) -> None:
        """``key``'s copy in ``tier`` is gone (a no-op for a key or copy not here)."""
        if (e := self._entries.get(key)) is not None:
            e.at.pop(tier, None)

    def add(self, entry: Entry) -> None:
        self._entries[entry.key] = entry

    def drop_if_empty(self, entry: Entry) -> bool:
        """Remove ``entry`` if no local tier holds it any more."""
        if LOCAL.isdisjoint(entry.at):
            self._entries.pop(entry.key, None)
            return True
        return False

    def prefix(self, keys: list[BlockKey]) -> list[Entry]:
        """Entries of the longest run of ``keys`` from the start that are all present."""
        out: list[Entry] = []
        for k in keys:
            e = self._entries.get(k)
            if e is None:
                break
            out.append(e)
        return out

    @staticmethod
    def lease(entries: Iterable[Entry]) -> None:
        """Protect ``entries`` from eviction until ``unlease`` (readers and writers in flight)."""
        for e in entries:
            e.leases += 1

    @staticmethod
    def unlease(entries: Iterable[Entry]) -> None:
        """End one lease of each of ``entries``; a lease ended twice is a LeaseError."""
        entries = list(entries)
        for e in entries:
            e.leases -= 1
        over = [e for e in entries if e.leases < 0]
        if over:
            for e in entries:  # undone: the counts stay as they were
                e.leases += 1
            raise LeaseError(
                f"{len(set(map(id, over)))} block(s) released more often than leased "
                f"(first {over[0].key.hex()[:16]}): a double release"
            )
