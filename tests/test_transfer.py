"""Host <-> device copies: on the CPU twin the copy runs off the loop, which stays free meanwhile."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from tiercache.transfer import CopyStreams, completion


def test_the_cpu_has_no_streams() -> None:
    streams = CopyStreams(torch.device("cpu"))
    assert streams.stream("store") is None
    assert streams.stream("load") is None
    streams.synchronize()  # nothing to wait for, and no CUDA call


async def test_a_cpu_copy_runs_off_the_loop_thread_and_is_done_when_run_returns() -> None:
    streams = CopyStreams(torch.device("cpu"))
    src = torch.arange(1024, dtype=torch.int32)
    dst = torch.zeros_like(src)
    threads: list[str] = []

    def copy() -> None:
        threads.append(threading.current_thread().name)
        dst.copy_(src)

    await streams.run("store", copy)
    assert torch.equal(dst, src)
    assert threads and threads[0] != threading.current_thread().name


async def test_the_loop_runs_other_coroutines_while_a_cpu_copy_is_in_progress() -> None:
    streams = CopyStreams(torch.device("cpu"))
    started, release = threading.Event(), threading.Event()
    ticks = 0

    def copy() -> None:
        started.set()
        assert release.wait(10)

    async def ticker() -> None:
        nonlocal ticks
        # Polled: the copy signals from its worker thread, with no event on the loop.
        while not started.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        for _ in range(5):
            ticks += 1
            await asyncio.sleep(0.001)
        release.set()

    await asyncio.wait_for(asyncio.gather(streams.run("load", copy), ticker()), 10)
    assert ticks == 5


async def test_an_exception_in_a_cpu_copy_reaches_the_caller() -> None:
    streams = CopyStreams(torch.device("cpu"))

    def copy() -> None:
        raise RuntimeError("copy failed")

    with pytest.raises(RuntimeError, match="copy failed"):
        await streams.run("store", copy)


async def test_a_cancelled_cpu_copy_is_waited_for_before_the_cancel_is_raised() -> None:
    # The worker thread copies on after a cancel: were the cancel raised at once, the caller
    # would free the slots it copies into (a device tier's put) while it still writes them.
    streams = CopyStreams(torch.device("cpu"))
    started, release = threading.Event(), threading.Event()

    def copy() -> None:
        started.set()
        assert release.wait(10)

    task = asyncio.create_task(streams.run("store", copy))
    while not started.is_set():  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    task.cancel()
    for _ in range(50):
        await asyncio.sleep(0)
    assert not task.done()  # still waiting for the copy
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task


class _ThreadEvent:
    """A stand-in for a CUDA event (this machine has none): ``query`` is all completion reads."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def query(self) -> bool:
        return self.done.is_set()


async def test_a_cancelled_wait_for_an_event_ends_only_when_the_event_has_completed() -> None:
    event = _ThreadEvent()
    task = asyncio.create_task(completion(event))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    task.cancel()
    for _ in range(50):
        await asyncio.sleep(0)
    assert not task.done()  # the copy behind the event is still running
    event.done.set()
    with pytest.raises(asyncio.CancelledError):
        await task
