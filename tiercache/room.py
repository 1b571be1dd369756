"""Room-making: a tier's pool of space with the eviction policy that orders its blocks.

``HostRoom`` is the host arena's slots, ``DiskRoom`` the disk tier's bytes. Each tells its
policy what entered, was used or left, and when asked for room walks the policy's victims,
skipping what may not go (pinned or leased: ``Index.evictable``), and frees them. A host
victim that no lower tier holds yet (write-back) is written to disk first, so eviction
never loses a block the disk tier has room for. The policies only order keys
(``tiercache.policy``); nothing here branches on a policy's name.

Everything here runs under the cache lock (``tiercache.lock``). The write-back of dirty
host victims is the one disk write made under it, on purpose: the victims' slots are handed
to the caller as soon as this returns, so their bytes must be on disk first, and the index
must not change between choosing a victim and freeing it. Batching (``make_room``) makes
that one journal record for a whole save, not one per block.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

from tiercache.errors import NoRoom
from tiercache.index import DISK, HOST, Entry, Index
from tiercache.keys import BlockKey
from tiercache.lock import CacheLock
from tiercache.policy.base import EvictionPolicy, RetainingPolicy, SizedPolicy, make_policy
from tiercache.stats import Stats
from tiercache.tiers.disk import DiskFull, DiskRecord, DiskTier, StoreError
from tiercache.tiers.host import ArenaFull, HostArena

log = logging.getLogger(__name__)

Gone = Callable[[Entry], None]  # called when a tier let go of an entry (the manager's cleanup)


class DiskRoom:
    """The disk tier's bytes and their eviction order."""

    def __init__(
        self, disk: DiskTier, eviction: str, index: Index, lock: CacheLock, stats: Stats, gone: Gone
    ) -> None:
        self.disk = disk
        self._eviction = eviction
        self._index = index
        self._lock = lock
        self._stats = stats
        self._gone = gone
        self.policy: EvictionPolicy | None = None
        index.pin_changed.append(self._pin_changed)
        if disk.records:
            self.policy = make_policy(eviction, blocks_at_budget(disk, 0))
            for rec in disk.records:
                index.add(Entry(rec.key, rec.array, rec.nbytes, rec.checksum, at={DISK: rec}))
                self._order.insert(rec.key)

    @property
    def _order(self) -> EvictionPolicy:
        assert self.policy is not None, "a namespace registers before any disk block moves"
        return self.policy

    def prepare(self, block_nbytes: int) -> None:
        """Make the policy, sized from the first namespace's block until the tier holds
        blocks (then from their mix: ``_room``)."""
        if self.policy is None:
            self.policy = make_policy(self._eviction, blocks_at_budget(self.disk, block_nbytes))

    def touch(self, e: Entry) -> None:
        if DISK in e.at:
            self._order.touch(e.key)

    def _pin_changed(self, key: BlockKey, pinned: bool) -> None:
        e = self._index.get(key)
        if e is not None and DISK in e.at:
            hold(self.policy, key, pinned)

    def drop(self, e: Entry) -> None:
        """Under the lock: free ``e``'s disk copy (evicted, failed verification or deleted)."""
        rec = e.disk
        assert rec is not None
        self.disk.discard(rec)
        del e.at[DISK]
        self._order.remove(e.key)
        self._gone(e)

    def forget_corrupt(self, failed: list[tuple[Entry, DiskRecord]]) -> None:
        """Under the lock: drop disk copies that failed verification (counted, never served)."""
        self._lock.held()
        for e, rec in failed:
            self._stats.corrupt()
            if e.disk is rec:
                self.drop(e)

    def _room(self, nbytes: int, keep: set[BlockKey]) -> bool:
        if self.disk.has_room(nbytes):
            return True
        if isinstance(self.policy, SizedPolicy):  # the tier is full: it holds this many
            self.policy.resize(blocks_at_budget(self.disk, 0))
        for key in self._order.victims():
            e = self._index.get(key)
            if e is None or key in keep or DISK not in e.at or not self._index.evictable(e):
                continue
            self.drop(e)
            self._stats.evicted(DISK)
            if self.disk.has_room(nbytes):
                return True
        return False

    async def fit_budget(self) -> int:
        """Under the lock, at open: evict down to the tier's byte budget, which may have been
        lowered since the store was written (else the tier stayed over it, and said so in its
        metrics, until a write made room); returns how many blocks went. Pinned blocks stay."""
        before = self.disk.num_blocks
        if not self._room(0, set()):
            log.warning(
                "disk tier holds %d B of pinned or in-use blocks, over its budget of %d B: "
                "unpin sessions or raise [tiers.disk] bytes",
                self.disk.used_bytes,
                self.disk.capacity_bytes,
            )
        gone = before - self.disk.num_blocks
        if gone:
            log.info(
                "disk tier over its budget of %d B: evicted %d blocks",
                self.disk.capacity_bytes,
                gone,
            )
            await self._sync_quietly("disk tier budget at open")
        return gone

    async def drop_all(self, entries: list[Entry]) -> None:
        """Under the lock: remove ``entries`` from disk and make it durable. On a full or
        failing disk the blocks are still gone from the index; their slots stay unused until
        the del records can be written."""
        for e in entries:
            self.drop(e)
        await self._sync_quietly("evict")

    async def _sync_quietly(self, what: str) -> None:
        """Sync the journal where the caller's own work is done whatever the disk says: a
        full or failing disk is counted and logged (``what`` it was for), not raised; the
        records stay pending for the next sync."""
        try:
            await self.disk.sync_journal()
        except (DiskFull, StoreError) as err:
            self._stats.error("disk_full" if isinstance(err, DiskFull) else "disk_write")
            log.warning("%s: %s", what, err)

    async def flush(
        self, host: HostArena, keys: Iterable[BlockKey] | None = None, quiet: bool = False
    ) -> int:
        """Under the lock: write every host-only block (of ``keys``, default all) here and
        sync the journal (``quiet``: a pin's or a close's flush, whose failure is counted and
        logged, not raised: ``_sync_quietly``); returns the bytes written."""
        some = self._index if keys is None else (e for k in keys if (e := self._index.get(k)))
        dirty = [e for e in some if HOST in e.at and DISK not in e.at]
        self._index.lease(dirty)
        try:
            written = await self.write(dirty, host) if dirty else 0
        finally:
            self._index.unlease(dirty)
        if quiet:
            await self._sync_quietly("host blocks not all on disk")
        else:
            await self.disk.sync_journal()
        return written

    async def write(self, entries: list[Entry], host: HostArena) -> int:
        """Under the lock: copy host-resident ``entries`` to disk, evicting disk blocks for
        room (never one of ``entries``); returns the bytes written."""
        self._lock.held()
        t0 = time.perf_counter()
        by_array: dict[str, list[Entry]] = {}
        keep = {e.key for e in entries}
        for e in entries:
            if DISK not in e.at and e.host_slot is not None:
                by_array.setdefault(e.array, []).append(e)
        written = 0
        for array, group in by_array.items():
            fits: list[Entry] = []
            for e in group:
                if not self._room(e.nbytes * (len(fits) + 1), keep):
                    self._stats.error("disk_full")
                    break
                fits.append(e)
            items = [
                (e.key, host.view(s, e.nbytes)) for e in fits if (s := e.host_slot) is not None
            ]
            results = await self.disk.put_many(array, items)
            for e, res in zip(fits, results, strict=True):
                if isinstance(res, DiskRecord):
                    # The checksum is taken when a block first leaves memory (in the disk
                    # tier's I/O threads): it guards the copies that can tear or rot, and
                    # keeps a host save at memcpy speed.
                    e.checksum = res.checksum
                    e.at[DISK] = res
                    self._order.insert(e.key)
                    if self._index.pins[e.key]:
                        hold(self.policy, e.key, True)
                    written += e.nbytes
                elif isinstance(res, DiskFull):
                    self._stats.error("disk_full")
                else:
                    self._stats.error("disk_write")
                    log.warning("disk write failed: %s", res)
        if written:
            self._stats.transfer(HOST, DISK, written, time.perf_counter() - t0)
        return written


class HostRoom:
    """The host arena's slots and their eviction order; dirty victims go to ``disk`` first."""

    def __init__(
        self,
        arena: HostArena,
        eviction: str,
        index: Index,
        lock: CacheLock,
        stats: Stats,
        gone: Gone,
        disk: DiskRoom | None,
    ) -> None:
        self.arena = arena
        self._eviction = eviction
        self._index = index
        self._lock = lock
        self._stats = stats
        self._gone = gone
        self._disk = disk
        self.policy: EvictionPolicy | None = None
        # The bytes of the blocks in the slots: under the slots' bytes when a namespace's
        # blocks are smaller than the slots (sized by another namespace, or slot_bytes).
        self.kv_bytes = 0
        index.pin_changed.append(self._pin_changed)

    def format(self, slot_bytes: int) -> None:
        """Carve the arena into slots of ``slot_bytes`` (once: the first namespace's block)."""
        self.arena.format(slot_bytes)
        self.policy = make_policy(self._eviction, self.arena.num_slots)

    @property
    def _order(self) -> EvictionPolicy:
        assert self.policy is not None, "the host arena is formatted before any block moves"
        return self.policy

    def place(
        self,
        e: Entry,
        slot: int | None = None,
        parent: BlockKey | None = None,
        position: int = 0,
    ) -> None:
        """Under the lock: ``e``'s bytes are in ``slot`` now (default: the slot it reserved).
        ``parent`` (the block before it in its chain) and ``position`` (its first token's place
        in the prompt) are for policies that trim chains from their end and weigh prefill cost."""
        if slot is not None:
            e.at[HOST] = slot
        assert e.host_slot is not None
        self._order.insert(e.key, parent, position)
        self.kv_bytes += e.nbytes
        if self._index.pins[e.key]:
            hold(self.policy, e.key, True)

    def touch(self, e: Entry) -> None:
        if HOST in e.at:
            self._order.touch(e.key)

    def _pin_changed(self, key: BlockKey, pinned: bool) -> None:
        e = self._index.get(key)
        if e is not None and HOST in e.at:
            hold(self.policy, key, pinned)

    def drop(self, e: Entry) -> None:
        """Under the lock: free ``e``'s host slot (its bytes are elsewhere, or let go)."""
        slot = e.host_slot
        assert slot is not None
        self.arena.free(slot)
        del e.at[HOST]
        self._order.remove(e.key)
        self.kv_bytes -= e.nbytes
        self._gone(e)

    def _victims(self, n: int) -> list[Entry]:
        out: list[Entry] = []
        for key in self._order.victims():
            if len(out) == n:
                break
            e = self._index.get(key)
            if e is not None and self._index.evictable(e) and HOST in e.at:
                out.append(e)
        return out

    async def _evict(self, victims: list[Entry]) -> None:
        dirty = [e for e in victims if DISK not in e.at]
        if dirty and self._disk is not None:
            await self._disk.write(dirty, self.arena)
        for e in victims:
            self.drop(e)
            self._stats.evicted(HOST)

    async def slot(self) -> int:
        """Under the lock: a free host slot, evicting (and writing back) one block if needed."""
        self._lock.held()
        try:
            return self.arena.allocate()
        except ArenaFull:
            pass
        victims = self._victims(1)
        if not victims:
            raise NoRoom(
                f"host tier is full: all {self.arena.num_slots} slots hold pinned or in-use "
                "blocks; unpin a session or raise [tiers.host] bytes"
            )
        await self._evict(victims)
        return self.arena.allocate()

    async def slot_or_none(self) -> int | None:
        """``slot``, or None when every slot holds a pinned or in-use block."""
        try:
            return self.arena.allocate()  # the common case, without a second coroutine
        except ArenaFull:
            pass
        try:
            return await self.slot()
        except NoRoom:
            return None

    async def make_room(self, n: int) -> None:
        """Under the lock: free host slots for ``n`` new blocks in one go, writing the dirty
        victims back to disk in one batch (one journal record, not one per block)."""
        self._lock.held()
        need = n - self.arena.free_slots
        if need > 0:
            await self._evict(self._victims(need))


def blocks_at_budget(disk: DiskTier, block_nbytes: int) -> int:
    """How many blocks ``disk`` holds at its byte budget: at the mix of block sizes it holds
    (namespaces of several models, a model's KV cache groups), or, empty, blocks of
    ``block_nbytes``. Sized by one namespace's block alone, the policy's bounds (ARC's ghost
    lists and target, the prefix policy's ghosts and counting window) were off by the ratio
    of the sizes: sized by big blocks on a tier of small ones, ARC kept no ghost at all and
    never adapted."""
    if disk.used_bytes > 0:
        return max(1, disk.num_blocks * disk.capacity_bytes // disk.used_bytes)
    return max(1, disk.capacity_bytes // max(1, block_nbytes))


def hold(policy: EvictionPolicy | None, key: BlockKey, pinned: bool) -> None:
    """Take a pinned block out of ``policy``'s victims, or put it back: a policy that can
    (``RetainingPolicy``; all of tiercache's) then walks no pinned block, where the walk
    passed over each one (``Index.evictable``, still checked) on every eviction."""
    if isinstance(policy, RetainingPolicy):
        policy.retain(key, math.inf if pinned else None)


async def evict_keys(
    keys: Iterable[BlockKey], index: Index, host: HostRoom, disk: DiskRoom | None
) -> int:
    """Under the lock: remove the blocks of ``keys`` from host and disk (an evict by keys or
    by session), pinned and leased ones kept; returns how many went. A key given twice is
    one block, dropped once."""
    gone = [e for k in dict.fromkeys(keys) if (e := index.get(k)) and index.evictable(e)]
    for e in gone:
        if HOST in e.at:
            host.drop(e)
    if disk is not None:
        await disk.drop_all([e for e in gone if DISK in e.at])
    return len(gone)
