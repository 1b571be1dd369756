"""The read path (tiercache/reads.py) over a real host arena, a real disk tier on a tmp dir and the
device tier's CPU twin: the out buffer's checks, which tier each block is read from, a failed
checksum ending the verified prefix, and the usage report."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, flip_byte, key, make_ns, row
from tiercache.errors import BlockShapeError
from tiercache.index import DEVICE, DISK, HOST, Entry
from tiercache.reads import output_rows, read_entries, usage
from tiercache.stats import Stats
from tiercache.tiers.device import DeviceTier
from tiercache.tiers.disk import DiskRecord, DiskTier
from tiercache.tiers.host import HostArena

NS = make_ns()


@dataclass
class Tiers:
    host: HostArena
    disk: DiskTier
    device: DeviceTier
    array: str

    def in_host(self, i: int, value: torch.Tensor | None = None) -> Entry:
        slot = self.host.allocate()
        self.host.view(slot, NBYTES).copy_(row(i) if value is None else value)
        return Entry(key(i), self.array, NBYTES, at={HOST: slot})

    async def in_disk(self, i: int) -> Entry:
        (rec,) = await self.disk.put_many(self.array, [(key(i), row(i))])
        assert isinstance(rec, DiskRecord)
        return Entry(key(i), self.array, NBYTES, rec.checksum, at={DISK: rec})

    async def in_device(self, e: Entry, value: torch.Tensor) -> None:
        src = value.reshape(1, NBYTES)
        assert (await self.device.put([e.key], src, [0])).stored == 1
        e.at[DEVICE] = True

    def corrupt(self, e: Entry) -> None:
        assert e.disk is not None
        path, offset = self.disk.location(e.disk)
        flip_byte(path, offset + 7)


@pytest.fixture
async def tiers(tmp_path: Path) -> AsyncIterator[Tiers]:
    host = HostArena(NBYTES, 8 * NBYTES, pin=False)
    disk = await DiskTier.open(str(tmp_path / "disk"), 8 * NBYTES)
    device = DeviceTier(4 * NBYTES, "cpu")
    device.format(NBYTES)
    yield Tiers(host, disk, device, await disk.register(NS))
    device.close()
    await disk.close()
    host.close()


def rows_of(*blocks: int) -> torch.Tensor:
    return torch.stack([row(i) for i in blocks])


# --- output_rows ---------------------------------------------------------------------------------


def test_without_an_out_buffer_a_new_one_of_n_rows_is_made() -> None:
    out = output_rows(None, 3, NBYTES, pin=False)
    assert (out.dtype, tuple(out.shape), out.is_pinned()) == (torch.uint8, (3, NBYTES), False)


def test_an_out_buffer_with_at_least_n_rows_of_the_block_size_is_used_as_is() -> None:
    out = torch.zeros((5, NBYTES), dtype=torch.uint8)
    assert output_rows(out, 3, NBYTES, pin=False) is out
    assert output_rows(out, 5, NBYTES, pin=False) is out


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (
            torch.zeros((3, NBYTES), dtype=torch.float32),
            f"out must be uint8 [>= 3, {NBYTES}], got torch.float32 [3, {NBYTES}]",
        ),
        (
            torch.zeros((3, NBYTES, 1), dtype=torch.uint8),
            f"out must be uint8 [>= 3, {NBYTES}], got torch.uint8 [3, {NBYTES}, 1]",
        ),
        (
            torch.zeros((2, NBYTES), dtype=torch.uint8),
            f"out must be uint8 [>= 3, {NBYTES}], got torch.uint8 [2, {NBYTES}]",
        ),
        (
            torch.zeros((3, NBYTES + 1), dtype=torch.uint8),
            f"out must be uint8 [>= 3, {NBYTES}], got torch.uint8 [3, {NBYTES + 1}]",
        ),
        (
            torch.zeros((3 * NBYTES,), dtype=torch.uint8),
            f"out must be uint8 [>= 3, {NBYTES}], got torch.uint8 [{3 * NBYTES}]",
        ),
    ],
    ids=["dtype", "3-d", "too-few-rows", "row-width", "1-d"],
)
def test_an_out_buffer_that_cannot_hold_the_blocks_is_refused_by_shape(
    out: torch.Tensor, message: str
) -> None:
    with pytest.raises(BlockShapeError) as err:
        output_rows(out, 3, NBYTES, pin=False)
    assert str(err.value) == message


# --- read_entries --------------------------------------------------------------------------------


async def test_each_block_is_read_from_its_fastest_tier(tiers: Tiers) -> None:
    on_device = tiers.in_host(0)
    # A device copy that differs from its host copy shows which one was read.
    await tiers.in_device(on_device, row(100))
    in_host = tiers.in_host(1)
    on_disk = await tiers.in_disk(2)
    on_both = await tiers.in_disk(3)
    on_both.at[HOST] = tiers.in_host(3, row(103)).at[HOST]
    entries = [on_device, in_host, on_disk, on_both]
    out = torch.zeros((4, NBYTES), dtype=torch.uint8)
    tiers_read, good, from_disk, failed = await read_entries(
        entries, out, tiers.device, tiers.host, tiers.disk, Stats()
    )
    assert tiers_read == ["device", "host", "disk", "host"]
    assert good == 4
    assert from_disk == [(2, on_disk)]
    assert failed == []
    assert torch.equal(out, rows_of(100, 1, 2, 103))


async def test_the_bytes_served_are_counted_per_tier(tiers: Tiers) -> None:
    on_device = tiers.in_host(0)
    await tiers.in_device(on_device, row(0))
    entries = [on_device, tiers.in_host(1), tiers.in_host(2), await tiers.in_disk(3)]
    stats = Stats()
    out = torch.zeros((4, NBYTES), dtype=torch.uint8)
    await read_entries(entries, out, tiers.device, tiers.host, tiers.disk, stats)
    assert stats.as_dict()["transfer_bytes"] == {
        "device->client": NBYTES,
        "host->client": 2 * NBYTES,
        "disk->client": NBYTES,
    }


async def test_host_blocks_need_no_disk_or_device_tier(tiers: Tiers) -> None:
    entries = [tiers.in_host(i) for i in range(3)]
    out = torch.zeros((3, NBYTES), dtype=torch.uint8)
    got = await read_entries(entries, out, None, tiers.host, None, Stats())
    assert got == (["host", "host", "host"], 3, [], [])
    assert torch.equal(out, rows_of(0, 1, 2))


async def test_rows_go_where_the_entries_are_in_a_larger_out_buffer(tiers: Tiers) -> None:
    entries = [await tiers.in_disk(0), tiers.in_host(1)]
    out = torch.zeros((3, NBYTES), dtype=torch.uint8)
    await read_entries(entries, out, None, tiers.host, tiers.disk, Stats())
    assert torch.equal(out[:2], rows_of(0, 1))
    assert not out[2].any()


async def test_a_disk_block_that_fails_its_checksum_ends_the_verified_prefix(tiers: Tiers) -> None:
    entries = [await tiers.in_disk(i) for i in range(4)]
    tiers.corrupt(entries[1])
    stats = Stats()
    out = torch.zeros((4, NBYTES), dtype=torch.uint8)
    tiers_read, good, from_disk, failed = await read_entries(
        entries, out, None, tiers.host, tiers.disk, stats
    )
    assert tiers_read == ["disk"] * 4
    assert good == 1
    rec = entries[1].disk
    assert failed == [(entries[1], rec)]
    # Blocks past the failure verified too, and are reported (the caller keeps only i < good).
    assert from_disk == [(0, entries[0]), (2, entries[2]), (3, entries[3])]
    assert stats.as_dict()["transfer_bytes"] == {"disk->client": NBYTES}  # only the served one
    assert torch.equal(out[0], row(0))


async def test_the_first_of_several_failed_blocks_sets_the_prefix(tiers: Tiers) -> None:
    entries = [tiers.in_host(0), *[await tiers.in_disk(i) for i in range(1, 5)]]
    tiers.corrupt(entries[4])
    tiers.corrupt(entries[2])
    _, good, _, failed = await read_entries(
        entries, torch.zeros((5, NBYTES), dtype=torch.uint8), None, tiers.host, tiers.disk, Stats()
    )
    assert good == 2
    assert [e.key for e, _ in failed] == [key(2), key(4)]


async def test_no_entries_read_nothing(tiers: Tiers) -> None:
    out = torch.zeros((0, NBYTES), dtype=torch.uint8)
    stats = Stats()
    assert await read_entries([], out, tiers.device, tiers.host, tiers.disk, stats) == (
        [],
        0,
        [],
        [],
    )
    assert stats.transfer_bytes == {}


# --- usage ---------------------------------------------------------------------------------------


async def test_usage_reports_each_tier_present(tiers: Tiers) -> None:
    e = tiers.in_host(0)
    await tiers.in_device(e, row(0))
    tiers.in_host(1)
    await tiers.in_disk(2)
    assert usage(tiers.device, tiers.host, tiers.disk) == {
        "device": {"capacity_bytes": 4 * NBYTES, "used_bytes": NBYTES, "blocks": 1},
        "host": {"capacity_bytes": 8 * NBYTES, "used_bytes": 2 * NBYTES, "blocks": 2},
        "disk": {"capacity_bytes": 8 * NBYTES, "used_bytes": NBYTES, "blocks": 1},
    }


def test_usage_without_device_or_disk_reports_the_host_tier_only() -> None:
    host = HostArena(NBYTES, 3 * NBYTES + 10, pin=False)
    try:
        host.allocate()
        assert usage(None, host, None) == {
            "host": {"capacity_bytes": 3 * NBYTES, "used_bytes": NBYTES, "blocks": 1}
        }
    finally:
        host.close()
