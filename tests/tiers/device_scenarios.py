"""Device-tier scenarios shared by the CPU twin's tests (tests/tiers/test_device.py) and the GPU
tests (tests/tiers/test_device_gpu.py), so both check the same behaviour."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import torch

from tiercache.keys import BlockKey
from tiercache.tiers.device import DeviceTier


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "big"))


async def reads_while_stores_evict(
    t: DeviceTier,
    src: torch.Tensor,
    read: Callable[[list[BlockKey]], Awaitable[torch.Tensor]],
) -> int:
    """Two writers store random rows of ``src`` (more keys than ``t`` has slots, so stores keep
    evicting) while three readers read whatever is present: every read must equal its keys'
    rows. Returns how many reads were checked."""
    n = src.shape[0]
    keys = [key(i) for i in range(n)]
    rng = random.Random(0)
    reads = 0
    writing = 2  # writers still running: readers read until both are done

    async def writer() -> None:
        nonlocal writing
        for _ in range(30):
            i = rng.randrange(n)
            await t.put([keys[i]], src, [i])
        writing -= 1

    async def reader() -> None:
        nonlocal reads
        while writing:
            present = [i for i in range(n) if keys[i] in t]
            if present:
                got = await read([keys[i] for i in present])
                assert torch.equal(got, src[present])
                reads += 1
            await asyncio.sleep(0)

    await asyncio.gather(writer(), writer(), reader(), reader(), reader())
    return reads
