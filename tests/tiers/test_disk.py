"""Fail closed: corrupted, truncated or missing chunks and torn journals are misses, never data;
and kill -9 in the middle of heavy disk writes loses nothing that completed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import xxhash

from tests.conftest import (
    NBYTES,
    OpenCache,
    as_bytes,
    flip_byte,
    make_blocks,
    make_ns,
    make_tokens,
)
from tiercache import KVSpec, Namespace, TierManager
from tiercache.tiers.blockio import SlabIO
from tiercache.tiers.disk import StoreError

SHARD_BLOCKS = SlabIO(Path()).shard_blocks

NS = make_ns()


def locate(m: TierManager, key: bytes) -> tuple[Path, int]:
    """The shard file and byte offset of a stored block."""
    e = m.index.get(key)
    assert e is not None and e.disk is not None and m.disk is not None
    return m.disk.location(e.disk)


async def saved_on_disk_only(
    open_cache: OpenCache, n: int
) -> tuple[TierManager, list[int], torch.Tensor]:
    """A cache whose ``n`` blocks are on disk and not in host memory (so reads hit the files)."""
    m = await open_cache(write="write-through", host_blocks=64)
    tokens, blocks = make_tokens(n), make_blocks(n)
    await m.save(NS, tokens, blocks)
    await m.close()
    return await open_cache(host_blocks=64), tokens, blocks


async def test_a_corrupted_block_is_a_counted_miss(open_cache: OpenCache) -> None:
    m, tokens, blocks = await saved_on_disk_only(open_cache, 3)
    path, offset = locate(m, NS.block_keys(tokens)[1])
    flip_byte(path, offset + 100)
    got = await m.load(NS, tokens)
    assert got.blocks == 1
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks[:1]))
    assert m.stats.corrupt_blocks == 1
    assert (await m.lookup(NS, tokens)).blocks == 1  # the bad copy is forgotten


async def test_a_file_truncated_while_running_is_a_miss_from_the_cut(open_cache: OpenCache) -> None:
    m, tokens, blocks = await saved_on_disk_only(open_cache, 3)
    path, offset = locate(m, NS.block_keys(tokens)[2])
    os.truncate(path, offset + 77)  # the cut falls inside block 2
    got = await m.load(NS, tokens)
    assert got.blocks == 2
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks[:2]))
    assert m.stats.corrupt_blocks == 1


@pytest.mark.parametrize(
    ("damage", "kept"), [("truncated", SHARD_BLOCKS + 2), ("missing", SHARD_BLOCKS)]
)
async def test_a_damaged_shard_file_loses_only_what_it_lost(
    open_cache: OpenCache, damage: str, kept: int
) -> None:
    n = SHARD_BLOCKS + 4  # two shard files: blocks 0-15 and 16-19
    m, tokens, blocks = await saved_on_disk_only(open_cache, n)
    path, offset = locate(m, NS.block_keys(tokens)[SHARD_BLOCKS + 2])
    await m.close()
    if damage == "truncated":
        os.truncate(path, offset + 77)  # cut inside block 18: 16 and 17 are whole
    else:
        path.unlink()
    m2 = await open_cache()
    assert (await m2.lookup(NS, tokens)).blocks == kept
    assert m2.disk is not None and m2.disk.corrupt_reads == n - kept
    got = await m2.load(NS, tokens)
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks[:kept]))


@pytest.mark.parametrize("read_first", [False, True])
async def test_a_shard_cut_short_is_repaired_by_the_next_write(
    open_cache: OpenCache, read_first: bool
) -> None:
    """Also when a read opened the shard file first (``read_first``)."""
    import zarr

    m, tokens, _ = await saved_on_disk_only(open_cache, 2)
    path, offset = locate(m, NS.block_keys(tokens)[0])
    await m.close()
    os.truncate(path, offset + 2 * NBYTES)  # the blocks survive, the zarr shard index does not
    m2 = await open_cache(write="write-through")
    if read_first:
        assert (await m2.load(NS, tokens)).tiers == ["disk", "disk"]
    more, more_blocks = make_tokens(1, seed=77), make_blocks(1, seed=77)
    await m2.save(NS, more, more_blocks)  # lands in the same shard: its index is written again
    assert m2.disk is not None
    slot = m2.index.get(NS.block_keys(more)[0]).disk.slot  # type: ignore[union-attr]
    await m2.close()
    arr = zarr.open_array(str(path.parents[4]), path=f"ns/{NS.hex}", mode="r")  # the store root
    assert torch.equal(torch.from_numpy(arr[slot : slot + 1]), as_bytes(more_blocks))


async def test_a_budget_raised_at_reopen_grows_the_array_zarr_reads(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    """The array the journal names is opened at start, before any save registers it: it
    too grows to the new budget, or the blocks past its old shape were the tier's only."""
    import zarr

    m = await open_cache(write="write-through", disk_blocks=4)
    await m.save(NS, make_tokens(4), make_blocks(4))
    await m.close(flush=False)
    m2 = await open_cache(write="write-through", disk_blocks=64)
    more, more_blocks = make_tokens(8, seed=5), make_blocks(8, seed=5)
    await m2.save(NS, more, more_blocks)
    slots = [m2.index.get(k).disk.slot for k in NS.block_keys(more)]  # type: ignore[union-attr]
    await m2.close()

    arr = zarr.open_array(str(tmp_path / "disk"), path=f"ns/{NS.hex}", mode="r")
    assert arr.shape[0] == 64 and max(slots) >= 4
    assert torch.equal(torch.from_numpy(arr[slots]), as_bytes(more_blocks))


async def test_a_torn_journal_segment_is_ignored(open_cache: OpenCache, tmp_path: Path) -> None:
    m = await open_cache(write="write-through")
    first, second = make_tokens(1, seed=1), make_tokens(1, seed=2)
    await m.save(NS, first, make_blocks(1, seed=1))
    await m.save(NS, second, make_blocks(1, seed=2))
    await m.close(flush=False)
    # close() compacts nothing, so the last segment holds exactly the second block's record.
    segments = sorted((tmp_path / "disk" / "journal").iterdir())
    segments[-1].write_bytes(segments[-1].read_bytes()[:-3])
    m2 = await open_cache()
    assert (await m2.lookup(NS, first)).blocks == 1
    assert (await m2.lookup(NS, second)).blocks == 0


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``path`` made undeletable, even by root (``chattr +i``), for the block."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a file immutable here: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


async def test_a_journal_segment_that_cannot_be_deleted_is_left_not_a_failed_open(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    # Every open compacts the journal into one snapshot and deletes the segments before it.
    # One that refused to go raised a raw PermissionError out of the open: the daemon could
    # not start on a store that holds all its blocks.
    m = await open_cache(write="write-through")
    tokens = make_tokens(3)
    await m.save(NS, tokens[:8], make_blocks(2))
    await m.save(NS, tokens, make_blocks(3))
    await m.close()
    journal = tmp_path / "disk" / "journal"
    stuck = sorted(journal.iterdir())[0]
    with immutable(stuck):
        m2 = await open_cache()
        assert (await m2.lookup(NS, tokens)).blocks == 3
        await m2.close()
        assert stuck in set(journal.iterdir())  # left, older than the snapshot after it
        m3 = await open_cache()  # which a replay reads over it
        assert (await m3.lookup(NS, tokens)).tiers == ["disk"] * 3
        await m3.close()


async def test_a_block_two_journal_records_name_is_counted_once(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    """A power cut can lose a segment whose ``del`` freed a block that was stored again at
    another slot: the journal then names that block twice. One copy is adopted, the other's
    slot freed, or its bytes were counted for good, in no index entry, never evicted."""
    m = await open_cache(write="write-through", host_blocks=8)
    tokens, blocks = make_tokens(3), make_blocks(3)
    keys = NS.block_keys(tokens)
    await m.save(NS, tokens, blocks)
    await m.evict(keys=[keys[0], keys[2]])  # one segment: both dels
    await m.save(NS, tokens[: NS.spec.block_size], blocks[:1])  # block 0 again, in slot 2
    await m.close(flush=False)
    segments = sorted((tmp_path / "disk" / "journal").iterdir())
    (lost,) = [
        s
        for s in segments
        if any(r[0] == 2 for r in msgpack.unpackb(s.read_bytes()[:-8])["records"])  # a del
    ]
    lost.unlink()

    m2 = await open_cache(host_blocks=8)
    assert m2.disk is not None
    assert (m2.disk.num_blocks, m2.disk.used_bytes) == (2, 2 * NBYTES)
    got = await m2.load(NS, tokens)
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks[: got.blocks]))
    assert got.blocks == 2
    await m2.evict(keys=keys)
    assert (m2.disk.num_blocks, m2.disk.used_bytes) == (0, 0)


async def test_a_journal_file_killed_before_its_rename_is_ignored(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    """The store writes ``<seq>.<uuid>.partial`` and renames it into place: a kill -9 between
    the two leaves a file whose bytes check out but whose write never happened."""
    m = await open_cache(write="write-through")
    tokens, blocks = make_tokens(2, seed=1), make_blocks(2, seed=1)
    await m.save(NS, tokens, blocks)
    await m.close(flush=False)
    journal = tmp_path / "disk" / "journal"
    last = sorted(journal.iterdir())[-1]
    partial = journal / f"{int(last.name) + 1:016d}.0123456789abcdef.partial"
    partial.write_bytes(last.read_bytes())  # a whole, valid segment: only its name is wrong

    m2 = await open_cache()

    got = await m2.load(NS, tokens)
    assert got.tiers == ["disk", "disk"]
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))
    assert not partial.exists()  # the compaction at open removed it


async def test_an_open_that_fails_lets_go_of_the_store_for_a_retry(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    m = await open_cache(write="write-through")
    tokens, blocks = make_tokens(1, seed=1), make_blocks(1, seed=1)
    await m.save(NS, tokens, blocks)
    await m.close(flush=False)
    meta = tmp_path / "disk" / "ns" / NS.hex / "zarr.json"
    saved = meta.read_bytes()
    meta.unlink()  # say, a volume mounted half-way
    with pytest.raises(StoreError, match="missing its metadata"):
        await open_cache()

    meta.write_bytes(saved)
    m2 = await open_cache()  # not "in use by another process": the failed open released it

    got = await m2.load(NS, tokens)
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))


@pytest.mark.parametrize(
    "record",
    [
        {"id": "chat", "keys": "not a list"},  # another release's layout
        {"id": "chat", "keys": [b"k" * 16], "pinned": True},  # no expires
        {"id": "chat", "keys": [b"k" * 16], "chains": [["", 2]], "pinned": True, "expires": None},
    ],
)
async def test_a_whole_session_record_of_another_format_is_a_store_error_naming_it(
    open_cache: OpenCache, tmp_path: Path, record: dict[str, object]
) -> None:
    m = await open_cache(write="write-through")
    tokens, blocks = make_tokens(2, seed=1), make_blocks(2, seed=1)
    await m.save(NS, tokens, blocks, session="chat")
    await m.close(flush=False)
    (path,) = (tmp_path / "disk" / "sessions").iterdir()
    body = msgpack.packb(record)
    path.write_bytes(body + xxhash.xxh64_digest(body))

    with pytest.raises(StoreError, match=f"session record sessions/{path.name} .* not one"):
        await open_cache()

    path.unlink()  # what the error says to do
    got = await (await open_cache()).load(NS, tokens)  # the failed open let go of the store
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))


@pytest.mark.parametrize("journaled", [True, False])
@pytest.mark.parametrize(
    "meta",
    [b'{"zarr_format": 3, "node', b'{"zarr_format": 3, "node_type": "group"}'],
    ids=["cut short", "a group's"],
)
async def test_an_array_whose_metadata_is_garbage_is_a_store_error_naming_it(
    open_cache: OpenCache, tmp_path: Path, journaled: bool, meta: bytes
) -> None:
    """At open (the journal names its blocks) or at the first save to it (it names none)."""
    m = await open_cache(write="write-through")
    tokens, blocks = make_tokens(1, seed=1), make_blocks(1, seed=1)
    await m.save(NS, tokens, blocks)
    await m.close(flush=False)
    if not journaled:
        for segment in (tmp_path / "disk" / "journal").iterdir():
            segment.unlink()
    (tmp_path / "disk" / "ns" / NS.hex / "zarr.json").write_bytes(meta)

    with pytest.raises(StoreError, match=f"array ns/{NS.hex} .*has unreadable metadata"):
        await (await open_cache()).save(NS, tokens, blocks)


@pytest.mark.parametrize(
    "segment",
    [
        {"version": 2, "entries": []},  # another release's layout
        [1, 2, 3],
        {"snapshot": False, "records": [[1, "ns/x"]]},  # a put cut short
        {"snapshot": False, "records": [[9, "ns/x", 0]]},  # an op this version has not
    ],
)
async def test_a_whole_journal_segment_of_another_format_is_refused_by_name(
    open_cache: OpenCache, tmp_path: Path, segment: object
) -> None:
    """Its checksum holds, so it was written whole: not a torn write to ignore, and not to be
    compacted away with the blocks it names."""
    m = await open_cache(write="write-through")
    tokens, blocks = make_tokens(2, seed=1), make_blocks(2, seed=1)
    await m.save(NS, tokens, blocks)
    await m.close(flush=False)
    journal = tmp_path / "disk" / "journal"
    foreign = journal / f"{int(sorted(journal.iterdir())[-1].name) + 1:016d}"
    body = msgpack.packb(segment)
    foreign.write_bytes(body + xxhash.xxh64_digest(body))

    with pytest.raises(
        StoreError, match=f"journal segment journal/{foreign.name} .* not a journal"
    ):
        await open_cache()

    assert foreign.exists()
    foreign.unlink()
    got = await (await open_cache()).load(NS, tokens)  # nothing else was touched
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))


@pytest.mark.parametrize("stage", ["block writes", "journal write"])
async def test_a_save_cancelled_during_its_disk_write_gives_the_disk_room_back(
    open_cache: OpenCache, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    m = await open_cache(write="write-through")
    await m.save(NS, make_tokens(2), make_blocks(2))
    disk = m.disk
    assert disk is not None and disk.used_bytes == 2 * NBYTES
    stalled = asyncio.Event()
    if stage == "block writes":
        real = disk.io.write

        async def slow(path: str, items: list) -> list:  # type: ignore[type-arg]
            stalled.set()
            await asyncio.sleep(0.2)  # the I/O threads are still writing when the save goes
            return await real(path, items)

        monkeypatch.setattr(disk.io, "write", slow)
    else:
        real_segment = disk._write_segment

        async def slow_segment(records: list, snapshot: bool = False) -> None:  # type: ignore[type-arg]
            stalled.set()
            await asyncio.sleep(3600)

        monkeypatch.setattr(disk, "_write_segment", slow_segment)
    save = asyncio.create_task(m.save(NS, make_tokens(3, seed=5), make_blocks(3, seed=5)))
    await stalled.wait()
    save.cancel()
    with pytest.raises(asyncio.CancelledError):
        await save
    await asyncio.sleep(0.4)
    if stage == "journal write":
        monkeypatch.setattr(disk, "_write_segment", real_segment)
        await disk.sync_journal()  # the puts and their dels
    on_disk = sum(1 for e in m.index if e.disk is not None)
    assert on_disk == 2 and disk.used_bytes == 2 * NBYTES  # nothing counted for nothing
    # The cancelled save's blocks are host-resident; a flush writes them in the room given back.
    assert await m.flush() == 3 * NBYTES and disk.used_bytes == 5 * NBYTES


CHILD = textwrap.dedent(
    """
    import asyncio, sys, torch
    from tiercache import KVSpec, Namespace, TierManager

    SPEC = KVSpec(num_layers=8, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)

    def block(i):
        g = torch.Generator().manual_seed(i)
        return (torch.rand((1, *SPEC.block_shape), generator=g) + 0.5).to(torch.bfloat16)

    async def main(root, start):
        ns = Namespace("crash-model", SPEC)
        m = await TierManager.open(host_bytes=4 * SPEC.block_nbytes, disk_url=root,
                                   disk_bytes=4096 * SPEC.block_nbytes, write="write-through")
        i = start
        while True:
            tokens = [i] * SPEC.block_size
            await m.save(ns, tokens, block(i))
            print(i, flush=True)
            i += 1

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)
CRASH_SPEC = KVSpec(num_layers=8, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)


def _crash_block(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return (torch.rand((1, *CRASH_SPEC.block_shape), generator=g) + 0.5).to(torch.bfloat16)


@pytest.mark.slow
def test_kill_9_during_heavy_writes_loses_no_completed_block(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    completed: list[int] = []
    start = 0
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        target = 20 + 7 * round_  # kill at a different point each round
        for done_here, line in enumerate(child.stdout, 1):
            completed.append(int(line))
            if done_here >= target:
                break
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        start = completed[-1] + 1_000  # the next round writes new blocks
    asyncio.run(_check_recovered(root, completed, start))


async def _check_recovered(root: Path, completed: list[int], start: int) -> None:
    ns = Namespace("crash-model", CRASH_SPEC)
    m = await TierManager.open(
        host_bytes=4 * CRASH_SPEC.block_nbytes,
        disk_url=str(root),
        disk_bytes=4096 * CRASH_SPEC.block_nbytes,
    )
    try:
        for i in completed:
            got = await m.load(ns, [i] * CRASH_SPEC.block_size)
            assert got.blocks == 1, f"completed block {i} was lost"
            assert torch.equal(as_bytes(got.kv()), as_bytes(_crash_block(i)))
        # Whatever else survived (a block whose save had not yet reported back) is
        # either exact or a miss: never torn bytes.
        for entry in list(m.index):
            assert entry.disk is not None
            out = torch.empty((1, CRASH_SPEC.block_nbytes), dtype=torch.uint8)
            if await m.disk.get(entry.disk, out[0]):  # type: ignore[union-attr]
                i = next(
                    j
                    for j in range(start + 100)
                    if ns.block_keys([j] * CRASH_SPEC.block_size)[0] == entry.key
                )
                assert torch.equal(out, as_bytes(_crash_block(i)))
        assert m.stats.corrupt_blocks == 0
    finally:
        await m.close()


async def test_a_load_cancelled_during_its_disk_read_writes_nothing_after_the_cancel(
    open_cache: OpenCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cancel used to be raised while the I/O threads still read into the caller's
    # tensor: an engine that reused its blocks on the cancel got the old read's bytes later.
    m, tokens, blocks = await saved_on_disk_only(open_cache, 2)
    assert m.disk is not None
    started, go = threading.Event(), threading.Event()
    real = SlabIO._read

    def held(self: SlabIO, *args: Any) -> None:
        started.set()
        go.wait(30)
        real(self, *args)

    monkeypatch.setattr(SlabIO, "_read", held)
    out = torch.zeros(2, NBYTES, dtype=torch.uint8)
    load = asyncio.create_task(m.load(NS, tokens, out=out))
    await asyncio.to_thread(started.wait, 30)
    load.cancel()
    await asyncio.sleep(0.05)
    heard_early = load.done()  # the cancel raised while the read still writes into ``out``
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await load
    heard = out.clone()
    await asyncio.sleep(0.2)  # a thread still reading would have written by now
    assert not heard_early
    assert torch.equal(out, heard)  # nothing written after the cancel was heard
    assert torch.equal(heard, as_bytes(blocks))  # the read had ended
