"""The cache's counters (tiercache/stats.py), and request timing: one observation per request, by
the outermost timed operation, only when it succeeds."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from tiercache.stats import Stats, timed


@dataclass
class Recorder(Stats):
    """A ``Stats`` observer the way the Prometheus exporter is one: it overrides ``request``."""

    requests: list[tuple[str, float]] = field(default_factory=list)

    def request(self, op: str, seconds: float) -> None:
        self.requests.append((op, seconds))

    @property
    def ops(self) -> list[str]:
        return [op for op, _ in self.requests]


class Service:
    """An object with ``stats`` whose coroutine methods are timed, like ``TierManager``."""

    def __init__(self, recorder: Recorder) -> None:
        self.stats: Stats = recorder
        self.recorder = recorder

    @timed("load")
    async def load(self, n: int, *, fail: bool = False) -> int:
        """Load ``n`` blocks."""
        await asyncio.sleep(0)
        if fail:
            raise KeyError("missing")
        return n * 2

    @timed("acquire")
    async def acquire(self) -> int:
        return await self.load(3)  # a timed operation inside another: one request, not two


# --- counters -------------------------------------------------------------------------------------


def test_every_event_adds_to_its_counter() -> None:
    s = Stats()
    s.lookup("host", 3)
    s.lookup("host", 2)
    s.lookup("miss", 1)
    s.transfer("host", "disk", 512, 0.01)
    s.transfer("host", "disk", 512, None)  # counted even when the copy was not timed here
    s.transfer("disk", "host", 100, 0.02)
    s.evicted("host")
    s.evicted("disk", 4)
    s.prefetched("early", 0.5)
    s.prefetched("early")
    s.prefetched("noop")
    s.dropped()
    s.dropped(2)
    s.corrupt()
    s.corrupt(3)
    s.error("disk_full")
    s.error("disk_full")
    assert s.as_dict() == {
        "lookup_blocks": {"host": 5, "miss": 1},
        "transfer_bytes": {"host->disk": 1024, "disk->host": 100},
        "evictions": {"host": 1, "disk": 4},
        "prefetch": {"early": 2, "noop": 1},
        "errors": {"disk_full": 2},
        "corrupt_blocks": 4,
        "dropped_blocks": 3,
    }


def test_new_stats_are_all_zero() -> None:
    assert Stats().as_dict() == {
        "lookup_blocks": {},
        "transfer_bytes": {},
        "evictions": {},
        "prefetch": {},
        "errors": {},
        "corrupt_blocks": 0,
        "dropped_blocks": 0,
    }


def test_two_stats_share_no_counter() -> None:
    a, b = Stats(), Stats()
    a.lookup("host", 1)
    a.error("x")
    assert b.lookups == {} and b.errors == {}


# --- timing ---------------------------------------------------------------------------------------


async def test_a_request_is_observed_once_with_its_duration() -> None:
    s = Recorder()
    with s.timing("save"):
        await asyncio.sleep(0.02)
    assert s.ops == ["save"]
    assert 0.02 <= s.requests[0][1] < 1.0


def test_a_nested_request_is_observed_once_by_the_outermost() -> None:
    s = Recorder()
    with s.timing("socket"):
        with s.timing("lookup"):
            pass
        with s.timing("load"):
            pass
    assert s.ops == ["socket"]


def test_a_failed_request_is_not_observed_and_the_next_one_is() -> None:
    s = Recorder()
    with pytest.raises(KeyError), s.timing("load"):
        raise KeyError("missing")
    assert s.requests == []
    with s.timing("load"):
        pass
    assert s.ops == ["load"]


def test_a_failed_inner_request_leaves_the_outer_one_observed() -> None:
    s = Recorder()
    with s.timing("socket"):
        with pytest.raises(KeyError), s.timing("load"):
            raise KeyError("missing")
        with s.timing("lookup"):
            pass
    assert s.ops == ["socket"]


async def test_concurrent_requests_in_their_own_tasks_are_each_observed() -> None:
    s = Recorder()
    started = asyncio.Event()

    async def first() -> None:
        with s.timing("load"):
            started.set()
            await asyncio.sleep(0.01)

    async def second() -> None:
        await started.wait()  # begins while the first request is being timed
        with s.timing("save"):
            pass

    await asyncio.gather(first(), second())
    assert s.ops == ["save", "load"]


async def test_a_task_started_inside_a_request_is_part_of_that_request() -> None:
    s = Recorder()

    async def inner() -> None:
        with s.timing("lookup"):
            pass

    with s.timing("socket"):
        await asyncio.create_task(inner())
    assert s.ops == ["socket"]


def test_the_base_stats_ignore_request_timing() -> None:
    s = Stats()
    with s.timing("load"):
        pass
    assert s.as_dict() == Stats().as_dict()


# --- timed -----------------------------------------------------------------------------------------


async def test_a_timed_method_is_one_request_of_its_op_and_returns_its_result() -> None:
    svc = Service(Recorder())
    assert await svc.load(4) == 8
    assert await svc.load(1) == 2
    assert svc.recorder.ops == ["load", "load"]


async def test_a_timed_method_calling_another_is_one_request_of_the_outer_op() -> None:
    svc = Service(Recorder())
    assert await svc.acquire() == 6
    assert svc.recorder.ops == ["acquire"]


async def test_a_timed_method_that_raises_is_not_observed() -> None:
    svc = Service(Recorder())
    with pytest.raises(KeyError):
        await svc.load(1, fail=True)
    assert svc.recorder.requests == []


def test_a_timed_method_keeps_its_name_and_docstring() -> None:
    assert Service.load.__name__ == "load"
    assert Service.load.__doc__ == "Load ``n`` blocks."
