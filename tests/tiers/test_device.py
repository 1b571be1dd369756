"""The device tier's pool on the CPU twin (``device="cpu"``): budget, LRU eviction, byte-exact
round trips, and concurrent reads and stores (copies run in a worker thread, so they really
overlap with the event loop) that never tear a block. The same class on ``cuda:0`` is tested
in tests/tiers/test_device_gpu.py."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.conftest import NBYTES, OpenCache, as_bytes, flip_byte, make_blocks, make_ns, make_tokens
from tests.tiers.device_scenarios import key, reads_while_stores_evict
from tiercache import TierManager
from tiercache.keys import BlockKey
from tiercache.tiers.device import DeviceTier

SLOT = 4096


def rows(n: int, seed: int = 0, width: int = SLOT) -> torch.Tensor:
    """``n`` random rows with no zero byte (so an unwritten byte shows)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, width), generator=g, dtype=torch.uint8)


def tier(slots: int, slot_bytes: int = SLOT) -> DeviceTier:
    t = DeviceTier(slots * slot_bytes + slot_bytes // 2, "cpu")  # half a slot left over
    t.format(slot_bytes)
    return t


async def read(t: DeviceTier, keys: list[BlockKey], width: int = SLOT) -> torch.Tensor:
    out = torch.zeros((len(keys), width), dtype=torch.uint8)
    await t.read(keys, out, list(range(len(keys))))
    return out


def test_the_budget_is_carved_into_whole_slots() -> None:
    t = tier(3)

    assert (t.num_slots, t.capacity_bytes, t.used_bytes, len(t)) == (3, 3 * SLOT, 0, 0)


@pytest.mark.parametrize("budget", [0, -1])
def test_a_budget_that_is_not_positive_is_refused(budget: int) -> None:
    with pytest.raises(ValueError, match=rf"^device tier budget must be positive, got {budget} B"):
        DeviceTier(budget, "cpu")


def test_a_block_larger_than_the_budget_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^device tier budget \(100 B\) holds no block of 200 B"):
        DeviceTier(100, "cpu").format(200)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_device_without_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^device tier on cuda:0, but torch sees no CUDA device"):
        DeviceTier(SLOT, "cuda:0")


async def test_put_then_read_returns_the_exact_bytes() -> None:
    t = tier(4)
    src = rows(3)

    put = await t.put([key(0), key(1), key(2)], src, [0, 1, 2])

    assert (put.stored, put.evicted, t.used_bytes) == (3, 0, 3 * SLOT)
    assert torch.equal(await read(t, [key(2), key(0)]), src[[2, 0]])


async def test_put_takes_scattered_source_rows_and_reads_fill_scattered_rows() -> None:
    t = tier(4)
    src = rows(6)

    await t.put([key(0), key(1), key(2)], src, [5, 1, 2])
    out = torch.zeros((5, SLOT), dtype=torch.uint8)
    await t.read([key(1), key(2), key(0)], out, [4, 0, 1])

    assert torch.equal(out[[4, 0, 1]], src[[1, 2, 5]])
    assert int(out[[2, 3]].count_nonzero()) == 0  # rows not asked for stay untouched


async def test_narrower_rows_than_a_slot_round_trip() -> None:
    t = tier(2)
    src = rows(2, width=100)

    await t.put([key(0), key(1)], src, [0, 1])

    assert torch.equal(await read(t, [key(0), key(1)], width=100), src)


async def test_a_key_already_there_is_not_stored_again() -> None:
    t = tier(2)
    await t.put([key(0)], rows(1, seed=1), [0])

    put = await t.put([key(0)], rows(1, seed=2), [0])

    assert put.stored == 0
    assert torch.equal(await read(t, [key(0)]), rows(1, seed=1))


async def test_a_full_tier_evicts_the_least_recently_used_block() -> None:
    t = tier(2)
    src = rows(3)
    await t.put([key(0), key(1)], src, [0, 1])
    await read(t, [key(0)])  # 1 is now the least recently used

    put = await t.put([key(2)], src, [2])

    assert (put.stored, put.evicted) == (1, 1)
    assert (key(0) in t, key(1) in t, key(2) in t) == (True, False, True)
    assert torch.equal(await read(t, [key(0), key(2)]), src[[0, 2]])


async def test_a_put_of_more_blocks_than_slots_stores_the_first_that_fit() -> None:
    t = tier(2)
    src = rows(3)

    put = await t.put([key(0), key(1), key(2)], src, [0, 1, 2])

    # A put never evicts the blocks it is itself storing: 2 finds no slot.
    assert (put.stored, put.evicted) == (2, 0)
    assert [key(i) in t for i in range(3)] == [True, True, False]
    assert t.used_bytes == 2 * SLOT


async def test_reading_a_block_that_is_not_there_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="is not in the device tier"):
        await read(tier(1), [key(7)])


@pytest.mark.parametrize(("src_rows", "bad"), [([2, 3], 3), ([-1, 0], -1), ([5], 5)])
async def test_a_source_row_out_of_range_is_refused_before_anything_is_stored(
    src_rows: list[int], bad: int
) -> None:
    t = tier(4)

    with pytest.raises(ValueError, match=f"^row {bad} is out of range for src of 3 rows"):
        await t.put([key(i) for i in range(len(src_rows))], rows(3), src_rows)

    assert (len(t), t.used_bytes) == (0, 0)


async def test_a_read_into_rows_out_of_range_is_refused_and_holds_nothing() -> None:
    t = tier(2)
    await t.put([key(0), key(1)], rows(2), [0, 1])
    out = torch.zeros((2, SLOT), dtype=torch.uint8)

    with pytest.raises(ValueError, match=r"^row 2 is out of range for out of 2 rows"):
        await t.read([key(0), key(1)], out, [1, 2])

    t.discard(key(0))
    assert t.used_bytes == SLOT  # its slot was not held by the refused read


async def test_discard_frees_the_slot() -> None:
    t = tier(1)
    await t.put([key(0)], rows(1), [0])

    assert t.discard(key(0)) is True
    assert t.discard(key(0)) is False
    assert (key(0) in t, t.used_bytes) == (False, 0)
    assert (await t.put([key(1)], rows(1), [0])).stored == 1


async def test_a_block_being_read_is_neither_evicted_nor_reused_after_a_discard() -> None:
    t = tier(1, slot_bytes=8 << 20)  # 8 MiB: the read is still copying when put runs
    src = rows(2, width=8 << 20)
    await t.put([key(0)], src, [0])

    reading = asyncio.create_task(read(t, [key(0)], width=8 << 20))
    await asyncio.sleep(0)  # the read holds its slot and copies in a worker thread
    blocked = await t.put([key(1)], src, [1])  # the only slot is being read: no room
    t.discard(key(0))  # the slot is the read's until it is done
    still_blocked = await t.put([key(1)], src, [1])
    got = await reading
    after = await t.put([key(1)], src, [1])

    assert (blocked.stored, still_blocked.stored, after.stored) == (0, 0, 1)
    assert torch.equal(got, src[:1])
    assert torch.equal(await read(t, [key(1)], width=8 << 20), src[1:])


async def test_a_block_discarded_while_it_is_stored_never_becomes_visible() -> None:
    t = tier(1, slot_bytes=8 << 20)
    storing = asyncio.create_task(t.put([key(0)], rows(1, width=8 << 20), [0]))
    await asyncio.sleep(0)

    assert t.discard(key(0)) is True
    assert (await storing).stored == 0
    assert (key(0) in t, t.used_bytes) == (False, 0)


async def all_free(t: DeviceTier) -> None:
    """Wait (at most 10 s) until no slot of ``t`` is in use."""
    for _ in range(1000):
        if not t.used_bytes:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{t.used_bytes} B of the device tier still in use")


async def test_a_cancelled_store_keeps_its_slot_until_its_copy_has_ended() -> None:
    t = tier(1, slot_bytes=32 << 20)  # 32 MiB: the copy goes on after the cancel
    src = rows(2, width=32 << 20)
    storing = asyncio.create_task(t.put([key(0)], src, [0]))
    await asyncio.sleep(0)  # the copy runs in a worker thread
    storing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await storing

    blocked = await t.put([key(1)], src, [1])  # else it would share the slot with that copy
    assert blocked.stored == 0
    await all_free(t)  # the slot comes back once the cancelled copy has ended

    assert (await t.put([key(1)], src, [1])).stored == 1
    assert key(0) not in t
    assert torch.equal(await read(t, [key(1)], width=32 << 20), src[1:])


async def test_a_cancelled_read_is_heard_once_its_copy_has_ended() -> None:
    # The copy goes on after a cancel (a worker thread, a stream): the slot it reads and the
    # caller's ``out`` it writes stay its own until the caller hears of the cancel.
    t = tier(1, slot_bytes=32 << 20)
    src = rows(2, width=32 << 20)
    await t.put([key(0)], src, [0])
    out = torch.zeros((1, 32 << 20), dtype=torch.uint8)
    reading = asyncio.create_task(t.read([key(0)], out, [0]))
    await asyncio.sleep(0)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    heard = out.clone()
    t.discard(key(0))

    assert (await t.put([key(1)], src, [1])).stored == 1  # its slot is free: the copy is over
    await asyncio.sleep(0.1)
    assert torch.equal(out, heard)  # and wrote nothing into ``out`` after


async def test_concurrent_reads_and_stores_never_tear_a_block() -> None:
    """Readers read whatever is present while writers store other keys into a tier too small
    for all of them (so stores keep evicting): every read equals its key's bytes."""
    t = tier(3, slot_bytes=256 << 10)
    src = rows(8, width=256 << 10)
    reads = await reads_while_stores_evict(t, src, lambda ks: read(t, ks, width=256 << 10))
    assert reads >= 10
    assert t.used_bytes <= t.capacity_bytes


# ------------------------------------------------------------------------------------------------
# The device tier in the manager (CPU twin, ``device_name="cpu"``): prefetch promotes disk ->
# host -> device, a later load is served from the device byte for byte, the budget holds, and a
# block that is corrupt below never reaches it.
# ------------------------------------------------------------------------------------------------


NS = make_ns()


async def with_device(open_cache: OpenCache, device_blocks: int, **kwargs: object) -> TierManager:
    return await open_cache(device_bytes=device_blocks * NBYTES, device_name="cpu", **kwargs)


async def on_disk_only(
    m: TierManager, session: str, n: int, seed: int
) -> tuple[list[int], torch.Tensor]:
    """Save ``n`` blocks as ``session`` and push them out of host memory (host holds 2)."""
    tokens, blocks = make_tokens(n, seed=seed), make_blocks(n, seed=seed)
    await m.save(NS, tokens, blocks, session=session)
    await m.save(NS, make_tokens(2, seed=99), make_blocks(2, seed=99))  # fills the host
    assert set((await m.lookup(NS, tokens)).tiers) == {"disk"}
    return tokens, blocks


async def test_the_device_tier_is_off_unless_configured(open_cache: OpenCache) -> None:
    m = await open_cache()

    assert m.device is None
    assert "device" not in m.usage()


async def test_prefetch_promotes_disk_to_host_to_device_and_load_is_served_from_it(
    open_cache: OpenCache,
) -> None:
    m = await with_device(open_cache, device_blocks=4, host_blocks=2)
    tokens, blocks = await on_disk_only(m, "a", 2, seed=1)

    assert await m.prefetch(session="a") == 2
    assert (await m.lookup(NS, tokens)).tiers == ["device", "device"]
    got = await m.load(NS, tokens)

    assert got.tiers == ["device", "device"]
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))
    assert m.stats.transfer_bytes[("disk", "host")] >= 2 * NBYTES
    assert m.stats.transfer_bytes[("host", "device")] == 2 * NBYTES
    assert m.stats.transfer_bytes[("device", "client")] == 2 * NBYTES
    assert m.stats.prefetch["early"] == 1  # the lead time of the prefetch was recorded
    assert m.usage()["device"] == {
        "capacity_bytes": 4 * NBYTES,
        "used_bytes": 2 * NBYTES,
        "blocks": 2,
    }


async def test_prefetch_of_host_blocks_puts_them_on_the_device(open_cache: OpenCache) -> None:
    m = await with_device(open_cache, device_blocks=4, host_blocks=4)
    tokens, blocks = make_tokens(3, seed=2), make_blocks(3, seed=2)
    await m.save(NS, tokens, blocks, session="a")

    assert await m.prefetch(session="a") == 3
    assert await m.prefetch(session="a") == 0  # already there: nothing moves
    assert m.stats.prefetch["noop"] == 1
    got = await m.load(NS, tokens)
    assert got.tiers == ["device"] * 3
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))


async def test_the_device_budget_holds_and_evicts_the_least_recent_session(
    open_cache: OpenCache,
) -> None:
    m = await with_device(open_cache, device_blocks=2, host_blocks=4)
    a, b = make_tokens(2, seed=1), make_tokens(2, seed=2)
    await m.save(NS, a, make_blocks(2, seed=1), session="a")
    await m.save(NS, b, make_blocks(2, seed=2), session="b")

    await m.prefetch(session="a")
    await m.prefetch(session="b")

    assert (await m.lookup(NS, a)).tiers == ["host", "host"]
    assert (await m.lookup(NS, b)).tiers == ["device", "device"]
    assert m.stats.evictions["device"] == 2
    assert m.usage()["device"]["used_bytes"] == 2 * NBYTES
    got = await m.load(NS, a)  # still served, from host, byte for byte
    assert torch.equal(as_bytes(got.kv()), as_bytes(make_blocks(2, seed=1)))


async def test_a_block_corrupt_on_disk_is_a_miss_and_never_reaches_the_device(
    open_cache: OpenCache,
) -> None:
    m = await with_device(open_cache, device_blocks=4, host_blocks=2, write="write-through")
    tokens, blocks = await on_disk_only(m, "a", 2, seed=3)
    e = m.index.get(NS.block_keys(tokens)[1])
    assert e is not None and e.disk is not None and m.disk is not None
    path, offset = m.disk.location(e.disk)
    flip_byte(path, offset + 100)

    assert await m.prefetch(session="a") == 1
    assert m.stats.corrupt_blocks == 1
    assert (await m.lookup(NS, tokens)).tiers == ["device"]
    got = await m.load(NS, tokens)
    assert got.tiers == ["device"]
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks[:1]))


async def test_evicting_a_session_drops_its_device_copies(open_cache: OpenCache) -> None:
    m = await with_device(open_cache, device_blocks=4, host_blocks=4)
    tokens = make_tokens(2, seed=4)
    await m.save(NS, tokens, make_blocks(2, seed=4), session="a")
    await m.prefetch(session="a")

    assert await m.evict(session="a") == 2
    assert (await m.lookup(NS, tokens)).blocks == 0
    assert m.usage()["device"]["used_bytes"] == 0


async def test_a_device_budget_below_one_block_fails_every_save_not_just_the_first(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(device_bytes=NBYTES // 2, device_name="cpu")

    for seed in range(2):
        with pytest.raises(ValueError, match=r"raise \[tiers\.device\] bytes"):
            await m.save(NS, make_tokens(2, seed=seed), make_blocks(2, seed=seed))

    assert not m.host.formatted and not m.device.formatted  # type: ignore[union-attr]
