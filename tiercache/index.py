"""The index: block key -> where the block lives, its checksum, pins, leases and sessions.

One dict, O(1) lookup, one small slotted record per block (about 200 bytes
with its key). A block is in the index only while at least one tier holds a
verified copy of it; an entry with no tier left is deleted at once.

Pins and leases are counts, so that several sessions (or clients) can protect
the same block: a block is evictable only when both are zero. Leases are held
by readers and writers in flight, on the entry (a connection's leases end with
it); pins are held by pinned sessions, on the key.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from tiercache.keys import BlockKey
from tiercache.tiers.disk import DiskRecord


@dataclass(slots=True)
class Entry:
    key: BlockKey
    array: str  # namespace array the block belongs to (ns/<namespace hex>)
    nbytes: int
    checksum: bytes = b""  # xxh3-128, set when the block is first written below host memory
    host_slot: int | None = None
    disk: DiskRecord | None = None
    leases: int = 0
    last_use: float = 0.0
    prefetched_at: float = 0.0  # monotonic time a prefetch promoted it; 0 once read
    remote: bool = False  # known to be in the shared tier (uploaded, or fetched from it)

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(
            t
            for t, here in (("host", self.host_slot is not None), ("disk", self.disk is not None))
            if here
        )

    @property
    def best_tier(self) -> str | None:
        return "host" if self.host_slot is not None else ("disk" if self.disk is not None else None)


@dataclass(slots=True)
class Session:
    """A named chat: the chain of keys it saved, and the protection it asked for."""

    id: str
    keys: list[BlockKey] = field(default_factory=list)
    pinned: bool = False
    pinned_keys: set[BlockKey] = field(
        default_factory=set
    )  # keys whose pin count this session holds
    expires: float | None = None  # wall-clock deadline (time.time()) set by a TTL; None: no TTL


class Index:
    def __init__(self) -> None:
        self._entries: dict[BlockKey, Entry] = {}
        self.sessions: dict[str, Session] = {}
        # Pin counts by key, held by pinned sessions (a key may be pinned before or after
        # its block is stored, and stays pinned if the block is dropped and saved again).
        self.pins: Counter[BlockKey] = Counter()

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

    def add(self, entry: Entry) -> None:
        self._entries[entry.key] = entry

    def drop_if_empty(self, entry: Entry) -> bool:
        """Remove ``entry`` if no tier holds it any more."""
        if entry.host_slot is None and entry.disk is None:
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
