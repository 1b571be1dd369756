"""The torch reference gather/scatter, checked against plain loops over blocks and tokens.

Every comparison is of raw bytes (``.view(torch.uint8)``), so float8 and bfloat16 are held to
the same bit-exact standard as the CUDA kernels are held to this reference.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache.kernels.reference import LayerCache, LayoutError, gather, scatter
from tiercache.spec import KVSpec, Layout

# Odd sizes on purpose: no dimension may be confused with another.
LAYERS, HEADS, HEAD_DIM, BLOCK, NUM_BLOCKS = 3, 3, 5, 7, 6
IDS = [4, 0, 2]  # permuted and not adjacent

LAYOUTS = [Layout.VLLM, Layout.FLASHINFER, Layout.HF]
DTYPES = ["float32", "float16", "bfloat16", "float8_e4m3fn", "int8"]
SCATTER_DTYPES = DTYPES


def make_spec(layout: Layout | str, dtype: str = "bfloat16") -> KVSpec:
    return KVSpec(
        num_layers=LAYERS,
        num_kv_heads=HEADS,
        head_dim=HEAD_DIM,
        dtype=dtype,
        block_size=BLOCK,
        layout=layout,
    )


MLA_LAYOUTS = [Layout.VLLM, Layout.HF]  # the layouts an MLA latent has


def make_mla_spec(layout: Layout | str, dtype: str = "bfloat16", latent: int = 11) -> KVSpec:
    """An MLA group: one latent row of ``latent`` values per token (576 in DeepSeek-V3)."""
    return KVSpec(
        num_layers=LAYERS, num_kv_heads=1, head_dim=latent, dtype=dtype, block_size=BLOCK,
        layout=layout, kind="mla",
    )  # fmt: skip


def random_tensor(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Finite, almost never zero values of ``dtype``."""
    if dtype == torch.int8:
        return torch.randint(-128, 128, tuple(shape), dtype=torch.int8, generator=gen)
    return (torch.randn(tuple(shape), generator=gen) * 8).to(dtype)


def make_caches(
    spec: KVSpec, seed: int = 0, num_blocks: int = NUM_BLOCKS, batch: int = 1, extra_tokens: int = 0
) -> list[LayerCache]:
    gen = torch.Generator().manual_seed(seed)
    dt, h, bs, d = spec.torch_dtype, spec.num_kv_heads, spec.block_size, spec.head_dim
    caches: list[LayerCache] = []
    for _ in range(spec.num_layers):
        if spec.layout is Layout.VLLM and spec.planes == 1:  # vLLM's MLA latent
            caches.append(random_tensor((num_blocks, bs, d), dt, gen))
        elif spec.layout is Layout.VLLM:
            caches.append(random_tensor((2, num_blocks, bs, h, d), dt, gen))
        elif spec.layout is Layout.FLASHINFER:
            caches.append(random_tensor((num_blocks, 2, bs, h, d), dt, gen))
        else:  # hf: K and V, or the latent
            seq = num_blocks * bs + extra_tokens
            caches.append(
                tuple(random_tensor((batch, h, seq, d), dt, gen) for _ in range(spec.planes))
            )
    return caches


def make_blocks(spec: KVSpec, n: int, seed: int = 1) -> torch.Tensor:
    return random_tensor(
        (n, *spec.block_shape), spec.torch_dtype, torch.Generator().manual_seed(seed)
    )


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def raw_caches(caches: Sequence[LayerCache]) -> list[Any]:
    return [tuple(raw(t) for t in c) if isinstance(c, tuple) else raw(c) for c in caches]


def clone_caches(caches: Sequence[LayerCache]) -> list[LayerCache]:
    return [(c[0].clone(), c[1].clone()) if isinstance(c, tuple) else c.clone() for c in caches]


def token_rows(
    spec: KVSpec, cache: Any, kv: int, block: int, token: int, batch: int
) -> torch.Tensor:
    """The ``[heads, head_dim]`` of one token of one block, K or V, in one layer (a view)."""
    if spec.layout is Layout.VLLM:
        return cache[kv, block, token]
    if spec.layout is Layout.FLASHINFER:
        return cache[block, kv, token]
    return cache[kv][batch, :, block * spec.block_size + token, :]


def loop_gather(
    spec: KVSpec, caches: Sequence[LayerCache], ids: Sequence[int], batch: int = 0
) -> torch.Tensor:
    src = raw_caches(caches)
    out = torch.empty(
        (len(ids), *spec.block_shape[:-1], spec.head_dim * spec.element_bytes), dtype=torch.uint8
    )
    for i, block in enumerate(ids):
        for layer in range(spec.num_layers):
            for kv in range(2):
                for token in range(spec.block_size):
                    out[i, layer, kv, token] = token_rows(spec, src[layer], kv, block, token, batch)
    return out


def loop_scatter(
    spec: KVSpec,
    blocks: torch.Tensor,
    caches: Sequence[LayerCache],
    ids: Sequence[int],
    batch: int = 0,
) -> list[Any]:
    """Raw bytes of ``caches`` after ``blocks`` are written at ``ids`` (``caches`` untouched)."""
    dst = raw_caches(clone_caches(caches))
    src = raw(blocks)
    for i, block in enumerate(ids):
        for layer in range(spec.num_layers):
            for kv in range(2):
                for token in range(spec.block_size):
                    token_rows(spec, dst[layer], kv, block, token, batch).copy_(
                        src[i, layer, kv, token]
                    )
    return dst


def assert_same_bytes(actual: Sequence[LayerCache], expected_raw: Sequence[Any]) -> None:
    for got, want in zip(raw_caches(actual), expected_raw, strict=True):
        if isinstance(got, tuple):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        else:
            assert torch.equal(got, want)


# --- gather / scatter against loops ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_equals_a_loop_over_blocks_and_tokens(layout: Layout, dtype: str) -> None:
    spec = make_spec(layout, dtype)
    caches = make_caches(spec)

    out = gather(spec, caches, IDS)

    assert (tuple(out.shape), out.dtype) == ((3, *spec.block_shape), spec.torch_dtype)
    assert torch.equal(raw(out), loop_gather(spec, caches, IDS))


@pytest.mark.parametrize("dtype", SCATTER_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_equals_a_loop_over_blocks_and_tokens(layout: Layout, dtype: str) -> None:
    spec = make_spec(layout, dtype)
    caches = make_caches(spec)
    blocks = make_blocks(spec, len(IDS))
    expected = loop_scatter(spec, blocks, caches, IDS)

    scatter(spec, blocks, caches, IDS)

    assert_same_bytes(caches, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_factory_data_is_mostly_nonzero_even_in_fp8(layout: Layout) -> None:
    spec = make_spec(layout, "float8_e4m3fn")
    tensors = [raw(t) for c in make_caches(spec) for t in (c if isinstance(c, tuple) else (c,))]
    tensors.append(raw(make_blocks(spec, 2)))

    assert all(int(t.count_nonzero()) > 0.9 * t.numel() for t in tensors)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_leaves_other_blocks_untouched(layout: Layout) -> None:
    spec = make_spec(layout)
    caches = make_caches(spec)
    before = clone_caches(caches)
    others = [b for b in range(NUM_BLOCKS) if b not in IDS]

    scatter(spec, make_blocks(spec, len(IDS)), caches, IDS)

    assert torch.equal(raw(gather(spec, caches, others)), raw(gather(spec, before, others)))


@pytest.mark.parametrize("dtype", SCATTER_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_then_gather_returns_the_blocks(layout: Layout, dtype: str) -> None:
    spec = make_spec(layout, dtype)
    caches = make_caches(spec)
    blocks = make_blocks(spec, len(IDS))

    scatter(spec, blocks, caches, IDS)

    assert torch.equal(raw(gather(spec, caches, IDS)), raw(blocks))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_then_scatter_copies_those_blocks_into_another_cache(layout: Layout) -> None:
    spec = make_spec(layout, "bfloat16")
    source, target = make_caches(spec, seed=1), make_caches(spec, seed=2)
    moved = [5, 1, 3]

    scatter(spec, gather(spec, source, IDS), target, moved)

    assert torch.equal(raw(gather(spec, target, moved)), raw(gather(spec, source, IDS)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_order_follows_block_id_order(layout: Layout) -> None:
    spec = make_spec(layout)
    caches = make_caches(spec)

    in_order = gather(spec, caches, [0, 2, 4])
    permuted = gather(spec, caches, IDS)  # [4, 0, 2]

    assert torch.equal(raw(permuted), raw(in_order[[2, 0, 1]]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_block_ids_may_be_a_tensor(layout: Layout) -> None:
    spec = make_spec(layout)
    caches = make_caches(spec)

    from_tensor = gather(spec, caches, torch.tensor(IDS, dtype=torch.int32))

    assert torch.equal(raw(from_tensor), raw(gather(spec, caches, IDS)))


@settings(max_examples=25, deadline=None)
@given(
    layout=st.sampled_from(LAYOUTS),
    ids=st.permutations(range(NUM_BLOCKS)),
    n=st.integers(0, NUM_BLOCKS),
)
def test_gather_of_any_distinct_ids_equals_the_loop(layout: Layout, ids: list[int], n: int) -> None:
    spec = make_spec(layout, "float16")
    caches = make_caches(spec)
    chosen = ids[:n]

    assert torch.equal(raw(gather(spec, caches, chosen)), loop_gather(spec, caches, chosen))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_of_no_blocks_is_empty(layout: Layout) -> None:
    spec = make_spec(layout)

    assert tuple(gather(spec, make_caches(spec), []).shape) == (0, *spec.block_shape)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_fills_and_returns_out(layout: Layout) -> None:
    spec = make_spec(layout)
    caches = make_caches(spec)
    out = torch.empty((len(IDS), *spec.block_shape), dtype=spec.torch_dtype)

    result = gather(spec, caches, IDS, out=out)

    assert result is out
    assert torch.equal(raw(out), loop_gather(spec, caches, IDS))


def every_other_block(spec: KVSpec) -> tuple[list[LayerCache], list[torch.Tensor]]:
    """Caches that are strided views (every other block) of wider caches, and those wider caches."""
    wide = make_caches(spec, num_blocks=2 * NUM_BLOCKS)
    step = slice(None, None, 2)
    index = (slice(None), step) if spec.layout is Layout.VLLM else (step,)
    full = [c for c in wide if isinstance(c, torch.Tensor)]
    return [c[index] for c in full], full


@pytest.mark.parametrize("layout", [Layout.VLLM, Layout.FLASHINFER])
def test_gather_reads_strided_caches(layout: Layout) -> None:
    spec = make_spec(layout)
    caches, _ = every_other_block(spec)
    assert not any(isinstance(c, torch.Tensor) and c.is_contiguous() for c in caches)

    assert torch.equal(raw(gather(spec, caches, IDS)), loop_gather(spec, caches, IDS))


@pytest.mark.parametrize("layout", [Layout.VLLM, Layout.FLASHINFER])
def test_scatter_writes_through_strided_caches_into_their_storage(layout: Layout) -> None:
    spec = make_spec(layout)
    caches, full = every_other_block(spec)
    blocks = make_blocks(spec, len(IDS))
    expected = loop_scatter(spec, blocks, caches, IDS)

    scatter(spec, blocks, caches, IDS)

    assert_same_bytes(caches, expected)
    assert torch.equal(raw(gather(spec, full, [2 * b for b in IDS])), raw(blocks))


# --- hf specifics ---------------------------------------------------------------------------


def test_hf_gather_reads_the_chosen_batch_row() -> None:
    spec = make_spec(Layout.HF)
    caches = make_caches(spec, batch=2)

    out = gather(spec, caches, IDS, batch=1)

    assert torch.equal(raw(out), loop_gather(spec, caches, IDS, batch=1))
    assert not torch.equal(raw(out), loop_gather(spec, caches, IDS, batch=0))


def test_hf_scatter_writes_only_the_chosen_batch_row() -> None:
    spec = make_spec(Layout.HF)
    caches = make_caches(spec, batch=2)
    blocks = make_blocks(spec, len(IDS))
    expected = loop_scatter(spec, blocks, caches, IDS, batch=1)

    scatter(spec, blocks, caches, IDS, batch=1)

    assert_same_bytes(caches, expected)


def test_hf_tokens_past_the_last_full_block_are_untouched() -> None:
    spec = make_spec(Layout.HF)
    caches = make_caches(spec, extra_tokens=3)
    tail = [
        (k[..., -3:, :].clone(), v[..., -3:, :].clone())
        for k, v in caches
        if isinstance(k, torch.Tensor)
    ]

    scatter(spec, make_blocks(spec, NUM_BLOCKS), caches, list(range(NUM_BLOCKS)))

    for (k, v), (k_tail, v_tail) in zip(caches, tail, strict=True):  # type: ignore[misc]
        assert torch.equal(raw(k[..., -3:, :]), raw(k_tail))
        assert torch.equal(raw(v[..., -3:, :]), raw(v_tail))


# --- errors ---------------------------------------------------------------------------------


def raises_layout_error(message: str) -> Any:
    return pytest.raises(LayoutError, match=f"^{re.escape(message)}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_wrong_number_of_layers_is_a_layout_error(layout: Layout, op: str) -> None:
    spec = make_spec(layout)
    caches = make_caches(spec)[:2]

    with raises_layout_error("expected 3 layers, got 2"):
        run(op, spec, caches)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cache_dtype_other_than_the_specs_is_a_layout_error(layout: Layout) -> None:
    spec = make_spec(layout, "bfloat16")
    caches = make_caches(spec)
    caches[1] = make_caches(make_spec(layout, "float16"))[1]

    with raises_layout_error("layer 1: dtype torch.float16, spec says bfloat16"):
        gather(spec, caches, IDS)


@pytest.mark.parametrize(
    ("layout", "shape"),
    [
        (Layout.VLLM, (2, NUM_BLOCKS, BLOCK, HEADS, HEAD_DIM + 1)),
        (Layout.VLLM, (2, NUM_BLOCKS, BLOCK, HEADS + 1, HEAD_DIM)),
        (Layout.VLLM, (2, NUM_BLOCKS, BLOCK + 1, HEADS, HEAD_DIM)),
        (Layout.VLLM, (NUM_BLOCKS, 2, BLOCK, HEADS, HEAD_DIM)),  # a flashinfer cache
        (Layout.VLLM, (2, NUM_BLOCKS, BLOCK, HEADS * HEAD_DIM)),
        (Layout.FLASHINFER, (2, NUM_BLOCKS, BLOCK, HEADS, HEAD_DIM)),  # a vllm cache
        (Layout.FLASHINFER, (NUM_BLOCKS, 2, BLOCK, HEADS, HEAD_DIM, 1)),
    ],
)
def test_paged_cache_of_the_wrong_shape_is_a_layout_error(
    layout: Layout, shape: tuple[int, ...]
) -> None:
    spec = make_spec(layout)
    caches = make_caches(spec)
    caches[2] = torch.ones(shape, dtype=spec.torch_dtype)

    with raises_layout_error(
        f"layer 2: shape {list(shape)} does not match the {layout} layout of {spec}"
    ):
        gather(spec, caches, IDS)


@pytest.mark.parametrize(
    "not_a_pair",
    [
        pytest.param(lambda k, v: k, id="tensor"),
        pytest.param(lambda k, v: (k,), id="1-tuple"),
        pytest.param(lambda k, v: (k, v, k), id="3-tuple"),
    ],
)
def test_hf_layer_that_is_not_a_kv_pair_is_a_layout_error(not_a_pair: Any) -> None:
    spec = make_spec(Layout.HF)
    caches = make_caches(spec)
    k, v = caches[0]  # type: ignore[misc]
    caches[0] = not_a_pair(k, v)

    with raises_layout_error("layer 0: the hf layout of this spec needs a (K, V) pair"):
        gather(spec, caches, IDS)


@pytest.mark.parametrize(
    ("k_shape", "v_shape"),
    [
        ((1, HEADS + 1, 42, HEAD_DIM), (1, HEADS + 1, 42, HEAD_DIM)),
        ((1, HEADS, 42, HEAD_DIM - 1), (1, HEADS, 42, HEAD_DIM - 1)),
        ((HEADS, 42, HEAD_DIM), (HEADS, 42, HEAD_DIM)),
        ((1, HEADS, 42, HEAD_DIM), (1, HEADS, 35, HEAD_DIM)),
    ],
)
def test_hf_kv_of_the_wrong_shape_is_a_layout_error(
    k_shape: tuple[int, ...], v_shape: tuple[int, ...]
) -> None:
    spec = make_spec(Layout.HF)
    caches = make_caches(spec)
    caches[0] = (
        torch.ones(k_shape, dtype=spec.torch_dtype),
        torch.ones(v_shape, dtype=spec.torch_dtype),
    )

    with raises_layout_error(
        f"layer 0: K/V must be [batch, 3, seq, 5], got {list(k_shape)}/{list(v_shape)}"
    ):
        gather(spec, caches, IDS)


def test_hf_value_dtype_other_than_the_specs_is_a_layout_error() -> None:
    spec = make_spec(Layout.HF, "bfloat16")
    caches = make_caches(spec)
    k, v = caches[0]  # type: ignore[misc]
    caches[0] = (k, v.to(torch.float32))

    with raises_layout_error("layer 0: dtype torch.float32, spec says bfloat16"):
        gather(spec, caches, IDS)


@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_block_ids_that_are_not_1d_are_a_layout_error(op: str) -> None:
    spec = make_spec(Layout.VLLM)

    with raises_layout_error("block ids must be 1-D, got shape [1, 3]"):
        run(op, spec, make_caches(spec), ids=[IDS])


@pytest.mark.parametrize("bad", [NUM_BLOCKS, NUM_BLOCKS + 1, -1, -NUM_BLOCKS])
@pytest.mark.parametrize("op", ["gather", "scatter"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_block_id_out_of_range_is_a_layout_error_that_writes_nothing(
    layout: Layout, op: str, bad: int
) -> None:
    spec = make_spec(layout)
    caches = make_caches(spec, extra_tokens=3)  # hf: a partial block past the last whole one
    before = clone_caches(caches)

    with raises_layout_error(f"block id {bad} is out of range for a cache of {NUM_BLOCKS} blocks"):
        run(op, spec, caches, ids=[0, 2, bad])

    assert_same_bytes(caches, raw_caches(before))


@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_a_block_id_past_the_shortest_layer_is_a_layout_error_that_writes_nothing(op: str) -> None:
    spec = make_spec(Layout.VLLM)
    caches = make_caches(spec)
    caches[-1] = caches[-1][:, : NUM_BLOCKS - 2].clone()  # type: ignore[index]
    before = clone_caches(caches)

    with raises_layout_error(f"block id 4 is out of range for a cache of {NUM_BLOCKS - 2} blocks"):
        run(op, spec, caches)

    assert_same_bytes(caches, raw_caches(before))


@pytest.mark.parametrize("batch", [-1, 2])
@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_an_hf_batch_row_out_of_range_is_a_layout_error(op: str, batch: int) -> None:
    spec = make_spec(Layout.HF)
    caches = make_caches(spec, batch=2)
    before = clone_caches(caches)

    with raises_layout_error(f"batch {batch} is out of range for a batch of 2"):
        if op == "gather":
            gather(spec, caches, IDS, batch=batch)
        else:
            scatter(spec, make_blocks(spec, len(IDS)), caches, IDS, batch=batch)

    assert_same_bytes(caches, raw_caches(before))


@pytest.mark.parametrize(
    ("shape", "dtype", "got"),
    [
        (
            (2, LAYERS, 2, BLOCK, HEADS, HEAD_DIM),
            torch.bfloat16,
            "[2, 3, 2, 7, 3, 5] torch.bfloat16",
        ),
        (
            (3, LAYERS, 2, BLOCK, HEADS, HEAD_DIM - 1),
            torch.bfloat16,
            "[3, 3, 2, 7, 3, 4] torch.bfloat16",
        ),
        ((3, LAYERS, 2, BLOCK, HEADS, HEAD_DIM), torch.float16, "[3, 3, 2, 7, 3, 5] torch.float16"),
    ],
)
def test_scatter_of_blocks_of_the_wrong_shape_or_dtype_is_a_layout_error(
    shape: tuple[int, ...], dtype: torch.dtype, got: str
) -> None:
    spec = make_spec(Layout.VLLM, "bfloat16")

    with raises_layout_error(f"blocks must be [3, 3, 2, 7, 3, 5] bfloat16, got {got}"):
        scatter(spec, torch.ones(shape, dtype=dtype), make_caches(spec), IDS)


@pytest.mark.parametrize(
    ("shape", "dtype", "got"),
    [
        (
            (4, LAYERS, 2, BLOCK, HEADS, HEAD_DIM),
            torch.bfloat16,
            "[4, 3, 2, 7, 3, 5] torch.bfloat16",
        ),
        ((3, LAYERS, 2, BLOCK, HEADS, HEAD_DIM), torch.float32, "[3, 3, 2, 7, 3, 5] torch.float32"),
    ],
)
def test_gather_into_out_of_the_wrong_shape_or_dtype_is_a_layout_error(
    shape: tuple[int, ...], dtype: torch.dtype, got: str
) -> None:
    spec = make_spec(Layout.VLLM, "bfloat16")

    with raises_layout_error(f"out must be [3, 3, 2, 7, 3, 5] bfloat16, got {got}"):
        gather(spec, make_caches(spec), IDS, out=torch.empty(shape, dtype=dtype))


def test_layout_error_is_a_value_error() -> None:
    assert issubclass(LayoutError, ValueError)


@pytest.mark.parametrize("layout", [Layout.VLLM, Layout.FLASHINFER])
def test_kv_pair_given_to_a_paged_layout_is_a_layout_error(layout: Layout) -> None:
    spec = make_spec(layout)
    caches = make_caches(spec)
    hf_pair = make_caches(make_spec(Layout.HF))[0]
    caches[0] = hf_pair

    with pytest.raises(LayoutError):
        gather(spec, caches, IDS)


def test_hf_layer_given_as_a_list_is_a_layout_error() -> None:
    spec = make_spec(Layout.HF)
    caches: list[Any] = make_caches(spec)
    caches[0] = list(caches[0])

    with raises_layout_error("layer 0: the hf layout of this spec needs a (K, V) pair"):
        gather(spec, caches, IDS)


def run(op: str, spec: KVSpec, caches: Sequence[LayerCache], ids: Any = IDS) -> None:
    if op == "gather":
        gather(spec, caches, ids)
    else:
        scatter(spec, make_blocks(spec, len(IDS)), caches, ids)


def test_an_mla_latent_in_the_hf_layout_round_trips_as_one_plane() -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=12, dtype="float32", block_size=4,
                  layout=Layout.HF, kind="mla")  # fmt: skip
    g = torch.Generator().manual_seed(3)
    caches: list[LayerCache] = [(torch.rand((1, 1, 16, 12), generator=g),) for _ in range(2)]

    blocks = gather(spec, caches, [3, 1])

    assert blocks.shape == (2, 2, 1, 4, 1, 12)
    assert torch.equal(blocks[0, 1, 0, :, 0], caches[1][0][0, 0, 12:16])
    empty: list[LayerCache] = [(torch.zeros((1, 1, 16, 12)),) for _ in range(2)]
    scatter(spec, blocks, empty, [3, 1])
    assert torch.equal(empty[1][0][0, 0, 4:8], caches[1][0][0, 0, 4:8])
    assert torch.equal(empty[1][0][0, 0, :4], torch.zeros(1, 4, 12)[0])
    with pytest.raises(
        LayoutError, match=r"^layer 0: the hf layout of this spec needs a \(latent,\) 1-tuple$"
    ):
        gather(spec, [(caches[0][0], caches[0][0]), caches[1]], [0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_mla_latent_in_the_vllm_layout_is_its_slot_byte_for_byte(dtype: str) -> None:
    # vLLM's MLA backends keep [num_blocks, block_size, latent] per layer: block b's rows are
    # a stored block's [1, block_size, 1, latent], in the same order.
    spec = make_mla_spec(Layout.VLLM, dtype)
    caches = make_caches(spec)

    blocks = gather(spec, caches, IDS)

    assert blocks.shape == (len(IDS), LAYERS, 1, BLOCK, 1, 11)
    for i, b in enumerate(IDS):
        for layer, c in enumerate(caches):
            assert isinstance(c, torch.Tensor)
            assert torch.equal(raw(blocks[i, layer, 0, :, 0]), raw(c[b]))
    empty = [torch.zeros_like(c) for c in caches if isinstance(c, torch.Tensor)]
    scatter(spec, blocks, empty, IDS)
    for e, c in zip(empty, caches, strict=True):
        assert isinstance(c, torch.Tensor)
        assert torch.equal(raw(e[IDS]), raw(c[IDS]))
        assert not raw(e[[1, 3, 5]]).any()  # blocks not named are not written


def test_an_mla_latent_of_the_wrong_shape_or_layout_is_refused() -> None:
    spec = make_mla_spec(Layout.VLLM)
    wrong: list[LayerCache] = [torch.zeros((NUM_BLOCKS, BLOCK, 12), dtype=torch.bfloat16)] * 3

    with raises_layout_error(
        f"layer 0: shape [{NUM_BLOCKS}, {BLOCK}, 12] does not match the vllm layout of"
    ):
        gather(spec, wrong, IDS)
    flashinfer = make_mla_spec(Layout.FLASHINFER)
    with raises_layout_error("an MLA latent has no flashinfer layout of its own"):
        gather(flashinfer, make_caches(spec), IDS)
