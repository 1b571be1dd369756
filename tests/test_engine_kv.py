"""An engine's KV cache attached to the cache (``EngineKV``), on the CPU twin: the daemon-side
save (gather out of the engine's blocks into reserved host slots) and load (scatter from the
host arena or the device tier into the engine's blocks) that CUDA IPC drives on a GPU
(tests/test_ipc_gpu.py runs the same steps on imported GPU memory)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, SPEC, OpenCache, make_blocks, make_ns, make_tokens
from tiercache import TierManager
from tiercache.client import Client
from tiercache.daemon.process import DaemonProcess
from tiercache.engine_kv import EngineKV
from tiercache.integrations.attached import AttachedKV
from tiercache.kernels import reference
from tiercache.kernels.reference import LayerCache, LayoutError
from tiercache.keys import KeyChain, Namespace
from tiercache.spec import KVSpec, Layout

NS = make_ns()
NUM_BLOCKS = 12


def vllm_caches(seed: int | None, spec: KVSpec = SPEC) -> list[LayerCache]:
    """vLLM-layout caches: random and never zero (``seed``), or all zero (None)."""
    shape = (2, NUM_BLOCKS, spec.block_size, spec.num_kv_heads, spec.head_dim)
    if seed is None:
        return [torch.zeros(shape, dtype=spec.torch_dtype) for _ in range(spec.num_layers)]
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(shape, generator=g) + 0.5).to(spec.torch_dtype) for _ in range(spec.num_layers)
    ]


def keys(tokens: list[int], ns: Namespace = NS) -> KeyChain:
    return KeyChain(ns.block_keys(tokens))


async def test_blocks_saved_from_one_engine_cache_load_into_another_byte_for_byte(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(host_blocks=8)
    src, dst = EngineKV(SPEC, vllm_caches(1)), EngineKV(SPEC, vllm_caches(None))
    tokens = make_tokens(3)

    saved = await src.save(m, NS, keys(tokens), [5, 2, 9], session="chat")
    tiers = await dst.load(m, NS, keys(tokens), [1, 3, 4])

    assert saved.stored == 3
    assert tiers == ["host"] * 3
    want = reference.gather(SPEC, src.caches, [5, 2, 9])
    assert torch.equal(reference.gather(SPEC, dst.caches, [1, 3, 4]), want)
    untouched = [b for b in range(NUM_BLOCKS) if b not in (1, 3, 4)]
    assert not reference.gather(SPEC, dst.caches, untouched).any()


async def saved_three(
    open_cache: OpenCache,
) -> tuple[TierManager, EngineKV, EngineKV, list[int]]:
    """A cache holding three blocks saved from engine blocks 5, 2, 9 of ``src``; an empty
    engine ``dst``; the tokens."""
    m = await open_cache(host_blocks=8)
    src, dst = EngineKV(SPEC, vllm_caches(1)), EngineKV(SPEC, vllm_caches(None))
    tokens = make_tokens(3)
    await src.save(m, NS, keys(tokens), [5, 2, 9])
    return m, src, dst, tokens


async def test_a_changed_token_ends_the_run_and_leaves_the_engine_block_alone(
    open_cache: OpenCache,
) -> None:
    m, src, dst, tokens = await saved_three(open_cache)
    changed = list(tokens)
    changed[2 * SPEC.block_size] += 1  # the third block's first token

    tiers = await dst.load(m, NS, keys(changed), [1, 3, 4])

    assert tiers == ["host", "host"]
    assert torch.equal(
        reference.gather(SPEC, dst.caches, [1, 3]), reference.gather(SPEC, src.caches, [5, 2])
    )
    assert not reference.gather(SPEC, dst.caches, [4]).any()


async def test_a_load_takes_blocks_from_disk_and_from_the_device_tier(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(host_blocks=2, device_bytes=2 * NBYTES, device_name="cpu")
    src, dst = EngineKV(SPEC, vllm_caches(2)), EngineKV(SPEC, vllm_caches(None))
    tokens = make_tokens(4, seed=3)
    assert (await src.save(m, NS, keys(tokens), [0, 1, 2, 3], session="a")).stored == 4
    assert (await m.prefetch(NS, tokens[: 2 * SPEC.block_size])) == 2  # blocks 0, 1 -> device

    tiers = await dst.load(m, NS, keys(tokens), [11, 10, 9, 8])

    assert tiers[:2] == ["device", "device"] and set(tiers[2:]) <= {"host", "disk"}
    assert torch.equal(
        reference.gather(SPEC, dst.caches, [11, 10, 9, 8]),
        reference.gather(SPEC, src.caches, [0, 1, 2, 3]),
    )


async def test_a_run_longer_than_the_host_tier_loads_in_rounds(open_cache: OpenCache) -> None:
    # Two host slots, five blocks: three leases of at most two blocks each.
    m = await open_cache(host_blocks=2)
    src, dst = EngineKV(SPEC, vllm_caches(6)), EngineKV(SPEC, vllm_caches(None))
    tokens = make_tokens(5, seed=8)
    assert (await src.save(m, NS, keys(tokens), [1, 2, 3, 4, 5])).stored == 5

    tiers = await dst.load(m, NS, keys(tokens), [7, 8, 9, 10, 11])

    assert len(tiers) == 5
    assert torch.equal(
        reference.gather(SPEC, dst.caches, [7, 8, 9, 10, 11]),
        reference.gather(SPEC, src.caches, [1, 2, 3, 4, 5]),
    )


async def test_transformers_caches_save_and_load_by_block_position(open_cache: OpenCache) -> None:
    spec = dataclasses.replace(SPEC, layout=Layout.HF)
    ns = make_ns(spec=spec)
    m = await open_cache(host_blocks=8)
    g = torch.Generator().manual_seed(4)
    shape = (1, spec.num_kv_heads, 5 * spec.block_size, spec.head_dim)

    def pair(fill: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not fill:
            return torch.zeros(shape, dtype=spec.torch_dtype), torch.zeros(
                shape, dtype=spec.torch_dtype
            )
        return tuple(  # type: ignore[return-value]
            (torch.rand(shape, generator=g) + 0.5).to(spec.torch_dtype) for _ in range(2)
        )

    src = EngineKV(spec, [pair(True) for _ in range(spec.num_layers)])
    dst = EngineKV(spec, [pair(False) for _ in range(spec.num_layers)])
    tokens = make_tokens(2, seed=5)

    await src.save(m, ns, keys(tokens, ns), [3, 4])
    assert await dst.load(m, ns, keys(tokens, ns), [0, 1]) == ["host", "host"]

    assert torch.equal(
        reference.gather(spec, dst.caches, [0, 1]), reference.gather(spec, src.caches, [3, 4])
    )


async def test_bad_block_ids_and_a_foreign_namespace_are_refused_and_lose_nothing(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(host_blocks=8)
    src = EngineKV(SPEC, vllm_caches(1))
    tokens = make_tokens(2)
    await src.save(m, NS, keys(tokens), [0, 1])
    other = make_ns(spec=dataclasses.replace(SPEC, block_size=8))

    with pytest.raises(LayoutError, match="out of range"):
        await src.save(m, NS, keys(make_tokens(2, seed=7)), [0, NUM_BLOCKS])
    with pytest.raises(LayoutError, match="another KV spec"):
        await src.load(m, other, keys(tokens, other), [0])
    with pytest.raises(LayoutError, match="expected 2 layers"):
        EngineKV(SPEC, vllm_caches(1)[:1])

    assert (await m.lookup(NS, tokens)).blocks == 2
    assert (await m.lookup(NS, make_tokens(2, seed=7))).blocks == 0
    assert m.host is not None and m.host.free_slots == 6  # the refused save's slots came back


async def test_a_load_into_an_engine_block_named_twice_is_refused_and_writes_nothing(
    open_cache: OpenCache,
) -> None:
    # It was taken: both blocks scattered into engine block 1, the first lost unseen.
    m, _, dst, tokens = await saved_three(open_cache)

    with pytest.raises(LayoutError, match=r"given more than once: \[1\]"):
        await dst.load(m, NS, keys(tokens), [1, 3, 1])

    assert not reference.gather(SPEC, dst.caches, list(range(NUM_BLOCKS))).any()
    assert all(e.leases == 0 for e in m.index)


async def test_a_quantized_namespace_is_refused_by_name_and_loses_nothing(
    open_cache: OpenCache,
) -> None:
    # Its slots hold int8 records, not the engine's bytes that these copies move.
    m = await open_cache(host_blocks=8)
    quant = Namespace("test-model", SPEC, store_dtype="int8")
    src, dst = EngineKV(SPEC, vllm_caches(1)), EngineKV(SPEC, vllm_caches(None))
    tokens = make_tokens(2)
    await m.save(quant, tokens, make_blocks(2))
    assert m.host is not None
    free = m.host.free_slots

    with pytest.raises(LayoutError, match="store_dtype is 'int8'"):
        await src.save(m, quant, keys(make_tokens(2, seed=7), quant), [0, 1])
    with pytest.raises(LayoutError, match="store_dtype is 'int8'"):
        await dst.load(m, quant, keys(tokens, quant), [0, 1])

    assert not reference.gather(SPEC, dst.caches, [0, 1]).any()
    assert (await m.lookup(quant, make_tokens(2, seed=7))).blocks == 0
    assert m.host.free_slots == free


def test_the_connector_s_attachment_turns_itself_off_where_it_cannot_attach(
    tmp_path: Path,
) -> None:
    """CPU caches (or a daemon without a GPU) cannot be attached: the connector's AttachedKV
    says so once and hands the transfer back (None), and the connection stays usable for
    the host-memory copies that replace it."""
    env = {
        "TIERCACHE_TIERS_HOST__BYTES": str(8 * NBYTES),
        "TIERCACHE_TIERS_HOST__SHARED": "true",
        "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk"),
        "TIERCACHE_TIERS_DISK__BYTES": str(64 * NBYTES),
    }
    with DaemonProcess(tmp_path, env=env) as daemon, Client(daemon.socket) as client:
        attached = AttachedKV(NS, vllm_caches(1))  # type: ignore[arg-type]
        tokens = make_tokens(2)

        assert attached.save(client, keys(tokens), [0, 1], 0, None) is None
        assert not attached.enabled
        assert attached.load(client, keys(tokens), [0, 1], 0, wait=True) is None

        assert client.save(NS, tokens, make_blocks(2)).stored == 2
        assert client.lookup(NS, tokens).blocks == 2
