"""Storage formats of the tiers below the engine: ``exact``, ``int8``, ``fp8_e4m3``.

A block stored ``exact`` is the engine's bytes. A quantized block is one stored
record of ``stored_nbytes(spec, fmt)`` bytes: the page-first data
``[layers, planes, block_size, kv_heads, head_dim]`` in one byte per element (int8 or
float8 e4m3), followed by the float32 scales ``[layers, planes, kv_heads]`` (one per
block, layer, K/V (or MLA latent) and head; ``kernels/reference_quant.py`` is the arithmetic and
its error bound). The scales travel inside the record, so one block is still one
slot, one disk chunk and one object, and the checksum, computed over the stored
record, covers data and scales alike.

Where blocks are quantized: where they leave the engine (``store_rows``, on
every save) and dequantized where they go back into it (``decode``, in
``LoadResult.kv``). Every tier below the engine then holds the same record, so
host slots, disk chunks and shared-tier objects are all sized by
``stored_nbytes``, checksums are computed over the stored record (data and
scales) by the unchanged tier code, a block is quantized exactly once, and a
socket client sends and receives half the bytes. Rejected: quantizing at the
host->disk boundary (a hot exact host over a narrow disk). It saves host bytes
for nothing on the read path (a disk hit would come back dequantized into an
exact-sized host slot), it needs two slot sizes and two checksums per block,
and a block would change bytes, and so checksum, as it moves down, which the
fail-closed rule (a block is its verified bytes) does not allow.

A block with an inf or NaN is refused by ``encode`` (a FormatError naming the head): one
such element makes its head's scale non-finite, and every element of the head would decode
as NaN. Such a block is only stored exact. Records a socket client encoded on its side
are checked as they are committed (``check_records``): a scale or a code that ``encode``
never writes (a NaN, inf, negative or oversized scale; an fp8 NaN code, int8's -128) is
refused, naming the block, layer, K/V and head.

The format is chosen per namespace, by the client, at registration
(``Namespace.store_dtype``): the application decides what error it accepts,
and every tier holds that namespace's blocks in that one format. There is no
per-tier format in the daemon's config (a tier converting blocks as they move
down is the rejected design above).

The format is part of what a block is: ``format_salt`` joins the namespace
seed of the block keys, so a block stored under ``int8`` has other keys than
the same tokens stored exact, and a namespace that asked for exact bytes
(``store_dtype = "exact"`` at registration, the default) can never look one
up. The zarr attributes of a namespace array carry ``zarr_attrs`` (format,
data dtype, scale layout, byte offsets), so a zarr v3 reader can split a chunk
into data and scales and dequantize it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from tiercache.errors import BlockShapeError
from tiercache.kernels import reference_quant as rq
from tiercache.kernels.reference import LayoutError
from tiercache.spec import KVSpec, block_rows

if TYPE_CHECKING:
    from tiercache.keys import Namespace

StoreFormat = Literal["exact", "int8", "fp8_e4m3"]
FORMATS: tuple[StoreFormat, ...] = ("exact", "int8", "fp8_e4m3")
# int8 and e4m3 take the same bytes; e4m3's relative error (2.6 %) is above int8's (0.8 %).
# The reference's names for the quantized formats.
_REF: dict[str, rq.Format] = {"int8": "int8", "fp8_e4m3": "fp8"}
# Bytes of records ``check_records`` scans at once: its temporaries stay in the CPU's cache.
_CHECK_BYTES = 1 << 19


class FormatError(ValueError):
    """A storage format that is unknown, or that cannot be used where it was asked for."""


def parse_format(value: str, where: str = "store_dtype") -> StoreFormat:
    for f in FORMATS:
        if value == f:
            return f
    raise FormatError(f"{where}: {value!r} is not one of {', '.join(FORMATS)}")


def format_salt(fmt: StoreFormat) -> bytes:
    """What the format adds to a namespace's key seed: nothing for exact (its keys are the
    ones every earlier release computed), the format's name otherwise."""
    return b"" if fmt == "exact" else b"store_dtype=" + fmt.encode()


def check_spec(spec: KVSpec, fmt: StoreFormat) -> None:
    if fmt != "exact":
        try:
            rq.check_engine_dtype(spec)
        except LayoutError as e:
            raise FormatError(f"store_dtype {fmt!r}: {e}") from None


def _data_nbytes(spec: KVSpec) -> int:
    layers, two, bs, heads, hd = spec.block_shape
    return layers * two * bs * heads * hd


def _scales_count(spec: KVSpec) -> int:
    return spec.num_layers * spec.planes * spec.num_kv_heads


def stored_nbytes(spec: KVSpec, fmt: StoreFormat) -> int:
    """Bytes one block takes in a tier of format ``fmt``."""
    if fmt == "exact":
        return spec.block_nbytes
    return _data_nbytes(spec) + 4 * _scales_count(spec)


def encode(spec: KVSpec, blocks: torch.Tensor, fmt: StoreFormat) -> torch.Tensor:
    """Engine-dtype page-first ``blocks`` ``[n, *block_shape]`` -> stored records, uint8
    ``[n, stored_nbytes]``. ``exact`` is the same bytes, unchanged."""
    n = blocks.shape[0]
    if blocks.dtype != spec.torch_dtype or tuple(blocks.shape[1:]) != spec.block_shape:
        # Quantizing would broadcast a block of another shape into the record silently.
        raise FormatError(
            f"blocks to encode must be {spec.dtype} {[n, *spec.block_shape]}, "
            f"got {blocks.dtype} {list(blocks.shape)}"
        )
    if fmt == "exact":
        return blocks.contiguous().view(torch.uint8).reshape(n, spec.block_nbytes)
    check_spec(spec, fmt)
    records = torch.empty((n, stored_nbytes(spec, fmt)), dtype=torch.uint8)
    split = _data_nbytes(spec)
    # The data is quantized straight into the records (a view of their first bytes); the
    # scales (4 bytes per head and layer) are copied in after.
    data = records[:, :split].view(rq.QDTYPE[_REF[fmt]]).view(n, *spec.block_shape)
    scales = torch.empty((n, spec.num_layers, spec.planes, spec.num_kv_heads))
    rq.quantize(blocks, _REF[fmt], out=rq.QuantBlocks(data, scales))
    _check_finite(spec, scales, fmt)
    records[:, split:] = scales.view(torch.uint8).reshape(n, -1)
    return records


def _check_finite(spec: KVSpec, scales: torch.Tensor, fmt: StoreFormat) -> None:
    """A FormatError naming the first head that holds an inf or NaN: its scale (the head's
    absmax) is not finite, and every element of the head would decode as NaN."""
    bad = (~torch.isfinite(scales)).nonzero()
    if len(bad):
        b, layer, plane, head = (int(i) for i in bad[0])
        what = "latent" if spec.planes == 1 else "KV"[plane]
        raise FormatError(
            f"store_dtype {fmt!r}: block {b}, layer {layer}, {what}, head {head} holds an inf "
            "or NaN, which a quantized record cannot hold (the whole head would come back NaN)"
        )


def check_records(
    spec: KVSpec,
    records: torch.Tensor,
    fmt: StoreFormat,
    rows: Sequence[int],
    blocks: Sequence[int],
) -> None:
    """The ``rows`` of stored records uint8 ``[*, >= stored_nbytes]`` encoded elsewhere (a
    socket client encodes its blocks) hold only what ``encode`` writes: a FormatError names
    the first block (``blocks[i]`` names ``rows[i]``), layer, K/V and head that does not.

    A scale must be finite, non-negative and at most the engine dtype's largest value over
    QMAX (above it, ``decode`` multiplies codes into inf, and fp8's zeros into NaN); a code
    must not be an fp8 NaN (``0x7f``, ``0xff``: ``encode`` refuses the inf or NaN heads that
    are its only source) nor int8's -128 (``encode`` clamps to +-127). The records are read
    in place, a few blocks at a time (``records`` may be the whole host arena)."""
    if fmt == "exact" or not rows:
        return
    split, want = _data_nbytes(spec), stored_nbytes(spec, fmt)
    top = torch.div(torch.tensor(torch.finfo(spec.torch_dtype).max), rq.QMAX[_REF[fmt]])
    step = max(1, _CHECK_BYTES // split)
    for row, slot, n in _row_runs(rows, step):
        rec = records[slot : slot + n]
        scales = rec[:, split:want].clone(memory_format=torch.contiguous_format).view(torch.float32)
        scales = scales.reshape(n, spec.num_layers, spec.planes, spec.num_kv_heads)
        bad_scale = ~(torch.isfinite(scales) & (scales >= 0) & (scales <= top))
        codes = rec[:, :split]
        if fmt == "int8":
            bad_codes = bool(codes.view(torch.int8).amin() == -128)
        else:
            bad_codes = bool((codes & 0x7F).amax() == 0x7F)
        if not bad_codes and not bool(bad_scale.any()):
            continue
        data = codes.reshape(n, *spec.block_shape)  # [n, layers, planes, tokens, heads, dim]
        bad_code = (data == 0x80) if fmt == "int8" else ((data & 0x7F) == 0x7F)
        per_head = bad_code.any(dim=5).any(dim=3)
        b, layer, plane, head = (int(i) for i in (per_head | bad_scale).nonzero()[0])
        what = "latent" if spec.planes == 1 else "KV"[plane]
        where = f"block {blocks[row + b]}, layer {layer}, {what}, head {head}"
        if bad_scale[b, layer, plane, head]:
            raise FormatError(
                f"store_dtype {fmt!r}: {where} has scale {float(scales[b, layer, plane, head])}; "
                f"a record's scales must be finite, non-negative and at most {float(top):.7g} "
                "(the head would decode as garbage)"
            )
        code = int(data[b, layer, plane, :, head][bad_code[b, layer, plane, :, head]][0])
        kind = "int8 -128, which encode clamps to -127" if fmt == "int8" else "an fp8 NaN"
        raise FormatError(
            f"store_dtype {fmt!r}: {where} holds code 0x{code:02x} ({kind}); a record holds "
            "only the codes encode writes (the element would decode as NaN or out of range)"
        )


def _row_runs(rows: Sequence[int], step: int) -> list[tuple[int, int, int]]:
    """(index in ``rows``, its row, length <= ``step``) of each run of consecutive rows."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1 or i - start == step:
            out.append((start, rows[start], i - start))
            start = i
    return out


def decode(
    spec: KVSpec, records: torch.Tensor, fmt: StoreFormat, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Stored records uint8 ``[n, stored_nbytes]`` -> engine-dtype blocks ``[n, *block_shape]``
    (into ``out`` when given; else exact records come back as a view of themselves)."""
    n = records.shape[0]
    want = stored_nbytes(spec, fmt)
    if records.dtype != torch.uint8 or tuple(records.shape) != (n, want):
        raise FormatError(
            f"stored {fmt} records of this spec must be uint8 [n, {want}], "
            f"got {records.dtype} {list(records.shape)}"
        )
    if out is not None and (
        out.dtype != spec.torch_dtype or tuple(out.shape) != (n, *spec.block_shape)
    ):
        raise FormatError(
            f"out must be {spec.dtype} {[n, *spec.block_shape]}, got {out.dtype} {list(out.shape)}"
        )
    if fmt == "exact":
        blocks = records.contiguous().view(spec.torch_dtype).reshape(n, *spec.block_shape)
        return blocks if out is None else out.copy_(blocks)
    split = _data_nbytes(spec)
    # Read in place: the data is a view of the records' first bytes (rows strided by a record).
    data = records[:, :split].view(rq.QDTYPE[_REF[fmt]]).view(n, *spec.block_shape)
    scales = (
        records[:, split:]
        .contiguous()
        .view(torch.float32)
        .reshape(n, spec.num_layers, spec.planes, spec.num_kv_heads)
    )
    return rq.dequantize(rq.QuantBlocks(data, scales), spec.torch_dtype, out)


def zarr_attrs(spec: KVSpec, fmt: StoreFormat) -> dict[str, Any]:
    """The attributes a namespace array carries so that a zarr v3 reader can interpret its
    uint8 chunks (one block each)."""
    out: dict[str, Any] = {"store_dtype": fmt, "block_nbytes": stored_nbytes(spec, fmt)}
    if fmt == "exact":
        out["data"] = {"dtype": spec.dtype, "shape": list(spec.block_shape), "offset": 0}
        return out
    out["data"] = {
        "dtype": "int8" if fmt == "int8" else "float8_e4m3fn",
        "shape": list(spec.block_shape),
        "dims": ["layer", "kv", "token", "head", "head_dim"],
        "offset": 0,
    }
    out["scales"] = {
        "dtype": "float32",
        "endian": "little",
        "shape": [spec.num_layers, spec.planes, spec.num_kv_heads],
        "dims": ["layer", "kv", "head"],
        "offset": _data_nbytes(spec),
        "per": "block, layer, K/V, head (symmetric absmax / QMAX)",
        "qmax": rq.QMAX[_REF[fmt]],
    }
    out["dequantize"] = f"x = data.astype(float32) * scales[..., None, :, None] -> {spec.dtype}"
    return out


def blocks_per_gib(spec: KVSpec, fmt: StoreFormat) -> float:
    return 2**30 / stored_nbytes(spec, fmt)


def store_rows(ns: Namespace, blocks: torch.Tensor) -> torch.Tensor:
    """What a save of ``ns`` stores: uint8 records ``[n, ns.block_nbytes]``. Engine-dtype
    blocks ``[n, *block_shape]`` are encoded in the namespace's format here, where they leave
    the engine; uint8 rows are taken as records already encoded (a socket client encodes
    on its side)."""
    fmt = parse_format(ns.store_dtype)
    if fmt == "exact" or blocks.dtype != torch.uint8:
        rows = block_rows(ns.spec, blocks)
        return (
            rows
            if fmt == "exact"
            else encode(ns.spec, blocks.reshape(-1, *ns.spec.block_shape), fmt)
        )
    want = stored_nbytes(ns.spec, fmt)
    if blocks.device.type != "cpu" or blocks.dim() != 2 or blocks.shape[1] != want:
        raise BlockShapeError(
            f"{fmt} records must be CPU uint8 [n, {want}] for this namespace, "
            f"got {blocks.device} {list(blocks.shape)}"
        )
    return blocks.contiguous()
