"""The quantized-storage reference (``kernels/reference_quant.py``), checked against plain loops.

Scales and stored values are compared exactly: the loops compute each scale and each stored
value one element at a time in numpy float32 (one correctly rounded operation per step) and
round with Python's ``round`` (half to even) or a nearest-value search over the 127 finite
non-negative e4m3 values, so they share no code with the vectorized torch they check.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from tests.kernels.test_reference import (
    BLOCK,
    HEAD_DIM,
    HEADS,
    IDS,
    LAYERS,
    LAYOUTS,
    NUM_BLOCKS,
    clone_caches,
    loop_gather,
    make_caches,
    make_spec,
    raw,
)
from tiercache.kernels import reference_quant as rq
from tiercache.kernels.reference import LayoutError, gather
from tiercache.kernels.reference_quant import (
    QuantBlocks,
    dequantize,
    error_bound,
    gather_quantized,
    measure_error,
    quantize,
    scatter_quantized,
)
from tiercache.spec import Layout

FORMATS = ["int8", "fp8"]
ENGINE_DTYPES = ["float32", "float16", "bfloat16"]


def random_blocks(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Page-first blocks of odd sizes, never zero, with heads of very different ranges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, LAYERS, 2, BLOCK, HEADS, HEAD_DIM), generator=g)
    x = torch.where(x == 0, 0.5, x)
    head_range = torch.tensor([0.01, 1.0, 300.0])[None, None, None, None, :, None]
    return (x * head_range).to(dtype)


def e4m3_values() -> list[tuple[float, int]]:
    """Every finite non-negative e4m3fn value and its bit pattern, from the format's definition."""
    values = []
    for bits in range(0x7F):  # 0x7f is NaN
        exp, man = bits >> 3, bits & 7
        v = man * 2.0**-9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
        values.append((v, bits))
    return values


def loop_e4m3(y: float) -> int:
    """Round ``y`` to the nearest e4m3fn bit pattern, ties to the even mantissa."""
    best = min(e4m3_values(), key=lambda vb: (abs(abs(y) - vb[0]), vb[1] & 1))
    return best[1] | (0x80 if y < 0 else 0)


def loop_quantize(blocks: torch.Tensor, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(stored bytes as int, scales) of ``blocks``, one group and one element at a time."""
    x = blocks.float().numpy()
    n, layers, _, bs, heads, d = x.shape
    qmax = np.float32(127 if fmt == "int8" else 448)
    data = np.zeros(x.shape, dtype=np.int64)
    scales = np.zeros((n, layers, 2, heads), dtype=np.float32)
    for i in range(n):
        for layer in range(layers):
            for kv in range(2):
                for h in range(heads):
                    group = [x[i, layer, kv, t, h, j] for t in range(bs) for j in range(d)]
                    scale = np.float32(max(abs(v) for v in group)) / qmax
                    scales[i, layer, kv, h] = scale
                    for t in range(bs):
                        for j in range(d):
                            y = float(np.float32(x[i, layer, kv, t, h, j]) / scale)
                            data[i, layer, kv, t, h, j] = (
                                max(-127, min(127, round(y))) if fmt == "int8" else loop_e4m3(y)
                            )
    return data, scales


def stored_ints(q: QuantBlocks) -> np.ndarray:
    return (q.data.numpy() if q.fmt == "int8" else raw(q.data).numpy()).astype(np.int64)


# --- quantize / dequantize against loops ----------------------------------------------------


@pytest.mark.parametrize("dtype", ENGINE_DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_equals_a_loop_over_heads_and_elements(fmt: str, dtype: str) -> None:
    blocks = random_blocks(2, getattr(torch, dtype))

    q = quantize(blocks, fmt)  # type: ignore[arg-type]

    want_data, want_scales = loop_quantize(blocks, fmt)
    assert q.scales.dtype == torch.float32
    assert np.array_equal(q.scales.numpy(), want_scales)
    assert np.array_equal(stored_ints(q), want_data)


@pytest.mark.parametrize("dtype", ENGINE_DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_converting_a_few_blocks_at_a_time_gives_the_same_bytes_as_all_at_once(
    fmt: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch_dtype = getattr(torch, dtype)
    blocks = random_blocks(7, torch_dtype, seed=3)
    blocks[2, 1, 0, :, 1] = 0  # an all-zero head inside a chunk
    before = blocks.clone()
    monkeypatch.setattr(rq, "_CHUNK_ELEMENTS", 2**40)  # everything in one chunk
    whole = quantize(blocks, fmt)  # type: ignore[arg-type]
    whole_back = dequantize(whole, torch_dtype)
    monkeypatch.setattr(rq, "_CHUNK_ELEMENTS", blocks[0].numel() * 2)  # 2 blocks a chunk: 4

    q = quantize(blocks, fmt)  # type: ignore[arg-type]
    back = dequantize(q, torch_dtype)

    assert torch.equal(raw(q.data), raw(whole.data)) and torch.equal(q.scales, whole.scales)
    assert torch.equal(raw(back), raw(whole_back))
    assert torch.equal(raw(blocks), raw(before))  # a float32 input is copied, never divided


def test_the_e4m3_table_holds_torch_s_value_of_every_code() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(rq._E4M3.view(torch.int32), want.view(torch.int32))  # NaNs bit for bit


@pytest.mark.parametrize("dtype", ENGINE_DTYPES)
@pytest.mark.parametrize("nan_codes", [False, True], ids=["finite codes", "with NaN codes"])
def test_every_e4m3_code_dequantizes_as_torch_s_value_times_the_scale(
    dtype: str, nan_codes: bool
) -> None:
    """The bit-moving decode against torch's own e4m3 -> float32 conversion, for every code
    under scales from subnormal to the largest quantize can give, zero, inf and NaN; a chunk
    holding a NaN code (0x7f, 0xff) goes through the table, bit for bit as well."""
    torch_dtype = getattr(torch, dtype)
    codes = torch.arange(256, dtype=torch.uint8)
    if not nan_codes:
        codes = codes[(codes & 0x7F) != 0x7F]
    big = torch.finfo(torch.float32).max / 448
    scale_values = [1.0, 2.0**-140, 2.0**-126, 3e-5, 0.37, 1e20, big, 0.0, math.inf, math.nan]
    layers, heads, head_dim = 1, len(scale_values), 2
    per_head = BLOCK * head_dim  # every code once per (block, K/V, head), in a row
    n = -(-len(codes) // per_head)
    flat = codes.repeat(n * 2 * heads * per_head // len(codes) + 1)
    data = torch.empty((n, layers, 2, BLOCK, heads, head_dim), dtype=torch.uint8)
    data.view(-1).copy_(flat[: data.numel()])
    scales = torch.tensor(scale_values).expand(n, layers, 2, heads).contiguous()
    q = QuantBlocks(data.view(torch.float8_e4m3fn), scales)

    restored = dequantize(q, torch_dtype)

    want = data.view(torch.float8_e4m3fn).float() * scales[:, :, :, None, :, None]
    assert torch.equal(raw(restored), raw(want.to(torch_dtype)))  # NaNs bit for bit too


def test_the_bit_moving_decode_is_the_one_used_without_nan_codes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The table is only the NaN path: a chunk without NaN codes never reads it."""
    q = quantize(random_blocks(2, torch.bfloat16), "fp8")
    want = dequantize(q, torch.bfloat16)
    monkeypatch.setattr(rq, "_E4M3", torch.full((256,), math.nan))

    assert torch.equal(raw(dequantize(q, torch.bfloat16)), raw(want))


@pytest.mark.parametrize("dtype", ENGINE_DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_is_one_float32_product_rounded_to_the_engine_dtype(
    fmt: str, dtype: str
) -> None:
    torch_dtype = getattr(torch, dtype)
    q = quantize(random_blocks(2, torch_dtype), fmt)  # type: ignore[arg-type]
    stored = q.data.float().numpy()
    scales = q.scales.numpy()

    restored = dequantize(q, torch_dtype)

    want = np.empty(stored.shape, dtype=np.float32)
    for idx in np.ndindex(*stored.shape):
        i, layer, kv, _, h, _ = idx
        want[idx] = np.float32(stored[idx]) * scales[i, layer, kv, h]
    assert restored.dtype == torch_dtype
    assert torch.equal(raw(restored), raw(torch.from_numpy(want).to(torch_dtype)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_heads_absmax_is_stored_as_the_largest_value(fmt: str) -> None:
    q = quantize(random_blocks(3, torch.bfloat16), fmt)  # type: ignore[arg-type]

    top = q.data.float().abs().amax(dim=(3, 5))

    assert torch.equal(top, torch.full_like(top, 127.0 if fmt == "int8" else 448.0))


def test_int8_never_stores_minus_128() -> None:
    q = quantize(random_blocks(3, torch.float32) * -1, "int8")

    assert int(q.data.min()) == -127


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_all_zero_head_has_scale_zero_and_comes_back_zero(fmt: str) -> None:
    blocks = random_blocks(1, torch.bfloat16)
    blocks[0, 1, 0, :, 2, :] = 0

    q = quantize(blocks, fmt)  # type: ignore[arg-type]
    restored = dequantize(q, torch.bfloat16)

    assert float(q.scales[0, 1, 0, 2]) == 0.0
    assert int(raw(q.data[0, 1, 0, :, 2, :]).count_nonzero()) == 0
    assert int(restored[0, 1, 0, :, 2, :].count_nonzero()) == 0
    assert bool(torch.isfinite(restored).all())


# --- error bound ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ENGINE_DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_error_is_within_the_documented_bound(fmt: str, dtype: str) -> None:
    torch_dtype = getattr(torch, dtype)
    blocks = random_blocks(4, torch_dtype)
    q = quantize(blocks, fmt)  # type: ignore[arg-type]

    err = (dequantize(q, torch_dtype).float() - blocks.float()).abs()

    assert bool((err <= error_bound(q, torch_dtype)).all())


@pytest.mark.parametrize("magnitude", [1e-1, 1e-3, 1e-5])
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_error_of_small_float16_values_is_within_the_documented_bound(
    fmt: str, magnitude: float
) -> None:
    """float16 goes subnormal below 6.1e-5: its last rounding there is half the fixed subnormal
    spacing, which a bound relative to the value (eps / 2 * |x'|) undercounted."""
    g = torch.Generator().manual_seed(0)
    blocks = (torch.randn((8, 4, 2, 16, 8, 64), generator=g) * magnitude).to(torch.float16)

    assert measure_error(blocks, fmt)["worst_over_bound"] <= 1.0  # type: ignore[arg-type]


def test_int8_error_in_float32_reaches_but_never_exceeds_half_a_step() -> None:
    """The bound is scale/2 and tight: float32 adds no rounding worth counting."""
    blocks = random_blocks(8, torch.float32)
    q = quantize(blocks, "int8")
    steps = (dequantize(q, torch.float32) - blocks).abs() / q.scales[:, :, :, None, :, None]

    assert 0.49 < float(steps.max()) <= 0.5 * (1 + 2**-20)


@pytest.mark.parametrize(
    ("fmt", "relative"), [("int8", 0.0081), ("fp8", 0.0265)], ids=["int8", "fp8"]
)
def test_relative_error_on_random_normal_kv_is_the_documented_one(
    fmt: str, relative: float
) -> None:
    g = torch.Generator().manual_seed(0)
    blocks = torch.randn((32, 4, 2, 16, 8, 64), generator=g).to(torch.bfloat16)

    measured = measure_error(blocks, fmt)  # type: ignore[arg-type]

    assert measured["relative"] == pytest.approx(relative, rel=0.01)
    assert measured["worst_over_bound"] <= 1.0


# --- gather / scatter in every layout -------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantized_gather_quantizes_exactly_the_gathered_blocks(layout: Layout, fmt: str) -> None:
    spec = make_spec(layout, "bfloat16")
    caches = make_caches(spec)

    q = gather_quantized(spec, caches, IDS, fmt=fmt)  # type: ignore[arg-type]

    gathered = loop_gather(spec, caches, IDS).view(torch.bfloat16).reshape(3, *spec.block_shape)
    want_data, want_scales = loop_quantize(gathered, fmt)
    assert np.array_equal(q.scales.numpy(), want_scales)
    assert np.array_equal(stored_ints(q), want_data)


@pytest.mark.parametrize("dtype", ENGINE_DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantized_round_trip_restores_the_blocks_within_the_bound_and_nothing_else(
    layout: Layout, fmt: str, dtype: str
) -> None:
    spec = make_spec(layout, dtype)
    caches = make_caches(spec)
    before = clone_caches(caches)
    others = [b for b in range(NUM_BLOCKS) if b not in IDS]
    q = gather_quantized(spec, caches, IDS, fmt=fmt)  # type: ignore[arg-type]
    target = make_caches(spec, seed=7)
    moved = [1, 5, 3]

    scatter_quantized(spec, q, target, moved)

    got = gather(spec, target, moved).float()
    want = gather(spec, before, IDS).float()
    assert bool(((got - want).abs() <= error_bound(q, spec.torch_dtype)).all())
    assert torch.equal(raw(gather(spec, target, moved)), raw(dequantize(q, spec.torch_dtype)))
    untouched = [b for b in range(NUM_BLOCKS) if b not in moved]
    assert torch.equal(
        raw(gather(spec, target, untouched)),
        raw(gather(spec, make_caches(spec, seed=7), untouched)),
    )
    assert torch.equal(raw(gather(spec, caches, others)), raw(gather(spec, before, others)))


def test_quantized_hf_round_trip_uses_the_chosen_batch_row() -> None:
    spec = make_spec(Layout.HF, "float16")
    caches = make_caches(spec, batch=2)
    q = gather_quantized(spec, caches, IDS, batch=1)

    assert torch.equal(q.scales, quantize(gather(spec, caches, IDS, batch=1)).scales)
    scatter_quantized(spec, q, caches, IDS, batch=0)
    assert torch.equal(raw(gather(spec, caches, IDS, batch=0)), raw(dequantize(q, torch.float16)))


def test_quantized_blocks_take_one_byte_per_element() -> None:
    spec = make_spec(Layout.VLLM, "bfloat16")

    q = gather_quantized(spec, make_caches(spec), IDS)

    assert q.data.element_size() == 1
    assert q.data.numel() == 3 * spec.block_nbytes // spec.element_bytes
    assert tuple(q.scales.shape) == (3, LAYERS, 2, HEADS)


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "int8"])
def test_quantizing_a_cache_that_is_already_narrow_is_a_layout_error(dtype: str) -> None:
    spec = make_spec(Layout.VLLM, dtype)

    with pytest.raises(LayoutError, match=f"^quantized storage needs .* got {dtype} "):
        gather_quantized(spec, make_caches(spec), IDS)


def test_unknown_format_is_a_layout_error() -> None:
    spec = make_spec(Layout.VLLM)

    with pytest.raises(LayoutError, match=re.escape("must be 'int8' or 'fp8', got 'int4'")):
        gather_quantized(spec, make_caches(spec), IDS, fmt="int4")  # type: ignore[arg-type]


def test_scattering_quantized_blocks_of_the_wrong_shape_is_a_layout_error() -> None:
    spec = make_spec(Layout.VLLM)
    q = gather_quantized(spec, make_caches(spec), IDS)

    with pytest.raises(
        LayoutError,
        match=re.escape(
            "quantized blocks must be [2, 3, 2, 7, 3, 5] with scales [2, 3, 2, 3], "
            "got [3, 3, 2, 7, 3, 5] with scales [3, 3, 2, 3]"
        ),
    ):
        scatter_quantized(spec, q, make_caches(spec), IDS[:2])


def test_scales_that_are_not_float32_are_a_layout_error() -> None:
    spec = make_spec(Layout.VLLM)
    q = gather_quantized(spec, make_caches(spec), IDS)

    with pytest.raises(
        LayoutError, match=re.escape("with float32 scales, got torch.int8 with torch.float16")
    ):
        scatter_quantized(spec, QuantBlocks(q.data, q.scales.half()), make_caches(spec), IDS)
