"""Quantized block storage (int8, fp8 e4m3): the torch reference, CPU path and oracle.

Opt-in narrow storage halves (bf16/fp16 engines) or quarters (fp32) the bytes a
block takes in the host and disk tiers. A stored quantized block is its
page-first data ``[layers, planes, block_size, kv_heads, head_dim]`` in one byte per
element plus one float32 scale per ``(layer, K/V, head)``; for ``n`` blocks,
``data`` is ``[n, *spec.block_shape]`` and ``scales`` is ``[n, layers, planes, heads]``.

Quantization is symmetric absmax over the ``block_size x head_dim`` values of
one head: ``scale = absmax / QMAX`` (QMAX 127 for int8, 448 for e4m3), stored
``q = round(x / scale)`` (half to even, int8 clamped to +-127), restored
``x' = q * scale`` rounded to the engine dtype. Every step is one correctly
rounded float32 operation, so the CUDA kernels (``kernels/quant.cu``), which
use ``__fdiv_rn`` / ``__fmul_rn`` / ``__float2int_rn`` and RNE conversions,
reproduce these bytes exactly. An all-zero head gets scale 0 and stores zeros.

Why per (block, layer, K/V, head): K and V, and the heads of one layer, have
ranges far apart, and per-head scales keep one wide head from flattening the
others; finer (per token) scales
would cost 4 bytes per 128 stored and break the one-scale-per-fragment layout
the kernel reduces over. Rejected: a per-channel K scale (KIVI style) -- better
for K outliers, but a block's scales would then depend on the layout of the
channels, not just on the block, and it needs a second kernel shape.

Error, from the arithmetic (``error_bound``): int8 ``|x - x'| <= scale / 2``,
e4m3 ``|x - x'| <= |x| / 16`` (half an ulp of 3 mantissa bits; ``scale * 2**-10``
in its subnormal range), each plus half an ulp of the engine dtype at ``x'``
(the final rounding: for bf16 that is up to ``|x'| * 2**-8``, as large as the
int8 step itself near a head's absmax).

Measured with ``measure_error`` (relative = ||x - x'|| / ||x|| over all blocks;
worst = the largest ``|x - x'| / error_bound``, <= 1 means the bound held for
every element; seed 0):

    data                                             int8: rel, worst    e4m3: rel, worst
    random normal bf16, 32 blocks, 4 layers, 8x64    0.81 %, 0.9999      2.65 %, 0.992
    the same in fp16                                 0.79 %, 0.9999      2.64 %, 0.998
    tiny llama KV bf16, 320 tokens, 4 layers, 2x32   0.75 %, 0.9992      2.64 %, 0.988
    the same KV in fp32                              0.74 %, 0.99997     2.63 %, 0.999997

The tiny llama is ``tiercache.demo_models.tiny_model("llama")`` (random weights)
run over 320 random tokens; real checkpoints have outlier channels in K that
raise the int8 relative error of the heads that hold them, which per-head
scales confine to those heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from tiercache.kernels.reference import LayerCache, LayoutError, gather, scatter
from tiercache.spec import KVSpec

Format = Literal["int8", "fp8"]

# Largest stored magnitude: the absmax of a head maps to it.
QMAX: dict[str, float] = {"int8": 127.0, "fp8": 448.0}
QDTYPE: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# Engine dtypes that quantized storage restores into (the kernels are instantiated for these).
ENGINE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True, slots=True)
class QuantBlocks:
    """``n`` quantized blocks: ``data`` ``[n, *block_shape]`` int8 or float8_e4m3fn, ``scales``
    ``[n, layers, planes, heads]`` float32 (one per block, layer, K/V, head)."""

    data: torch.Tensor
    scales: torch.Tensor

    @property
    def fmt(self) -> Format:
        return "fp8" if self.data.dtype == torch.float8_e4m3fn else "int8"


def _fmt(fmt: str) -> Format:
    if fmt == "int8":
        return "int8"
    if fmt == "fp8":
        return "fp8"
    raise LayoutError(f"quantized format must be 'int8' or 'fp8', got {fmt!r}")


def check_engine_dtype(spec: KVSpec) -> None:
    if spec.dtype not in ENGINE_DTYPES:
        raise LayoutError(
            f"quantized storage needs a float16, bfloat16 or float32 cache, got {spec.dtype} "
            "(an fp8 or int8 cache is already narrow: store it as it is)"
        )


def check_quantized(spec: KVSpec, q: QuantBlocks, n: int) -> None:
    """``q`` holds ``n`` blocks of ``spec``: data and scales of the right shapes and dtypes."""
    want_scales = (n, spec.num_layers, spec.planes, spec.num_kv_heads)
    if tuple(q.data.shape) != (n, *spec.block_shape) or tuple(q.scales.shape) != want_scales:
        raise LayoutError(
            f"quantized blocks must be {[n, *spec.block_shape]} with scales {list(want_scales)}, "
            f"got {list(q.data.shape)} with scales {list(q.scales.shape)}"
        )
    if q.data.dtype not in QDTYPE.values() or q.scales.dtype != torch.float32:
        raise LayoutError(
            f"quantized blocks must be int8 or float8_e4m3fn with float32 scales, "
            f"got {q.data.dtype} with {q.scales.dtype}"
        )


# Blocks are converted a few at a time, so that the float32 temporaries (4 bytes per element)
# stay in the CPU's cache instead of being allocated, faulted in and streamed through memory
# whole: 4-6x faster than whole-tensor operations for 8k tokens of a 256 KiB block.
_CHUNK_ELEMENTS = 1 << 19


# e4m3 -> float16 by moving bits: a code's sign goes to bit 15, its exponent and mantissa
# (bits 6-0) to bits 13-7, so the float16's exponent field is the code's with a zero on top
# and its mantissa the code's 3 bits. That float16 is the code's value times 2**-8 (bias 15
# against 7), normal and subnormal codes alike (both formats go subnormal at exponent field
# 0), exactly. Multiplying it by 256 * scale instead of scale gives the same float32 product:
# 256 * scale is exact (scale <= float32 max / 448) and so is the float16's value. The codes
# this does not map are the NaNs (0x7f, 0xff: 1.875 * 2**-8 here): quantize writes them only
# in a head with an infinite or NaN element, and a chunk holding one is decoded through the
# table of the 256 codes' values (as torch converts them) instead.
_E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
_E4M3_TO_F16_SHIFT = 7
_E4M3_TO_F16_SCALE = 256.0
_F16_CLEAR_BIT14 = ~(1 << 14)  # int16 -16385: the sign extension's copy in bit 14 cleared
# The largest finite code (0x7e, 448) as that float16: only a NaN code (1.875) lies past it.
_E4M3_MAX_AS_F16 = 448.0 / _E4M3_TO_F16_SCALE


def _step(blocks: torch.Tensor) -> int:
    """How many of ``blocks`` (``[n, ...]``) one chunk converts."""
    per_block = blocks[0].numel() if blocks.shape[0] else 1
    return max(1, _CHUNK_ELEMENTS // max(1, per_block))


def quantize(
    blocks: torch.Tensor, fmt: Format = "int8", out: QuantBlocks | None = None
) -> QuantBlocks:
    """Quantize page-first ``blocks`` ``[n, layers, planes, block_size, heads, head_dim]`` (into
    ``out``'s tensors when given: views into a record buffer, say)."""
    fmt = _fmt(fmt)
    n = blocks.shape[0]
    if out is None:
        scales_shape = (n, blocks.shape[1], blocks.shape[2], blocks.shape[4])
        out = QuantBlocks(
            torch.empty(blocks.shape, dtype=QDTYPE[fmt]),
            torch.empty(scales_shape, dtype=torch.float32),
        )
    step = _step(blocks)
    for i in range(0, n, step):
        x = blocks[i : i + step].to(torch.float32, copy=True)  # a copy: divided in place below
        scales = torch.div(x.abs().amax(dim=(3, 5)), QMAX[fmt], out=out.scales[i : i + step])
        # Dividing an all-zero head by 1 instead of 0 stores zeros (and no NaN).
        divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
        x.div_(divisor[:, :, :, None, :, None])
        if fmt == "int8":
            x.round_().clamp_(-127, 127)  # integers now: the copy to int8 below is exact
        # fp8: |x| <= 448 up to one rounding, so torch's RNE conversion (NaN from 464 up) and
        # the kernel's saturating one agree.
        out.data[i : i + step].copy_(x)
    return out


def dequantize(q: QuantBlocks, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks of ``dtype`` from ``q``: ``q * scale`` in float32, rounded once to ``dtype``.

    A few blocks at a time, through one float32 buffer that stays in cache. Each chunk of
    ``q.data`` is read whole before its blocks of ``out`` are written, and no later chunk is
    written before, so a block's codes may lie inside its own bytes of ``out``: a load into an
    engine's blocks reads each record into the tail of the block it decodes to
    (``results.record_rows``)."""
    n = q.data.shape[0]
    if out is None:
        out = torch.empty(q.data.shape, dtype=dtype)
    scales = q.scales[:, :, :, None, :, None]
    step = _step(q.data)
    fp8 = q.data.dtype == torch.float8_e4m3fn
    shape = (min(step, n), *q.data.shape[1:])
    buf = torch.empty(shape)
    if fp8:
        bits = torch.empty(shape, dtype=torch.int16)
        scales_f16 = scales * _E4M3_TO_F16_SCALE  # once, not per chunk
    for i in range(0, n, step):
        chunk = q.data[i : i + step]
        x = buf[: chunk.shape[0]]
        if not fp8:
            x.copy_(chunk).mul_(scales[i : i + step])
        else:
            # torch converts e4m3 one element at a time on a CPU (20x slower than the table;
            # the bits moved into a float16, 2x faster than the table)
            x.copy_(_e4m3_as_f16(chunk, bits[: chunk.shape[0]]).view(torch.float16))
            lo, hi = torch.aminmax(x)
            if float(hi) > _E4M3_MAX_AS_F16 or float(lo) < -_E4M3_MAX_AS_F16:
                torch.take(_E4M3, chunk.view(torch.uint8).long(), out=x)  # a NaN code
                x.mul_(scales[i : i + step])
            else:
                x.mul_(scales_f16[i : i + step])
        out[i : i + step].copy_(x)
    return out


def _e4m3_as_f16(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """e4m3fn ``codes`` as the int16 bits of float16 values 2**-8 times theirs (NaN codes
    aside), into ``out`` (int16, ``codes``' shape) if given."""
    signed = codes.view(torch.int8)  # sign-extended to int16: the sign in bits 15-7
    bits = signed.to(torch.int16) if out is None else out.copy_(signed)
    return bits.bitwise_left_shift_(_E4M3_TO_F16_SHIFT).bitwise_and_(_F16_CLEAR_BIT14)


def error_bound(q: QuantBlocks, dtype: torch.dtype) -> torch.Tensor:
    """Per element bound on ``|x - dequantize(quantize(x))|``, shaped like ``q.data``.

    int8: half a quantization step, ``scale / 2``. e4m3: half an ulp of a 3-mantissa-bit
    number, ``|x| / 16``, or ``scale * 2**-10`` in the subnormal range. Both plus half an ulp
    of the engine dtype at the restored value (``eps / 2 * max(|x'|, smallest_normal)``, as
    ``torch.finfo`` gives them).
    """
    scale = q.scales[:, :, :, None, :, None]
    restored = q.data.float() * scale
    if q.fmt == "int8":
        step = scale.expand_as(restored) / 2
    else:
        # Quantization error of e4m3 at y = x / scale: 2**(e - 4) for |y| in [2**e, 2**(e+1)),
        # e >= -6 (normal), else 2**-10 (subnormal spacing 2**-9, halved).
        y = restored.abs() / torch.where(scale > 0, scale, torch.ones_like(scale))
        e = torch.floor(torch.log2(y.clamp(min=2.0**-6)))
        step = torch.exp2(e - 4) * scale
    # The final rounding to ``dtype``: half an ulp at x', which below the dtype's smallest
    # normal is half the (fixed) subnormal spacing, not eps / 2 * |x'| (float16 goes subnormal
    # below 6.1e-5, where ordinary KV values fall). And slack for the two float32 roundings
    # (x / scale and q * scale), each at most 2**-24 relative.
    finfo = torch.finfo(dtype)
    half_ulp = restored.abs().clamp(min=finfo.smallest_normal) * (finfo.eps / 2)
    return step + half_ulp + 2**-22 * restored.abs()


def gather_quantized(
    spec: KVSpec,
    caches: Sequence[LayerCache],
    block_ids: torch.Tensor | Sequence[int],
    *,
    fmt: Format = "int8",
    batch: int = 0,
) -> QuantBlocks:
    """``quantize(gather(...))``: blocks ``block_ids`` of ``caches``, stored narrow."""
    check_engine_dtype(spec)
    return quantize(gather(spec, caches, block_ids, batch=batch), fmt)


def scatter_quantized(
    spec: KVSpec,
    q: QuantBlocks,
    caches: Sequence[LayerCache],
    block_ids: torch.Tensor | Sequence[int],
    *,
    batch: int = 0,
) -> None:
    """``scatter(dequantize(q))``: restore quantized blocks into ``caches`` at ``block_ids``."""
    check_engine_dtype(spec)
    check_quantized(spec, q, len(block_ids))
    scatter(spec, dequantize(q, spec.torch_dtype), caches, block_ids, batch=batch)


def measure_error(blocks: torch.Tensor, fmt: Format = "int8") -> dict[str, float]:
    """Round-trip error of ``blocks``: ``relative`` = ||x - x'|| / ||x||, and ``worst_over_bound``
    = the largest ``|x - x'| / error_bound`` (at most 1 when the bound holds)."""
    q = quantize(blocks, fmt)
    x = blocks.float()
    err = (dequantize(q, blocks.dtype).float() - x).abs()
    bound = error_bound(q, blocks.dtype)
    return {
        "relative": float(err.norm() / x.norm()),
        "worst_over_bound": float((err / bound.clamp(min=torch.finfo(torch.float32).tiny)).max()),
    }
