"""Disk-layout study for tiercache's zarr v3 disk tier.

What it measures, side by side in one run (candidates interleaved within every
repetition, in a rotating order; medians of per-repetition ratios reported), for
KV blocks of 64 KiB, 256 KiB, 1 MiB and 4 MiB stored as raw ``uint8`` bytes
(zarr has no bfloat16 dtype; the logical dtype goes in the array attributes):

* baselines: ``file_seq`` -- one plain file, each block written in order with
  ``os.write`` and closed without ``fsync``, read back in order with ``readv``
  straight into the destination slot (every ratio is against this);
  ``file_per_block`` -- one plain file per block (``open``/``write``/``close``),
  the cost of a chunk-per-file layout without zarr;
* ``zarr_array`` -- the naive path: ``AsyncArray.setitem``/``getitem``, one chunk
  per block, a batch of blocks gathered concurrently;
* ``zarr_store``, ``zarr_store_xxh`` -- a zarr v3 array ``(n_slots,
  block_bytes)``, chunks ``(1, block_bytes)``, only the ``bytes`` codec (a
  chunk's stored bytes *are* the block), chunks written and read through the
  store API (``LocalStore.set``/``get``) with ``asyncio.gather``; ``_xxh`` adds
  tiercache's xxh3-128 checksum on write and its verification on every read;
* ``zarr_sharded`` -- the same with a ``ShardingCodec``, whole-shard ``setitem``
  writes, per-block reads;
* ``chunkfile``, ``chunkfile_xxh``, ``chunkfile_xxh_flat`` -- the same zarr chunk
  files (same keys, same bytes) written in place and read with OS calls, a batch
  split over two ``asyncio.to_thread`` calls, reads landing in the destination
  slot; without / with the checksum; ``_flat`` uses the ``c.<slot>.0`` key
  encoding (one directory instead of one per slot);
* ``shardslab_xxh`` -- a zarr *sharded* array used as a slab allocator: shard
  files preallocated once (untimed, like tier start-up) with zarr's own shard
  index, blocks ``pwrite``/``pread`` at their fixed offsets + the checksum.

Phases: *steady* (every slot already exists and is rewritten -- the regime of a
full, fixed-capacity cache), *hot read* (from the page cache right after the
write: software overhead, not the device), *cold read* (after ``sync`` and
``drop_caches``, when the process may write ``/proc/sys/vm/drop_caches``), and
*fresh* (an empty layout: every chunk file is created by the write). Every
layout that claims to be a zarr array is read back with zarr's normal array API
and compared byte for byte.

Then checksum cost (xxh3-64/128 throughput per block size) and codecs on real
bfloat16 KV (a tiny seeded random-weight ``LlamaForCausalLM``, page-first
blocks): compression ratio and single-thread encode/decode throughput for no
codec, zstd (levels 1 and 3) and blosc (lz4, zstd; byte and bit shuffle,
``typesize=2``).

Why: the disk tier must reach >= 70% of plain sequential file throughput at
>= 1 MiB blocks; the layout (chunk per file vs shards, zarr store API vs OS
calls) and the default codec are chosen from these numbers
(``docs/disk-layout.md``).

Run: ``python scripts/disk_layout_study.py --out DIR [--workdir SCRATCH]``
(``--quick``: a few-second smoke run). Writes ``DIR/disk_layout.json`` and
``DIR/disk_layout.png``. The scratch directory decides the filesystem measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash
import zarr
import zarr.api.asynchronous as zasync
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import Buffer as CpuBuffer
from zarr.storage import LocalStore

U8 = npt.NDArray[np.uint8]

KIB = 1024
MIB = 1024 * KIB
BASELINE = "file_seq"
ARRAY_NAME = "kv"
TARGET_RATIO = 0.70

#: Attributes every tiercache disk array carries (zarr has no bfloat16 dtype).
ARRAY_ATTRIBUTES: dict[str, Any] = {
    "tiercache": {"logical_dtype": "bfloat16", "layout": "page-first", "format": 1}
}


# --------------------------------------------------------------------------
# workload and small I/O helpers


@dataclass
class Workload:
    """One layout directory, the blocks to write (source arena) and where reads land."""

    root: Path
    src: U8  # (n_blocks, block_bytes), what is written
    dst: U8  # (n_blocks, block_bytes), where reads land (a host-tier slot each)
    batch: int
    shard_blocks: int

    @property
    def n_blocks(self) -> int:
        return int(self.src.shape[0])

    @property
    def block_bytes(self) -> int:
        return int(self.src.shape[1])


def _batches(n: int, size: int) -> Iterator[range]:
    for lo in range(0, n, size):
        yield range(lo, min(n, lo + size))


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]


def _read_into(fd: int, buf: memoryview) -> None:
    while len(buf):
        n = os.readv(fd, [buf])
        if n == 0:
            raise EOFError("short read")
        buf = buf[n:]


#: No O_TRUNC: blocks have a fixed size, so rewriting a slot overwrites it in place
#: (no new inode, no block allocation); a fresh file is simply created.
_WFLAGS = os.O_WRONLY | os.O_CREAT


def _digest(block: U8) -> int:
    return xxhash.xxh3_128_intdigest(block.data)


class ChecksumError(RuntimeError):
    """A block read back does not match the checksum taken when it was written."""


# --------------------------------------------------------------------------
# candidates


class Candidate(ABC):
    """One storage layout / access path; one instance per layout directory."""

    name: str = ""
    label: str = ""
    #: whether the files on disk form a zarr array readable with zarr's own API
    zarr_layout: bool = False
    #: slow and far from the target: measured in fewer repetitions (see SLOW_REPS)
    slow: bool = False

    async def prepare(self, w: Workload) -> None:
        """Untimed setup (array metadata, directories)."""
        w.root.mkdir(parents=True, exist_ok=True)

    async def prefill(self, w: Workload) -> None:
        """Untimed: make every slot exist (steady state). Same files as ``write``."""
        await self.write(w)

    def close(self) -> None:  # noqa: B027 -- optional hook, most candidates hold nothing
        """Release what ``prepare`` opened (file descriptors)."""

    @abstractmethod
    async def write(self, w: Workload) -> None: ...

    @abstractmethod
    async def read(self, w: Workload) -> None: ...


class FileSeq(Candidate):
    name = BASELINE
    label = "plain file, sequential"

    async def write(self, w: Workload) -> None:
        fd = os.open(w.root / "blocks.bin", _WFLAGS, 0o644)
        try:
            for i in range(w.n_blocks):
                _write_all(fd, w.src[i].data)
        finally:
            os.close(fd)

    async def read(self, w: Workload) -> None:
        fd = os.open(w.root / "blocks.bin", os.O_RDONLY)
        try:
            for i in range(w.n_blocks):
                _read_into(fd, w.dst[i].data)
        finally:
            os.close(fd)


class FilePerBlock(Candidate):
    name = "file_per_block"
    label = "plain file per block"

    def _path(self, w: Workload, i: int) -> str:
        return str(w.root / "blocks" / str(i))

    async def prepare(self, w: Workload) -> None:
        (w.root / "blocks").mkdir(parents=True, exist_ok=True)

    async def write(self, w: Workload) -> None:
        for i in range(w.n_blocks):
            fd = os.open(self._path(w, i), _WFLAGS, 0o644)
            try:
                _write_all(fd, w.src[i].data)
            finally:
                os.close(fd)

    async def read(self, w: Workload) -> None:
        for i in range(w.n_blocks):
            fd = os.open(self._path(w, i), os.O_RDONLY)
            try:
                _read_into(fd, w.dst[i].data)
            finally:
                os.close(fd)


async def _create_block_array(
    w: Workload, *, sharded: bool = False, flat_keys: bool = False
) -> zarr.AsyncArray[Any]:
    """The disk tier's array: (n_slots, block_bytes) uint8, one chunk per block, no codecs
    but ``bytes`` (or the same inside a ShardingCodec), logical dtype in the attributes."""
    attrs = dict(ARRAY_ATTRIBUTES)
    attrs["tiercache"] = {**ARRAY_ATTRIBUTES["tiercache"], "block_bytes": w.block_bytes}
    arr: zarr.AsyncArray[Any] = await zasync.create_array(
        store=LocalStore(w.root),
        name=ARRAY_NAME,
        shape=(w.n_blocks, w.block_bytes),
        dtype="uint8",
        chunks=(1, w.block_bytes),
        shards=(w.shard_blocks, w.block_bytes) if sharded else None,
        filters=None,
        compressors=None,
        fill_value=0,
        attributes=attrs,
        chunk_key_encoding={"name": "default", "separator": "." if flat_keys else "/"},
    )
    return arr


def _chunk_keys(arr: zarr.AsyncArray[Any], n: int) -> list[str]:
    """Store keys of the chunks of blocks 0..n-1, e.g. ``kv/c/7/0`` (or ``kv/c.7.0``)."""
    enc = arr.metadata.encode_chunk_key
    return [f"{ARRAY_NAME}/{enc((i, 0))}" for i in range(n)]


def _write_chunk_files(
    paths: Sequence[str], src: U8, idx: range, digests: list[int], checksum: bool = True
) -> None:
    """Hash and write blocks ``idx`` to their chunk files, in place (no new inode once the
    slot exists); creates the file (and its directory) on first use."""
    for i in idx:
        if checksum:
            digests[i] = _digest(src[i])
        try:
            fd = os.open(paths[i], _WFLAGS, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(paths[i]), exist_ok=True)
            fd = os.open(paths[i], _WFLAGS, 0o644)
        try:
            _write_all(fd, src[i].data)
        finally:
            os.close(fd)


def _read_chunk_files(
    paths: Sequence[str], dst: U8, idx: range, digests: list[int], checksum: bool = True
) -> None:
    """Read blocks ``idx`` straight into their destination slots, verifying each checksum."""
    for i in idx:
        fd = os.open(paths[i], os.O_RDONLY)
        try:
            _read_into(fd, dst[i].data)
        finally:
            os.close(fd)
        if checksum and _digest(dst[i]) != digests[i]:
            raise ChecksumError(paths[i])


class _ChunkArrayBase(Candidate):
    """Shared setup of the one-chunk-per-block array; prefill writes the chunk files directly."""

    zarr_layout = True
    flat_keys = False

    def __init__(self) -> None:
        self.arr: zarr.AsyncArray[Any] | None = None
        self.keys: list[str] = []
        self.paths: list[str] = []
        self.digests: list[int] = []

    async def prepare(self, w: Workload) -> None:
        self.arr = await _create_block_array(w, flat_keys=self.flat_keys)
        self.keys = _chunk_keys(self.arr, w.n_blocks)
        self.paths = [str(w.root / k) for k in self.keys]
        self.digests = [0] * w.n_blocks

    async def prefill(self, w: Workload) -> None:
        await asyncio.to_thread(
            _write_chunk_files, self.paths, w.src, range(w.n_blocks), self.digests
        )


class ZarrArray(_ChunkArrayBase):
    name = "zarr_array"
    label = "zarr AsyncArray set/getitem"
    slow = True

    async def write(self, w: Workload) -> None:
        arr = self.arr
        assert arr is not None
        for b in _batches(w.n_blocks, w.batch):
            await asyncio.gather(*(arr.setitem((i, slice(None)), w.src[i]) for i in b))

    async def read(self, w: Workload) -> None:
        arr = self.arr
        assert arr is not None
        for b in _batches(w.n_blocks, w.batch):
            got = await asyncio.gather(*(arr.getitem((i, slice(None))) for i in b))
            for i, a in zip(b, got, strict=True):
                w.dst[i] = np.asarray(a)


class ZarrStore(_ChunkArrayBase):
    """Chunk bytes through ``LocalStore.set``/``get``; optionally with xxh3-128."""

    def __init__(self, checksum: bool) -> None:
        super().__init__()
        self.checksum = checksum
        self.name = "zarr_store_xxh" if checksum else "zarr_store"
        self.label = "zarr store set/get + xxh3" if checksum else "zarr store set/get"
        self.store: LocalStore | None = None

    async def prepare(self, w: Workload) -> None:
        await super().prepare(w)
        self.store = LocalStore(w.root)

    async def write(self, w: Workload) -> None:
        store = self.store
        assert store is not None
        for b in _batches(w.n_blocks, w.batch):
            if self.checksum:
                for i in b:
                    self.digests[i] = _digest(w.src[i])
            await asyncio.gather(
                *(store.set(self.keys[i], CpuBuffer.from_array_like(w.src[i])) for i in b)
            )

    async def read(self, w: Workload) -> None:
        store = self.store
        assert store is not None
        proto = default_buffer_prototype()
        for b in _batches(w.n_blocks, w.batch):
            got = await asyncio.gather(*(store.get(self.keys[i], prototype=proto) for i in b))
            for i, buf in zip(b, got, strict=True):
                if buf is None:
                    raise KeyError(self.keys[i])
                a = buf.as_numpy_array()
                if self.checksum and _digest(a) != self.digests[i]:
                    raise ChecksumError(self.keys[i])
                w.dst[i] = a


class ZarrSharded(Candidate):
    name = "zarr_sharded"
    label = "zarr sharded (whole-shard writes)"
    zarr_layout = True
    slow = True

    def __init__(self) -> None:
        self.arr: zarr.AsyncArray[Any] | None = None

    async def prepare(self, w: Workload) -> None:
        self.arr = await _create_block_array(w, sharded=True)

    async def write(self, w: Workload) -> None:
        arr = self.arr
        assert arr is not None
        s = w.shard_blocks
        per_batch = max(1, w.batch // s) * s
        for b in _batches(w.n_blocks, per_batch):
            await asyncio.gather(
                *(
                    arr.setitem((slice(lo, lo + s), slice(None)), w.src[lo : lo + s])
                    for lo in range(b.start, b.stop, s)
                )
            )

    async def read(self, w: Workload) -> None:
        arr = self.arr
        assert arr is not None
        for b in _batches(w.n_blocks, w.batch):
            got = await asyncio.gather(*(arr.getitem((i, slice(None))) for i in b))
            for i, a in zip(b, got, strict=True):
                w.dst[i] = np.asarray(a)


class ChunkFiles(_ChunkArrayBase):
    """The same zarr chunk files, written and read with OS calls: each batch is split
    into ``threads`` slices, one ``asyncio.to_thread`` call per slice; in-place rewrite,
    reads land straight in the destination slot; xxh3-128 on write, verified on read."""

    def __init__(self, threads: int = 2, checksum: bool = True, flat_keys: bool = False) -> None:
        super().__init__()
        self.threads = threads
        self.checksum = checksum
        self.flat_keys = flat_keys
        self.name = "chunkfile" + ("_xxh" if checksum else "") + ("_flat" if flat_keys else "")
        if threads != 2:
            self.name += f"_t{threads}"
        self.label = (
            f"zarr chunk files via os calls, {threads} threads/batch"
            + (" + xxh3" if checksum else "")
            + (", flat keys c.<slot>.0" if flat_keys else "")
        )

    async def prefill(self, w: Workload) -> None:
        await self.write(w)

    def _slices(self, b: range) -> list[range]:
        step = max(1, -(-len(b) // self.threads))
        return [range(lo, min(b.stop, lo + step)) for lo in range(b.start, b.stop, step)]

    async def write(self, w: Workload) -> None:
        for b in _batches(w.n_blocks, w.batch):
            await asyncio.gather(
                *(
                    asyncio.to_thread(
                        _write_chunk_files, self.paths, w.src, part, self.digests, self.checksum
                    )
                    for part in self._slices(b)
                )
            )

    async def read(self, w: Workload) -> None:
        for b in _batches(w.n_blocks, w.batch):
            await asyncio.gather(
                *(
                    asyncio.to_thread(
                        _read_chunk_files, self.paths, w.dst, part, self.digests, self.checksum
                    )
                    for part in self._slices(b)
                )
            )


def _pwrite_blocks(
    fds: Sequence[int],
    offsets: Sequence[int],
    per_shard: int,
    src: U8,
    idx: range,
    digests: list[int],
) -> None:
    for i in idx:
        digests[i] = _digest(src[i])
        fd, off = fds[i // per_shard], offsets[i % per_shard]
        data = src[i].data
        while len(data):
            n = os.pwrite(fd, data, off)
            data, off = data[n:], off + n


def _pread_blocks(
    fds: Sequence[int],
    offsets: Sequence[int],
    per_shard: int,
    dst: U8,
    idx: range,
    digests: list[int],
) -> None:
    for i in idx:
        fd, off = fds[i // per_shard], offsets[i % per_shard]
        buf = dst[i].data
        while len(buf):
            n = os.preadv(fd, [buf], off)
            if n == 0:
                raise EOFError("short read")
            buf, off = buf[n:], off + n
        if _digest(dst[i]) != digests[i]:
            raise ChecksumError(f"block {i}")


class ShardSlab(Candidate):
    """A zarr *sharded* array used as a slab allocator: every shard file is created up
    front (data region ``posix_fallocate``-d, zarr's own shard index, which lists each
    chunk at a fixed offset, at the end), stays open, and blocks are ``pwrite``/``pread``
    at their fixed offsets with OS calls (batch slices in ``asyncio.to_thread``) + xxh3.
    No file is created, renamed or opened on the block path, and the shard index never
    changes, so the files stay a valid zarr array."""

    name = "shardslab_xxh"
    label = "zarr shards as preallocated slabs, pwrite/pread + xxh3"
    zarr_layout = True

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads
        self.fds: list[int] = []
        self.offsets: list[int] = []
        self.digests: list[int] = []
        self.per_shard = 1

    async def prepare(self, w: Workload) -> None:
        s, bb = w.shard_blocks, w.block_bytes
        arr = await _create_block_array(w, sharded=True)
        # learn zarr's index for a full shard from a throwaway one-shard array
        probe_root = w.root / "_probe"
        probe_w = Workload(probe_root, w.src[:s], w.dst[:s], w.batch, s)
        probe = await _create_block_array(probe_w, sharded=True)
        await probe.setitem(slice(None), w.src[:s])
        raw = (probe_root / ARRAY_NAME / probe.metadata.encode_chunk_key((0, 0))).read_bytes()
        shutil.rmtree(probe_root)
        tail = raw[s * bb :]
        index = np.frombuffer(tail[: 16 * s], dtype="<u8").reshape(s, 2)
        if not (index[:, 1] == bb).all():
            raise AssertionError(f"unexpected shard index {index!r}")
        self.offsets = [int(o) for o in index[:, 0]]
        self.per_shard = s
        self.digests = [0] * w.n_blocks
        for k in range(w.n_blocks // s):
            path = w.root / ARRAY_NAME / arr.metadata.encode_chunk_key((k, 0))
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            self.fds.append(fd)
            os.posix_fallocate(fd, 0, s * bb)
            os.pwrite(fd, tail, s * bb)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def _slices(self, b: range) -> list[range]:
        step = max(1, -(-len(b) // self.threads))
        return [range(lo, min(b.stop, lo + step)) for lo in range(b.start, b.stop, step)]

    async def write(self, w: Workload) -> None:
        for b in _batches(w.n_blocks, w.batch):
            await asyncio.gather(
                *(
                    asyncio.to_thread(
                        _pwrite_blocks,
                        self.fds,
                        self.offsets,
                        self.per_shard,
                        w.src,
                        part,
                        self.digests,
                    )
                    for part in self._slices(b)
                )
            )

    async def read(self, w: Workload) -> None:
        for b in _batches(w.n_blocks, w.batch):
            await asyncio.gather(
                *(
                    asyncio.to_thread(
                        _pread_blocks,
                        self.fds,
                        self.offsets,
                        self.per_shard,
                        w.dst,
                        part,
                        self.digests,
                    )
                    for part in self._slices(b)
                )
            )


CandidateFactory = Callable[[], Candidate]

CANDIDATES: list[CandidateFactory] = [
    FileSeq,
    FilePerBlock,
    ZarrArray,
    lambda: ZarrStore(checksum=False),
    lambda: ZarrStore(checksum=True),
    ZarrSharded,
    lambda: ChunkFiles(checksum=False),
    lambda: ChunkFiles(),
    lambda: ChunkFiles(flat_keys=True),
    ShardSlab,
]

#: Repetitions given to ``slow`` candidates (they sit at a few % of the baseline, so
#: more repetitions would only cost time); they run in the first repetitions, paired
#: with the baseline of the same repetition.
SLOW_REPS = 3


# --------------------------------------------------------------------------
# page cache control


def drop_caches() -> str | None:
    """Sync and drop the page cache. Returns None on success, else why it failed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


# --------------------------------------------------------------------------
# I/O measurement

#: What is recorded per (block size, candidate): seconds per repetition.
PHASES = ("write", "read", "cold_read", "fresh_write", "fresh_read")


@dataclass
class IoResult:
    block_bytes: int
    candidate: str
    label: str
    times: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})


async def _verify_zarr_readback(w: Workload) -> None:
    """Open what a candidate wrote with zarr's normal API and compare everything."""
    store = LocalStore(w.root, read_only=True)
    arr = await zasync.open_array(store=store, path=ARRAY_NAME, mode="r")
    data = np.asarray(await arr.getitem(slice(None)))
    if data.dtype != np.uint8 or data.shape != w.src.shape or not np.array_equal(data, w.src):
        raise AssertionError("zarr read-back differs from the blocks written")
    attrs = arr.metadata.attributes
    if attrs.get("tiercache", {}).get("logical_dtype") != "bfloat16":
        raise AssertionError(f"attributes lost: {attrs!r}")


async def _timed(fn: Callable[[], Awaitable[None]]) -> float:
    """Seconds ``fn`` takes, with the cyclic GC paused (it would add noise, not signal)."""
    gc.disable()
    try:
        t0 = time.perf_counter()
        await fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


async def _timed_read(cand: Candidate, w: Workload) -> float:
    w.dst.fill(0)
    t = await _timed(partial(cand.read, w))
    if not np.array_equal(w.dst, w.src):
        raise AssertionError(f"{cand.name}: read-back differs")
    return t


def _rotated(items: Sequence[CandidateFactory], rep: int) -> list[CandidateFactory]:
    """A different candidate order each repetition, to cancel order and drift effects."""
    k = len(items)
    order = [items[(j + rep) % k] for j in range(k)]
    if rep % 2:
        order.reverse()
    return order


async def run_io(
    *,
    workdir: Path,
    sizes: Sequence[int],
    total_bytes: int,
    reps: int,
    cold_reps: int,
    fresh_reps: int,
    batch: int,
    shard_blocks: int,
    log: Callable[[str], None],
) -> tuple[list[IoResult], list[str]]:
    """Steady state (slots exist, rewritten), cold reads, then fresh (new files) writes.

    Steady state is the disk tier's normal regime: a fixed-capacity cache rewrites
    evicted slots. Each candidate's layout is written once untimed, then every
    repetition rewrites all blocks (alternating two bit patterns, so every read is
    checked against the bytes of *this* repetition's write) and reads them back.
    """
    gc.collect()
    gc.freeze()  # everything imported so far: never scanned again (torch makes gc slow)
    rng = np.random.default_rng(1234)
    pat0: U8 = rng.integers(0, 256, size=total_bytes, dtype=np.uint8)
    pat1: U8 = np.bitwise_not(pat0)
    dst_flat: U8 = np.zeros(total_bytes, dtype=np.uint8)
    results: dict[tuple[int, str], IoResult] = {}
    verified: list[str] = []
    counter = 0

    def workload(bs: int, root: Path, pattern: U8) -> Workload:
        n = total_bytes // bs
        return Workload(
            root=root,
            src=pattern[: n * bs].reshape(n, bs),
            dst=dst_flat[: n * bs].reshape(n, bs),
            batch=batch,
            shard_blocks=min(shard_blocks, n),
        )

    def record(bs: int, cand: Candidate, phase: str, t: float) -> None:
        res = results.setdefault(
            (bs, cand.name), IoResult(block_bytes=bs, candidate=cand.name, label=cand.label)
        )
        res.times[phase].append(t)

    def runs(cand: Candidate, rep: int) -> bool:
        return not (cand.slow and rep >= SLOW_REPS)

    # -- steady state (rewrite existing slots) and cold reads, one block size at a time
    for bs in sizes:
        t_size = time.perf_counter()
        live: dict[int, tuple[Candidate, Path]] = {}
        try:
            for j, factory in enumerate(CANDIDATES):
                cand = factory()
                root = workdir / f"steady-{bs}-{j}"
                live[id(factory)] = (cand, root)
                w = workload(bs, root, pat1)
                await cand.prepare(w)
                await cand.prefill(w)  # untimed: every slot exists afterwards
            for rep in range(reps):
                pattern = pat0 if rep % 2 == 0 else pat1
                for factory in _rotated(CANDIDATES, rep):
                    cand, root = live[id(factory)]
                    if not runs(cand, rep):
                        continue
                    w = workload(bs, root, pattern)
                    os.sync()  # start clean: no earlier write-back competing for the CPUs
                    record(bs, cand, "write", await _timed(partial(cand.write, w)))
                    record(bs, cand, "read", await _timed_read(cand, w))
                    if rep == 0 and cand.zarr_layout:
                        await _verify_zarr_readback(w)
                        verified.append(f"{cand.name}@{bs}")
            # every layout now holds its last-written pattern (slow ones possibly an older one)
            for rep in range(cold_reps):
                # one sync + drop per repetition: every candidate's files are cold at once
                why = drop_caches()
                if why is not None:
                    raise RuntimeError(why)
                for factory in _rotated(CANDIDATES, rep):
                    cand, root = live[id(factory)]
                    if not runs(cand, rep):
                        continue
                    last_rep = min(reps, SLOW_REPS if cand.slow else reps) - 1
                    w = workload(bs, root, pat0 if last_rep % 2 == 0 else pat1)
                    record(bs, cand, "cold_read", await _timed_read(cand, w))
        finally:
            for cand, root in live.values():
                cand.close()
                shutil.rmtree(root, ignore_errors=True)
        log(f"  io steady+cold {bs // KIB} KiB: {time.perf_counter() - t_size:.1f}s")

    # -- fresh: a new, empty directory per measurement (every write creates files)
    for rep in range(fresh_reps):
        t_rep = time.perf_counter()
        for bs in sizes:
            for factory in _rotated(CANDIDATES, rep):
                cand = factory()
                if not runs(cand, rep):
                    continue
                counter += 1
                root = workdir / f"fresh-{counter}"
                try:
                    w = workload(bs, root, pat0)
                    await cand.prepare(w)
                    os.sync()
                    record(bs, cand, "fresh_write", await _timed(partial(cand.write, w)))
                    record(bs, cand, "fresh_read", await _timed_read(cand, w))
                finally:
                    cand.close()
                    shutil.rmtree(root, ignore_errors=True)
        log(f"  io fresh rep {rep + 1}: {time.perf_counter() - t_rep:.1f}s")
    return list(results.values()), verified


def _median_ratio(num: Sequence[float], den: Sequence[float]) -> float | None:
    """Median over repetitions of den_time / num_time (throughput ratio, paired by rep)."""
    if not num or not den:
        return None
    return statistics.median(d / n for n, d in zip(num, den, strict=False))


def summarize_io(results: Sequence[IoResult], total_bytes: int) -> list[dict[str, Any]]:
    base = {r.block_bytes: r for r in results if r.candidate == BASELINE}
    rows: list[dict[str, Any]] = []
    for r in results:
        b = base[r.block_bytes]
        nbytes = (total_bytes // r.block_bytes) * r.block_bytes
        row: dict[str, Any] = {
            "block_bytes": r.block_bytes,
            "candidate": r.candidate,
            "label": r.label,
            "bytes_per_rep": nbytes,
            "seconds": r.times,
        }
        for ph in PHASES:
            ts = r.times[ph]
            row[f"{ph}_MBps"] = nbytes / statistics.median(ts) / 1e6 if ts else None
            # paired per repetition (same rep, same block size), then the median
            row[f"{ph}_ratio"] = _median_ratio(ts, b.times[ph])
        rows.append(row)
    rows.sort(key=lambda d: (d["block_bytes"], d["candidate"]))
    return rows


# --------------------------------------------------------------------------
# checksum cost


def run_checksums(sizes: Sequence[int], total_bytes: int, reps: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    flat: U8 = rng.integers(0, 256, size=total_bytes, dtype=np.uint8)
    fns: dict[str, Callable[[memoryview], int]] = {
        "xxh3_64": xxhash.xxh3_64_intdigest,
        "xxh3_128": xxhash.xxh3_128_intdigest,
    }
    out: list[dict[str, Any]] = []
    for bs in sizes:
        n = total_bytes // bs
        blocks = flat[: n * bs].reshape(n, bs)
        for name, fn in fns.items():
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for i in range(n):
                    fn(blocks[i].data)
                times.append(time.perf_counter() - t0)
            out.append(
                {
                    "block_bytes": bs,
                    "hash": name,
                    "GBps": n * bs / statistics.median(times) / 1e9,
                }
            )
    return out


# --------------------------------------------------------------------------
# codecs on real bf16 KV


@dataclass(frozen=True)
class KvModel:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    tokens: int
    tokens_per_block: int


def real_kv_blocks(m: KvModel, seed: int = 0) -> tuple[U8, dict[str, Any]]:
    """KV of a seeded random-weight tiny Llama, as page-first blocks of raw bytes.

    Block ``b`` holds ``[layer, K/V, kv_head, token, head_dim]`` for its tokens,
    bfloat16, viewed as bytes: shape ``(n_blocks, block_bytes)``.
    """
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=m.hidden,
        intermediate_size=2 * m.hidden,
        num_hidden_layers=m.layers,
        num_attention_heads=m.heads,
        num_key_value_heads=m.kv_heads,
        initializer_range=0.2,
        max_position_embeddings=max(2048, m.tokens),
    )
    model: Any = LlamaForCausalLM(cfg)  # type: ignore[no-untyped-call,unused-ignore]
    model = model.to(torch.bfloat16).eval()
    ids = torch.randint(
        0, cfg.vocab_size, (1, m.tokens), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache: Any = out.past_key_values
    if hasattr(cache, "layers"):  # transformers >= 4.56 / 5.x
        kv_pairs = [(layer.keys, layer.values) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):  # older DynamicCache
        kv_pairs = list(zip(cache.key_cache, cache.value_cache, strict=True))
    else:  # legacy tuple of tuples
        kv_pairs = [(k, v) for k, v in cache]
    # (L, 2, H, S, D) -> (n_blocks, L, 2, H, T, D): page-first
    kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in kv_pairs])
    L, _, H, S, D = kv.shape
    T = m.tokens_per_block
    nb = S // T
    blocks = kv[:, :, :, : nb * T].reshape(L, 2, H, nb, T, D).permute(3, 0, 1, 2, 4, 5).contiguous()
    raw: U8 = blocks.view(torch.uint8).numpy().reshape(nb, -1).copy()
    info = {
        "model": "LlamaForCausalLM (random weights, seed 0, initializer_range 0.2)",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "layers": L,
        "kv_heads": H,
        "head_dim": D,
        "tokens": S,
        "tokens_per_block": T,
        "dtype": str(kv.dtype),
        "bytes_per_token": 2 * L * H * D * 2,
        "block_bytes": int(raw.shape[1]),
        "n_blocks": nb,
        "kv_std": float(kv.float().std()),
    }
    return raw, info


@dataclass(frozen=True)
class CodecSpec:
    name: str
    zarr_v3: str  # how to configure the same thing as a zarr v3 codec
    make: Callable[[], Any]


def _codec_specs() -> list[CodecSpec]:
    import numcodecs

    B = numcodecs.Blosc
    return [
        CodecSpec("none", "BytesCodec() only", lambda: None),
        CodecSpec("zstd-1", "ZstdCodec(level=1)", lambda: numcodecs.Zstd(level=1)),
        CodecSpec("zstd-3", "ZstdCodec(level=3)", lambda: numcodecs.Zstd(level=3)),
        CodecSpec(
            "blosc-lz4-shuffle",
            "BloscCodec(cname='lz4', clevel=5, shuffle='shuffle', typesize=2)",
            lambda: B(cname="lz4", clevel=5, shuffle=B.SHUFFLE),
        ),
        CodecSpec(
            "blosc-lz4-bitshuffle",
            "BloscCodec(cname='lz4', clevel=5, shuffle='bitshuffle', typesize=2)",
            lambda: B(cname="lz4", clevel=5, shuffle=B.BITSHUFFLE),
        ),
        CodecSpec(
            "blosc-zstd-shuffle",
            "BloscCodec(cname='zstd', clevel=3, shuffle='shuffle', typesize=2)",
            lambda: B(cname="zstd", clevel=3, shuffle=B.SHUFFLE),
        ),
        CodecSpec(
            "blosc-zstd-bitshuffle",
            "BloscCodec(cname='zstd', clevel=3, shuffle='bitshuffle', typesize=2)",
            lambda: B(cname="zstd", clevel=3, shuffle=B.BITSHUFFLE),
        ),
    ]


def _timed_loop(fn: Callable[[], None], min_s: float) -> float:
    """Seconds per call of fn, running it until at least min_s has passed."""
    calls = 0
    t0 = time.perf_counter()
    while True:
        fn()
        calls += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return dt / calls


def run_codecs(raw: U8, reps: int, min_s: float) -> list[dict[str, Any]]:
    import numcodecs
    import numcodecs.blosc

    numcodecs.blosc.set_nthreads(1)  # one core per codec call; tiercache parallelises by block
    n, bs = raw.shape
    views = [raw[i].view(np.uint16) for i in range(n)]  # itemsize 2 -> blosc typesize=2
    specs = _codec_specs()
    enc_t: dict[str, list[float]] = {s.name: [] for s in specs}
    dec_t: dict[str, list[float]] = {s.name: [] for s in specs}
    sizes: dict[str, int] = {}
    for rep in range(reps):
        for s in specs[rep % len(specs) :] + specs[: rep % len(specs)]:
            codec = s.make()
            if codec is None:  # stored as is: nothing to time
                sizes[s.name] = n * bs
                continue
            encoded = [bytes(codec.encode(v)) for v in views]
            for v, e in zip(views, encoded, strict=True):
                back = np.frombuffer(bytes(codec.decode(e)), dtype=np.uint16)
                if not np.array_equal(back, v):
                    raise AssertionError(f"codec {s.name} does not round-trip")
            sizes[s.name] = sum(len(e) for e in encoded)

            def enc(codec: Any = codec) -> None:
                for v in views:
                    codec.encode(v)

            def dec(codec: Any = codec, encoded: list[bytes] = encoded) -> None:
                for e in encoded:
                    codec.decode(e)

            enc_t[s.name].append(_timed_loop(enc, min_s))
            dec_t[s.name].append(_timed_loop(dec, min_s))
    total = n * bs

    def mbps(ts: list[float]) -> float | None:
        return total / statistics.median(ts) / 1e6 if ts else None

    return [
        {
            "codec": s.name,
            "zarr_v3": s.zarr_v3,
            "ratio": total / sizes[s.name],
            "encode_MBps": mbps(enc_t[s.name]),
            "decode_MBps": mbps(dec_t[s.name]),
        }
        for s in specs
    ]


# --------------------------------------------------------------------------
# machine info and plotting


def _fs_of(path: Path) -> dict[str, Any]:
    """Filesystem of ``path`` from /proc/mounts: type, device, mount point, options, and
    for ext4 whether it has a journal (jbd2); a no-journal ext4 makes every file
    creation slow (its inode allocator skips recently deleted inodes one by one)."""
    info: dict[str, Any] = {"type": "unknown"}
    best = ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4:
                    continue
                mnt = parts[1]
                inside = str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) > len(best):
                    best = mnt
                    info = {"type": parts[2], "device": parts[0], "mount": mnt, "options": parts[3]}
    except OSError:
        pass
    if info.get("type") == "ext4" and os.path.isdir("/proc/fs/jbd2"):
        dev = os.path.basename(str(info["device"]))
        info["journal"] = any(e.startswith(dev + "-") for e in os.listdir("/proc/fs/jbd2"))
    return info


def machine_info(workdir: Path) -> dict[str, Any]:
    def ver(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu_model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": cpu_model,
        "workdir": str(workdir),
        "workdir_fs": _fs_of(workdir.resolve()),
        "versions": {
            p: ver(p)
            for p in ("zarr", "numcodecs", "numpy", "xxhash", "torch", "transformers", "matplotlib")
        },
        "zarr_async_concurrency": zarr.config.get("async.concurrency"),
        "to_thread_workers": min(32, (os.cpu_count() or 1) + 4),
    }


def _fs_label(fs: dict[str, Any]) -> str:
    label = str(fs.get("type"))
    if "journal" in fs:
        label += " (journal)" if fs["journal"] else " (no journal)"
    return label


def _size_label(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[dict[str, Any]] = result["io"]["rows"]
    sizes: list[int] = result["config"]["block_sizes"]
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    names.sort(key=lambda c: (c != BASELINE, c))
    xs = list(range(len(sizes)))
    fig, axes = plt.subplots(2, 3, figsize=(19, 10.5))
    panels = [
        (
            axes[0, 0],
            "write_ratio",
            "WRITE, steady state (rewrite existing slots)\n/ plain file rewritten in place",
        ),
        (axes[1, 0], "read_ratio", "READ, hot (page cache)\n/ plain sequential file read"),
        (
            axes[0, 1],
            "fresh_write_ratio",
            "WRITE, fresh (empty layout: chunk files created; slabs preallocated untimed)"
            "\n/ plain new file written sequentially",
        ),
        (
            axes[1, 1],
            "cold_read_ratio",
            "READ, cold (after sync + drop_caches)\n/ plain sequential file read, cold",
        ),
    ]
    markers = "os^vD<>ph*P"
    key_names = ("zarr_store_xxh", "chunkfile_xxh", "shardslab_xxh")
    others = iter(f"C{k}" for k in range(10))  # the default (tab10) colour cycle
    colors: dict[str, Any] = {}
    for name in names:
        colors[name] = "black" if name == BASELINE else next(others, "gray")
    for ax, key, title in panels:
        any_data = False
        for j, name in enumerate(names):
            ys = []
            for bs in sizes:
                r = next(r for r in rows if r["candidate"] == name and r["block_bytes"] == bs)
                ys.append(r[key] if r[key] is not None else float("nan"))
            if all(y != y for y in ys):
                continue
            any_data = True
            ax.plot(
                xs,
                ys,
                marker=markers[j % len(markers)],
                label=name,
                color=colors[name],
                linewidth=2.6 if name in key_names else 1.1,
                linestyle="-" if name in key_names or name == BASELINE else "--",
            )
        ax.axhline(TARGET_RATIO, color="red", linestyle=":", linewidth=1.2, label="70% target")
        ax.set_xticks(xs, [_size_label(s) for s in sizes])
        ax.set_xlabel("block size")
        ax.set_ylabel("throughput ratio (1.0 = plain file)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if not any_data:
            note = result["io"].get("cold_note") or "not measured"
            ax.text(
                0.5,
                0.5,
                f"not measured\n({note})",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)

    # absolute throughput of the baseline and the key candidates (context for the ratios)
    ax = axes[1, 2]
    for name in (BASELINE, *key_names):
        for key, style in (("write", "-"), ("read", "--")):
            ys = []
            for bs in sizes:
                match = [r for r in rows if r["candidate"] == name and r["block_bytes"] == bs]
                v = match[0][f"{key}_MBps"] if match else None
                ys.append(v if v is not None else float("nan"))
            if all(y != y for y in ys):
                continue
            ax.plot(
                xs,
                ys,
                style,
                color=colors.get(name, "gray"),
                marker="o",
                markersize=3,
                label=f"{name} {'steady write' if key == 'write' else 'hot read'}",
                linewidth=1.4,
            )
    ax.set_yscale("log")
    ax.set_xticks(xs, [_size_label(s) for s in sizes])
    ax.set_xlabel("block size")
    ax.set_ylabel("MB/s (log)")
    ax.set_title("absolute throughput, median (solid: steady write, dashed: hot read)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")

    ax = axes[0, 2]
    codecs: list[dict[str, Any]] = result.get("codecs", {}).get("rows", [])
    if codecs:
        labels = [c["codec"] for c in codecs]
        ratios = [c["ratio"] for c in codecs]
        ys2 = list(range(len(labels)))
        ax.barh(ys2, ratios, color="tab:blue")
        ax.set_yticks(ys2, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("compression ratio (raw / stored)")
        kv = result["codecs"]["kv"]
        ax.set_title(
            f"codecs on real bf16 KV ({_size_label(kv['block_bytes'])} page-first blocks, "
            "1 thread)\nlabels: ratio, encode / decode MB/s",
            fontsize=10,
        )
        hi = max(ratios)
        ax.set_xlim(0, hi * 2.1)
        for y, c in zip(ys2, codecs, strict=True):
            ax.text(
                c["ratio"] + hi * 0.03,
                y,
                (
                    f"{c['ratio']:.3f}x  enc {_fmt(c['encode_MBps'], '.0f')} / "
                    f"dec {_fmt(c['decode_MBps'], '.0f')}"
                    if c["encode_MBps"] is not None
                    else "1.000x  (stored as is)"
                ),
                va="center",
                fontsize=8,
            )
        ax.axvline(1.0, color="gray", linewidth=0.8)
    else:
        ax.text(0.5, 0.5, "codecs not measured", ha="center", va="center", transform=ax.transAxes)
    meta = result["meta"]
    cfg = result["config"]
    fig.suptitle(
        f"tiercache disk-tier layout: zarr {meta['versions']['zarr']}, {meta['cpu_count']} CPUs, "
        f"{_fs_label(meta['workdir_fs'])}, {cfg['total_bytes'] / MIB:g} MiB per block size, "
        f"medians of {cfg['reps']} steady / {cfg['fresh_reps']} fresh / {cfg['cold_reps']} cold "
        f"interleaved reps ({meta['date_utc']})",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------
# entry point


def _sync_api_check(workdir: Path) -> dict[str, Any]:
    """Outside any event loop, read with zarr's synchronous ``zarr.open_array(...)[:]``:
    a chunk-per-block array whose slots 0-1 were written with ``LocalStore.set`` and
    2-3 with OS calls, and a slab-written sharded array."""
    src: U8 = np.random.default_rng(3).integers(0, 256, size=(8, 4 * KIB), dtype=np.uint8)
    chunked = Workload(workdir / "sync_chunked", src[:4], np.zeros_like(src[:4]), 4, 4)
    slab_w = Workload(workdir / "sync_slab", src, np.zeros_like(src), 4, 4)
    try:

        async def write_all() -> None:
            st = ZarrStore(checksum=True)
            await st.prepare(chunked)
            await st.write(Workload(chunked.root, src[:2], chunked.dst[:2], 2, 2))
            await asyncio.to_thread(_write_chunk_files, st.paths, src, range(2, 4), st.digests)
            slab = ShardSlab()
            await slab.prepare(slab_w)
            try:
                await slab.write(slab_w)
            finally:
                slab.close()

        asyncio.run(write_all())
        out: dict[str, Any] = {}
        for name, w in (("chunk_per_block", chunked), ("shard_slab", slab_w)):
            arr = zarr.open_array(store=str(w.root), path=ARRAY_NAME, mode="r")
            out[name] = {
                "ok": bool(np.array_equal(np.asarray(arr[:]), w.src)),
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "codecs": [repr(c) for c in getattr(arr.metadata, "codecs", ())],
                "attributes": dict(arr.attrs),
            }
        out["ok"] = all(v["ok"] for v in out.values())
        return out
    finally:
        for w in (chunked, slab_w):
            shutil.rmtree(w.root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python scripts/disk_layout_study.py",
        description="Measure zarr v3 disk-tier layouts against plain file I/O; write JSON + PNG.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one rep (smoke test)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch dir (default: a temp dir)")
    p.add_argument("--total-mib", type=float, default=None, help="MiB written per block size")
    p.add_argument("--reps", type=int, default=None, help="steady-state repetitions")
    p.add_argument("--fresh-reps", type=int, default=None, help="fresh-file repetitions")
    p.add_argument("--cold-reps", type=int, default=None, help="cold-read repetitions")
    p.add_argument("--no-cold", action="store_true", help="never drop the page cache")
    p.add_argument("--no-codecs", action="store_true", help="skip the codec study")
    p.add_argument("--batch", type=int, default=32, help="blocks gathered concurrently")
    p.add_argument("--shard-blocks", type=int, default=16, help="blocks per shard")
    args = p.parse_args(argv)

    quick: bool = args.quick

    def pick(value: int | None, quick_default: int, full_default: int) -> int:
        return value if value is not None else (quick_default if quick else full_default)

    sizes = [16 * KIB, 64 * KIB] if quick else [64 * KIB, 256 * KIB, MIB, 4 * MIB]
    total_mib: float = args.total_mib if args.total_mib is not None else (0.25 if quick else 64)
    total_bytes = int(total_mib * MIB)
    reps = pick(args.reps, 1, 7)
    fresh_reps = pick(args.fresh_reps, 1, 3)
    cold_reps = 0 if args.no_cold else pick(args.cold_reps, 0, 3)
    kvm = (
        KvModel(layers=2, hidden=128, heads=4, kv_heads=2, tokens=64, tokens_per_block=16)
        if quick
        else KvModel(layers=4, hidden=512, heads=8, kv_heads=2, tokens=1024, tokens_per_block=32)
    )

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-disk-layout-")) if own_tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    try:
        cold_note: str | None = "disabled (--no-cold, or --quick without --cold-reps)"
        if cold_reps:
            cold_note = drop_caches()
            if cold_note is not None:
                log(f"cold reads disabled: {cold_note}")
                cold_reps = 0
        log(
            f"io: sizes {[_size_label(s) for s in sizes]}, {total_bytes / MIB:g} MiB each, "
            f"{reps} steady + {fresh_reps} fresh + {cold_reps} cold reps, workdir {workdir}"
        )
        io_results, verified = asyncio.run(
            run_io(
                workdir=workdir,
                sizes=sizes,
                total_bytes=total_bytes,
                reps=reps,
                cold_reps=cold_reps,
                fresh_reps=fresh_reps,
                batch=args.batch,
                shard_blocks=args.shard_blocks,
                log=log,
            )
        )
        sync_check = _sync_api_check(workdir)
        if not sync_check["ok"]:
            raise AssertionError(f"zarr sync API read-back failed: {sync_check}")
        log("checksums")
        checks = run_checksums(sizes, total_bytes, reps=3)
        codecs: dict[str, Any] = {}
        if not args.no_codecs:
            log("codecs: building tiny Llama KV")
            raw, kv_info = real_kv_blocks(kvm)
            rows = run_codecs(raw, reps=1 if quick else 3, min_s=0.01 if quick else 0.15)
            codecs = {"kv": kv_info, "rows": rows, "blosc_threads": 1}
        meta = machine_info(workdir)
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)

    result: dict[str, Any] = {
        "what": "tiercache disk-tier layout study (see the module docstring)",
        "meta": meta,
        "config": {
            "quick": quick,
            "block_sizes": sizes,
            "total_bytes": total_bytes,
            "reps": reps,
            "fresh_reps": fresh_reps,
            "cold_reps": cold_reps,
            "batch": args.batch,
            "shard_blocks": args.shard_blocks,
            "baseline": BASELINE,
            "target_ratio": TARGET_RATIO,
            "candidates": {c.name: c.label for c in (f() for f in CANDIDATES)},
            "phases": {
                "write": "steady state: every slot exists; all blocks rewritten",
                "read": "hot: right after the write, from the page cache",
                "cold_read": "after os.sync() and drop_caches=3",
                "fresh_write": "empty layout: every chunk file is created by the write "
                "(shardslab: shard files created and fallocated untimed, as at tier start-up)",
                "fresh_read": "hot read right after the fresh write",
            },
        },
        "io": {
            "rows": summarize_io(io_results, total_bytes),
            "cold_note": cold_note,
            "zarr_readback_verified": verified,
            "zarr_sync_api_check": sync_check,
        },
        "checksum": checks,
        "codecs": codecs,
        "elapsed_s": time.perf_counter() - t_start,
    }
    (out / "disk_layout.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "disk_layout.png")
    _print_table(result)
    log(
        f"wrote {out / 'disk_layout.json'} and {out / 'disk_layout.png'} "
        f"in {result['elapsed_s']:.0f}s"
    )
    return 0


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _print_table(result: dict[str, Any]) -> None:
    cols = [
        ("write", "wr"),
        ("read", "rd"),
        ("cold_read", "cold"),
        ("fresh_write", "fr-wr"),
        ("fresh_read", "fr-rd"),
    ]
    head = " ".join(f"{short + ' MB/s':>11} {'ratio':>5}" for _, short in cols)
    print(f"{'block':>7} {'candidate':<18} {head}")
    for r in result["io"]["rows"]:
        cells = " ".join(
            f"{_fmt(r[f'{ph}_MBps'], '11.0f')} {_fmt(r[f'{ph}_ratio'], '5.2f')}" for ph, _ in cols
        )
        print(f"{_size_label(r['block_bytes']):>7} {r['candidate']:<18} {cells}")
    for c in result["checksum"]:
        print(f"checksum {c['hash']:<9} {_size_label(c['block_bytes']):>7} {c['GBps']:.1f} GB/s")
    for c in result.get("codecs", {}).get("rows", []):
        print(
            f"codec {c['codec']:<22} ratio {c['ratio']:.3f}  "
            f"enc {_fmt(c['encode_MBps'], '.0f')} MB/s  dec {_fmt(c['decode_MBps'], '.0f')} MB/s"
        )


if __name__ == "__main__":
    raise SystemExit(main())
