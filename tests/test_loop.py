"""The event loop on a thread of its own that the blocking facades run the async core on."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tiercache.loop import LoopThread


def test_run_returns_the_coroutines_result_computed_on_the_loops_own_thread() -> None:
    lt = LoopThread("test-loop")
    try:

        async def where() -> tuple[str, bool]:
            await asyncio.sleep(0)
            return threading.current_thread().name, asyncio.get_running_loop() is lt.loop

        name, same_loop = lt.run(where())
        assert name == "test-loop"
        assert same_loop
        assert threading.current_thread().name != "test-loop"
    finally:
        lt.stop()


def test_run_raises_the_coroutines_exception_in_the_caller_and_the_loop_keeps_serving() -> None:
    lt = LoopThread("test-loop")
    try:

        async def boom() -> None:
            raise KeyError("nope")

        with pytest.raises(KeyError, match="nope"):
            lt.run(boom())

        async def fine() -> int:
            return 7

        assert lt.run(fine()) == 7
    finally:
        lt.stop()


def test_state_kept_on_the_loop_survives_between_runs() -> None:
    lt = LoopThread("test-loop")
    try:

        async def make_queue() -> asyncio.Queue[int]:
            return asyncio.Queue()

        q = lt.run(make_queue())
        lt.run(q.put(1))
        lt.run(q.put(2))
        assert lt.run(q.get()) == 1
        assert lt.run(q.get()) == 2
    finally:
        lt.stop()


def test_stop_ends_the_thread_and_closes_the_loop() -> None:
    lt = LoopThread("test-loop-stop")
    lt.stop()
    assert lt.loop.is_closed()
    assert not any(t.name == "test-loop-stop" for t in threading.enumerate())


def test_a_run_past_its_timeout_is_cancelled_and_raises_once_the_coroutine_has_ended() -> None:
    lt = LoopThread("test-loop")
    ended: list[str] = []
    try:

        async def slow() -> None:
            try:
                await asyncio.sleep(30)
            finally:
                ended.append("cleaned up")  # before the caller hears of the timeout

        with pytest.raises(TimeoutError, match=r"no answer within 0\.1 s"):
            lt.run(slow(), timeout=0.1)
        assert ended == ["cleaned up"]
        assert lt.run(asyncio.sleep(0, "still serving"), timeout=5) == "still serving"
    finally:
        lt.stop()


def test_a_run_the_busy_loop_never_started_times_out_instead_of_waiting_for_ever() -> None:
    lt = LoopThread("test-loop")
    ran: list[bool] = []
    go = threading.Event()
    try:
        lt.loop.call_soon_threadsafe(go.wait, 1)  # the loop is busy past the timeout

        async def body() -> None:
            ran.append(True)

        with pytest.raises(TimeoutError):
            lt.run(body(), timeout=0.1)
        go.set()
        assert ran == []  # cancelled before it ever ran
    finally:
        go.set()
        lt.stop()
