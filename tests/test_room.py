"""Room-making (tiercache/room.py) over a real host arena, a real disk tier on a tmp dir and the real
policies: which blocks go, that a dirty host victim reaches disk before its slot is reused, that
pinned or leased blocks never go, and the disk tier's write, flush, drop and corrupt paths."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, SPEC, flip_byte, key, make_ns, row
from tiercache.errors import NoRoom
from tiercache.index import DISK, HOST, Entry, Index
from tiercache.lock import CacheLock
from tiercache.policy.arc import ARCPolicy
from tiercache.policy.base import POLICIES, EvictionPolicy
from tiercache.room import DiskRoom, HostRoom
from tiercache.stats import Stats
from tiercache.tiers.disk import DiskTier
from tiercache.tiers.host import HostArena

NS = make_ns()


@dataclass
class Rooms:
    index: Index
    lock: CacheLock
    stats: Stats
    arena: HostArena
    host: HostRoom
    tier: DiskTier
    disk: DiskRoom
    array: str
    gone: list[int]  # blocks that left the index

    def entry(self, i: int) -> Entry:
        e = self.index.get(key(i))
        assert e is not None, f"block {i} is not in the index"
        return e

    async def save(self, *ids: int, array: str | None = None) -> None:
        """Blocks ``ids`` saved to host memory, one at a time, the way a commit places them."""
        for i in ids:
            async with self.lock:
                slot = await self.host.slot()
                self.arena.view(slot, NBYTES).copy_(row(i))
                e = Entry(key(i), array or self.array, NBYTES)
                self.index.add(e)
                self.host.place(e, slot)

    def where(self) -> dict[int, tuple[str, ...]]:
        return {int.from_bytes(e.key, "little"): e.tiers for e in self.index}

    async def on_disk(self, i: int) -> torch.Tensor:
        rec = self.entry(i).disk
        assert rec is not None
        out = torch.zeros(NBYTES, dtype=torch.uint8)
        assert await self.tier.get(rec, out)
        return out

    def journal_segments(self, tmp_path: Path) -> int:
        return len(list((tmp_path / "disk" / "journal").iterdir()))


def policy_of(room: DiskRoom) -> EvictionPolicy | None:
    return room.policy


OpenRooms = Callable[..., Awaitable[Rooms]]


@pytest.fixture
async def open_rooms(tmp_path: Path) -> AsyncIterator[OpenRooms]:
    """``await open_rooms(host_blocks=2, disk_blocks=4, eviction="lru")``."""
    opened: list[Rooms] = []

    async def factory(host_blocks: int = 2, disk_blocks: int = 4, eviction: str = "lru") -> Rooms:
        index, lock, stats = Index(), CacheLock(), Stats()
        gone: list[int] = []

        def on_gone(e: Entry) -> None:
            """The manager's cleanup: a block no local tier holds leaves the index."""
            if index.drop_if_empty(e):
                gone.append(int.from_bytes(e.key, "little"))

        tier = await DiskTier.open(str(tmp_path / "disk"), disk_blocks * NBYTES)
        arena = HostArena(None, host_blocks * NBYTES, pin=False)
        disk = DiskRoom(tier, eviction, index, lock, stats, on_gone)
        host = HostRoom(arena, eviction, index, lock, stats, on_gone, disk)
        rooms = Rooms(index, lock, stats, arena, host, tier, disk, await tier.register(NS), gone)
        host.format(NBYTES)
        disk.prepare(NBYTES)
        opened.append(rooms)
        return rooms

    yield factory
    for r in opened:
        r.arena.close()
        await r.tier.close()


# --- host room: slots and victims ----------------------------------------------------------------


async def test_format_carves_the_arena_and_sizes_the_policy(open_rooms: OpenRooms) -> None:
    r = await open_rooms(host_blocks=3)
    assert (r.arena.slot_bytes, r.arena.num_slots, r.arena.free_slots) == (NBYTES, 3, 3)
    assert r.host.policy is not None and len(r.host.policy) == 0


async def test_a_free_slot_is_handed_out_without_evicting(open_rooms: OpenRooms) -> None:
    r = await open_rooms(host_blocks=2)
    await r.save(0, 1)
    assert r.where() == {0: ("host",), 1: ("host",)}
    assert r.stats.evictions == {}


async def test_a_full_host_tier_writes_its_lru_victim_to_disk_before_reusing_its_slot(
    open_rooms: OpenRooms,
) -> None:
    r = await open_rooms(host_blocks=2)
    await r.save(0, 1)
    slot0 = r.entry(0).host_slot
    await r.save(2)
    assert r.where() == {0: ("disk",), 1: ("host",), 2: ("host",)}
    assert r.entry(2).host_slot == slot0
    assert torch.equal(await r.on_disk(0), row(0))  # written before block 2 overwrote the slot
    assert r.entry(0).checksum == r.entry(0).disk.checksum != b""  # type: ignore[union-attr]
    assert r.stats.evictions == {"host": 1}
    assert r.stats.transfer_bytes == {("host", "disk"): NBYTES}


async def test_a_victim_already_on_disk_is_not_written_again(open_rooms: OpenRooms) -> None:
    r = await open_rooms(host_blocks=2)
    await r.save(0, 1)
    async with r.lock:
        assert await r.disk.write([r.entry(0)], r.arena) == NBYTES
    rec = r.entry(0).disk
    await r.save(2)
    assert r.entry(0).disk is rec
    assert r.where() == {0: ("disk",), 1: ("host",), 2: ("host",)}
    assert r.stats.transfer_bytes == {("host", "disk"): NBYTES}  # the one explicit write


async def test_touch_moves_a_block_to_the_back_of_the_victims(open_rooms: OpenRooms) -> None:
    r = await open_rooms(host_blocks=2)
    await r.save(0, 1)
    async with r.lock:
        r.host.touch(r.entry(0))
    await r.save(2)
    assert r.where() == {0: ("host",), 1: ("disk",), 2: ("host",)}


@pytest.mark.parametrize("protect", ["pin", "lease"])
async def test_pinned_and_leased_blocks_are_skipped_as_victims(
    open_rooms: OpenRooms, protect: str
) -> None:
    r = await open_rooms(host_blocks=2)
    await r.save(0, 1)
    if protect == "pin":
        r.index.pins[key(0)] += 1
    else:
        r.index.lease([r.entry(0)])
    await r.save(2)
    assert r.where() == {0: ("host",), 1: ("disk",), 2: ("host",)}


async def test_a_host_tier_full_of_protected_blocks_has_no_room(open_rooms: OpenRooms) -> None:
    r = await open_rooms(host_blocks=2)
    await r.save(0, 1)
    r.index.pins[key(0)] += 1
    r.index.lease([r.entry(1)])
    async with r.lock:
        with pytest.raises(NoRoom) as err:
            await r.host.slot()
        assert await r.host.slot_or_none() is None
    assert str(err.value) == (
        "host tier is full: all 2 slots hold pinned or in-use blocks; "
        "unpin a session or raise [tiers.host] bytes"
    )
    assert r.where() == {0: ("host",), 1: ("host",)}
    assert r.stats.evictions == {}


async def test_without_a_disk_tier_a_host_victim_leaves_the_cache(tmp_path: Path) -> None:
    index, lock, stats = Index(), CacheLock(), Stats()
    arena = HostArena(None, 2 * NBYTES, pin=False)
    gone: list[Entry] = []

    def on_gone(e: Entry) -> None:
        if index.drop_if_empty(e):
            gone.append(e)

    host = HostRoom(arena, "lru", index, lock, stats, on_gone, disk=None)
    host.format(NBYTES)
    try:
        entries = [Entry(key(i), "ns/test", NBYTES) for i in range(3)]
        async with lock:
            for e in entries:
                slot = await host.slot()
                index.add(e)
                host.place(e, slot)
        assert gone == [entries[0]]
        assert key(0) not in index and len(index) == 2
        assert stats.evictions == {"host": 1}
    finally:
        arena.close()


async def test_room_is_made_only_under_the_lock(open_rooms: OpenRooms) -> None:
    r = await open_rooms()
    with pytest.raises(AssertionError, match=r"^HostRoom\.slot must run under the cache lock$"):
        await r.host.slot()
    with pytest.raises(
        AssertionError, match=r"^HostRoom\.make_room must run under the cache lock$"
    ):
        await r.host.make_room(1)
    with pytest.raises(AssertionError, match=r"^DiskRoom\.write must run under the cache lock$"):
        await r.disk.write([], r.arena)
    with pytest.raises(AssertionError, match=r"^DiskRoom\.forget_corrupt must run under"):
        r.disk.forget_corrupt([])


async def test_make_room_evicts_what_n_new_blocks_need_in_one_journal_record(
    open_rooms: OpenRooms, tmp_path: Path
) -> None:
    r = await open_rooms(host_blocks=4)
    await r.save(0, 1, 2)
    segments = r.journal_segments(tmp_path)
    async with r.lock:
        await r.host.make_room(3)  # one slot is free: two victims go
    assert r.arena.free_slots == 3
    assert r.where() == {0: ("disk",), 1: ("disk",), 2: ("host",)}
    assert r.journal_segments(tmp_path) == segments + 1
    for i in (0, 1):
        assert torch.equal(await r.on_disk(i), row(i))


async def test_make_room_with_enough_free_slots_evicts_nothing(open_rooms: OpenRooms) -> None:
    r = await open_rooms(host_blocks=4)
    await r.save(0, 1)
    async with r.lock:
        await r.host.make_room(2)
    assert r.stats.evictions == {}
    assert r.arena.free_slots == 2


async def test_make_room_frees_what_it_can_when_too_much_is_protected(
    open_rooms: OpenRooms,
) -> None:
    r = await open_rooms(host_blocks=3)
    await r.save(0, 1, 2)
    r.index.pins[key(0)] += 1
    r.index.pins[key(1)] += 1
    async with r.lock:
        await r.host.make_room(3)
    assert r.arena.free_slots == 1
    assert r.where() == {0: ("host",), 1: ("host",), 2: ("disk",)}


@pytest.mark.parametrize("eviction", POLICIES)
async def test_no_policy_loses_a_block_the_disk_has_room_for_or_evicts_a_pinned_one(
    open_rooms: OpenRooms, eviction: str
) -> None:
    r = await open_rooms(host_blocks=3, disk_blocks=16, eviction=eviction)
    r.index.pins[key(0)] += 1
    await r.save(*range(10))
    async with r.lock:
        r.host.touch(r.entry(3))
        r.host.touch(r.entry(3))
    await r.save(*range(10, 14))
    assert r.gone == []
    assert len(r.index) == 14
    assert "host" in r.entry(0).tiers
    assert r.arena.free_slots == 0
    assert sum("host" in t for t in r.where().values()) == 3
    for i, tiers in r.where().items():
        if tiers == ("disk",):
            assert torch.equal(await r.on_disk(i), row(i))
    assert r.stats.evictions == {"host": 11}


async def test_dropping_a_host_copy_frees_its_slot_and_tells_the_manager(
    open_rooms: OpenRooms,
) -> None:
    r = await open_rooms(host_blocks=2)
    await r.save(0, 1)
    async with r.lock:
        e = r.entry(0)
        slot = e.host_slot
        r.host.drop(e)
    assert HOST not in e.at
    assert r.gone == [0]  # no other copy: it left the index
    assert r.arena.free_slots == 1
    assert r.arena.allocate() == slot
    assert r.host.policy is not None and list(r.host.policy.victims()) == [key(1)]


async def test_place_without_a_slot_uses_the_one_the_entry_reserved(
    open_rooms: OpenRooms,
) -> None:
    r = await open_rooms()
    slot = r.arena.allocate()
    reserved = Entry(key(0), r.array, NBYTES, at={HOST: slot})
    r.host.place(reserved)
    assert r.host.policy is not None and list(r.host.policy.victims()) == [key(0)]
    with pytest.raises(AssertionError):
        r.host.place(Entry(key(1), r.array, NBYTES))  # no slot given or reserved


# --- disk room -------------------------------------------------------------------------------------


async def test_write_copies_host_blocks_to_disk_with_their_checksum(
    open_rooms: OpenRooms,
) -> None:
    r = await open_rooms(host_blocks=3)
    await r.save(0, 1, 2)
    async with r.lock:
        assert await r.disk.write([r.entry(0), r.entry(2)], r.arena) == 2 * NBYTES
        assert await r.disk.write([r.entry(0)], r.arena) == 0  # already there
    assert r.where() == {0: ("host", "disk"), 1: ("host",), 2: ("host", "disk")}
    assert torch.equal(await r.on_disk(2), row(2))
    assert r.stats.transfer_bytes == {("host", "disk"): 2 * NBYTES}


async def test_write_evicts_disk_blocks_for_room_but_never_one_it_is_writing(
    open_rooms: OpenRooms,
) -> None:
    r = await open_rooms(host_blocks=4, disk_blocks=2)
    await r.save(0, 1, 2, 3)
    async with r.lock:
        await r.disk.write([r.entry(0), r.entry(1)], r.arena)
        r.host.drop(r.entry(0))  # block 0 is on disk only now: losing it there loses it
        await r.disk.write([r.entry(2), r.entry(3)], r.arena)
    assert r.where() == {1: ("host",), 2: ("host", "disk"), 3: ("host", "disk")}
    assert r.gone == [0]
    assert r.stats.evictions == {"disk": 2}


async def test_a_write_spanning_namespaces_never_evicts_a_block_it_just_wrote(
    open_rooms: OpenRooms,
) -> None:
    r = await open_rooms(host_blocks=3, disk_blocks=2)
    other = await r.tier.register(make_ns(model="other-model"))
    await r.save(0)
    async with r.lock:
        await r.disk.write([r.entry(0)], r.arena)
        r.host.drop(r.entry(0))
    r.index.pins[key(0)] += 1  # the one block on disk may not go
    await r.save(1)
    await r.save(2, array=other)
    async with r.lock:
        # Block 1 (this namespace) lands first; block 2 (the other one) finds no room that it
        # may take: block 1 is one of the blocks being written, however recent its disk copy.
        assert await r.disk.write([r.entry(1), r.entry(2)], r.arena) == NBYTES
    assert r.where() == {0: ("disk",), 1: ("host", "disk"), 2: ("host",)}
    assert r.stats.errors == {"disk_full": 1}


async def test_a_disk_full_of_protected_blocks_writes_what_fits_and_counts_the_rest(
    open_rooms: OpenRooms,
) -> None:
    r = await open_rooms(host_blocks=4, disk_blocks=2)
    await r.save(0, 1, 2, 3)
    async with r.lock:
        await r.disk.write([r.entry(0)], r.arena)
        r.index.pins[key(0)] += 1
        assert await r.disk.write([r.entry(1), r.entry(2), r.entry(3)], r.arena) == NBYTES
    assert r.where() == {0: ("host", "disk"), 1: ("host", "disk"), 2: ("host",), 3: ("host",)}
    assert r.stats.errors == {"disk_full": 1}


async def test_flush_writes_every_host_only_block_and_leaves_no_lease(
    open_rooms: OpenRooms,
) -> None:
    r = await open_rooms(host_blocks=3)
    await r.save(0, 1, 2)
    async with r.lock:
        await r.disk.write([r.entry(1)], r.arena)
        assert await r.disk.flush(r.arena) == 2 * NBYTES
        assert await r.disk.flush(r.arena) == 0
    assert all(t == ("host", "disk") for t in r.where().values())
    assert [e.leases for e in r.index] == [0, 0, 0]


async def test_drop_all_removes_blocks_from_disk_durably(
    open_rooms: OpenRooms, tmp_path: Path
) -> None:
    r = await open_rooms(host_blocks=3)
    await r.save(0, 1, 2)
    async with r.lock:
        await r.disk.flush(r.arena)
        await r.disk.drop_all([r.entry(0), r.entry(1)])
    assert r.where() == {0: ("host",), 1: ("host",), 2: ("host", "disk")}
    assert r.tier.num_blocks == 1
    await r.tier.close()
    again = await DiskTier.open(str(tmp_path / "disk"), 4 * NBYTES)  # the journal says so
    try:
        assert [rec.key for rec in again.records] == [key(2)]
    finally:
        await again.close()
    r.tier = await DiskTier.open(str(tmp_path / "disk"), 4 * NBYTES)  # for the teardown


async def test_a_disk_block_that_failed_verification_is_dropped_and_counted(
    open_rooms: OpenRooms,
) -> None:
    r = await open_rooms(host_blocks=2)
    await r.save(0, 1)
    async with r.lock:
        await r.disk.flush(r.arena)
        r.host.drop(r.entry(0))
    entries = [r.entry(0), r.entry(1)]
    recs = [e.disk for e in entries if e.disk is not None]
    for rec in recs:
        path, offset = r.tier.location(rec)
        flip_byte(path, offset + 3)
    outs = [torch.zeros(NBYTES, dtype=torch.uint8) for _ in recs]
    assert await r.tier.get_many(recs, outs) == [False, False]
    async with r.lock:
        r.disk.forget_corrupt(list(zip(entries, recs, strict=True)))
    assert r.gone == [0]  # its only copy
    assert r.where() == {1: ("host",)}
    assert r.stats.corrupt_blocks == 2
    assert r.tier.num_blocks == 0


async def test_a_failed_read_of_a_copy_since_replaced_keeps_the_new_copy(
    open_rooms: OpenRooms,
) -> None:
    r = await open_rooms(host_blocks=2)
    await r.save(0)
    async with r.lock:
        await r.disk.write([r.entry(0)], r.arena)
        old = r.entry(0).disk
        assert old is not None
        r.disk.drop(r.entry(0))
        await r.disk.write([r.entry(0)], r.arena)
        r.disk.forget_corrupt([(r.entry(0), old)])
    assert r.entry(0).tiers == ("host", "disk")
    assert r.stats.corrupt_blocks == 1


async def test_a_restart_finds_the_disk_blocks_in_the_index(
    open_rooms: OpenRooms, tmp_path: Path
) -> None:
    r = await open_rooms(host_blocks=2)
    await r.save(0, 1)
    async with r.lock:
        await r.disk.flush(r.arena)
    checksums = {i: r.entry(i).checksum for i in (0, 1)}
    await r.tier.close()
    tier = await DiskTier.open(str(tmp_path / "disk"), 4 * NBYTES)
    try:
        index = Index()
        room = DiskRoom(tier, "lru", index, CacheLock(), Stats(), lambda e: None)
        assert {e.key: (e.tiers, e.checksum, e.nbytes, e.array) for e in index} == {
            key(i): (("disk",), checksums[i], NBYTES, r.array) for i in (0, 1)
        }
        assert room.policy is not None and sorted(room.policy.victims()) == [key(0), key(1)]
    finally:
        await tier.close()
    r.tier = await DiskTier.open(str(tmp_path / "disk"), 4 * NBYTES)  # for the teardown


async def test_a_disk_room_moves_nothing_before_a_namespace_sizes_its_policy(
    tmp_path: Path,
) -> None:
    tier = await DiskTier.open(str(tmp_path / "disk"), 4 * NBYTES)
    try:
        room = DiskRoom(tier, "arc", Index(), CacheLock(), Stats(), lambda e: None)
        assert policy_of(room) is None
        e = Entry(key(0), "ns/test", NBYTES, at={DISK: True})
        with pytest.raises(AssertionError, match="a namespace registers before any disk block"):
            room.touch(e)
        room.prepare(NBYTES)
        room.prepare(2 * NBYTES)  # once: the first namespace sizes it
        policy = policy_of(room)
        assert policy is not None and policy.name == "arc"
    finally:
        await tier.close()


# --- disk room: namespaces of several block sizes -----------------------------------------------

BIG = make_ns(model="big-model", spec=dataclasses.replace(SPEC, num_layers=4 * SPEC.num_layers))
BIG_NBYTES = 4 * NBYTES


@dataclass
class Mixed:
    """A disk tier of 4 big (16 small) blocks under ``eviction``, its two namespaces' arrays."""

    index: Index
    lock: CacheLock
    arena: HostArena
    host: HostRoom
    disk: DiskRoom
    arrays: dict[int, str]  # block size -> array

    async def write(self, i: int, nbytes: int) -> None:
        """Block ``i`` of ``nbytes`` saved, written to disk and its host copy let go."""
        async with self.lock:
            slot = await self.host.slot()
            self.arena.view(slot, nbytes).fill_(i + 1)
            e = self.index.get(key(i)) or Entry(key(i), self.arrays[nbytes], nbytes)
            self.index.add(e)
            self.host.place(e, slot)
            assert await self.disk.write([e], self.arena) == nbytes
            self.host.drop(e)


@pytest.fixture
async def mixed(tmp_path: Path) -> AsyncIterator[Callable[[str, int], Awaitable[Mixed]]]:
    """``await mixed(eviction, first)``: the namespace of ``first``-byte blocks registers first."""
    opened: list[tuple[HostArena, DiskTier]] = []

    async def factory(eviction: str, first: int) -> Mixed:
        index, lock = Index(), CacheLock()
        tier = await DiskTier.open(str(tmp_path / "disk"), 4 * BIG_NBYTES)
        arena = HostArena(None, 2 * BIG_NBYTES, pin=False)
        opened.append((arena, tier))
        disk = DiskRoom(tier, eviction, index, lock, Stats(), index.drop_if_empty)
        host = HostRoom(arena, eviction, index, lock, Stats(), index.drop_if_empty, disk)
        host.format(BIG_NBYTES)
        arrays = {NBYTES: await tier.register(NS), BIG_NBYTES: await tier.register(BIG)}
        disk.prepare(first)
        return Mixed(index, lock, arena, host, disk, arrays)

    yield factory
    for arena, tier in opened:
        arena.close()
        await tier.close()


async def test_a_disk_arc_sized_by_big_blocks_keeps_the_ghosts_of_the_small_ones_it_holds(
    mixed: Callable[[str, int], Awaitable[Mixed]],
) -> None:
    m = await mixed("arc", BIG_NBYTES)  # 4 big blocks' worth: ARC would count 4
    for i in range(16):
        await m.write(i, NBYTES)  # a tier of 16 small blocks, full
    e = m.index.get(key(15))
    assert e is not None
    m.disk.touch(e)  # used again: T1 holds 15
    await m.write(16, NBYTES)  # evicts block 0 from T1
    await m.write(0, NBYTES)  # block 0 again: T1 was too small, as ARC learns from its ghost

    policy = m.disk.policy
    assert isinstance(policy, ARCPolicy)
    assert (policy.target_t1, list(policy.t2)) == (1.0, [key(15), key(0)])
    assert policy.capacity == 16


async def test_a_disk_arc_sized_by_small_blocks_bounds_its_ghosts_by_the_big_ones_it_holds(
    mixed: Callable[[str, int], Awaitable[Mixed]],
) -> None:
    m = await mixed("arc", NBYTES)  # 16 small blocks' worth: ARC would count 16
    for i in range(12):
        await m.write(i, BIG_NBYTES)  # a tier of 4 big blocks: 8 evicted

    policy = m.disk.policy
    assert isinstance(policy, ARCPolicy)
    # T1 + B1 within the 4 blocks the tier holds (the paper drops a full T1's victim
    # unghosted), not the 8 blocks evicted.
    assert (list(policy.t1), list(policy.b1)) == (
        [key(i) for i in range(8, 12)],
        [],
    )
    assert policy.capacity == 4
