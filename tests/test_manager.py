"""The tier manager over a real host arena and a real zarr disk tier on a tmp dir."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import (
    NBYTES,
    SPEC,
    OpenCache,
    as_bytes,
    flip_byte,
    make_blocks,
    make_ns,
    make_tokens,
)
from tiercache import BlockShapeError, KVSpec, NoRoom, SessionPinned, UnknownSession
from tiercache.keys import KeyChain, Namespace

NS = make_ns()


async def test_save_then_load_returns_the_exact_bytes(open_cache: OpenCache) -> None:
    m = await open_cache()
    tokens, blocks = make_tokens(3), make_blocks(3)
    assert (await m.save(NS, tokens, blocks)).stored == 3
    got = await m.load(NS, tokens)
    assert got.tiers == ["host", "host", "host"]
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))


async def test_lookup_reports_the_cached_prefix_and_its_tiers(open_cache: OpenCache) -> None:
    m = await open_cache()
    tokens = make_tokens(3)
    await m.save(NS, tokens[:8], make_blocks(2))
    hit = await m.lookup(NS, [*tokens, 1, 2])  # 3 full blocks and a partial tail
    assert len(hit.keys) == 3
    assert hit.tiers == ["host", "host"]
    assert hit.tokens == 8


async def test_a_changed_token_ends_the_hit_at_its_block(open_cache: OpenCache) -> None:
    m = await open_cache()
    tokens = make_tokens(3)
    await m.save(NS, tokens, make_blocks(3))
    changed = list(tokens)
    changed[5] += 1  # inside block 1
    assert (await m.lookup(NS, changed)).blocks == 1


async def test_other_salt_or_model_never_hits(open_cache: OpenCache) -> None:
    m = await open_cache()
    tokens = make_tokens(2)
    await m.save(NS, tokens, make_blocks(2))
    assert (await m.lookup(make_ns(salt="tenant-b"), tokens)).blocks == 0
    assert (await m.lookup(make_ns(model="other-model"), tokens)).blocks == 0


async def test_saving_blocks_already_cached_writes_nothing(open_cache: OpenCache) -> None:
    m = await open_cache()
    tokens = make_tokens(2)
    await m.save(NS, tokens, make_blocks(2))
    again = await m.save(NS, tokens, make_blocks(2, seed=9))
    assert (again.stored, again.present) == (0, 2)
    got = await m.load(NS, tokens)
    assert torch.equal(as_bytes(got.kv()), as_bytes(make_blocks(2)))


async def test_first_block_saves_a_continuation(open_cache: OpenCache) -> None:
    m = await open_cache()
    tokens, blocks = make_tokens(4), make_blocks(4)
    await m.save(NS, tokens[:8], blocks[:2])
    await m.save(NS, tokens, blocks[2:], first_block=2)
    got = await m.load(NS, tokens)
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))


async def test_a_negative_max_blocks_is_refused_by_name(open_cache: OpenCache) -> None:
    m = await open_cache()
    tokens = make_tokens(2)
    await m.save(NS, tokens, make_blocks(2))
    with pytest.raises(ValueError, match=r"^max_blocks must be >= 0 \(or None: no cap\), got -1$"):
        await m.load(NS, tokens, max_blocks=-1)  # not a slice's -1: all blocks but the last
    assert (await m.load(NS, tokens, max_blocks=0)).blocks == 0


@pytest.mark.parametrize("value", [2**70, True, 1.5])
async def test_a_block_number_the_socket_client_refuses_is_refused_embedded_too(
    open_cache: OpenCache, value: Any
) -> None:
    m = await open_cache()
    tokens, blocks = make_tokens(2), make_blocks(2)
    for call in (
        m.save(NS, tokens, blocks[:1], first_block=value),  # True saved block 1 before
        m.lookup(NS, tokens, first_block=value),
        m.load(NS, tokens, first_block=value),
    ):
        with pytest.raises(ValueError, match=r"^first_block must be"):
            await call
    with pytest.raises(ValueError, match=r"^max_blocks must be"):
        await m.load(NS, tokens, max_blocks=value)
    assert (await m.lookup(NS, tokens)).blocks == 0


async def test_a_disk_budget_lowered_at_reopen_is_kept_from_the_open_on(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(host_blocks=8, disk_blocks=16)
    a, b = make_tokens(4, seed=1), make_tokens(4, seed=2)
    await m.save(NS, a, make_blocks(4, seed=1), session="a")
    await m.save(NS, b, make_blocks(4, seed=2), session="b")
    await m.pin("b")
    await m.close()

    m = await open_cache(host_blocks=8, disk_blocks=5)  # the same store
    # Over budget by 3 blocks: the 3 least recent go at once, never a pinned one.
    assert m.usage()["disk"] == {
        "capacity_bytes": 5 * NBYTES,
        "used_bytes": 5 * NBYTES,
        "blocks": 5,
        "kv_bytes": 5 * NBYTES,
    }
    assert m.stats.evictions["disk"] == 3
    assert (await m.lookup(NS, b)).blocks == 4
    await m.close()

    m = await open_cache(host_blocks=8, disk_blocks=2)
    # Only the pinned session is left, over the budget: it stays (a pin is the operator's).
    assert m.usage()["disk"]["blocks"] == 4
    assert (await m.lookup(NS, a)).blocks == 0 and (await m.lookup(NS, b)).blocks == 4
    await m.close()


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        (torch.zeros((1, *SPEC.block_shape), dtype=torch.float16), "dtype torch.float16"),
        (torch.zeros((1, 2, 2, 4, 2, 4), dtype=torch.bfloat16), "must be [n, 2, 2, 4, 2, 8]"),
        (torch.zeros((1, NBYTES + 1), dtype=torch.uint8), f"[n, {NBYTES}]"),
        (torch.zeros((3, *SPEC.block_shape), dtype=torch.bfloat16), "do not fit the 2 full blocks"),
    ],
)
async def test_wrong_shapes_and_dtypes_are_rejected_by_name(
    open_cache: OpenCache, blocks: torch.Tensor, message: str
) -> None:
    m = await open_cache()
    with pytest.raises(BlockShapeError) as err:
        await m.save(NS, make_tokens(2), blocks)
    assert message in str(err.value)
    assert len(m.index) == 0


async def test_a_namespace_with_blocks_bigger_than_host_slots_is_rejected(
    open_cache: OpenCache,
) -> None:
    m = await open_cache()
    await m.register(NS)
    big = make_ns(
        spec=KVSpec(num_layers=4, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4)
    )
    with pytest.raises(BlockShapeError, match="slot_bytes"):
        await m.register(big)


async def test_host_eviction_writes_back_to_disk_in_lru_order(open_cache: OpenCache) -> None:
    m = await open_cache(host_blocks=2, write="write-back")
    tokens, blocks = make_tokens(4), make_blocks(4)
    await m.save(NS, tokens, blocks)
    assert (await m.lookup(NS, tokens)).tiers == ["disk", "disk", "host", "host"]
    assert m.stats.evictions["host"] == 2
    got = await m.load(NS, tokens)
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))
    assert got.tiers == ["disk", "disk", "host", "host"]


async def test_write_through_puts_every_block_on_disk_at_save(open_cache: OpenCache) -> None:
    m = await open_cache(write="write-through")
    await m.save(NS, make_tokens(3), make_blocks(3))
    assert m.disk is not None and len(m.disk.records) == 3


async def test_write_back_leaves_disk_empty_until_flush(open_cache: OpenCache) -> None:
    m = await open_cache(write="write-back")
    await m.save(NS, make_tokens(3), make_blocks(3))
    assert m.disk is not None and len(m.disk.records) == 0
    assert await m.flush() == 3 * NBYTES
    assert len(m.disk.records) == 3


async def test_a_disk_hit_is_promoted_to_host_on_load(open_cache: OpenCache) -> None:
    m = await open_cache(host_blocks=2)
    tokens = make_tokens(4)
    await m.save(NS, tokens, make_blocks(4))
    await m.load(NS, tokens[:8])  # blocks 0, 1 come from disk and take the host slots
    assert (await m.lookup(NS, tokens)).tiers == ["host", "host", "disk", "disk"]


async def test_prefetch_promotes_a_session_from_disk(open_cache: OpenCache) -> None:
    m = await open_cache(host_blocks=2)
    a, b = make_tokens(2, seed=1), make_tokens(2, seed=2)
    await m.save(NS, a, make_blocks(2), session="a")
    await m.save(NS, b, make_blocks(2), session="b")
    assert (await m.lookup(NS, a)).tiers == ["disk", "disk"]
    assert await m.prefetch(session="a") == 2
    assert (await m.lookup(NS, a)).tiers == ["host", "host"]


async def test_prefetch_of_an_unknown_session_is_a_typed_error(open_cache: OpenCache) -> None:
    m = await open_cache()
    with pytest.raises(UnknownSession, match="'nope'"):
        await m.prefetch(session="nope")


async def test_pinned_blocks_are_never_evicted(open_cache: OpenCache) -> None:
    m = await open_cache(host_blocks=2, disk_blocks=None)
    pinned = make_tokens(2, seed=1)
    await m.save(NS, pinned, make_blocks(2), session="keep")
    assert await m.pin("keep") == 2
    result = await m.save(NS, make_tokens(2, seed=2), make_blocks(2, seed=2))
    assert (result.stored, result.rejected) == (0, 2)
    assert (await m.lookup(NS, pinned)).tiers == ["host", "host"]
    assert await m.unpin("keep") == 2
    assert (await m.save(NS, make_tokens(2, seed=2), make_blocks(2, seed=2))).stored == 2


async def test_pinning_twice_then_unpinning_once_releases(open_cache: OpenCache) -> None:
    m = await open_cache()
    await m.save(NS, make_tokens(2), make_blocks(2), session="s")
    assert await m.pin("s") == 2
    assert await m.pin("s") == 0
    assert await m.unpin("s") == 2
    assert not m.index.pins


async def test_no_room_when_every_host_slot_is_pinned(open_cache: OpenCache) -> None:
    m = await open_cache(host_blocks=1, disk_blocks=None)
    await m.save(NS, make_tokens(1), make_blocks(1), session="s")
    await m.pin("s")
    async with m._lock:
        with pytest.raises(NoRoom, match="unpin a session or raise"):
            await m.host_room.slot()


async def test_evicting_a_session_keeps_blocks_another_session_shares(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(host_blocks=8)
    tokens = make_tokens(3)
    await m.save(NS, tokens[:8], make_blocks(2), session="short")
    await m.save(NS, tokens, make_blocks(3), session="long")
    assert await m.evict(session="long") == 1
    assert (await m.lookup(NS, tokens)).blocks == 2
    with pytest.raises(UnknownSession):
        await m.evict(session="long")


async def test_a_key_given_twice_to_evict_is_one_block_evicted(open_cache: OpenCache) -> None:
    m = await open_cache()
    tokens = make_tokens(2)
    await m.save(NS, tokens, make_blocks(2))
    await m.flush()  # on host and disk: each copy dropped once
    first = (await m.lookup(NS, tokens)).keys[0]
    assert await m.evict(keys=[first, first]) == 1
    assert (await m.lookup(NS, tokens)).blocks == 0
    assert len(m.index) == 1
    assert m.disk is not None and m.disk.num_blocks == 1


async def test_a_pinned_session_cannot_be_evicted_without_unpinning(open_cache: OpenCache) -> None:
    m = await open_cache()
    await m.save(NS, make_tokens(2), make_blocks(2), session="s")
    await m.pin("s")
    with pytest.raises(SessionPinned):
        await m.evict(session="s")
    assert (await m.lookup(NS, make_tokens(2))).blocks == 2


async def test_a_session_past_its_ttl_is_forgotten_and_evicted(open_cache: OpenCache) -> None:
    m = await open_cache()
    tokens = make_tokens(2)
    await m.save(NS, tokens, make_blocks(2), session="s")
    await m.pin("s")
    await m.set_ttl("s", 60)
    sess = m.sessions["s"]
    assert sess.expires is not None
    assert await m.expire(now=sess.expires - 1) == []
    assert await m.expire(now=sess.expires) == ["s"]
    assert (await m.lookup(NS, tokens)).blocks == 0
    assert "s" not in m.sessions


async def test_an_expiry_waiting_for_the_lock_acts_on_the_deadlines_it_finds_there(
    open_cache: OpenCache,
) -> None:
    m = await open_cache()
    for sid, seed in (("a", 1), ("b", 2)):
        await m.save(NS, make_tokens(2, seed=seed), make_blocks(2), session=sid)
        await m.set_ttl(sid, 60)
    now = m.sessions["a"].expires + 1  # type: ignore[operator]
    async with m._lock:  # busy (a flush, a write-through commit) while both wait
        refresh = asyncio.create_task(m.set_ttl("b", 3600))  # queued first: it wins
        await asyncio.sleep(0)
        first = asyncio.create_task(m.expire(now=now))
        second = asyncio.create_task(m.expire(now=now))  # the daemon's timer and a load's
        await asyncio.sleep(0.01)
    await refresh
    assert await first == ["a"]
    assert await second == []  # not a second forget of "a": UnknownSession
    assert list(m.sessions) == [m.sessions["b"]]
    assert (await m.lookup(NS, make_tokens(2, seed=2))).blocks == 2


async def test_admission_threshold_stores_on_second_offer(open_cache: OpenCache) -> None:
    m = await open_cache(admission=2)
    tokens = make_tokens(2)
    assert (await m.save(NS, tokens, make_blocks(2))).rejected == 2
    assert (await m.lookup(NS, tokens)).blocks == 0
    assert (await m.save(NS, tokens, make_blocks(2))).stored == 2


async def test_disk_budget_evicts_the_least_recently_used_disk_blocks(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(host_blocks=1, disk_blocks=3, write="write-through")
    for seed in range(5):
        await m.save(NS, make_tokens(1, seed=seed), make_blocks(1, seed=seed))
    assert m.disk is not None
    assert m.disk.used_bytes <= 3 * NBYTES
    on_disk = {e.key for e in m.index if e.disk is not None}
    assert on_disk == {NS.block_keys(make_tokens(1, seed=s))[0] for s in (2, 3, 4)}
    assert m.stats.evictions["disk"] == 2


async def test_a_block_read_from_disk_that_the_disk_evicts_while_it_is_kept_takes_no_slot(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(host_blocks=2, disk_blocks=2)
    tokens, blocks = make_tokens(2), make_blocks(2)
    await m.save(NS, tokens, blocks)
    await m.flush()  # blocks 0 and 1 on host and disk: the disk is full
    await m.save(NS, make_tokens(1, seed=5), make_blocks(1, seed=5))  # dirty; evicts 0 from host
    # Keeping block 0 in host evicts the dirty block, whose write-back evicts block 0 from disk.
    got = await m.load(NS, tokens)
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))
    in_host = sum(1 for e in m.index if "host" in e.at)
    assert m.usage()["host"]["blocks"] == in_host == len(m.host_room.policy)  # type: ignore[arg-type]


async def test_blocks_sessions_and_pins_survive_a_restart(open_cache: OpenCache) -> None:
    m = await open_cache(write="write-back")
    tokens, blocks = make_tokens(3), make_blocks(3)
    await m.save(NS, tokens, blocks, session="chat")
    await m.pin("chat")
    await m.close()  # flushes write-back blocks
    m2 = await open_cache()
    assert (await m2.lookup(NS, tokens)).tiers == ["disk", "disk", "disk"]
    assert m2.sessions["chat"].pinned
    assert all(m2.index.pins[e.key] == 1 for e in m2.index)
    got = await m2.load(NS, tokens)
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))


async def test_a_pinned_session_s_blocks_reach_disk_under_write_back(
    open_cache: OpenCache,
) -> None:
    # A close without a flush is what a crash leaves: a pin must outlive it, so the pin
    # writes the session's host-only blocks, and its later saves write through.
    m = await open_cache(host_blocks=8, write="write-back")
    tokens, blocks = make_tokens(4), make_blocks(4)
    other = make_tokens(2, seed=1)
    await m.save(NS, tokens[:8], blocks[:2], session="chat")
    await m.save(NS, other, make_blocks(2), session="unpinned")
    assert m.disk is not None and len(m.disk.records) == 0
    await m.pin("chat")
    assert len(m.disk.records) == 2
    await m.save(NS, tokens, blocks, session="chat")  # the next turn
    assert len(m.disk.records) == 4
    await m.close(flush=False)
    m2 = await open_cache()
    assert (await m2.lookup(NS, tokens)).tiers == ["disk"] * 4
    assert torch.equal(as_bytes((await m2.load(NS, tokens)).kv()), as_bytes(blocks))
    assert (await m2.lookup(NS, other)).blocks == 0  # not pinned: write-back as before


async def test_close_without_flush_loses_only_unwritten_write_back_blocks(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(host_blocks=2, write="write-back")
    tokens = make_tokens(4)
    await m.save(NS, tokens, make_blocks(4))  # blocks 0, 1 written back on eviction
    await m.close(flush=False)
    m2 = await open_cache()
    assert (await m2.lookup(NS, tokens)).tiers == ["disk", "disk"]


async def test_a_second_process_cannot_open_the_same_disk_dir(open_cache: OpenCache) -> None:
    from tiercache.tiers.disk import StoreError

    await open_cache()
    with pytest.raises(StoreError, match="in use by another process"):
        await open_cache()


async def test_memory_store_url_works_without_a_filesystem(open_cache: OpenCache) -> None:
    m = await open_cache(host_blocks=1, disk_url="memory://")
    tokens, blocks = make_tokens(3), make_blocks(3)
    await m.save(NS, tokens, blocks)
    got = await m.load(NS, tokens)
    assert got.tiers == ["disk", "disk", "host"]
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))


async def test_stored_blocks_form_a_zarr_array_zarr_itself_can_read(
    open_cache: OpenCache, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import zarr

    m = await open_cache(write="write-through")
    blocks = make_blocks(2)
    await m.save(NS, make_tokens(2), blocks)
    assert m.disk is not None
    arr = zarr.open_array(str(tmp_path / "disk"), path=f"ns/{NS.hex}", mode="r")
    assert arr.attrs["tiercache"]["logical_dtype"] == "bfloat16"
    slots = sorted(r.slot for r in m.disk.records)
    raw = torch.from_numpy(arr[slots[0] : slots[-1] + 1])
    assert sorted(map(bytes, raw.numpy())) == sorted(map(bytes, as_bytes(blocks).numpy()))


async def test_a_save_after_the_deadline_expires_the_session(open_cache: OpenCache) -> None:
    import asyncio

    m = await open_cache()
    tokens = make_tokens(2)
    await m.save(NS, tokens, make_blocks(2), session="short-lived")
    await m.set_ttl("short-lived", 0.05)
    await asyncio.sleep(0.06)
    await m.save(NS, make_tokens(1, seed=5), make_blocks(1, seed=5))
    assert "short-lived" not in m.sessions
    assert (await m.lookup(NS, tokens)).blocks == 0


async def test_a_prefetch_after_the_deadline_finds_the_session_gone(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(host_blocks=2)
    tokens = make_tokens(2)
    await m.save(NS, tokens, make_blocks(2), session="short-lived")
    await m.save(NS, make_tokens(2, seed=5), make_blocks(2, seed=5))  # pushes them to disk
    assert (await m.lookup(NS, tokens)).tiers == ["disk", "disk"]
    await m.set_ttl("short-lived", 0.05)
    await asyncio.sleep(0.06)
    with pytest.raises(UnknownSession):
        await m.prefetch(session="short-lived")
    assert (await m.lookup(NS, tokens)).blocks == 0


async def test_a_lookup_after_the_deadline_finds_no_hit_a_load_would_miss(
    open_cache: OpenCache,
) -> None:
    m = await open_cache()
    tokens = make_tokens(2)
    await m.save(NS, tokens, make_blocks(2), session="short-lived")
    await m.set_ttl("short-lived", 0.05)
    await asyncio.sleep(0.06)
    assert (await m.lookup(NS, tokens)).tiers == []  # the engine is promised nothing
    assert (await m.load(NS, tokens)).tiers == []
    tails = NS.tail_keys(make_tokens(1)[:3])
    await m.save(NS, KeyChain(tails[-1:]), make_blocks(1), session="tail")
    assert (await m.lookup_tail(NS, tails)) == (2, "host")
    await m.set_ttl("tail", 0.05)
    await asyncio.sleep(0.06)
    assert (await m.lookup_tail(NS, tails)) == (-1, "miss")


async def test_a_ttl_survives_a_restart(open_cache: OpenCache) -> None:
    m = await open_cache()
    await m.save(NS, make_tokens(2), make_blocks(2), session="s")
    await m.set_ttl("s", 3600)
    deadline = m.sessions["s"].expires
    await m.close()
    m2 = await open_cache()
    assert m2.sessions["s"].expires == deadline


async def test_a_reservation_is_invisible_until_committed(open_cache: OpenCache) -> None:
    m = await open_cache()
    tokens, blocks = make_tokens(2), make_blocks(2)
    r = await m.reserve(NS, tokens, session="s")
    assert len(r.slots) == 2 and (await m.lookup(NS, tokens)).blocks == 0
    assert m.host is not None
    m.host.write(r.slots, as_bytes(blocks))
    assert (await m.commit(r)).stored == 2
    got = await m.load(NS, tokens)
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))


async def test_an_aborted_reservation_gives_its_slots_back(open_cache: OpenCache) -> None:
    m = await open_cache(host_blocks=2)
    r = await m.reserve(NS, make_tokens(2))
    assert m.host is not None and m.host.free_slots == 0
    await m.abort(r)
    assert m.host.free_slots == 2 and len(m.index) == 0


async def test_acquire_promotes_disk_blocks_and_holds_them_until_release(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(host_blocks=2)
    a, b = make_tokens(2, seed=1), make_tokens(2, seed=2)
    blocks_a = make_blocks(2, seed=1)
    await m.save(NS, a, blocks_a)
    await m.save(NS, b, make_blocks(2, seed=2))  # pushes a to disk
    lease = await m.acquire(NS, a)
    assert lease.tiers == ["disk", "disk"] and len(lease.slots) == 2
    assert m.host is not None
    out = torch.empty((2, NBYTES), dtype=torch.uint8)
    m.host.read(lease.slots, out)
    assert torch.equal(out, as_bytes(blocks_a))
    # Leased: a save cannot evict them, so it finds no room.
    assert (await m.save(NS, make_tokens(1, seed=3), make_blocks(1, seed=3))).rejected == 1
    await m.release(lease)
    assert (await m.save(NS, make_tokens(1, seed=3), make_blocks(1, seed=3))).stored == 1


async def test_a_load_after_a_prefetch_records_its_lead(open_cache: OpenCache) -> None:
    m = await open_cache(host_blocks=2)
    a = make_tokens(2, seed=1)
    await m.save(NS, a, make_blocks(2, seed=1), session="a")
    await m.save(NS, make_tokens(2, seed=2), make_blocks(2, seed=2))
    assert await m.prefetch(session="a") == 2
    await m.load(NS, a)
    assert m.stats.prefetch["early"] == 1 and m.stats.prefetch["late"] == 0


async def test_a_bad_policy_name_leaves_the_disk_tier_free_for_a_retry(
    open_cache: OpenCache,
) -> None:
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'"):
        await open_cache(eviction="fifo")
    m = await open_cache()  # the failed attempt did not keep the directory locked
    assert m.disk is not None


async def test_a_save_that_evicts_writes_its_dirty_victims_back_in_one_journal_record(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    m = await open_cache(host_blocks=4, write="write-back")
    await m.save(NS, make_tokens(4, seed=1), make_blocks(4, seed=1))
    journal = tmp_path / "disk" / "journal"
    before = len(list(journal.iterdir()))
    await m.save(NS, make_tokens(4, seed=2), make_blocks(4, seed=2))  # evicts the 4 dirty blocks
    assert m.stats.evictions["host"] == 4
    assert m.disk is not None and m.disk.num_blocks == 4
    assert len(list(journal.iterdir())) == before + 1


async def test_many_concurrent_first_registrations_of_one_model_all_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 engines registering one model at once (seen in the daemon under load): every
    registration must find the array missing before any creates it, and all must succeed."""
    import asyncio

    import zarr

    from tiercache.tiers.disk import DiskTier

    real_open = zarr.api.asynchronous.open_array

    async def slow_open(*args: object, **kwargs: object) -> object:
        await asyncio.sleep(0.05)  # widen the window between "not found" and "create"
        return await real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(zarr.api.asynchronous, "open_array", slow_open)
    tier = await DiskTier.open(str(tmp_path / "disk"), 2**30)

    async def engine(i: int) -> str:
        await asyncio.sleep(i * 0.004)  # engines connect a few ms apart, as over sockets
        return await tier.register(NS)

    results = await asyncio.gather(*(engine(i) for i in range(16)), return_exceptions=True)
    await tier.close()
    assert results == [f"ns/{NS.hex}"] * 16


async def test_a_load_racing_a_prefetch_waits_for_it_and_counts_it_late(
    open_cache: OpenCache,
) -> None:
    import asyncio

    m = await open_cache(host_blocks=2)
    a, blocks_a = make_tokens(2, seed=1), make_blocks(2, seed=1)
    await m.save(NS, a, blocks_a, session="a")
    await m.save(NS, make_tokens(2, seed=2), make_blocks(2, seed=2))  # a is now only on disk
    prefetch = asyncio.create_task(m.prefetch(session="a"))
    await asyncio.sleep(0)  # the prefetch has registered its blocks as in flight
    got = await m.load(NS, a)
    assert await prefetch == 2
    assert got.tiers == ["host", "host"]  # served from what the prefetch brought up, not read twice
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks_a))
    assert m.stats.prefetch["late"] == 1


async def test_a_lookup_refreshes_the_recency_of_the_blocks_it_finds(open_cache: OpenCache) -> None:
    m = await open_cache(host_blocks=2, disk_blocks=None)
    a, b, c = (make_tokens(1, seed=s) for s in (1, 2, 3))
    await m.save(NS, a, make_blocks(1))
    await m.save(NS, b, make_blocks(1))
    assert (await m.lookup(NS, a)).blocks == 1  # a is in use: b is now the least recent

    await m.save(NS, c, make_blocks(1))

    assert [(await m.lookup(NS, t)).blocks for t in (a, b, c)] == [1, 0, 1]


async def test_touch_refreshes_blocks_an_engine_served_from_its_own_cache(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(host_blocks=2, disk_blocks=None)
    a, b, c = (make_tokens(1, seed=s) for s in (1, 2, 3))
    await m.save(NS, a, make_blocks(1))
    await m.save(NS, b, make_blocks(1))

    assert await m.touch(NS, [*a, *make_tokens(1, seed=9)]) == 1  # a's block; the next is absent
    await m.save(NS, c, make_blocks(1))

    assert [(await m.lookup(NS, t)).blocks for t in (a, b, c)] == [1, 0, 1]


@pytest.mark.parametrize(("eviction", "kept"), [("lru", 0), ("prefix", 2)])
async def test_the_prefix_policy_trims_a_chain_from_its_end(
    open_cache: OpenCache, eviction: str, kept: int
) -> None:
    m = await open_cache(host_blocks=4, disk_blocks=None, eviction=eviction)
    chain = make_tokens(3, seed=1)
    await m.save(NS, chain, make_blocks(3))

    await m.save(NS, make_tokens(2, seed=2), make_blocks(2))  # room for one more: one goes

    # LRU drops the chain's first block, which leaves none of it reachable; the prefix policy
    # (it learns each block's parent from the save) drops the last and keeps a 2-block prefix.
    assert (await m.lookup(NS, chain)).blocks == kept


@pytest.mark.parametrize("how", ["load", "prefetch", "acquire"])
async def test_a_chain_promoted_from_disk_is_trimmed_from_its_end_too(
    open_cache: OpenCache, how: str
) -> None:
    # Promotions placed blocks in the host policy with no parent, so the prefix policy took a
    # chain read back from disk (after a restart, say) for six roots: it evicted its first
    # blocks and kept its last, which no lookup reaches without them.
    m = await open_cache(host_blocks=6, eviction="prefix")
    chain = make_tokens(6, seed=1)
    await m.save(NS, chain, make_blocks(6))
    await m.close()
    m = await open_cache(host_blocks=6, eviction="prefix")
    assert (await m.lookup(NS, chain)).tiers == ["disk"] * 6
    if how == "load":
        await m.load(NS, chain)
    elif how == "prefetch":
        assert await m.prefetch(NS, chain) == 6
    else:
        await m.release(await m.acquire(NS, chain))
    assert (await m.lookup(NS, chain)).tiers == ["host"] * 6

    await m.save(NS, make_tokens(3, seed=2), make_blocks(3))  # 3 of the chain's slots go

    assert (await m.lookup(NS, chain)).tiers == ["host"] * 3 + ["disk"] * 3


# --- load(into=): a resume straight into the engine's blocks ----------------------------------


async def test_a_load_into_the_engines_blocks_reads_exact_blocks_into_their_own_bytes(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(host_blocks=2)
    tokens, blocks = make_tokens(4), make_blocks(4)
    await m.save(NS, tokens, blocks)  # blocks 0, 1 leave the host tier for disk
    engine = torch.zeros((5, *SPEC.block_shape), dtype=SPEC.torch_dtype)
    got = await m.load(NS, tokens, into=engine)
    assert got.tiers == ["disk", "disk", "host", "host"]
    kv = got.kv()
    assert kv.data_ptr() == engine.data_ptr() and kv.shape[0] == 4  # no staging rows, no copy
    assert torch.equal(as_bytes(engine[:4]), as_bytes(blocks))
    assert not engine[4].any()  # a row past the load is left alone


@pytest.mark.parametrize("device", [False, True], ids=["host and disk", "device tier too"])
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
async def test_a_quantized_load_into_the_engines_blocks_is_what_kv_decodes(
    open_cache: OpenCache, fmt: str, device: bool
) -> None:
    """Each record is read into the tail of the engine block it decodes to
    (``results.record_rows``) from whichever tier holds it, and decoded there."""
    extra = {"device_bytes": 2 * NBYTES, "device_name": "cpu"} if device else {}
    m = await open_cache(host_blocks=2, **extra)
    ns = Namespace("test-model", SPEC, store_dtype=fmt)
    tokens, blocks = make_tokens(4), make_blocks(4)
    await m.save(ns, tokens, blocks)
    if device:  # block 0, on disk, up to the device tier
        assert await m.prefetch(ns, tokens[: SPEC.block_size]) == 1
    engine = torch.zeros((4, *SPEC.block_shape), dtype=SPEC.torch_dtype)
    got = await m.load(ns, tokens, into=engine)
    # Host slots hold more quantized blocks than exact ones: only block 0 went to disk.
    assert got.blocks == 4 and got.tiers[0] == ("device" if device else "disk")
    assert "host" in got.tiers
    assert got.kv().data_ptr() == engine.data_ptr()
    again = (await m.load(ns, tokens)).kv()  # the records, decoded by kv()
    assert torch.equal(as_bytes(engine), as_bytes(again))
    assert not torch.equal(as_bytes(engine), as_bytes(blocks))  # quantized, so not the bytes


async def test_a_load_into_stops_at_a_corrupted_disk_block(open_cache: OpenCache) -> None:
    m = await open_cache(host_blocks=1)
    tokens, blocks = make_tokens(3), make_blocks(3)
    await m.save(NS, tokens, blocks)  # blocks 0, 1 on disk only
    key1 = (await m.lookup(NS, tokens)).keys[1]
    bad = next(e for e in m.index if e.key == key1)
    assert m.disk is not None and bad.disk is not None
    path, offset = m.disk.location(bad.disk)
    flip_byte(path, offset + 3)
    engine = torch.zeros((3, *SPEC.block_shape), dtype=SPEC.torch_dtype)
    got = await m.load(NS, tokens, into=engine)
    assert got.blocks == 1 and got.tiers == ["disk"]
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks[:1]))


@pytest.mark.parametrize(
    ("into", "message"),
    [
        (torch.zeros((2, *SPEC.block_shape), dtype=torch.float16), "into must be bfloat16"),
        (torch.zeros((2, 2, 2, 4, 2, 4), dtype=torch.bfloat16), "[>= 2, 2, 2, 4, 2, 8]"),
        (torch.zeros((1, *SPEC.block_shape), dtype=torch.bfloat16), "[>= 2, 2, 2, 4, 2, 8]"),
        (
            torch.zeros((*SPEC.block_shape, 2), dtype=torch.bfloat16).movedim(-1, 0),
            "contiguous CPU tensor",
        ),
    ],
)
async def test_an_into_that_cannot_take_the_blocks_is_refused_by_name(
    open_cache: OpenCache, into: torch.Tensor, message: str
) -> None:
    m = await open_cache()
    tokens = make_tokens(2)
    await m.save(NS, tokens, make_blocks(2))
    with pytest.raises(BlockShapeError, match=re.escape(message)):
        await m.load(NS, tokens, into=into)
    got = await m.load(NS, tokens)  # nothing was lost or left leased
    assert got.blocks == 2


async def test_a_load_takes_out_or_into_not_both(open_cache: OpenCache) -> None:
    m = await open_cache()
    out = torch.zeros((1, NBYTES), dtype=torch.uint8)
    into = torch.zeros((1, *SPEC.block_shape), dtype=SPEC.torch_dtype)
    with pytest.raises(BlockShapeError, match=r"out .* or into .*, not both"):
        await m.load(NS, make_tokens(1), out=out, into=into)


@pytest.mark.parametrize("eviction", ["lru", "arc", "prefix"])
async def test_a_pinned_session_costs_the_eviction_walk_nothing(
    open_cache: OpenCache, eviction: str
) -> None:
    """The host and disk policies hold a pinned session's blocks out of their victims (the
    walk passed over each pinned block on every eviction) and take them back on unpin."""
    m = await open_cache(host_blocks=8, eviction=eviction, write="write-through")
    pinned, other = make_tokens(3, seed=1), make_tokens(3, seed=2)
    await m.save(NS, pinned, make_blocks(3, seed=1), session="chat")
    await m.pin("chat")
    await m.save(NS, other, make_blocks(3, seed=2))
    held = set(NS.block_keys(pinned))

    def first_victims(policy: object) -> list[bytes]:
        walk = list(policy.victims())  # type: ignore[attr-defined]
        return walk[: len(walk) - len(held)] if eviction == "prefix" else walk

    assert m.host_room.policy is not None and m.disk_room is not None
    for policy in (m.host_room.policy, m.disk_room.policy):
        walk = first_victims(policy)
        assert held.isdisjoint(walk) and set(NS.block_keys(other)) <= set(walk)
    await m.unpin("chat")
    for policy in (m.host_room.policy, m.disk_room.policy):
        assert held <= set(policy.victims())  # type: ignore[union-attr]
    # Saved again into the session while pinned: still held.
    await m.pin("chat")
    await m.evict(keys=list(NS.block_keys(other)))
    await m.save(NS, pinned, make_blocks(3, seed=1), session="chat")
    assert held.isdisjoint(first_victims(m.host_room.policy))
