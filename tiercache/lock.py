"""The cache lock: one asyncio lock serialises every change to the index and to the tiers'
allocation state (host slots, disk space, the policies' order, sessions, pins).

The rules, stated once here and checked where they can be:

- Held: every change to an ``Entry``'s locations, leases or the index; every slot or byte
  allocated or freed; every policy call. Functions that need it say "under the lock" and
  call ``held()`` first (an AssertionError names the function that forgot it).
- Not held: reads of block bytes from disk or the shared tier, and uploads to it. A read
  runs under a *lease* instead (a leased block is never evicted, so the slot or record
  under the read cannot be reused); ``free()`` checks this where such I/O starts.
- Writes to disk under the lock, in exactly two places, each saying why: the write-back of
  dirty host victims before their slots are reused (``tiercache.room``), and a
  write-through commit (``tiercache.saves``); ``flush`` holds it to write a consistent
  snapshot. Write-back (the default) keeps the common save path off the disk.

asyncio's own Lock does not know its owner; this one records the task that holds it, so
that the checks can tell "held by me" from "held by someone else".
"""

from __future__ import annotations

import asyncio
import sys
from types import TracebackType


class CacheLock:
    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[object] | None = None

    async def __aenter__(self) -> CacheLock:
        await self._lock.acquire()
        self._owner = asyncio.current_task()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._owner = None
        self._lock.release()

    def mine(self) -> bool:
        return self._owner is not None and self._owner is asyncio.current_task()

    def held(self) -> None:
        """Assert that the calling task holds the lock."""
        assert self.mine(), f"{_caller()} must run under the cache lock"

    def free(self) -> None:
        """Assert that the calling task does not hold the lock (before I/O that may block)."""
        assert not self.mine(), f"{_caller()}: block I/O must not run under the cache lock"


def _caller() -> str:
    """The function that called ``held`` or ``free``: the one that broke the rule."""
    return sys._getframe(2).f_code.co_qualname
