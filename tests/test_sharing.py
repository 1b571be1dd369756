"""The shared tier against a real SeaweedFS: two managers on one prefix stand for two nodes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import obstore
import pytest
import torch

from tests.conftest import NBYTES, SPEC, as_bytes, make_blocks, make_ns, make_tokens
from tests.services.seaweedfs import objects, options, slow_gateway
from tiercache import TierManager
from tiercache.bench.seaweedfs import SeaweedFS
from tiercache.keys import Namespace
from tiercache.sharing import MAX_FILLS, Sharing
from tiercache.storage_format import stored_nbytes, zarr_attrs
from tiercache.tiers.remote import TRAILER_BYTES, object_key, retention

pytestmark = pytest.mark.service

NS = make_ns()


async def test_a_block_saved_on_one_node_is_loaded_on_another_byte_exact(open_node: Any) -> None:
    a, b = await open_node("a"), await open_node("b")
    tokens, blocks = make_tokens(3), make_blocks(3)
    await a.save(NS, tokens, blocks)
    assert await a.shared.drain(30) == 0

    hit = await b.lookup(NS, tokens)
    got = await b.load(NS, tokens)

    assert hit.tiers == ["remote"] * 3
    assert torch.equal(got.data, as_bytes(blocks))
    assert b.stats.lookups["remote"] == 3
    assert b.stats.transfer_bytes[("remote", "host")] == 3 * NBYTES
    assert (await b.lookup(NS, tokens)).tiers == ["host"] * 3  # promoted: the next hit is local


async def test_a_corrupted_object_is_a_counted_miss_never_data(open_node: Any) -> None:
    a, b = await open_node("a"), await open_node("b")
    tokens, blocks = make_tokens(3), make_blocks(3)
    await a.save(NS, tokens, blocks)
    assert await a.shared.drain(30) == 0
    key = object_key(f"ns/{NS.hex}", NS.block_keys(tokens)[1])
    body = bytearray(await (await obstore.get_async(a.remote.obj, key)).bytes_async())
    body[7] ^= 0x40
    await obstore.put_async(a.remote.obj, key, bytes(body))

    got = await b.load(NS, tokens)

    assert got.tiers == ["remote"]
    assert torch.equal(got.data, as_bytes(blocks[:1]))
    assert b.stats.corrupt_blocks == 1


async def test_a_truncated_object_is_a_counted_miss(open_node: Any) -> None:
    a, b = await open_node("a"), await open_node("b")
    tokens = make_tokens(2)
    await a.save(NS, tokens, make_blocks(2))
    assert await a.shared.drain(30) == 0
    key = object_key(f"ns/{NS.hex}", NS.block_keys(tokens)[0])
    body = await (await obstore.get_async(a.remote.obj, key)).bytes_async()
    await obstore.put_async(a.remote.obj, key, bytes(body)[: NBYTES + TRAILER_BYTES - 1])

    assert (await b.lookup(NS, tokens)).tiers == []
    assert b.stats.corrupt_blocks == 1


async def test_an_object_stored_under_another_blocks_key_is_a_miss(open_node: Any) -> None:
    a, b = await open_node("a"), await open_node("b")
    tokens = make_tokens(2)
    await a.save(NS, tokens, make_blocks(2))
    assert await a.shared.drain(30) == 0
    first, second = (object_key(f"ns/{NS.hex}", k) for k in NS.block_keys(tokens))
    body = await (await obstore.get_async(a.remote.obj, second)).bytes_async()
    await obstore.put_async(a.remote.obj, first, bytes(body))  # intact bytes, wrong block

    assert (await b.lookup(NS, tokens)).tiers == []
    assert b.stats.corrupt_blocks == 1


@pytest.mark.parametrize("damage", ["deleted", "cut_short"])
async def test_a_block_retention_deleted_or_cut_short_is_uploaded_again_on_its_next_hit(
    open_node: Any, damage: str
) -> None:
    a = await open_node("a", sharing=Sharing(recheck_seconds=0))
    b = await open_node("b")
    tokens, blocks = make_tokens(3), make_blocks(3)
    await a.save(NS, tokens, blocks)
    assert await a.shared.drain(30) == 0
    if damage == "deleted":
        await retention(a.remote, max_age=60, now=time.time() + 3600)
    else:
        key = object_key(f"ns/{NS.hex}", NS.block_keys(tokens)[0])
        await obstore.put_async(a.remote.obj, key, b"cut short")
    assert (await b.lookup(NS, tokens)).tiers == []

    await a.load(NS, tokens)  # a hit on the node that uploaded them
    assert await a.shared.drain(30) == 0

    got = await b.load(NS, tokens)
    assert torch.equal(got.data, as_bytes(blocks)) and got.tiers == ["remote"] * 3
    assert a.shared.state()["found_gone_blocks"] == (3 if damage == "deleted" else 1)


async def test_two_nodes_writing_the_same_blocks_at_once_leave_one_intact_copy(
    open_node: Any,
) -> None:
    a, b, c = await open_node("a"), await open_node("b"), await open_node("c")
    tokens, blocks = make_tokens(8), make_blocks(8)
    await asyncio.gather(a.save(NS, tokens, blocks), b.save(NS, tokens, blocks))
    assert await asyncio.gather(a.shared.drain(30), b.shared.drain(30)) == [0, 0]

    got = await c.load(NS, tokens)

    assert torch.equal(got.data, as_bytes(blocks)) and got.tiers == ["remote"] * 8
    keys = {object_key(f"ns/{NS.hex}", k) for k in NS.block_keys(tokens)}
    assert set(await objects(c)) == keys | {f"ns/{NS.hex}/zarr.json"}


async def test_with_admission_two_only_blocks_seen_twice_are_shared(open_node: Any) -> None:
    a = await open_node("a", sharing=Sharing(admission=2))
    reused, once = make_tokens(2, seed=1), make_tokens(2, seed=2)
    await a.save(NS, reused, make_blocks(2, seed=1))
    await a.save(NS, once, make_blocks(2, seed=2))
    assert await a.shared.drain(30) == 0 and await objects(a) == []

    await a.load(NS, reused)  # the second sighting
    assert await a.shared.drain(30) == 0

    assert await objects(a, f"ns/{NS.hex}/b/") == sorted(
        object_key(f"ns/{NS.hex}", k) for k in NS.block_keys(reused)
    )


async def test_with_admission_two_a_block_a_full_queue_refused_goes_on_its_next_sighting(
    open_node: Any,
) -> None:
    a = await open_node("a", sharing=Sharing(admission=2, queue_blocks=2))
    tokens = make_tokens(4)
    await a.save(NS, tokens, make_blocks(4))
    await a.load(NS, tokens)  # the second sightings: two fit the queue, two are refused
    assert await a.shared.drain(30) == 0
    assert a.shared.state()["dropped_blocks"] == {"queue_full": 2}
    assert len(await objects(a, f"ns/{NS.hex}/b/")) == 2

    await a.load(NS, tokens)  # the refused two are offered again
    assert await a.shared.drain(30) == 0

    assert await objects(a, f"ns/{NS.hex}/b/") == sorted(
        object_key(f"ns/{NS.hex}", k) for k in NS.block_keys(tokens)
    )


async def test_with_admission_zero_only_pinned_sessions_are_shared(open_node: Any) -> None:
    a = await open_node("a", sharing=Sharing(admission=0))
    kept, other = make_tokens(2, seed=1), make_tokens(3, seed=2)
    await a.save(NS, kept, make_blocks(2, seed=1), session="kept")
    await a.save(NS, other, make_blocks(3, seed=2), session="other")
    await a.load(NS, other)

    await a.pin("kept")
    assert await a.shared.drain(30) == 0

    assert await objects(a, f"ns/{NS.hex}/b/") == sorted(
        object_key(f"ns/{NS.hex}", k) for k in NS.block_keys(kept)
    )


async def test_namespaces_are_apart_in_the_bucket_and_never_hit_each_other(
    open_node: Any,
) -> None:
    a, b = await open_node("a"), await open_node("b")
    tenant_a, tenant_b = make_ns(salt="tenant-a"), make_ns(salt="tenant-b")
    tokens = make_tokens(2)
    await a.save(tenant_a, tokens, make_blocks(2))
    assert await a.shared.drain(30) == 0

    assert (await b.lookup(tenant_b, tokens)).tiers == []
    assert {p.split("/")[1] for p in await objects(a)} == {tenant_a.hex}


async def test_a_quantized_namespace_is_shared_as_its_records_and_says_its_format(
    open_node: Any,
) -> None:
    int8 = Namespace("test-model", SPEC, store_dtype="int8")
    a, b = await open_node("a"), await open_node("b")
    tokens, blocks = make_tokens(3), make_blocks(3)
    await a.save(int8, tokens, blocks)
    assert await a.shared.drain(30) == 0
    stored = await a.load(int8, tokens)

    got = await b.load(int8, tokens)

    assert got.tiers == ["remote"] * 3 and got.data.shape[1] == stored_nbytes(SPEC, "int8")
    assert torch.equal(got.data, stored.data)  # the records travel, quantized once
    assert (got.kv() - blocks).abs().max() <= blocks.abs().max() / 127  # int8's step
    group = await obstore.get_async(a.remote.obj, f"ns/{int8.hex}/zarr.json")
    attrs = json.loads(bytes(await group.bytes_async()))["attributes"]["tiercache"]
    assert attrs["format"] == zarr_attrs(SPEC, "int8")


async def test_a_store_slower_than_the_deadline_costs_one_lookup_one_deadline(
    open_node: Any, seaweedfs: SeaweedFS, remote_url: str
) -> None:
    a = await open_node("a")
    prompts = [make_tokens(2, seed=s) for s in range(4)]
    for s, tokens in enumerate(prompts):
        await a.save(NS, tokens, make_blocks(2, seed=s))
    assert await a.shared.drain(30) == 0
    deadline = 0.5
    async with slow_gateway(seaweedfs, delay=0.3) as endpoint:  # one GET in time, two are not
        opts = dataclasses.replace(options(seaweedfs, timeout=deadline), endpoint=endpoint)
        b = await TierManager.open(
            host_bytes=16 * NBYTES, remote_url=remote_url, remote_options=opts
        )
        try:
            await b.lookup(NS, prompts[0])  # waits the deadline; its fill finishes late
            waits = []
            for tokens in prompts[1:]:
                # The fill before finishes (late), the store up all along.
                await asyncio.gather(*(task for task, _ in b.shared._fills.values()))
                t0 = time.monotonic()
                await b.lookup(NS, tokens)
                waits.append(time.monotonic() - t0)

            assert b.remote.up and max(waits) < deadline / 2, waits
            assert b.stats.errors["remote_timeout"] == 1
        finally:
            await b.close(flush=False)


async def test_a_burst_of_misses_against_a_slow_store_runs_at_most_max_fills(
    open_node: Any, seaweedfs: SeaweedFS, remote_url: str
) -> None:
    a = await open_node("a")
    prompts = [make_tokens(2, seed=s) for s in range(MAX_FILLS + 4)]
    for s, tokens in enumerate(prompts):
        await a.save(NS, tokens, make_blocks(2, seed=s))
    assert await a.shared.drain(30) == 0
    async with slow_gateway(seaweedfs, delay=0.3) as endpoint:  # a fill takes two GETs
        opts = dataclasses.replace(options(seaweedfs, timeout=0.5), endpoint=endpoint)
        b = await TierManager.open(
            host_bytes=64 * NBYTES, remote_url=remote_url, remote_options=opts
        )
        try:
            assert b.shared is not None
            await asyncio.gather(*(b.lookup(NS, tokens) for tokens in prompts))
            assert len(b.shared._fills) == MAX_FILLS  # the other four started none
            assert b.shared.state()["fills_skipped"] == 4
            await asyncio.gather(*(task for task, _ in b.shared._fills.values()))

            # Once those are done, the skipped misses fill as any other.
            for tokens in prompts:
                await b.lookup(NS, tokens)
            await asyncio.gather(*(task for task, _ in b.shared._fills.values()))
            for tokens in prompts:
                assert (await b.lookup(NS, tokens)).tiers == ["host", "host"]
        finally:
            await b.close(flush=False)


async def test_an_upload_batch_that_raises_is_retried_and_uploads_go_on(
    open_node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await open_node("a")
    assert a.shared is not None
    real, calls = a.shared._sources, []

    async def sources(batch: Any) -> Any:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("an unforeseen error reading the batch")
        return await real(batch)

    monkeypatch.setattr(a.shared, "_sources", sources)
    tokens, blocks = make_tokens(3), make_blocks(3)
    await a.save(NS, tokens, blocks)
    assert await a.shared.drain(30) == 0  # the failed batch came back and went out
    assert calls[0] == 3 and len(calls) >= 2
    assert a.stats.errors["remote_write"] == 1
    got = await (await open_node("b")).load(NS, tokens)
    assert got.tiers == ["remote"] * 3 and torch.equal(got.data, as_bytes(blocks))
