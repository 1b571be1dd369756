"""A disk that really fills up (a 1 MiB tmpfs of the test's own): writes are refused with a
counted error, saves and reads from host keep working, nothing stored is lost, and writing
resumes by itself once space returns."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, as_bytes, make_blocks, make_ns, make_tokens
from tiercache import TierManager

NS = make_ns()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the filesystem refuses."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


async def test_a_full_device_refuses_writes_but_keeps_serving(small_fs: Path) -> None:
    m = await TierManager.open(
        host_bytes=64 * NBYTES,
        disk_url=str(small_fs / "disk"),
        disk_bytes=10_000 * NBYTES,
        write="write-through",
    )
    try:
        before, before_blocks = make_tokens(2, seed=1), make_blocks(2, seed=1)
        await m.save(NS, before, before_blocks)  # lands on disk while there is room
        assert (await m.lookup(NS, before)).tiers == ["host", "host"]
        assert m.disk is not None and len(m.disk.records) == 2
        fill(small_fs / "filler")

        during, during_blocks = make_tokens(3, seed=2), make_blocks(3, seed=2)
        result = await m.save(NS, during, during_blocks)
        assert result.stored == 3  # the host tier took them
        assert m.stats.errors["disk_full"] >= 1
        assert len(m.disk.records) == 2  # nothing half-written became visible
        got = await m.load(NS, during)
        assert torch.equal(as_bytes(got.kv()), as_bytes(during_blocks))

        (small_fs / "filler").unlink()
        assert await m.flush() == 3 * NBYTES  # the host-only blocks reach disk now
        assert len(m.disk.records) == 5
    finally:
        await m.close()

    again = await TierManager.open(
        host_bytes=64 * NBYTES, disk_url=str(small_fs / "disk"), disk_bytes=10_000 * NBYTES
    )
    try:
        for tokens, blocks in ((before, before_blocks), (during, during_blocks)):
            got = await again.load(NS, tokens)
            assert got.tiers == ["disk"] * len(blocks)
            assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))
    finally:
        await again.close()


@pytest.mark.parametrize("budget", [10_000, 20_000])
async def test_a_store_on_a_full_device_reopens_and_serves(small_fs: Path, budget: int) -> None:
    """A daemon that stopped on a full disk must start again on it: the compaction at open
    needs room it may not have, and the journal as it stands is enough. So does growing an
    array to a raised ``budget``: its blocks are read all the same."""
    disk = str(small_fs / "disk")
    m = await TierManager.open(
        host_bytes=64 * NBYTES, disk_url=disk, disk_bytes=10_000 * NBYTES, write="write-through"
    )
    tokens, blocks = make_tokens(2, seed=1), make_blocks(2, seed=1)
    await m.save(NS, tokens, blocks)
    await m.close()
    fill(small_fs / "filler")

    again = await TierManager.open(
        host_bytes=64 * NBYTES, disk_url=disk, disk_bytes=budget * NBYTES
    )
    try:
        got = await again.load(NS, tokens)
        assert got.tiers == ["disk", "disk"]
        assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))
    finally:
        await again.close()
    (small_fs / "filler").unlink()
    third = await TierManager.open(
        host_bytes=64 * NBYTES, disk_url=disk, disk_bytes=10_000 * NBYTES
    )
    try:
        assert (await third.lookup(NS, tokens)).blocks == 2
    finally:
        await third.close()


async def test_a_cache_closed_on_a_full_device_lets_go_of_its_store(small_fs: Path) -> None:
    """The journal records an evict could not write (``del``s) cannot be written at close
    either: the close says so and goes on, and the store opens again in this process (its
    lock let go), as the state a kill -9 would have left."""
    disk = str(small_fs / "disk")
    m = await TierManager.open(
        host_bytes=64 * NBYTES, disk_url=disk, disk_bytes=10_000 * NBYTES, write="write-through"
    )
    tokens, blocks = make_tokens(4, seed=1), make_blocks(4, seed=1)
    await m.save(NS, tokens, blocks)
    fill(small_fs / "filler")
    assert await m.evict(keys=NS.block_keys(tokens)[2:]) == 2  # their del records wait

    await m.close()

    again = await TierManager.open(
        host_bytes=64 * NBYTES, disk_url=disk, disk_bytes=10_000 * NBYTES
    )
    try:
        got = await again.load(NS, tokens)  # the evict never reached the journal
        assert got.tiers == ["disk"] * 4
        assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))
    finally:
        await again.close()
