"""The shared tier's two background jobs: uploads (write-behind) and fills (read-through).

Network I/O is never awaited under the cache lock nor without a deadline.

- **Uploads.** A block worth sharing (its N-th sighting: a save, then each save or read
  that meets it; or any block of a pinned session) is queued on a bounded queue; one
  background task takes batches, copies their bytes out of host memory under the lock (or
  reads and verifies them from disk under a lease), and PUTs them outside it. A failure
  marks the store down and puts the blocks back in the queue; while it is down the next
  upload is the health probe. A block is believed stored once uploaded (or fetched), but
  only for ``recheck_seconds``: retention or an operator may delete its object, so a
  sighting after that queues it again, and the uploader asks the store (one HEAD) whether
  the whole object is still there; one that is gone or cut short is uploaded again.
- **Fills.** ``lookup``, ``load`` and ``acquire`` that miss locally start a fill: a
  background task that fetches the missing blocks in chain order (the first alone, then
  windows in parallel; it stops at the first absent block) and adopts each verified one
  into host memory. The caller waits for the fill at most the tier's ``timeout``, then
  answers with what has arrived; the fill goes on, so a later request finds the rest
  locally. After a fill outlives the deadline, callers stop waiting (they still start
  fills) until one finishes in time; while the store is down they do not ask it at all.
  So a slow store costs one lookup one deadline, and a dead one costs nothing. At most
  ``MAX_FILLS`` fills run at once (each up to ``FETCH_WINDOW`` requests): a miss past them
  starts none, so a burst of lookups against a slow store does not pile up requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from tiercache.index import DISK, HOST, REMOTE, Entry, Index
from tiercache.keys import BlockKey, Namespace
from tiercache.lock import CacheLock
from tiercache.policy.write import Admission
from tiercache.room import DiskRoom, HostRoom
from tiercache.stats import Stats
from tiercache.tiers.disk import DiskRecord
from tiercache.tiers.remote import CorruptObject, RemoteTier, UploadQueue

log = logging.getLogger(__name__)

UPLOAD_BATCH = 16  # blocks in flight to the shared tier at once
FETCH_WINDOW = 32  # blocks a fill asks the shared tier for at once
MAX_FILLS = 8  # fills in flight at once; a miss past them is answered locally, unfilled


@dataclass(frozen=True, slots=True)
class Sharing:
    """Which blocks go to the shared tier, and how many may wait for it.

    ``admission``: a block goes out on its N-th sighting (its save, then each save or read
    that finds it); 0 shares only pinned sessions' blocks. ``pinned``: a pinned session's
    blocks go out whatever their count.
    """

    queue_blocks: int = 4096
    admission: int = 1
    pinned: bool = True
    drain_seconds: float = 10.0  # how long close() keeps uploading what is queued
    recheck_seconds: float = 600.0  # how long an upload (or fetch) is believed still stored


class SharedTier:
    def __init__(
        self,
        remote: RemoteTier,
        sharing: Sharing,
        index: Index,
        lock: CacheLock,
        host: HostRoom,
        disk: DiskRoom | None,
        stats: Stats,
        namespaces: dict[str, Namespace],
        ensure_format: Callable[[int], None],
    ) -> None:
        self.remote = remote
        self.sharing = sharing
        self._index = index
        self._lock = lock
        self._host = host
        self._disk = disk
        self._stats = stats
        self._namespaces = namespaces  # array path -> namespace registered here
        self._ensure_format = ensure_format
        self.uploads = UploadQueue(sharing.queue_blocks)
        self._admission = Admission(max(1, sharing.admission))
        self._uploader: asyncio.Task[None] | None = None
        self._upload_done = asyncio.Event()  # set after every upload batch (drain waits on it)
        # Fills in flight, by the first key they fetch -> (task, keys adopted so far).
        self._fills: dict[BlockKey, tuple[asyncio.Task[None], set[BlockKey]]] = {}
        self._slow = False  # a fill outlived the deadline: callers do not wait
        self._closed = False
        self._prober: asyncio.Task[None] | None = None
        remote.on_down = self._watch
        if not remote.up:  # unreachable at open
            self._watch()
        self.fills_skipped = 0  # misses that started no fill: MAX_FILLS were in flight
        self.found_gone = 0  # blocks believed stored whose object was gone: uploaded again

    # -- uploads --------------------------------------------------------------

    def sighted(self, e: Entry) -> None:
        """A save or a read met ``e``: queue it once it is worth sharing (or, believed stored
        for ``recheck_seconds``, to ask the store whether it still is)."""
        if e.key in self.uploads or not self.sharing.admission:
            return
        if REMOTE in e.at:
            if self._stale(e):
                self._share(e)
        elif self._admission.admit(e.key) and not self._share(e):
            self._admission.refund(e.key)  # refused (a full queue): its next sighting goes

    def saved(self, entries: list[Entry], pinned: Iterable[BlockKey]) -> None:
        """A save committed ``entries``; ``pinned``: the keys of its session when pinned."""
        for e in entries:
            self.sighted(e)
        self.share_pinned(pinned)

    def share_pinned(self, keys: Iterable[BlockKey]) -> None:
        """A pinned session's blocks go out whatever their count."""
        if not self.sharing.pinned:
            return
        for k in keys:
            e = self._index.get(k)
            if e is not None and (REMOTE not in e.at or self._stale(e)):
                self._share(e)

    def _stale(self, e: Entry) -> bool:
        """Whether ``e`` was last known stored more than ``recheck_seconds`` ago."""
        known = e.at[REMOTE]
        return not isinstance(known, float) or (
            time.monotonic() - known >= self.sharing.recheck_seconds
        )

    def _share(self, e: Entry) -> bool:
        """Queue ``e`` for the uploader; False if it was refused (closed, or the queue full)."""
        if self._closed or not self.uploads.offer(e.key, e.array):
            return False
        if self._uploader is None or self._uploader.done():
            self._uploader = asyncio.create_task(self._upload_loop(), name="tiercache-upload")
        return True

    async def _upload_loop(self) -> None:
        remote = self.remote
        while True:
            await self.uploads.ready.wait()
            pause = remote.down_until - time.monotonic()
            if not remote.up and pause > 0:
                await asyncio.sleep(pause)  # the next upload is the health probe
            batch = self.uploads.take(UPLOAD_BATCH)
            try:
                await self._upload(batch)
            except asyncio.CancelledError:
                self.uploads.put_back(batch)  # not uploaded: close() reports them with the rest
                raise
            except Exception as e:
                # Unforeseen (a bug, a disk read that raised): the batch goes back and the
                # store gets a backoff, as for a failed upload. Ending here would lose the
                # batch and leave uploads stopped until the next block is offered.
                log.exception("shared tier: an upload batch failed; it will be retried")
                self.uploads.put_back(batch)
                remote.failed(e)
                self._stats.error("remote_write")
            finally:
                self.uploads.done(len(batch))
                self._upload_done.set()

    async def _upload(self, batch: list[tuple[BlockKey, str]]) -> None:
        """PUT a batch of queued blocks; failures go back to the queue and mark the store down."""
        remote = self.remote
        await self._recheck(batch)
        t0 = time.perf_counter()
        sources = await self._sources(batch)

        async def one(e: Entry, data: torch.Tensor) -> None:
            ns = self._namespaces.get(e.array)
            if ns is not None:
                await remote.ensure_namespace(ns)
            await remote.put(e.array, e.key, data)

        results = await asyncio.gather(
            *(one(e, data) for e, _, data in sources), return_exceptions=True
        )
        retry: list[tuple[BlockKey, str]] = []
        moved: dict[str, int] = {}
        for (e, src, _), res in zip(sources, results, strict=True):
            if isinstance(res, BaseException):
                retry.append((e.key, e.array))
                if not isinstance(res, asyncio.CancelledError):
                    remote.failed(res)
                    self._stats.error("remote_write")
            else:
                e.at[REMOTE] = time.monotonic()
                self.uploads.uploaded += 1
                moved[src] = moved.get(src, 0) + e.nbytes
        for src, nbytes in moved.items():
            self._stats.transfer(src, REMOTE, nbytes, time.perf_counter() - t0)
        if retry:
            log.warning(
                "shared tier: %d uploads failed, will retry: %s", len(retry), remote.last_error
            )
            self.uploads.put_back(retry)

    async def _recheck(self, batch: list[tuple[BlockKey, str]]) -> None:
        """Ask the store for the queued blocks believed stored (their belief is stale): one
        still whole there is believed for another ``recheck_seconds``; one gone or cut short
        loses the belief, so ``_sources`` takes its bytes and it is uploaded again. One the
        store did not answer for keeps its stale belief: its next sighting asks again."""
        stale = [
            e for key, _ in batch if (e := self._index.get(key)) is not None and REMOTE in e.at
        ]
        if not stale:
            return
        results = await asyncio.gather(
            *(self.remote.stored(e.array, e.key, e.nbytes) for e in stale), return_exceptions=True
        )
        now, gone = time.monotonic(), 0
        for e, res in zip(stale, results, strict=True):
            if isinstance(res, BaseException):
                if not isinstance(res, asyncio.CancelledError):
                    self.remote.failed(res)
                    self._stats.error("remote_read")
            elif res:
                e.at[REMOTE] = now
            elif REMOTE in e.at:
                del e.at[REMOTE]
                gone += 1
        if gone:
            self.found_gone += gone
            log.warning(
                "shared tier: %d blocks this daemon stored are gone from %s (retention, or "
                "deleted); uploading them again",
                gone,
                self.remote.url,
            )

    async def _sources(
        self, batch: list[tuple[BlockKey, str]]
    ) -> list[tuple[Entry, str, torch.Tensor]]:
        """The bytes of queued blocks: copied out of host memory under the lock, or read (and
        verified) from disk under a lease. A block no longer cached is dropped and counted."""
        out: list[tuple[Entry, str, torch.Tensor]] = []
        from_disk: list[tuple[Entry, DiskRecord]] = []
        async with self._lock:
            for key, _ in batch:
                e = self._index.get(key)
                if e is None:
                    self.uploads.dropped["evicted"] += 1
                elif REMOTE in e.at:
                    continue
                elif (slot := e.host_slot) is not None:
                    out.append((e, HOST, self._host.arena.view(slot, e.nbytes).clone()))
                elif (rec := e.disk) is not None:
                    from_disk.append((e, rec))
            self._index.lease(e for e, _ in from_disk)
        if from_disk:
            disk = self._disk
            assert disk is not None
            bufs = [torch.empty(e.nbytes, dtype=torch.uint8) for e, _ in from_disk]
            oks = [False] * len(from_disk)
            try:
                oks = await disk.disk.get_many([rec for _, rec in from_disk], bufs)
            finally:
                async with self._lock:
                    self._index.unlease(e for e, _ in from_disk)
                    disk.forget_corrupt([j for j, ok in zip(from_disk, oks, strict=True) if not ok])
            out += [(e, DISK, b) for (e, _), b, ok in zip(from_disk, bufs, oks, strict=True) if ok]
            if not all(oks):
                self.uploads.dropped["corrupt"] += oks.count(False)
        return out

    async def drain(self, seconds: float) -> int:
        """Wait until the write-behind queue is empty (or ``seconds``); returns what is left."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while len(self.uploads) or self.uploads.in_flight:
                    self._upload_done.clear()
                    await self._upload_done.wait()
        return len(self.uploads) + self.uploads.in_flight

    # -- health ---------------------------------------------------------------

    def _watch(self) -> None:
        """The store went down: probe it after each backoff until it answers, also when
        nothing is queued or fetched (``up`` feeds ``stats``, the metrics and their alert)."""
        if self._closed or (self._prober is not None and not self._prober.done()):
            return
        self._prober = asyncio.get_running_loop().create_task(
            self._probe_loop(), name="tiercache-probe"
        )

    async def _probe_loop(self) -> None:
        remote = self.remote
        while not remote.up:
            await asyncio.sleep(max(0.0, remote.down_until - time.monotonic()))
            if remote.up or not remote.available():  # an upload or a fill asked it meanwhile
                continue
            try:
                await remote.probe()
            except Exception as e:
                remote.failed(e)

    # -- fills ----------------------------------------------------------------

    async def fill(
        self, array: str, nbytes: int, keys: list[BlockKey], start: int
    ) -> set[BlockKey]:
        """Fetch ``keys[start:]`` into host memory (see the module doc): waits for the fill at
        most the tier's timeout; returns the keys it adopted so far."""
        remote = self.remote
        if start >= len(keys) or not remote.available():
            return set()
        first = keys[start]
        fill = self._fills.get(first)
        if fill is None:
            if len(self._fills) >= MAX_FILLS:
                self.fills_skipped += 1
                return set()
            got: set[BlockKey] = set()
            task = asyncio.create_task(
                self._fetch(array, nbytes, keys[start:], got), name="tiercache-fill"
            )
            fill = self._fills[first] = (task, got)
            started = time.monotonic()
            task.add_done_callback(lambda t: self._fill_done(first, t, started))
        task, got = fill
        if not self._slow:
            done, _ = await asyncio.wait({task}, timeout=remote.timeout)
            if not done:
                self._slow = True
                self._stats.error("remote_timeout")
        return set(got)

    def _fill_done(self, first: BlockKey, task: asyncio.Task[None], started: float) -> None:
        if self._fills.get(first, (None,))[0] is task:
            del self._fills[first]
        if task.cancelled():
            return
        if (err := task.exception()) is not None:
            log.warning("shared tier fill failed: %s", err)
        elif self.remote.up and time.monotonic() - started <= self.remote.timeout:
            # The store answered a whole fill in time: wait for it again. A fill that merely
            # finished late does not: a store slower than the deadline would cost every lookup.
            self._slow = False

    async def _fetch(
        self, array: str, nbytes: int, keys: list[BlockKey], got: set[BlockKey]
    ) -> None:
        """The fill task: fetch blocks in chain order, adopt the verified ones, stop at the
        first block that is absent, corrupt, unreadable or finds no host room."""
        remote = self.remote
        i, window = 0, 1
        while i < len(keys) and not self._closed:
            chunk = keys[i : i + window]
            t0 = time.perf_counter()
            results = await asyncio.gather(
                *(self._fetch_one(array, k, nbytes) for k in chunk), return_exceptions=True
            )
            good: list[tuple[BlockKey, tuple[np.ndarray, bytes] | None]] = []
            for k, res in zip(chunk, results, strict=True):
                if isinstance(res, CorruptObject):
                    log.warning("%s; treated as a miss", res)
                    self._stats.corrupt()
                elif isinstance(res, BaseException):
                    remote.failed(res)
                    self._stats.error("remote_read")
                elif not isinstance(res, str):
                    good.append((k, res))
                    continue
                elif res == "local":
                    good.append((k, None))
                    continue
                break
            adopted, complete = await self._adopt(array, nbytes, good, got)
            if adopted:
                self._stats.transfer(REMOTE, HOST, adopted * nbytes, time.perf_counter() - t0)
            if len(good) < len(chunk) or not complete:
                return
            i += len(chunk)
            window = min(window * 4, FETCH_WINDOW)

    async def _fetch_one(
        self, array: str, key: BlockKey, nbytes: int
    ) -> tuple[np.ndarray, bytes] | str:
        """A block's verified bytes and checksum, or "local" (already here) or "absent"."""
        if key in self._index:
            return "local"
        got = await self.remote.get(array, key, nbytes)
        return "absent" if got is None else got

    async def _adopt(
        self,
        array: str,
        nbytes: int,
        blocks: list[tuple[BlockKey, tuple[np.ndarray, bytes] | None]],
        got: set[BlockKey],
    ) -> tuple[int, bool]:
        """Put fetched blocks into host slots and the index (visible from now). Returns how
        many were adopted, and whether all of ``blocks`` are now local."""
        adopted = 0
        async with self._lock:
            if self._closed or not blocks:
                return 0, not blocks
            self._ensure_format(nbytes)
            await self._host.make_room(sum(1 for k, _ in blocks if k not in self._index))
            now = time.monotonic()
            parent: BlockKey | None = None  # the blocks come in chain order
            for key, fetched in blocks:
                parent, up = key, parent
                if key in self._index or fetched is None:
                    continue
                slot = await self._host.slot_or_none()
                if slot is None:
                    return adopted, False
                data, csum = fetched
                np.copyto(self._host.arena.view(slot, nbytes).numpy(), data)
                e = Entry(key, array, nbytes, csum, at={REMOTE: now}, last_use=now)
                self._index.add(e)
                self._host.place(e, slot, up)
                got.add(key)
                adopted += 1
        return adopted, True

    def state(self) -> dict[str, object]:
        """The shared tier's state for ``stats``: health, queue, uploads, losses."""
        return {
            **self.remote.state(),
            "queue_blocks": len(self.uploads) + self.uploads.in_flight,  # what the bound counts
            "queue_bound": self.uploads.bound,
            "uploaded_blocks": self.uploads.uploaded,
            "dropped_blocks": dict(self.uploads.dropped),
            "admission": self.sharing.admission,
            "fills_in_flight": len(self._fills),
            "fills_skipped": self.fills_skipped,
            "found_gone_blocks": self.found_gone,
        }

    async def upload_queued(self) -> None:
        """Upload what is queued, for at most ``drain_seconds`` (a shutdown's drain)."""
        if self.remote.available():
            await self.drain(self.sharing.drain_seconds)

    async def close(self, drain: bool) -> None:
        """Upload what is queued (``upload_queued``, when ``drain``), then stop."""
        if drain:
            await self.upload_queued()
        self._closed = True
        tasks = [t for t, _ in self._fills.values()]
        tasks += [t for t in (self._uploader, self._prober) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if len(self.uploads):
            self.uploads.dropped["shutdown"] += len(self.uploads)
            log.warning("shared tier: %d queued blocks not uploaded at close", len(self.uploads))
