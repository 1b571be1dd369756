"""The host side of a save (``tiercache/saves.py``): reserve, fill, commit or abort."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, make_blocks, make_ns, make_tokens
from tiercache.errors import BlockShapeError, Draining
from tiercache.keys import KeyChain
from tiercache.manager import TierManager


async def manager(slots: int) -> TierManager:
    return await TierManager.open(host_bytes=slots * NBYTES, slot_bytes=NBYTES)


async def test_reserved_slots_are_invisible_until_commit_then_served_byte_exact() -> None:
    m = await manager(8)
    ns, tokens, blocks = make_ns(), make_tokens(3), make_blocks(3)
    r = await m.saves.reserve(ns, tokens, 0, None, "chat")
    assert (len(r.slots), r.walked, r.present) == (3, 3, 0)
    assert (await m.lookup(ns, tokens)).blocks == 0  # not visible yet
    rows = blocks.contiguous().view(torch.uint8).view(3, NBYTES)
    m.host.write(r.slots, rows, list(r.rows))
    assert (await m.saves.commit(r)).stored == 3
    got = await m.load(ns, tokens)
    assert got.data.equal(rows)
    again = await m.saves.reserve(ns, tokens, 0, None, None)
    assert (again.slots, again.present) == ([], 3)  # held blocks are not written twice
    await m.close(flush=False)


async def test_abort_gives_the_slots_back_and_nothing_becomes_visible() -> None:
    m = await manager(2)
    ns, tokens = make_ns(), make_tokens(2)
    r = await m.saves.reserve(ns, tokens)
    assert len(r.slots) == 2 and m.host.free_slots == 0
    await m.saves.abort(r)
    assert m.host.free_slots == 2 and (await m.lookup(ns, tokens)).blocks == 0
    await m.close(flush=False)


async def test_a_full_host_stops_the_reservation_early_and_says_how_far_it_walked() -> None:
    m = await manager(2)
    ns, tokens = make_ns(), make_tokens(5)
    first = await m.saves.reserve(ns, tokens)
    assert (len(first.slots), first.walked) == (2, 2)  # leased slots cannot be evicted
    await m.saves.abort(first)
    await m.close(flush=False)


async def test_bad_ranges_and_a_draining_cache_are_refused_by_name() -> None:
    m = await manager(2)
    ns, tokens = make_ns(), make_tokens(2)
    with pytest.raises(BlockShapeError, match="3 blocks from block 0 do not fit the 2 full blocks"):
        await m.saves.reserve(ns, tokens, 0, 3)
    m.draining = True
    with pytest.raises(Draining, match="saves are not taken"):
        await m.saves.reserve(ns, tokens)
    await m.close(flush=False)


async def _blocked(task: asyncio.Task[object]) -> None:
    for _ in range(50):  # let it reach the lock (or the socket) and block there
        await asyncio.sleep(0.01)
    assert not task.done()


async def test_a_commit_cancelled_while_it_waits_gives_its_slots_back() -> None:
    m = await TierManager.open(host_bytes=4 * NBYTES, slot_bytes=NBYTES)
    tokens = make_tokens(3)
    r = await m.reserve(make_ns(), tokens)
    assert m.host.free_slots == 1
    async with m._lock:
        commit = asyncio.create_task(m.commit(r))
        await _blocked(commit)
        commit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await commit
    for _ in range(5):  # the shielded abort takes the lock once it is free
        await asyncio.sleep(0)
    assert m.host.free_slots == 4 and (await m.lookup(make_ns(), tokens)).blocks == 0
    await m.close(flush=False)


async def test_a_reservation_cancelled_mid_walk_gives_its_slots_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = await TierManager.open(host_bytes=4 * NBYTES, slot_bytes=NBYTES)
    real = m.host_room.slot_or_none
    calls = 0
    stalled = asyncio.Event()

    async def slow_second_slot() -> int | None:  # as a write-back of a victim to disk would
        nonlocal calls
        calls += 1
        if calls == 2:
            stalled.set()
            await asyncio.sleep(3600)
        return await real()

    monkeypatch.setattr(m.host_room, "slot_or_none", slow_second_slot)
    task = asyncio.create_task(m.reserve(make_ns(), make_tokens(3)))
    await stalled.wait()
    assert m.host.free_slots == 3  # the first block's slot is taken
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert m.host.free_slots == 4
    await m.close(flush=False)


async def test_blocks_reserved_twice_before_a_commit_keep_one_slot_and_free_the_other() -> None:
    # Two engines saving one shared prefix at once, or a client's chain naming a key twice:
    # the second commit must not replace the first's entry and orphan its slot for good.
    m = await manager(8)
    ns, tokens, blocks = make_ns(), make_tokens(2), make_blocks(2)
    rows = blocks.contiguous().view(torch.uint8).view(2, NBYTES)
    first, second = await m.reserve(ns, tokens), await m.reserve(ns, tokens)
    for r in (first, second):
        m.host.write(r.slots, rows, list(r.rows))
    assert (await m.commit(first)).stored == 2
    again = await m.commit(second)
    assert (again.stored, again.present) == (0, 2)
    assert m.host.free_slots == 6 and len(m.index) == 2
    key = ns.block_keys(make_tokens(1, seed=5))[0]
    twice = await m.reserve(ns, KeyChain([key, key]))
    assert (await m.commit(twice)).stored == 1 and m.host.free_slots == 5
    assert await m.evict(keys=[*ns.block_keys(tokens), key]) == 3
    assert m.host.free_slots == 8  # every slot is back
    await m.close(flush=False)


async def test_a_block_admitted_then_aborted_is_admitted_by_its_next_offer() -> None:
    # admission=2: a client that reserves a block on its second offer and then gives up (an
    # abort, a dropped connection) made that offer all the same; the block was counted
    # from zero again and needed two more offers to be stored.
    m = await TierManager.open(host_bytes=4 * NBYTES, slot_bytes=NBYTES, admission=2)
    ns, tokens = make_ns(), make_tokens(2)
    assert (await m.reserve(ns, tokens)).rejected == 2  # the first offer
    second = await m.reserve(ns, tokens)
    assert len(second.slots) == 2
    await m.abort(second)
    third = await m.reserve(ns, tokens)
    assert (len(third.slots), third.rejected) == (2, 0)
    await m.abort(third)
    await m.close(flush=False)


async def test_a_save_cancelled_while_its_admitted_block_waits_for_room_keeps_its_offers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host slot of a block admitted on its second offer comes from evicting a dirty
    # block, which is written back to disk first; a save cancelled there (its caller gave
    # up) lost the block's offers.
    m = await TierManager.open(
        host_bytes=NBYTES, slot_bytes=NBYTES, admission=2,
        disk_url=str(tmp_path / "disk"), disk_bytes=8 * NBYTES,
    )  # fmt: skip
    ns, held, tokens = make_ns(), make_tokens(1, seed=1), make_tokens(1, seed=2)
    for _ in range(2):
        await m.save(ns, held, make_blocks(1, seed=1))  # the host's one slot, dirty
    assert (await m.save(ns, tokens, make_blocks(1, seed=2))).rejected == 1  # the first offer
    disk = m.disk
    assert disk is not None
    stalled, real = asyncio.Event(), disk.io.write

    async def slow(path: str, items: list) -> list:  # type: ignore[type-arg]
        stalled.set()
        await asyncio.sleep(3600)  # the write-back of the held block, cancelled below
        return await real(path, items)

    monkeypatch.setattr(disk.io, "write", slow)
    save = asyncio.create_task(m.save(ns, tokens, make_blocks(1, seed=2)))  # the second
    await stalled.wait()
    save.cancel()
    with pytest.raises(asyncio.CancelledError):
        await save
    monkeypatch.setattr(disk.io, "write", real)
    assert (await m.save(ns, tokens, make_blocks(1, seed=2))).stored == 1  # the third stores it
    await m.close(flush=False)


async def test_a_block_admitted_without_room_is_stored_by_the_next_round() -> None:
    # admission=2: the second offer admits a block; one that then finds no host slot (a reader
    # holds the rest) is offered again by the save's next round, which must store it, not
    # count it as a first offer and leave a hole in the chain.
    m = await TierManager.open(host_bytes=4 * NBYTES, slot_bytes=NBYTES, admission=2)
    ns, other, tokens = make_ns(), make_tokens(2, seed=9), make_tokens(4)
    for _ in range(2):
        await m.save(ns, other, make_blocks(2, seed=9))
    lease = await m.acquire(ns, other)  # 2 of the 4 slots held by a reader
    assert (await m.save(ns, tokens, make_blocks(4))).rejected == 4  # the first offer
    first = await m.reserve(ns, tokens)  # the second: room for blocks 0 and 1 only
    assert (first.walked, len(first.slots)) == (2, 2)
    m.host.write(first.slots, make_blocks(4).contiguous().view(torch.uint8).view(4, NBYTES), [0, 1])
    await m.commit(first)
    await m.release(lease)
    rest = await m.reserve(ns, tokens, first_block=2)
    assert (rest.walked, len(rest.slots), rest.rejected) == (2, 2, 0)
    await m.abort(rest)
    await m.close(flush=False)
