"""Promotion and prefetch: blocks move up the tiers, disk -> host -> device, before (or as)
an engine asks for them.

A prefetch (by session, or by tokens an engine will need) leases the blocks of the prefix,
reads the disk-only ones straight into freshly allocated host slots (verified by checksum
on the way; a block that fails is forgotten and counted), and with a device tier copies
every host-resident one on to the device on its store stream. A load or lease that arrives
while a prefetch of its blocks is in flight waits for it rather than reading them twice,
and records how late the prefetch was; the first read after a prefetch records how early
it was (``tiercache_prefetch_lead_seconds``).

Locking (``tiercache.lock``): slots are allocated and entries changed under the lock; the
disk reads and the device copies run outside it, on leased entries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import torch

from tiercache.index import DEVICE, DISK, HOST, Entry, Index
from tiercache.keys import BlockKey
from tiercache.lock import CacheLock
from tiercache.room import DiskRoom, HostRoom
from tiercache.stats import Stats
from tiercache.tiers.device import DeviceTier
from tiercache.tiers.disk import DiskRecord
from tiercache.transaction import abort_later


class Promoter:
    def __init__(
        self,
        index: Index,
        lock: CacheLock,
        host: HostRoom,
        disk: DiskRoom | None,
        device: DeviceTier | None,
        stats: Stats,
        touch: Callable[[list[Entry]], None],
        ensure_format: Callable[[int], None],
    ) -> None:
        self._index = index
        self._lock = lock
        self._host = host
        self._disk = disk
        self._device = device
        self._stats = stats
        self._touch = touch
        self._ensure_format = ensure_format
        # Keys being promoted by a prefetch -> the event set when it is done.
        self._prefetching: dict[BlockKey, asyncio.Event] = {}

    async def prefetch(self, entries: list[Entry], chained: bool = False) -> int:
        """Promote the cached prefix ``entries`` (leased by the caller) disk -> host, and with a
        device tier on to the device; returns how many blocks moved up (each counted once).
        ``chained``: ``entries`` are one chain's run (``to_host``)."""
        device = self._device
        todo = [
            e
            for e in entries
            if (HOST not in e.at and DISK in e.at) or (device is not None and DEVICE not in e.at)
        ]
        if not todo:
            self._stats.prefetched("noop")
            return 0
        done = asyncio.Event()
        for e in todo:
            self._prefetching[e.key] = done
        try:
            cold = [e for e in todo if HOST not in e.at]
            # The whole run (to_host skips blocks in host memory), for the blocks' parents.
            promoted = (
                await self.to_host(entries, chained) if cold and self._disk is not None else 0
            )
            if device is not None:
                # Every block now in host memory goes on to the device (those already in
                # host memory too); a block counts once however far it moved.
                onto = await self.to_device(todo)
                promoted = len({e.key for e in cold if HOST in e.at} | onto)
        finally:
            now = time.monotonic()
            async with self._lock:
                for e in todo:
                    if HOST in e.at:
                        e.prefetched_at = now
                    if self._prefetching.get(e.key) is done:
                        del self._prefetching[e.key]
            done.set()
        self._stats.prefetched("done" if promoted == len(todo) else "partial")
        return promoted

    async def to_host(self, entries: list[Entry], chained: bool = False) -> int:
        """Copy disk-only ``entries`` (leased by the caller) into host slots; returns how many.

        Slots are allocated first and the verified bytes read straight into them; a block
        that fails verification is forgotten (counted), and its slot goes back. Stops
        allocating when the host tier has no evictable room. ``chained``: ``entries`` are one
        chain's run, block after block, so each tells the host policy its parent (``_parent``).
        """
        disk = self._disk
        assert disk is not None
        arena = self._host.arena
        t0 = time.perf_counter()
        targets: list[tuple[Entry, DiskRecord, int]] = []
        at = {id(e): i for i, e in enumerate(entries)} if chained else {}
        async with self._lock:
            # A prefetch by session right after a restart, before any engine registered.
            self._ensure_format(max(e.nbytes for e in entries))
            await self._host.make_room(sum(1 for e in entries if HOST not in e.at and DISK in e.at))
            for e in entries:
                rec = e.disk
                if HOST in e.at or rec is None:
                    continue
                slot = await self._host.slot_or_none()
                if slot is None:
                    break
                targets.append((e, rec, slot))
        if not targets:
            return 0
        self._lock.free()
        recs = [rec for _, rec, _ in targets]
        views = [arena.view(slot, e.nbytes) for e, _, slot in targets]
        reading = asyncio.ensure_future(disk.disk.get_many(recs, views))
        try:
            oks = await asyncio.shield(reading)
        except BaseException:
            # Cancelled (or the read failed): no block failed verification, so none is
            # forgotten, and the slots go back only once the I/O threads stop writing them.
            slots = [slot for _, _, slot in targets]
            reading.add_done_callback(lambda _: abort_later(self._give_back(slots)))
            raise
        async with self._lock:
            promoted = 0
            for (e, rec, slot), ok in zip(targets, oks, strict=True):
                if ok and HOST not in e.at and e.key in self._index:
                    self._host.place(e, slot, _parent(entries, at[id(e)]) if chained else None)
                    promoted += 1
                else:
                    arena.free(slot)
                    if not ok:
                        disk.forget_corrupt([(e, rec)])
            nbytes = sum(e.nbytes for (e, _, _), ok in zip(targets, oks, strict=True) if ok)
            self._stats.transfer(DISK, HOST, nbytes, time.perf_counter() - t0)
        return promoted

    async def _give_back(self, slots: list[int]) -> None:
        """The host slots of a promotion given up, once its read has ended."""
        async with self._lock:
            for slot in slots:
                self._host.arena.free(slot)

    async def to_device(self, entries: list[Entry]) -> set[BlockKey]:
        """Copy the host-resident ``entries`` (leased by the caller, so their host slots stay)
        into the device tier on its store stream; returns the keys now there."""
        device = self._device
        assert device is not None
        hot = [e for e in entries if HOST in e.at and DEVICE not in e.at]
        if not hot or not device.formatted:
            return set()
        t0 = time.perf_counter()
        slots = [s for e in hot if (s := e.host_slot) is not None]
        put = await device.put([e.key for e in hot], self._host.arena.buffer, slots)
        if put.evicted:
            self._stats.evicted(DEVICE, put.evicted)
        done: set[BlockKey] = set()
        for e in hot:
            if e.key not in device:
                continue
            if e.key in self._index:
                e.at[DEVICE] = True
                done.add(e.key)
            else:  # it left the index while it was copied: its copy must not stay
                device.discard(e.key)
        nbytes = sum(e.nbytes for e in hot if e.key in done)
        self._stats.transfer(HOST, DEVICE, nbytes, time.perf_counter() - t0)
        return done

    async def wait(self, keys: list[BlockKey]) -> None:
        """A read that arrives while a prefetch of its blocks is in flight waits for it (rather
        than reading the same blocks twice) and records how late the prefetch was."""
        if not self._prefetching:
            return
        pending = {ev for k in keys if (ev := self._prefetching.get(k)) is not None}
        if not pending:
            return
        t0 = time.perf_counter()
        await asyncio.gather(*(ev.wait() for ev in pending))
        self._stats.prefetched("late", time.perf_counter() - t0)

    def served(self, entries: list[Entry]) -> None:
        """Under the lock: ``entries`` were read; touch them and record how early a prefetch
        served this read (once per read)."""
        self._touch(entries)
        first = 0.0  # monotonic time of the earliest prefetch among them
        for e in entries:
            if e.prefetched_at:
                first = e.prefetched_at if not first else min(first, e.prefetched_at)
                e.prefetched_at = 0.0
        if first:
            self._stats.prefetched("early", time.monotonic() - first)

    async def keep(
        self, read: list[tuple[int, Entry]], rows: torch.Tensor, run: list[Entry] | None = None
    ) -> None:
        """Under the lock: blocks a load read (and verified) from disk into ``rows[i]`` get a
        host slot too, while there is room: the next read of them is a memcpy. ``run``: the
        load's entries, one chain's, so each block tells the host policy its parent."""
        self._lock.held()
        t0 = time.perf_counter()
        promoted = 0
        for i, e in read:
            if HOST in e.at or e.key not in self._index:
                continue
            slot = await self._host.slot_or_none()
            if slot is None:
                break
            if self._index.get(e.key) is not e:
                # The room for it wrote a host victim back, for which the disk evicted this
                # very block (unleased once read): placed now, its slot would be lost for good.
                self._host.arena.free(slot)
                continue
            self._host.arena.view(slot, e.nbytes).copy_(rows[i])
            self._host.place(e, slot, _parent(run, i) if run is not None else None)
            promoted += e.nbytes
        if promoted:
            self._stats.transfer(DISK, HOST, promoted, time.perf_counter() - t0)


def _parent(run: list[Entry], i: int) -> BlockKey | None:
    """The block before ``run[i]`` in its chain where it is in host memory (placed just
    before it, or there already), for a promoted block's place in the host policy: the prefix
    policy trims a chain from its end, and without parents a promoted chain was evicted root
    first. The first block of a run, and one after a block held only elsewhere, get none (a
    parent not in the tier would make the block an orphan, evicted first)."""
    if i == 0:
        return None
    p = run[i - 1]
    return p.key if HOST in p.at else None
