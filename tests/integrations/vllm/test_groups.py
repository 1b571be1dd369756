"""The vLLM connector's KV cache groups (``tiercache.integrations.vllm.groups``), engine-free:
the blocks a sliding group reads, and tiercache blocks of several engine blocks. (The groups
of every attention family in real engines: test_groups_engines.py.)"""

from __future__ import annotations

import pytest
import torch

from tiercache.integrations.vllm import to_engine_blocks, to_store_blocks
from tiercache.integrations.vllm.groups import FULL, SLIDING, Group
from tiercache.kernels.reference import gather
from tiercache.keys import Namespace
from tiercache.spec import AttentionKind, KVSpec, Layout


def _filled(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3 + 1).to(dtype)


@pytest.mark.parametrize("per_block", [1, 2, 4])
def test_larger_tiercache_blocks_hold_what_an_engine_with_that_block_holds(per_block: int) -> None:
    """k engine blocks of b tokens, mapped to one tiercache block, are byte for byte the block
    an engine with k*b-token blocks holding the same tokens would store."""
    layers, heads, dim, b, n = 3, 2, 8, 4, 3
    small = KVSpec(layers, heads, dim, "bfloat16", b, Layout.VLLM)
    big = KVSpec(layers, heads, dim, "bfloat16", b * per_block, Layout.VLLM)
    tokens = n * per_block * b
    # The same K/V per token in both engines: [2, tokens, heads, dim] per layer.
    kv = [_filled((2, tokens, heads, dim), seed=i) for i in range(layers)]
    small_cache = [t.reshape(2, n * per_block, b, heads, dim) for t in kv]
    big_cache = [t.reshape(2, n, b * per_block, heads, dim) for t in kv]
    rows = gather(small, small_cache, list(range(n * per_block)))
    stored = to_store_blocks(rows, big, per_block)
    assert torch.equal(stored, gather(big, big_cache, list(range(n))))
    assert torch.equal(to_engine_blocks(stored, big, per_block), rows)


def test_a_sliding_group_reads_the_blocks_of_its_window_and_no_others() -> None:
    # What vLLM holds of a sliding group (its null block stands for the rest): a token at
    # position 20 attends to 13..20 with a window of 8, blocks 3 and 4 (of 4 tokens).
    spec = KVSpec(1, 1, 8, "bfloat16", 4, Layout.VLLM_CPU, kind=AttentionKind.SLIDING, window=8)
    g = Group(0, SLIDING, 8, ("l0",), Namespace("m", spec, group="g0"), spec)
    assert g.first_needed(20, 4) == 3
    assert g.first_needed(7, 4) == 0
    full = KVSpec(1, 1, 8, "bfloat16", 4, Layout.VLLM_CPU)
    f = Group(1, FULL, None, ("l1",), Namespace("m", full), full)
    assert f.first_needed(1000, 4) == 0


def test_an_mla_group_on_a_gpu_engine_takes_the_vllm_layout_and_its_block_is_the_engine_s() -> None:
    # vLLM's MLA backends keep [num_blocks, block_size, latent] per layer: the connector takes
    # them (it refused them before the kernels moved one plane).
    from types import SimpleNamespace

    from tiercache.integrations.vllm.groups import MLA, _engine_id

    config = SimpleNamespace(device_config=SimpleNamespace(device_type="cuda"))
    layout, engine = _engine_id(config, None, MLA)  # type: ignore[arg-type]
    assert (layout, engine) == (Layout.VLLM, "cuda")
    spec = KVSpec(2, 1, 576, "bfloat16", 16, layout, kind=AttentionKind.MLA)
    caches = [_filled((5, 16, 576), seed=i) for i in range(2)]
    blocks = gather(spec, caches, [4, 1])
    assert blocks.shape == (2, 2, 1, 16, 1, 576)
    assert torch.equal(blocks[0, 1, 0, :, 0], caches[1][4])
