"""Block bytes to and from a zarr store: shard slabs on a local disk, one chunk per block
elsewhere; both keep a zarr array that zarr itself reads, and both verify every read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore, MemoryStore

from tiercache.tiers.blockio import BlockIO, ChunkIO, SlabIO, block_io_for, checksum, shard_index

NBYTES = 64
SLOTS = 8


def block(i: int) -> torch.Tensor:
    return torch.full((NBYTES,), i + 1, dtype=torch.uint8)


async def opened(store: Any, io: BlockIO, path: str = "ns/a") -> Any:
    za = await zarr.api.asynchronous.create_array(
        store=store,
        name=path,
        shape=(SLOTS, NBYTES),
        dtype="uint8",
        **io.array_kwargs(NBYTES),
        compressors=None,
        filters=None,
        fill_value=0,
    )
    io.attach(path, za.metadata, NBYTES)
    return za


def read_at(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(NBYTES)


def stores(tmp_path: Path) -> list[tuple[Any, BlockIO]]:
    local = LocalStore(str(tmp_path / "local"))
    memory = MemoryStore()
    return [(local, block_io_for(local, shard_blocks=4)), (memory, block_io_for(memory))]


def test_block_io_for_picks_slabs_for_a_local_store_and_chunks_for_any_other(
    tmp_path: Path,
) -> None:
    assert isinstance(block_io_for(LocalStore(str(tmp_path))), SlabIO)
    assert isinstance(block_io_for(MemoryStore()), ChunkIO)


def test_checksum_is_the_same_for_a_tensor_an_array_and_bytes_and_differs_on_one_bit() -> None:
    t = block(3)
    assert checksum(t) == checksum(t.numpy()) == checksum(t.numpy().tobytes())
    assert len(checksum(t)) == 16
    flipped = t.clone()
    flipped[5] ^= 1
    assert checksum(flipped) != checksum(t)


def test_the_shard_index_lists_chunk_i_at_i_times_nbytes_and_ends_in_its_crc() -> None:
    index = shard_index(4, NBYTES)
    assert len(index) == 4 * 16 + 4
    pairs = np.frombuffer(index[:-4], dtype="<u8").reshape(4, 2)
    assert pairs.tolist() == [[i * NBYTES, NBYTES] for i in range(4)]


async def test_written_blocks_read_back_byte_exact_and_zarr_reads_them_too(tmp_path: Path) -> None:
    for store, io in stores(tmp_path):
        za = await opened(store, io)
        sums = await io.write("ns/a", [(s, block(s)) for s in (0, 3, 5)])
        assert sums == [checksum(block(s)) for s in (0, 3, 5)]
        outs = [torch.zeros(NBYTES, dtype=torch.uint8) for _ in range(3)]
        ok = await io.read(
            "ns/a", [(s, NBYTES, c, o) for s, c, o in zip((0, 3, 5), sums, outs, strict=True)]
        )
        assert ok == [True, True, True]
        for s, o in zip((0, 3, 5), outs, strict=True):
            assert torch.equal(o, block(s))
        assert set(await io.present("ns/a")) >= {0, 3, 5}
        data = await za.getitem((slice(0, SLOTS), slice(None)))
        assert (data[3] == 4).all() and (data[5] == 6).all()
        io.close()


async def test_a_read_whose_checksum_does_not_match_is_false(
    tmp_path: Path,
) -> None:
    for store, io in stores(tmp_path):
        await opened(store, io)
        [csum] = await io.write("ns/a", [(1, block(1))])
        assert isinstance(csum, bytes)
        out = torch.zeros(NBYTES, dtype=torch.uint8)
        assert await io.read("ns/a", [(1, NBYTES, checksum(block(2)), out)]) == [False]
        io.close()


async def test_a_slot_never_written_is_not_served(tmp_path: Path) -> None:
    for store, io in stores(tmp_path):
        await opened(store, io)
        out = torch.zeros(NBYTES, dtype=torch.uint8)
        assert await io.read("ns/a", [(6, NBYTES, checksum(block(6)), out)]) == [False]
        io.close()


async def test_many_blocks_split_over_the_threads_all_arrive(tmp_path: Path) -> None:
    io = SlabIO(tmp_path, shard_blocks=4, threads=3)
    await opened(LocalStore(str(tmp_path)), io)
    sums = await io.write("ns/a", [(s, block(s)) for s in range(SLOTS)])
    outs = [torch.zeros(NBYTES, dtype=torch.uint8) for _ in range(SLOTS)]
    ok = await io.read(
        "ns/a",
        [(s, NBYTES, sums[s], outs[s]) for s in range(SLOTS)],  # type: ignore[misc]
    )
    assert ok == [True] * SLOTS
    assert all(torch.equal(outs[s], block(s)) for s in range(SLOTS))
    assert sorted(await io.present("ns/a")) == list(range(SLOTS))
    io.close()


async def test_the_slab_location_is_the_shard_file_and_offset_of_a_slot(tmp_path: Path) -> None:
    io = SlabIO(tmp_path, shard_blocks=4)
    await opened(LocalStore(str(tmp_path)), io)
    await io.write("ns/a", [(6, block(6))])
    path, offset = io.location("ns/a", 6)
    assert offset == 2 * NBYTES
    assert read_at(path, offset) == block(6).numpy().tobytes()
    io.close()


async def test_slabs_refuse_an_array_that_is_not_sharded(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    za = await zarr.api.asynchronous.create_array(
        store=store, name="ns/a", shape=(SLOTS, NBYTES), dtype="uint8", chunks=(1, NBYTES)
    )
    with pytest.raises(ValueError, match="not a plain sharded uint8 array"):
        SlabIO(tmp_path).attach("ns/a", za.metadata, NBYTES)
