"""The one transaction every caller runs, in rounds: the embedded cache, the socket client
and the attached-engine path all save and read through these two loops.

- **Save**: reserve host slots for the blocks the cache lacks, fill them, commit (or abort
  if the fill failed). A reservation stops early when the host tier has no evictable room
  left (``walked`` says how far it got); the caller's committed blocks are then evictable,
  so the next round reserves the rest.
- **Read**: acquire a lease on the cached run (its blocks promoted to host memory, at most
  the host tier's slots at once), use it, release it, go on from where it ended while the
  cached run goes on (``prefix``: how long the run was from the lease's first block).

The steps are the caller's (a method call, a socket request, a CUDA copy); only the loop
is here, so a fix to it reaches every caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from tiercache.results import SaveResult


class Reserved(Protocol):
    @property
    def walked(self) -> int: ...  # blocks (from the round's first) the reservation covered


class Leased(Protocol):
    @property
    def tiers(self) -> list[str]: ...  # one per leased block

    @property
    def prefix(self) -> int: ...  # the cached run's length from the lease's first block


R = TypeVar("R", bound=Reserved)
L = TypeVar("L", bound=Leased)


_aborts: set[asyncio.Future[None]] = set()  # aborts running after their caller left


def abort_later(abort: Awaitable[None]) -> asyncio.Future[None]:
    """Run ``abort`` to its end although whoever started the save was cancelled (a cancel
    must not wait on the cache's lock, nor leave the reserved slots taken)."""
    task = asyncio.ensure_future(abort)
    _aborts.add(task)
    task.add_done_callback(_aborts.discard)
    return task


async def save_rounds(
    count: int,
    reserve: Callable[[int, int], Awaitable[R]],
    fill: Callable[[R, int], Awaitable[None]],
    commit: Callable[[R], Awaitable[SaveResult]],
    abort: Callable[[R], Awaitable[None]],
) -> SaveResult:
    """Save ``count`` blocks: ``reserve(done, left)`` the next round, ``fill(r, done)`` its
    slots, ``commit(r)``; ``abort(r)`` when the fill or the commit raised (``commit`` must
    leave nothing to abort once it made the blocks visible).

    A ``reserve`` that is cancelled must leave nothing reserved: the manager's frees what
    it took; the socket client gives back a reservation that lands after its caller left
    (``AsyncClient.request``'s ``undo``)."""
    total = SaveResult(0, 0, 0)
    done = 0
    while done < count:
        r = await reserve(done, count - done)
        try:
            await fill(r, done)
            total += await commit(r)
        except asyncio.CancelledError:
            abort_later(abort(r))
            raise
        except BaseException:
            await abort(r)
            raise
        if not r.walked:
            break
        done += r.walked
    return total


async def lease_rounds(
    max_blocks: int | None,
    acquire: Callable[[int, int | None], Awaitable[L]],
    use: Callable[[L, int], Awaitable[list[str]]],
    release: Callable[[L], Awaitable[None]],
) -> list[str]:
    """Read the cached run (at most ``max_blocks``): ``acquire(done, left)`` the next lease,
    ``use(lease, done)`` it (returns where its blocks were read from), ``release(lease)``
    (also when ``use`` raised, and to its end when the caller is cancelled). Returns the
    tiers of every block served."""
    tiers: list[str] = []
    while max_blocks is None or len(tiers) < max_blocks:
        left = None if max_blocks is None else max_blocks - len(tiers)
        lease = await acquire(len(tiers), left)
        try:
            got = await use(lease, len(tiers)) if lease.tiers else []
        finally:
            # To its end, although the caller is cancelled meanwhile (a timeout while the
            # release waits its turn behind another request): a release cut short left the
            # blocks leased, unevictable, for as long as the client stayed connected.
            await asyncio.shield(abort_later(release(lease)))
        tiers += got
        if not got or len(got) >= lease.prefix:
            break
    return tiers
