"""Promotion and prefetch (tiercache/promotion.py) over a real host arena, a real disk tier on a tmp
dir and the device tier's CPU twin: blocks move up verified, each counted once; a read waits for
a prefetch in flight; the lead or lateness of a prefetch is recorded once per read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, flip_byte, key, make_ns, row
from tiercache.index import DEVICE, HOST, Entry, Index
from tiercache.lock import CacheLock
from tiercache.promotion import Promoter
from tiercache.room import DiskRoom, HostRoom
from tiercache.stats import Stats
from tiercache.tiers.blockio import ReadItem
from tiercache.tiers.device import DeviceTier
from tiercache.tiers.disk import DiskTier
from tiercache.tiers.host import HostArena

NS = make_ns()


@dataclass
class Cache:
    index: Index
    lock: CacheLock
    stats: Stats
    arena: HostArena
    host: HostRoom
    tier: DiskTier
    disk: DiskRoom
    device: DeviceTier | None
    promoter: Promoter
    array: str
    touched: list[int]
    formats: list[int]

    def entry(self, i: int) -> Entry:
        e = self.index.get(key(i))
        assert e is not None
        return e

    def entries(self, *ids: int) -> list[Entry]:
        return [self.entry(i) for i in ids]

    async def in_host(self, *ids: int) -> list[Entry]:
        async with self.lock:
            for i in ids:
                slot = await self.host.slot()
                self.arena.view(slot, NBYTES).copy_(row(i))
                e = Entry(key(i), self.array, NBYTES)
                self.index.add(e)
                self.host.place(e, slot)
        return self.entries(*ids)

    async def on_disk(self, *ids: int) -> list[Entry]:
        """Blocks ``ids`` on disk only (written back, then their host slots reused)."""
        entries = await self.in_host(*ids)
        async with self.lock:
            await self.disk.write(entries, self.arena)
            for e in entries:
                self.host.drop(e)
        return entries

    def host_bytes(self, e: Entry) -> torch.Tensor:
        assert e.host_slot is not None
        return self.arena.view(e.host_slot, NBYTES)

    def where(self) -> dict[int, tuple[str, ...]]:
        return {int.from_bytes(e.key, "little"): e.tiers for e in self.index}


OpenCache = Callable[..., Awaitable[Cache]]


@pytest.fixture
async def open_cache(tmp_path: Path) -> AsyncIterator[OpenCache]:
    """``await open_cache(host_blocks=4, device_blocks=0)``: a disk tier of 16 blocks."""
    opened: list[Cache] = []

    async def factory(host_blocks: int = 4, device_blocks: int = 0) -> Cache:
        index, lock, stats = Index(), CacheLock(), Stats()
        touched: list[int] = []
        formats: list[int] = []
        tier = await DiskTier.open(str(tmp_path / "disk"), 16 * NBYTES)
        arena = HostArena(None, host_blocks * NBYTES, pin=False)
        device = DeviceTier(device_blocks * NBYTES, "cpu") if device_blocks else None

        def gone(e: Entry) -> None:
            index.drop_if_empty(e)

        disk = DiskRoom(tier, "lru", index, lock, stats, gone)
        host = HostRoom(arena, "lru", index, lock, stats, gone, disk)
        host.format(NBYTES)
        disk.prepare(NBYTES)
        array = await tier.register(NS)
        if device is not None:
            device.format(NBYTES)
        promoter = Promoter(
            index,
            lock,
            host,
            disk,
            device,
            stats,
            lambda es: touched.extend(int.from_bytes(e.key, "little") for e in es),
            formats.append,
        )
        c = Cache(
            index, lock, stats, arena, host, tier, disk, device, promoter, array, touched, formats
        )
        opened.append(c)
        return c

    yield factory
    for c in opened:
        if c.device is not None:
            c.device.close()
        c.arena.close()
        await c.tier.close()


# --- prefetch, disk -> host ------------------------------------------------------------------------


async def test_a_prefetch_of_blocks_already_in_host_memory_is_a_noop(
    open_cache: OpenCache,
) -> None:
    c = await open_cache()
    entries = await c.in_host(0, 1)
    assert await c.promoter.prefetch(entries) == 0
    assert c.stats.prefetch == {"noop": 1}


async def test_a_prefetch_reads_disk_blocks_into_host_slots_verified(
    open_cache: OpenCache,
) -> None:
    c = await open_cache(host_blocks=4)
    entries = [*await c.on_disk(0, 1), *await c.in_host(2)]
    c.index.lease(entries)  # the caller leases the prefix it prefetches
    assert await c.promoter.prefetch(entries) == 2
    c.index.unlease(entries)
    assert c.where() == {0: ("host", "disk"), 1: ("host", "disk"), 2: ("host",)}
    for i, e in enumerate(entries):
        assert torch.equal(c.host_bytes(e), row(i))
    assert [e.prefetched_at > 0 for e in entries] == [True, True, False]
    assert c.stats.prefetch == {"done": 1}
    assert c.stats.transfer_bytes[("disk", "host")] == 2 * NBYTES
    assert c.formats == [NBYTES]  # the arena is formatted by a prefetch right after a restart


async def test_a_block_that_fails_verification_is_forgotten_and_the_prefetch_is_partial(
    open_cache: OpenCache,
) -> None:
    c = await open_cache(host_blocks=4)
    entries = await c.on_disk(0, 1, 2)
    rec = entries[1].disk
    assert rec is not None
    path, offset = c.tier.location(rec)
    flip_byte(path, offset + 5)
    assert await c.promoter.prefetch(entries) == 2
    assert c.where() == {0: ("host", "disk"), 2: ("host", "disk")}
    assert c.stats.corrupt_blocks == 1
    assert c.stats.prefetch == {"partial": 1}
    assert c.arena.free_slots == 2  # the failed block's slot went back


async def test_a_prefetch_stops_where_the_host_tier_has_no_evictable_room(
    open_cache: OpenCache,
) -> None:
    c = await open_cache(host_blocks=3)
    for i in (0, 1):
        c.index.pins[key(i)] += 1
    await c.in_host(0, 1)
    entries = [*await c.on_disk(2), *await c.on_disk(3)]  # through the one free slot
    assert await c.promoter.prefetch(entries) == 1
    assert c.where() == {0: ("host",), 1: ("host",), 2: ("host", "disk"), 3: ("disk",)}
    assert c.stats.prefetch == {"partial": 1}


async def test_a_prefetch_cancelled_during_its_disk_read_forgets_no_block(
    open_cache: OpenCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = await open_cache(host_blocks=4)
    entries = await c.on_disk(0, 1)
    gate = asyncio.Event()
    real = c.tier.io.read

    async def held(path: str, items: list[ReadItem]) -> list[bool]:
        await gate.wait()  # the I/O threads still at work when the prefetch is cancelled
        return await real(path, items)

    monkeypatch.setattr(c.tier.io, "read", held)
    prefetch = asyncio.create_task(c.promoter.prefetch(entries))
    await asyncio.sleep(0.01)
    prefetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await prefetch
    assert c.where() == {0: ("disk",), 1: ("disk",)}  # not dropped as corrupt
    assert c.stats.corrupt_blocks == 0
    assert c.arena.free_slots == 2  # the read still writes into its slots
    gate.set()
    async with asyncio.timeout(5):
        while c.arena.free_slots < 4:  # noqa: ASYNC110 - given back once the read has ended
            await asyncio.sleep(0.01)
    assert c.where() == {0: ("disk",), 1: ("disk",)}


# --- prefetch on to the device ---------------------------------------------------------------------


async def test_with_a_device_tier_every_block_goes_on_to_the_device_counted_once(
    open_cache: OpenCache,
) -> None:
    c = await open_cache(host_blocks=4, device_blocks=4)
    entries = [*await c.on_disk(0), *await c.in_host(1)]
    assert await c.promoter.prefetch(entries) == 2
    assert c.where() == {0: ("device", "host", "disk"), 1: ("device", "host")}
    assert c.device is not None and len(c.device) == 2
    out = torch.zeros((2, NBYTES), dtype=torch.uint8)
    await c.device.read([key(0), key(1)], out, [0, 1])
    assert torch.equal(out, torch.stack([row(0), row(1)]))
    assert c.stats.transfer_bytes[("host", "device")] == 2 * NBYTES
    assert c.stats.prefetch == {"done": 1}
    assert await c.promoter.prefetch(entries) == 0  # all on the device already
    assert c.stats.prefetch == {"done": 1, "noop": 1}


async def test_a_block_that_left_the_index_during_its_copy_is_not_kept_on_the_device(
    open_cache: OpenCache,
) -> None:
    c = await open_cache(host_blocks=4, device_blocks=4)
    slot = c.arena.allocate()
    c.arena.view(slot, NBYTES).copy_(row(0))
    e = Entry(key(0), c.array, NBYTES, at={HOST: slot})  # its host copy, but not in the index
    assert await c.promoter.to_device([e]) == set()
    assert c.device is not None and key(0) not in c.device
    assert DEVICE not in e.at


# --- reads meeting prefetches ----------------------------------------------------------------------


async def test_a_read_waits_for_a_prefetch_of_its_blocks_and_records_it_late(
    open_cache: OpenCache,
) -> None:
    c = await open_cache()
    entries = await c.on_disk(0, 1)
    async with c.lock:  # the prefetch registers its keys, then waits here for the lock
        prefetch = asyncio.create_task(c.promoter.prefetch(entries))
        await asyncio.sleep(0)
        read = asyncio.create_task(c.promoter.wait([key(1), key(9)]))
        await asyncio.sleep(0.01)
        assert not read.done()
    await read
    assert prefetch.done() and await prefetch == 2
    assert c.stats.prefetch == {"done": 1, "late": 1}


async def test_a_read_of_blocks_no_prefetch_is_moving_does_not_wait(
    open_cache: OpenCache,
) -> None:
    c = await open_cache()
    await c.promoter.wait([key(0)])
    assert c.stats.prefetch == {}


async def test_served_touches_each_block_and_records_the_earliest_lead_once(
    open_cache: OpenCache,
) -> None:
    c = await open_cache()
    entries = await c.on_disk(0, 1)
    await c.promoter.prefetch(entries)
    (plain,) = await c.in_host(2)
    async with c.lock:
        c.promoter.served([*entries, plain])
        c.promoter.served(entries)  # a second read is not served by the prefetch
    assert c.touched == [0, 1, 2, 0, 1]
    assert [e.prefetched_at for e in entries] == [0.0, 0.0]
    assert c.stats.prefetch == {"done": 1, "early": 1}


# --- keep: blocks a load read from disk stay in host memory ----------------------------------------


async def test_blocks_a_load_read_from_disk_are_kept_in_host_slots(open_cache: OpenCache) -> None:
    c = await open_cache(host_blocks=4)
    entries = await c.on_disk(0, 1, 2)
    rows = torch.stack([row(0), row(1), row(2)])
    async with c.lock:
        await c.promoter.keep([(0, entries[0]), (2, entries[2])], rows)
    assert c.where() == {0: ("host", "disk"), 1: ("disk",), 2: ("host", "disk")}
    assert torch.equal(c.host_bytes(entries[2]), row(2))
    assert c.stats.transfer_bytes[("disk", "host")] == 2 * NBYTES


async def test_keep_evicts_unprotected_blocks_for_room(open_cache: OpenCache) -> None:
    c = await open_cache(host_blocks=2)
    entries = await c.on_disk(0, 1)
    c.index.pins[key(5)] += 1
    await c.in_host(5)
    async with c.lock:
        await c.promoter.keep(list(enumerate(entries)), torch.stack([row(0), row(1)]))
    # Block 0 takes the free slot; block 1 then evicts the least recent unpinned block: 0.
    assert c.where() == {0: ("disk",), 1: ("host", "disk"), 5: ("host",)}


async def test_keep_stops_when_no_slot_is_free_or_evictable(open_cache: OpenCache) -> None:
    c = await open_cache(host_blocks=2)
    entries = await c.on_disk(0, 1)
    c.index.pins[key(5)] += 1
    c.index.pins[key(6)] += 1
    await c.in_host(5, 6)
    async with c.lock:
        await c.promoter.keep(list(enumerate(entries)), torch.stack([row(0), row(1)]))
    assert c.where() == {0: ("disk",), 1: ("disk",), 5: ("host",), 6: ("host",)}
    assert ("disk", "host") not in c.stats.transfer_bytes


async def test_keep_skips_blocks_in_host_memory_or_gone_from_the_index(
    open_cache: OpenCache,
) -> None:
    c = await open_cache()
    (hot,) = await c.in_host(0)
    gone = Entry(key(1), c.array, NBYTES)  # read, then dropped from the index meanwhile
    free = c.arena.free_slots
    async with c.lock:
        await c.promoter.keep([(0, hot), (1, gone)], torch.stack([row(0), row(1)]))
    assert c.arena.free_slots == free
    assert ("disk", "host") not in c.stats.transfer_bytes


async def test_keep_runs_only_under_the_lock(open_cache: OpenCache) -> None:
    c = await open_cache()
    with pytest.raises(AssertionError, match=r"^Promoter\.keep must run under the cache lock$"):
        await c.promoter.keep([], torch.empty((0, NBYTES), dtype=torch.uint8))
