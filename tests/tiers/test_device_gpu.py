"""The device tier on ``cuda:0``: byte-exact round trips through GPU memory, copies on the
tier's own streams awaited without blocking the event loop, and the manager serving a
prefetched prefix from the GPU. Skipped without CUDA; the same logic on the CPU twin is
tests/tiers/test_device.py. Plain functions running
``asyncio.run``: the GPU image has no pytest-asyncio."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, as_bytes, make_blocks, make_ns, make_tokens
from tests.tiers.device_scenarios import key, reads_while_stores_evict
from tiercache import TierManager
from tiercache.keys import BlockKey
from tiercache.tiers.device import DeviceTier

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda:0"
SLOT = 1 << 20
NS = make_ns()


def pinned_rows(n: int, seed: int = 0, width: int = SLOT) -> torch.Tensor:
    """Random rows with no zero byte, in pinned host memory (like the registered host arena)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, width), generator=g, dtype=torch.uint8).pin_memory()


def gpu_tier(slots: int) -> DeviceTier:
    t = DeviceTier(slots * SLOT, DEV)
    t.format(SLOT)
    return t


async def read(t: DeviceTier, keys: list[BlockKey]) -> torch.Tensor:
    out = torch.zeros((len(keys), SLOT), dtype=torch.uint8).pin_memory()
    await t.read(keys, out, list(range(len(keys))))
    return out


def test_put_then_read_through_gpu_memory_returns_the_exact_bytes() -> None:
    asyncio.run(_put_then_read_through_gpu_memory_returns_the_exact_bytes())


async def _put_then_read_through_gpu_memory_returns_the_exact_bytes() -> None:
    t = gpu_tier(4)
    src = pinned_rows(3)

    put = await t.put([key(0), key(1), key(2)], src, [2, 0, 1])

    assert put.stored == 3
    assert t.buffer.device.type == "cuda"
    assert torch.equal(await read(t, [key(1), key(2), key(0)]), src[[0, 1, 2]])
    t.close()


def test_stores_and_loads_have_their_own_streams() -> None:
    t = gpu_tier(1)
    store, load = t.streams.stream("store"), t.streams.stream("load")

    assert store is not None and load is not None
    assert len({store.cuda_stream, load.cuda_stream, torch.cuda.default_stream().cuda_stream}) == 3
    t.close()


def test_a_put_waits_for_its_copy_without_blocking_the_event_loop() -> None:
    asyncio.run(_a_put_waits_for_its_copy_without_blocking_the_event_loop())


async def _a_put_waits_for_its_copy_without_blocking_the_event_loop() -> None:
    t = gpu_tier(2)
    src = pinned_rows(1, seed=3)
    store = t.streams.stream("store")
    assert store is not None
    with torch.cuda.stream(store):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles queued before the copy
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    ticker = asyncio.create_task(tick())
    put = await t.put([key(0)], src, [0])
    ticker.cancel()

    assert put.stored == 1
    assert ticks >= 10  # the loop kept running while the GPU slept and copied
    assert torch.equal(await read(t, [key(0)]), src)
    t.close()


def test_concurrent_reads_and_stores_on_the_gpu_never_tear_a_block() -> None:
    asyncio.run(_concurrent_reads_and_stores_on_the_gpu_never_tear_a_block())


async def _concurrent_reads_and_stores_on_the_gpu_never_tear_a_block() -> None:
    t = gpu_tier(3)
    src = pinned_rows(8, seed=5)
    reads = await reads_while_stores_evict(t, src, lambda ks: read(t, ks))
    assert reads >= 10
    t.close()


def test_the_manager_serves_a_prefetched_prefix_from_the_gpu(tmp_path: Path) -> None:
    asyncio.run(_the_manager_serves_a_prefetched_prefix_from_the_gpu(tmp_path))


async def _the_manager_serves_a_prefetched_prefix_from_the_gpu(tmp_path: Path) -> None:
    m = await TierManager.open(
        host_bytes=2 * NBYTES, disk_url=str(tmp_path / "disk"), disk_bytes=64 * NBYTES,
        device_bytes=4 * NBYTES, device_name=DEV,
    )  # fmt: skip
    try:
        tokens, blocks = make_tokens(2, seed=1), make_blocks(2, seed=1)
        await m.save(NS, tokens, blocks, session="a")
        await m.save(NS, make_tokens(2, seed=9), make_blocks(2, seed=9))  # pushes "a" to disk

        assert m.host is not None and m.host.pinned  # registered once, at start
        assert await m.prefetch(session="a") == 2
        got = await m.load(NS, tokens)

        assert got.tiers == ["device", "device"]
        assert got.data.is_pinned()
        assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))
    finally:
        await m.close(flush=False)
