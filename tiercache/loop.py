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
        seconds it is cancelled, and TimeoutError raised once the task has ended (a copy it
        runs in a thread ends first: nothing it writes lands after the caller hears of it;
        a task the busy loop never started ends at once)."""
        ended = threading.Event()
        tasks: list[asyncio.Task[T]] = []

        def start() -> None:
            task = self.loop.create_task(coro)
            task.add_done_callback(lambda _: ended.set())
            tasks.append(task)

        self.loop.call_soon_threadsafe(start)
        if not ended.wait(timeout):
            self.loop.call_soon_threadsafe(lambda: tasks[0].cancel())  # after start(): FIFO
            ended.wait()
            if tasks[0].cancelled():
                raise TimeoutError(f"no answer within {timeout:g} s")
        return tasks[0].result()  # done: its own outcome

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
