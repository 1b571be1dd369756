"""The one transaction loop (tiercache/transaction.py): save rounds (reserve, fill, commit or abort)
and read rounds (acquire, use, release), driven here by a scripted cache whose steps log what
the loop asked of them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from tiercache.results import SaveResult
from tiercache.transaction import lease_rounds, save_rounds


@dataclass
class Round:
    walked: int
    present: int = 0
    rejected: int = 0


@dataclass
class Saver:
    """A cache whose host tier takes at most ``room`` blocks a round (``room`` 0: pinned full)."""

    room: list[int]
    fail_at: int | None = None  # the round whose fill raises
    log: list[str] = field(default_factory=list)

    async def reserve(self, done: int, left: int) -> Round:
        self.log.append(f"reserve {done} {left}")
        return Round(walked=min(self.room.pop(0), left))

    async def fill(self, r: Round, done: int) -> None:
        self.log.append(f"fill {done}+{r.walked}")
        if self.fail_at == done:
            raise OSError("copy failed")

    async def commit(self, r: Round) -> SaveResult:
        self.log.append(f"commit {r.walked}")
        return SaveResult(r.walked, 1, 0)

    async def abort(self, r: Round) -> None:
        self.log.append(f"abort {r.walked}")

    async def save(self, count: int) -> SaveResult:
        return await save_rounds(count, self.reserve, self.fill, self.commit, self.abort)


# --- save rounds ---------------------------------------------------------------------------------


async def test_a_save_that_fits_is_one_round() -> None:
    s = Saver(room=[8])
    assert await s.save(5) == SaveResult(5, 1, 0)
    assert s.log == ["reserve 0 5", "fill 0+5", "commit 5"]


async def test_a_save_goes_on_in_rounds_from_where_each_reservation_stopped() -> None:
    s = Saver(room=[2, 2, 2])
    assert await s.save(5) == SaveResult(5, 3, 0)
    assert s.log == [
        "reserve 0 5",
        "fill 0+2",
        "commit 2",
        "reserve 2 3",
        "fill 2+2",
        "commit 2",
        "reserve 4 1",
        "fill 4+1",
        "commit 1",
    ]


async def test_a_round_that_walked_nothing_is_committed_and_ends_the_save() -> None:
    s = Saver(room=[2, 0, 9])  # the host tier fills up with pinned blocks after one round
    assert await s.save(5) == SaveResult(2, 2, 0)
    assert s.log == ["reserve 0 5", "fill 0+2", "commit 2", "reserve 2 3", "fill 2+0", "commit 0"]


async def test_a_save_of_no_blocks_reserves_nothing() -> None:
    s = Saver(room=[])
    assert await s.save(0) == SaveResult(0, 0, 0)
    assert s.log == []


async def test_a_failed_fill_aborts_its_round_keeps_the_committed_ones_and_raises() -> None:
    s = Saver(room=[2, 2, 2], fail_at=2)
    with pytest.raises(OSError, match=r"^copy failed$"):
        await s.save(5)
    assert s.log == ["reserve 0 5", "fill 0+2", "commit 2", "reserve 2 3", "fill 2+2", "abort 2"]


async def test_a_save_cancelled_during_its_fill_aborts_the_round() -> None:
    s = Saver(room=[4])
    filling = asyncio.Event()

    async def fill(r: Round, done: int) -> None:
        s.log.append("fill")
        filling.set()
        await asyncio.sleep(10)

    task = asyncio.create_task(save_rounds(4, s.reserve, fill, s.commit, s.abort))
    await filling.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s.log == ["reserve 0 4", "fill", "abort 4"]


# --- read rounds ---------------------------------------------------------------------------------


@dataclass
class Held:
    tiers: list[str]
    prefix: int


@dataclass
class Reader:
    """A cache with a cached run of ``run`` blocks that leases at most ``window`` at once."""

    run: int
    window: int
    served: list[int] | None = None  # blocks each use serves (default: all it leased)
    fail_at: int | None = None
    log: list[str] = field(default_factory=list)

    async def acquire(self, done: int, left: int | None) -> Held:
        self.log.append(f"acquire {done} {left}")
        n = min(self.window, self.run - done, self.run if left is None else left)
        return Held(["host"] * n, prefix=self.run - done)

    async def use(self, lease: Held, done: int) -> list[str]:
        self.log.append(f"use {done}+{len(lease.tiers)}")
        if self.fail_at == done:
            raise OSError("copy failed")
        n = self.served.pop(0) if self.served else len(lease.tiers)
        return lease.tiers[:n]

    async def release(self, lease: Held) -> None:
        self.log.append(f"release {len(lease.tiers)}")

    async def read(self, max_blocks: int | None) -> list[str]:
        return await lease_rounds(max_blocks, self.acquire, self.use, self.release)


async def test_a_run_that_fits_the_window_is_one_round() -> None:
    r = Reader(run=3, window=8)
    assert await r.read(None) == ["host"] * 3
    assert r.log == ["acquire 0 None", "use 0+3", "release 3"]


async def test_a_run_longer_than_the_window_is_read_in_rounds_to_its_end() -> None:
    r = Reader(run=5, window=2)
    assert await r.read(None) == ["host"] * 5
    assert r.log == [
        "acquire 0 None",
        "use 0+2",
        "release 2",
        "acquire 2 None",
        "use 2+2",
        "release 2",
        "acquire 4 None",
        "use 4+1",
        "release 1",
    ]


async def test_max_blocks_caps_the_read_and_each_round_asks_for_what_is_left() -> None:
    r = Reader(run=9, window=2)
    assert await r.read(3) == ["host"] * 3
    assert r.log == ["acquire 0 3", "use 0+2", "release 2", "acquire 2 1", "use 2+1", "release 1"]


async def test_an_empty_lease_is_released_without_use_and_ends_the_read() -> None:
    r = Reader(run=0, window=4)
    assert await r.read(None) == []
    assert r.log == ["acquire 0 None", "release 0"]


async def test_a_read_of_no_blocks_acquires_nothing() -> None:
    r = Reader(run=5, window=4)
    assert await r.read(0) == []
    assert r.log == []


async def test_a_round_that_serves_nothing_ends_the_read() -> None:
    r = Reader(run=6, window=2, served=[2, 0, 2])  # the second round's first block fails
    assert await r.read(None) == ["host"] * 2
    assert r.log == [
        "acquire 0 None",
        "use 0+2",
        "release 2",
        "acquire 2 None",
        "use 2+2",
        "release 2",
    ]


async def test_a_partly_served_round_goes_on_from_the_last_block_served() -> None:
    r = Reader(run=4, window=2, served=[1, 2, 1])
    assert await r.read(None) == ["host"] * 4
    assert r.log == [
        "acquire 0 None",
        "use 0+2",
        "release 2",
        "acquire 1 None",
        "use 1+2",
        "release 2",
        "acquire 3 None",
        "use 3+1",
        "release 1",
    ]


async def test_a_failed_use_still_releases_its_lease_and_raises() -> None:
    r = Reader(run=5, window=2, fail_at=2)
    with pytest.raises(OSError, match=r"^copy failed$"):
        await r.read(None)
    assert r.log == [
        "acquire 0 None",
        "use 0+2",
        "release 2",
        "acquire 2 None",
        "use 2+2",
        "release 2",
    ]


async def test_the_tiers_of_every_round_are_returned_in_order() -> None:
    leases = iter([Held(["device", "host"], prefix=4), Held(["disk", "remote"], prefix=2)])

    async def acquire(done: int, left: int | None) -> Held:
        return next(leases)

    async def use(lease: Held, done: int) -> list[str]:
        return lease.tiers

    async def release(lease: Held) -> None:
        pass

    assert await lease_rounds(None, acquire, use, release) == ["device", "host", "disk", "remote"]
