"""An event loop on a thread of its own: how the blocking facades (``SyncCache``, ``Client``)
run the async core for synchronous callers (notebooks, a transformers ``generate`` loop)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (or exception). Past ``timeout``
        seconds it is cancelled, and TimeoutError raised once it has ended (a copy it runs
        in a thread ends first: nothing it writes lands after the caller hears of it)."""
        ended = threading.Event()
        future = asyncio.run_coroutine_threadsafe(_ending(coro, ended), self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done():  # finished in between: its own outcome
                return future.result()
            future.cancel()
            ended.wait()
            raise TimeoutError(f"no answer within {timeout:g} s") from None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _ending(coro: Coroutine[Any, Any, T], ended: threading.Event) -> T:
    try:
        return await coro
    finally:
        ended.set()
