"""Storage formats (``tiercache/storage_format.py``): records, identity, config, zarr attrs."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tiercache.kernels import reference_quant as rq
from tiercache.keys import Namespace
from tiercache.manager import TierManager
from tiercache.results import record_rows
from tiercache.spec import AttentionKind, KVSpec
from tiercache.storage_format import (
    FormatError,
    blocks_per_gib,
    check_records,
    decode,
    encode,
    stored_nbytes,
    zarr_attrs,
)
from tiercache.tiers.disk import DiskTier

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=16, dtype="bfloat16", block_size=8)
QUANT = ("int8", "fp8_e4m3")
REF = {"int8": "int8", "fp8_e4m3": "fp8"}


def blocks(spec: KVSpec, n: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *spec.block_shape), generator=g) * 3
    x[0, 1, 0] = 0  # one all-zero (layer, K) fragment: scale 0, stored zeros
    return x.to(spec.torch_dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_exact_records_are_the_engine_bytes(dtype: str) -> None:
    spec = KVSpec(3, 2, 16, dtype=dtype, block_size=8)
    x = blocks(spec)
    rec = encode(spec, x, "exact")
    assert rec.shape == (5, spec.block_nbytes)
    assert rec.numpy().tobytes() == x.contiguous().view(torch.uint8).numpy().tobytes()
    assert decode(spec, rec, "exact").view(torch.uint8).equal(x.view(torch.uint8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("fmt", QUANT)
def test_quantized_round_trip_within_the_reference_bound(dtype: str, fmt: str) -> None:
    spec = KVSpec(3, 2, 16, dtype=dtype, block_size=8)
    x = blocks(spec)
    rec = encode(spec, x, fmt)  # type: ignore[arg-type]
    assert rec.dtype == torch.uint8 and rec.shape == (5, stored_nbytes(spec, fmt))  # type: ignore[arg-type]
    back = decode(spec, rec, fmt)  # type: ignore[arg-type]
    assert back.dtype == spec.torch_dtype and back.shape == x.shape
    q = rq.quantize(x, REF[fmt])  # type: ignore[arg-type]
    bound = rq.error_bound(q, spec.torch_dtype)
    err = (back.float() - x.float()).abs()
    assert bool((err <= bound).all())
    assert bool((back[0, 1, 0] == 0).all())
    # the record is exactly the reference's data followed by its scales
    n_data = 3 * 2 * 8 * 2 * 16
    assert rec[:, :n_data].equal(q.data.view(torch.uint8).reshape(5, -1))
    assert rec[:, n_data:].equal(q.scales.view(torch.uint8).reshape(5, -1))
    # and it is not the exact bytes: a quantized block is a different record
    assert not torch.equal(back, x)


@pytest.mark.parametrize("fmt", QUANT)
def test_mla_records_have_one_scale_per_layer_latent_plane_and_head(fmt: str) -> None:
    # An MLA group caches one latent plane per token: its scales are [layers, 1, heads].
    spec = KVSpec(3, 1, 24, dtype="bfloat16", block_size=8, kind=AttentionKind.MLA)
    x = blocks(spec)
    rec = encode(spec, x, fmt)  # type: ignore[arg-type]
    assert stored_nbytes(spec, fmt) == 3 * 1 * 8 * 1 * 24 + 4 * 3 * 1 * 1  # type: ignore[arg-type]
    assert rec.shape == (5, stored_nbytes(spec, fmt))  # type: ignore[arg-type]
    back = decode(spec, rec, fmt)  # type: ignore[arg-type]
    q = rq.quantize(x, REF[fmt])  # type: ignore[arg-type]
    assert q.scales.shape == (5, 3, 1, 1)
    assert bool(((back.float() - x.float()).abs() <= rq.error_bound(q, spec.torch_dtype)).all())
    assert zarr_attrs(spec, fmt)["scales"]["shape"] == [3, 1, 1]  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("fmt", QUANT)
def test_a_block_holding_inf_or_nan_is_refused_not_stored_as_a_head_of_nans(
    fmt: str, bad: float
) -> None:
    # One such element would make its head's scale non-finite: all 128 values of the head
    # would decode as NaN.
    x = blocks(SPEC)
    x[3, 2, 1, 5, 1, 7] = bad
    with pytest.raises(FormatError, match=r"block 3, layer 2, V, head 1 holds an inf or NaN"):
        encode(SPEC, x, fmt)  # type: ignore[arg-type]
    assert encode(SPEC, x, "exact").view(torch.uint8).equal(x.view(torch.uint8).reshape(5, -1))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("fmt", QUANT)
def test_every_record_encode_writes_passes_the_commit_check(fmt: str, dtype: str) -> None:
    spec = KVSpec(num_layers=3, num_kv_heads=2, head_dim=16, dtype=dtype, block_size=8)
    x = blocks(spec, n=6)
    top = torch.finfo(spec.torch_dtype).max
    x[1, 0, 1] = top  # a head at the dtype's largest value: the largest scale encode writes
    x[2, 2, 0, 3] = -top
    x[3] = torch.finfo(spec.torch_dtype).tiny  # and the smallest
    rec = encode(spec, x, fmt)  # type: ignore[arg-type]
    # in slots 7, 8, 2, 3, 4, 9 of an arena (runs broken, and bytes after the record)
    arena = torch.zeros((10, rec.shape[1] + 5), dtype=torch.uint8)
    slots = [7, 8, 2, 3, 4, 9]
    arena[slots, : rec.shape[1]] = rec
    check_records(spec, arena, fmt, slots, list(range(6)))  # type: ignore[arg-type]


# Each case: the record's byte to change, the code written there, what the error names.
# A data byte's place: ((((layer * 2 + kv) * 8 + token) * 2 + head) * 16 + dim).
_DATA_AT = (((2 * 2 + 1) * 8 + 3) * 2 + 1) * 16 + 4  # layer 2, V, token 3, head 1, dim 4


@pytest.mark.parametrize(
    ("fmt", "code", "names"),
    [
        ("fp8_e4m3", 0x7F, "holds code 0x7f (an fp8 NaN)"),
        ("fp8_e4m3", 0xFF, "holds code 0xff (an fp8 NaN)"),
        ("int8", 0x80, "holds code 0x80 (int8 -128"),
    ],
)
def test_a_record_with_a_code_encode_never_writes_is_refused_naming_its_head(
    fmt: str, code: int, names: str
) -> None:
    # An fp8 NaN code was committed with only the scales checked: the element decoded as NaN
    # for every reader of the block.
    rec = encode(SPEC, blocks(SPEC), fmt).clone()  # type: ignore[arg-type]
    rec[4, _DATA_AT] = code
    check_records(SPEC, rec, fmt, [0, 1, 2, 3], [10, 11, 12, 13])  # type: ignore[arg-type]
    with pytest.raises(FormatError, match=rf"block 14, layer 2, V, head 1 {re.escape(names)}"):
        check_records(SPEC, rec, fmt, [0, 1, 2, 3, 4], [10, 11, 12, 13, 14])  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", QUANT)
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0, 1e37])
def test_a_record_with_a_scale_encode_never_writes_is_refused_naming_its_head(
    fmt: str, scale: float
) -> None:
    # 1e37: finite, but over bf16's largest value / QMAX: the head decoded as inf (and fp8's
    # zero codes as NaN).
    rec = encode(SPEC, blocks(SPEC), fmt).clone()  # type: ignore[arg-type]
    n_data = 3 * 2 * 8 * 2 * 16
    rec[2, n_data + 4 * 7 : n_data + 4 * 8] = torch.tensor([scale]).view(torch.uint8)
    with pytest.raises(FormatError, match=r"block 2, layer 1, V, head 1 has scale"):
        check_records(SPEC, rec, fmt, [0, 1, 2], [0, 1, 2])  # type: ignore[arg-type]
    if scale != -1.0:  # that one decodes the head negated
        assert not torch.isfinite(decode(SPEC, rec, fmt).float()).all()  # type: ignore[arg-type]


def test_sizes_and_blocks_per_gib() -> None:
    # bf16: 2 bytes per element -> 1, plus 4 bytes per (layer, K/V, head)
    assert stored_nbytes(SPEC, "exact") == SPEC.block_nbytes == 3 * 2 * 8 * 2 * 16 * 2
    assert stored_nbytes(SPEC, "int8") == 3 * 2 * 8 * 2 * 16 + 4 * 3 * 2 * 2
    assert stored_nbytes(SPEC, "fp8_e4m3") == stored_nbytes(SPEC, "int8")
    ratio = blocks_per_gib(SPEC, "int8") / blocks_per_gib(SPEC, "exact")
    assert 1.9 < ratio < 2.0


@pytest.mark.parametrize("fmt", ("exact", *QUANT))
def test_decode_into_an_engine_buffer_writes_what_it_returns(fmt: str) -> None:
    x = blocks(SPEC)
    rec = encode(SPEC, x, fmt)  # type: ignore[arg-type]
    engine = torch.full_like(x, 7.0)

    got = decode(SPEC, rec, fmt, out=engine)  # type: ignore[arg-type]

    assert got.data_ptr() == engine.data_ptr()
    assert engine.view(torch.uint8).equal(decode(SPEC, rec, fmt).view(torch.uint8))  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("fmt", QUANT)
def test_records_read_into_their_blocks_tails_decode_in_place_as_from_rows_of_their_own(
    dtype: str, fmt: str
) -> None:
    """A load into an engine's blocks reads each quantized record into the tail of the block
    it decodes to (``record_rows``) and decodes it there: the same bits as from separate
    rows, over several chunks of the dequantization, NaN codes (the table's path) included."""
    spec = KVSpec(3, 2, 16, dtype=dtype, block_size=8)
    ns = Namespace("m", spec, store_dtype=fmt)
    n = 2 * rq._step(torch.empty((1, *spec.block_shape))) + 3
    rec = encode(spec, blocks(spec, n), fmt)  # type: ignore[arg-type]
    if fmt == "fp8_e4m3":
        rec[n - 2, 5] = 0x7F  # a NaN code: that chunk decodes through the table
    engine = torch.full((n, *spec.block_shape), 7.0, dtype=spec.torch_dtype)
    tails = record_rows(ns, engine)
    assert tails is not None and tails.shape == rec.shape
    assert tails.data_ptr() + rec.shape[1] == engine.data_ptr() + spec.block_nbytes
    tails.copy_(rec)

    decode(spec, tails, fmt, out=engine)  # type: ignore[arg-type]

    want = decode(spec, rec, fmt)  # type: ignore[arg-type]
    assert engine.view(torch.uint8).equal(want.view(torch.uint8))
    assert torch.isnan(want[n - 2]).any() == (fmt == "fp8_e4m3")


def test_a_record_larger_than_its_block_is_staged_in_rows_of_its_own() -> None:
    tiny = KVSpec(2, 2, 1, dtype="bfloat16", block_size=1)  # 2 bytes a head, 4 of scale
    ns = Namespace("m", tiny, store_dtype="int8")
    assert stored_nbytes(tiny, "int8") > tiny.block_nbytes
    assert record_rows(ns, torch.zeros((3, *tiny.block_shape), dtype=torch.bfloat16)) is None


def test_decode_refuses_an_engine_buffer_of_another_shape_or_dtype() -> None:
    rec = encode(SPEC, blocks(SPEC), "int8")
    with pytest.raises(FormatError, match=r"out must be bfloat16 \[5, 3, 2, 8, 2, 16\], got"):
        decode(SPEC, rec, "int8", out=torch.empty((4, *SPEC.block_shape), dtype=torch.bfloat16))
    with pytest.raises(FormatError, match=r"got torch.float32 \[5, 3, 2, 8, 2, 16\]"):
        decode(SPEC, rec, "int8", out=torch.empty((5, *SPEC.block_shape)))


@pytest.mark.parametrize("fmt", ("exact", *QUANT))
def test_encode_refuses_blocks_of_another_shape_or_dtype(fmt: str) -> None:
    # int8 and e4m3 broadcast one head into two (or a head_dim of 1 into 16) without it.
    x = blocks(SPEC)
    for bad in (x[:, :, :, :, :1], x[..., :1], x.float(), x.reshape(5, -1)):
        with pytest.raises(
            FormatError, match=r"blocks to encode must be bfloat16 \[5, 3, 2, 8, 2, 16\]"
        ):
            encode(SPEC, bad, fmt)  # type: ignore[arg-type]


def test_decode_refuses_records_of_another_size() -> None:
    rec = encode(SPEC, blocks(SPEC), "int8")
    with pytest.raises(
        FormatError, match=r"must be uint8 \[n, 1584\], got torch.uint8 \[5, 1583\]"
    ):
        decode(SPEC, rec[:, :-1], "int8")


def test_format_is_part_of_block_identity() -> None:
    tokens = np.arange(40)
    exact = Namespace("m", SPEC)
    # the exact id is the one keys had before formats existed (computed on main, 3798209)
    assert Namespace("m", KVSpec(2, 2, 8)).hex == "51bf81a2bbdb293fbc68620c8d977639"
    keys = {fmt: Namespace("m", SPEC, store_dtype=fmt).block_keys(tokens) for fmt in QUANT}
    assert exact.block_keys(tokens) == Namespace("m", SPEC, store_dtype="exact").block_keys(tokens)
    for fmt in QUANT:
        assert not set(keys[fmt]) & set(exact.block_keys(tokens))
    assert not set(keys["int8"]) & set(keys["fp8_e4m3"])


def test_namespace_refuses_unknown_or_unquantizable_formats() -> None:
    with pytest.raises(FormatError, match=r"^Namespace.store_dtype: 'int4' is not one of exact"):
        Namespace("m", SPEC, store_dtype="int4")
    narrow = KVSpec(3, 2, 16, dtype="float8_e4m3fn")
    with pytest.raises(FormatError, match="store_dtype 'int8': quantized storage needs"):
        Namespace("m", narrow, store_dtype="int8")
    Namespace("m", narrow)  # exact storage of a narrow cache is fine


@pytest.mark.parametrize("fmt", QUANT)
def test_manager_round_trip_through_disk_and_never_across_formats(tmp_path: Path, fmt: str) -> None:
    """Save quantized through a real TierManager, evict the host copy, load from the zarr
    disk tier: within the bound, stored at the record size, and invisible to the exact
    namespace of the same model and tokens (and the exact one stays byte-identical)."""
    tokens = np.arange(SPEC.block_size * 4)
    x = blocks(SPEC, n=4, seed=1)
    qns = Namespace("m", SPEC, store_dtype=fmt)
    ens = Namespace("m", SPEC)

    async def main() -> None:
        disk = await DiskTier.open(f"file://{tmp_path}/d", 1 << 20)
        m = TierManager(host_bytes=1 << 20, disk=disk, slot_bytes=SPEC.block_nbytes)
        try:
            await m.save(qns, tokens, x)
            assert (await m.lookup(ens, tokens)).blocks == 0
            assert (await m.load(ens, tokens)).blocks == 0
        finally:
            await m.close()  # flushes to disk
        disk = await DiskTier.open(f"file://{tmp_path}/d", 1 << 20)
        m = TierManager(host_bytes=1 << 20, disk=disk, slot_bytes=SPEC.block_nbytes)
        try:
            assert (await m.lookup(ens, tokens)).blocks == 0
            got = await m.load(qns, tokens)
            assert got.tiers == ["disk"] * 4
            assert got.data.shape[1] == stored_nbytes(SPEC, fmt) < SPEC.block_nbytes  # type: ignore[arg-type]
            assert got.data.equal(encode(SPEC, x, fmt))  # type: ignore[arg-type]
            back = got.kv()
            q = rq.quantize(x, REF[fmt])  # type: ignore[arg-type]
            bound = rq.error_bound(q, SPEC.torch_dtype)
            assert bool(((back.float() - x.float()).abs() <= bound).all())
            # the exact namespace stores and returns the engine's bytes
            await m.save(ens, tokens, x)
            exact = await m.load(ens, tokens)
            assert exact.kv().view(torch.uint8).equal(x.view(torch.uint8))
        finally:
            await m.close()
        attrs = zarr.open_array(str(tmp_path / "d"), path=f"ns/{qns.hex}", mode="r").attrs
        assert attrs["tiercache"]["format"] == zarr_attrs(SPEC, fmt)  # type: ignore[arg-type]

    asyncio.run(main())


@pytest.mark.parametrize("fmt", QUANT)
def test_zarr_attrs_let_a_plain_reader_dequantize(tmp_path: Path, fmt: str) -> None:
    """Write records into a zarr v3 array with ``zarr_attrs``, reopen it with zarr alone and
    rebuild the blocks from the attributes only (numpy for int8, a byte table for e4m3)."""
    x = blocks(SPEC)
    rec = encode(SPEC, x, fmt)  # type: ignore[arg-type]
    attrs = zarr_attrs(SPEC, fmt)  # type: ignore[arg-type]
    za = zarr.create_array(
        store=str(tmp_path / "z"),
        shape=tuple(rec.shape),
        chunks=(1, rec.shape[1]),
        dtype="uint8",
        attributes={"tiercache": {"format": attrs}},
        zarr_format=3,
    )
    za[:] = rec.numpy()
    got = zarr.open_array(str(tmp_path / "z"), mode="r")
    a = got.attrs["tiercache"]["format"]
    assert a["store_dtype"] == fmt and a["block_nbytes"] == rec.shape[1]
    raw = np.asarray(got[:])
    d, s = a["data"], a["scales"]
    n_data = int(np.prod(d["shape"]))
    body = raw[:, d["offset"] : d["offset"] + n_data]
    if d["dtype"] == "int8":
        vals = body.view(np.int8).astype(np.float32)
    else:
        assert d["dtype"] == "float8_e4m3fn"
        table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
        vals = table[body]
    vals = vals.reshape(-1, *d["shape"])
    assert s["dtype"] == "float32" and s["endian"] == "little"
    n_sc = int(np.prod(s["shape"]))
    scales = (
        raw[:, s["offset"] : s["offset"] + 4 * n_sc].copy().view("<f4").reshape(-1, *s["shape"])
    )
    rebuilt = torch.from_numpy(vals * scales[:, :, :, None, :, None]).to(SPEC.torch_dtype)
    assert rebuilt.equal(decode(SPEC, rec, fmt))  # type: ignore[arg-type]


def test_disk_tier_records_the_format_in_the_zarr_attributes(tmp_path: Path) -> None:
    async def main() -> None:
        disk = await DiskTier.open(f"file://{tmp_path}/d", 1 << 20)
        try:
            path = await disk.register(Namespace("m", SPEC))
        finally:
            await disk.close()
        got = zarr.open_array(str(tmp_path / "d"), path=path, mode="r")
        fmt = got.attrs["tiercache"]["format"]
        assert fmt == zarr_attrs(SPEC, "exact")
        assert fmt["store_dtype"] == "exact" and fmt["block_nbytes"] == got.shape[1]
        assert fmt["data"] == {"dtype": "bfloat16", "shape": list(SPEC.block_shape), "offset": 0}

    asyncio.run(main())
