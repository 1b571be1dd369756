"""The shared tier against a real SeaweedFS: two managers on one prefix stand for two nodes."""

from __future__ import annotations

import asyncio
from typing import Any

import obstore
import torch

from tests.conftest import NBYTES, as_bytes, make_blocks, make_ns, make_tokens
from tiercache.manager import Sharing
from tiercache.tiers.remote import TRAILER_BYTES, object_key

NS = make_ns()


async def objects(m: Any, prefix: str = "ns/") -> list[str]:
    return sorted(
        meta["path"] for batch in obstore.list(m.remote.obj, prefix) async for meta in batch
    )


async def test_a_block_saved_on_one_node_is_loaded_on_another_byte_exact(open_node: Any) -> None:
    a, b = await open_node("a"), await open_node("b")
    tokens, blocks = make_tokens(3), make_blocks(3)
    await a.save(NS, tokens, blocks)
    assert await a.drain_uploads(30) == 0

    hit = await b.lookup(NS, tokens)
    got = await b.load(NS, tokens)

    assert hit.tiers == ["remote"] * 3
    assert torch.equal(got.data, as_bytes(blocks))
    assert b.stats.lookups["remote"] == 3
    assert b.stats.transfer_bytes[("remote", "host")] == 3 * NBYTES
    assert (await b.lookup(NS, tokens)).tiers == ["host"] * 3  # promoted: the next hit is local
