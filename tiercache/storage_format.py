"""Storage formats of the tiers below the engine: ``exact``, ``int8``, ``fp8_e4m3``.

A block stored ``exact`` is the engine's bytes. A quantized block is one stored
record of ``stored_nbytes(spec, fmt)`` bytes: the page-first data
``[layers, 2, block_size, kv_heads, head_dim]`` in one byte per element (int8 or
float8 e4m3), followed by the float32 scales ``[layers, 2, kv_heads]`` (one per
block, layer, K/V and head; ``kernels/reference_quant.py`` is the arithmetic and
its error bound). The scales travel inside the record, so one block is still one
slot, one disk chunk and one object, and the checksum, computed over the stored
record, covers data and scales alike.

Where blocks are quantized: when they are written to a tier whose format is
coarser than the one above it (``encode`` on the way down, ``decode`` into the
engine dtype on the way up). Argued against the alternative, quantizing where
the block leaves the engine:

- the device tier and the engine's own cache stay exact, so a hit in the
  fastest tier costs no dequantize and adds no error;
- a namespace whose host is exact and whose disk is int8 keeps its hot working
  set exact and only its cold set narrow, which is the tier whose bytes are the
  scarce ones (disk resume and S3 upload are bound by bytes read);
- a format only gets coarser going down (``check_chain``), so a block is
  quantized at most once per format change and never widened: promoting a disk
  block to an exact host would store dequantized bytes as if they were exact,
  so an exact tier above a quantized one is refused in the config.

The format is part of what a block is: ``format_salt`` joins the namespace
seed of the block keys, so a block stored under ``int8`` has other keys than
the same tokens stored exact, and a namespace that asked for exact bytes
(``store_dtype = "exact"`` at registration, the default) can never look one
up. The zarr attributes of a namespace array carry ``zarr_attrs`` (format,
data dtype, scale layout, byte offsets), so a zarr v3 reader can split a chunk
into data and scales and dequantize it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from tiercache.kernels import reference_quant as rq
from tiercache.kernels.reference import LayoutError
from tiercache.spec import KVSpec

StoreFormat = Literal["exact", "int8", "fp8_e4m3"]
FORMATS: tuple[StoreFormat, ...] = ("exact", "int8", "fp8_e4m3")
# How coarse a format is: a lower tier may keep its upper tier's format or a coarser one.
# int8 and e4m3 take the same bytes; e4m3's relative error (2.6 %) is above int8's (0.8 %).
_RANK = {"exact": 0, "int8": 1, "fp8_e4m3": 2}
# The reference's names for the quantized formats.
_REF: dict[str, rq.Format] = {"int8": "int8", "fp8_e4m3": "fp8"}
TIER_ORDER = ("host", "disk", "remote")


class FormatError(ValueError):
    """A storage format that is unknown, or that cannot be used where it was asked for."""


def parse_format(value: str, where: str = "store_dtype") -> StoreFormat:
    for f in FORMATS:
        if value == f:
            return f
    raise FormatError(f"{where}: {value!r} is not one of {', '.join(FORMATS)}")


def check_chain(formats: dict[str, str]) -> None:
    """Formats of the configured tiers (``{"host": .., "disk": .., "remote": ..}``; absent
    tiers left out) only get coarser going down; else a ``FormatError`` naming both tiers."""
    above: tuple[str, str] | None = None
    for tier in TIER_ORDER:
        if tier not in formats:
            continue
        fmt = parse_format(formats[tier], f"tiers.{tier}.store_dtype")
        if above is not None and _RANK[fmt] < _RANK[above[1]]:
            raise FormatError(
                f"tiers.{tier}.store_dtype = {fmt!r} is finer than "
                f"tiers.{above[0]}.store_dtype = {above[1]!r}: a format can only get coarser "
                f"going down the tiers (exact > int8 > fp8_e4m3); a block read back from "
                f"{above[0]} could not become {fmt!r} again"
            )
        above = (tier, fmt)


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
    return spec.num_layers * 2 * spec.num_kv_heads


def stored_nbytes(spec: KVSpec, fmt: StoreFormat) -> int:
    """Bytes one block takes in a tier of format ``fmt``."""
    if fmt == "exact":
        return spec.block_nbytes
    return _data_nbytes(spec) + 4 * _scales_count(spec)


def encode(spec: KVSpec, blocks: torch.Tensor, fmt: StoreFormat) -> torch.Tensor:
    """Engine-dtype page-first ``blocks`` ``[n, *block_shape]`` -> stored records, uint8
    ``[n, stored_nbytes]``. ``exact`` is the same bytes, unchanged."""
    n = blocks.shape[0]
    if fmt == "exact":
        return blocks.contiguous().view(torch.uint8).reshape(n, spec.block_nbytes)
    check_spec(spec, fmt)
    q = rq.quantize(blocks, _REF[fmt])
    data = q.data.contiguous().view(torch.uint8).reshape(n, -1)
    scales = q.scales.contiguous().view(torch.uint8).reshape(n, -1)
    return torch.cat([data, scales], dim=1)


def decode(spec: KVSpec, records: torch.Tensor, fmt: StoreFormat) -> torch.Tensor:
    """Stored records uint8 ``[n, stored_nbytes]`` -> engine-dtype blocks ``[n, *block_shape]``."""
    n = records.shape[0]
    want = stored_nbytes(spec, fmt)
    if records.dtype != torch.uint8 or tuple(records.shape) != (n, want):
        raise FormatError(
            f"stored {fmt} records of this spec must be uint8 [n, {want}], "
            f"got {records.dtype} {list(records.shape)}"
        )
    records = records.contiguous()
    if fmt == "exact":
        return records.view(spec.torch_dtype).reshape(n, *spec.block_shape)
    split = _data_nbytes(spec)
    data = records[:, :split].contiguous().view(rq.QDTYPE[_REF[fmt]]).reshape(n, *spec.block_shape)
    scales = (
        records[:, split:]
        .contiguous()
        .view(torch.float32)
        .reshape(n, spec.num_layers, 2, spec.num_kv_heads)
    )
    return rq.dequantize(rq.QuantBlocks(data, scales), spec.torch_dtype)


def convert(
    spec: KVSpec, records: torch.Tensor, src: StoreFormat, dst: StoreFormat
) -> torch.Tensor:
    """Records of format ``src`` as records of ``dst`` (a tier coarser than the one above it:
    decode then encode; the same format: the same bytes)."""
    if src == dst:
        return records
    if _RANK[dst] < _RANK[src]:
        raise FormatError(f"cannot store a {src} block as {dst}: formats only get coarser")
    return encode(spec, decode(spec, records, src), dst)


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
        "shape": [spec.num_layers, 2, spec.num_kv_heads],
        "dims": ["layer", "kv", "head"],
        "offset": _data_nbytes(spec),
        "per": "block, layer, K/V, head (symmetric absmax / QMAX)",
        "qmax": rq.QMAX[_REF[fmt]],
    }
    out["dequantize"] = f"x = data.astype(float32) * scales[..., None, :, None] -> {spec.dtype}"
    return out


def blocks_per_gib(spec: KVSpec, fmt: StoreFormat) -> float:
    return 2**30 / stored_nbytes(spec, fmt)


def check_registrable(ns_model: str, fmt: str) -> None:
    """Refuse a namespace whose format the tiers cannot store yet: the host, disk and shared
    tiers keep engine bytes only (the encode/decode above is not on their write and read
    paths), so a namespace that asked for a quantized format would be handed exact bytes
    under a quantized identity. Fail closed with a message that says so."""
    if fmt != "exact":
        raise FormatError(
            f"namespace {ns_model!r} asks for store_dtype {fmt!r}, but this build stores "
            f"blocks exact only; register it with store_dtype 'exact'"
        )
