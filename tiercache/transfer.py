"""Host <-> device copies on their own CUDA streams, awaited without blocking the event loop.

Every move between host memory and a device is queued on one of two streams per device:
``store`` (host -> device: promoting blocks into the device tier) and ``load`` (device ->
host: serving them), so a prefetch's stores never queue behind a load, nor a load behind a
long prefetch. The caller's coroutine then awaits a CUDA event recorded behind the copy by
polling ``event.query()`` with a short, growing sleep on the loop (50 us, doubling to 2 ms):
nothing blocks the loop, and nothing extra runs while it waits.

Rejected: a helper thread per copy that calls ``event.synchronize()`` and resolves a future
with ``call_soon_threadsafe``. It wakes the loop exactly once, but costs a thread hop per
copy and keeps a thread blocked in the driver for the whole copy; at the copy sizes here
(a prefix is milliseconds of DMA) the poll's added latency is at most one 2 ms step.

On the CPU (``device`` ``cpu``: the twin that CI runs) there are no streams: the copy runs in
a worker thread (``asyncio.to_thread``; torch releases the GIL while it copies), so the loop
runs other coroutines meanwhile exactly as it does while a GPU copies, and the tests of
concurrent loads and stores exercise the same interleavings.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Literal, TypeVar

import torch

POLL_FIRST = 50e-6  # seconds before the first event.query() after queueing a copy
POLL_MAX = 2e-3  # the longest sleep between two queries

Direction = Literal["store", "load"]
T = TypeVar("T")


async def completion(event: torch.cuda.Event) -> None:
    """Return once ``event`` (recorded on some stream) has completed; never blocks the loop.
    Cancelled meanwhile, it still waits for the event, then raises the cancel: the copy runs
    on regardless, and what the caller does next (free the slots it copies) must come after."""
    delay = POLL_FIRST
    cancel: asyncio.CancelledError | None = None
    while not event.query():  # type: ignore[no-untyped-call]
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError as e:
            cancel = e
        delay = min(2 * delay, POLL_MAX)
    if cancel is not None:
        raise cancel


async def outlast_cancel(work: asyncio.Future[T]) -> T:
    """``work``'s result; cancelled meanwhile, wait for ``work`` to end (a copy in a thread
    cannot be stopped), then raise the cancel: what the caller does on it (free the slots or
    reuse the tensors ``work`` writes into) must come after."""
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        while not work.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([work])
        if not work.cancelled():
            work.exception()  # retrieved: the cancel is what the caller hears
        raise


async def in_thread(copy: Callable[[], None]) -> None:
    """Run ``copy`` in a worker thread and return once it has ended (``outlast_cancel``)."""
    await outlast_cancel(asyncio.ensure_future(asyncio.to_thread(copy)))


class CopyStreams:
    """The two copy streams of one device (none on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._streams: dict[Direction, torch.cuda.Stream] = {}
        if device.type == "cuda":
            self._streams = {
                "store": torch.cuda.Stream(device),  # type: ignore[no-untyped-call]
                "load": torch.cuda.Stream(device),  # type: ignore[no-untyped-call]
            }

    def stream(self, direction: Direction) -> torch.cuda.Stream | None:
        return self._streams.get(direction)

    async def run(self, direction: Direction, copy: Callable[[], None]) -> None:
        """Queue ``copy`` (tensor ``copy_`` calls, ``non_blocking``) on the ``direction`` stream
        and return when it has completed."""
        stream = self._streams.get(direction)
        if stream is None:
            await in_thread(copy)
            return
        with torch.cuda.stream(stream):
            copy()
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(stream)
        await completion(done)

    def synchronize(self) -> None:
        """Block until both streams are idle (at close, when nothing else is running)."""
        for stream in self._streams.values():
            stream.synchronize()
