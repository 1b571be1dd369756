"""The tier manager: the whole cache in one process, composed of its rooms.

The daemon serves it over a socket and embedded mode (``tiercache.open_cache``) calls it
directly. Every public method is a coroutine so disk I/O never blocks the event loop;
``tiercache.SyncCache`` wraps them for synchronous callers.

It owns the index (``index.py``) and the lock (``lock.py``, where the locking rules are)
and composes the rest, one concept a module:

- ``room.py``: each tier's space and eviction order (host slots, disk bytes), write-back;
- ``promotion.py``: disk -> host -> device, prefetch and its lead time;
- ``sharing.py``: the shared tier's uploads and fills;
- ``sessions.py``: session names, pins, TTLs, their persistence;
- ``transaction.py``: the save and read rounds every caller runs; ``saves.py``: the host side
  of a save (reserve, commit, abort); ``reads.py``: one read.

Data flows host -> disk (write-through on save, write-back on host eviction or flush) and
disk -> host (promotion on load or prefetch); with a device tier, a prefetch also copies
its blocks host -> device and a load serves them from there. A block is served only from
a tier whose copy is complete: host copies are made before the entry becomes visible, disk
and shared-tier copies are verified by checksum on every read, and a copy that fails is
dropped and counted, never returned.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence

import torch

from tiercache.errors import BlockShapeError, CacheError
from tiercache.index import DEVICE, HOST, REMOTE, Entry, Index
from tiercache.keys import BlockKey, Namespace, Tokens, check_first_block, check_max_blocks, keys_of
from tiercache.lock import CacheLock
from tiercache.policy.base import make_policy
from tiercache.policy.write import Admission, WritePolicy, make_write_policy
from tiercache.promotion import Promoter
from tiercache.reads import load_rows, read_entries, usage
from tiercache.results import Lease, LoadResult, LookupResult, Reservation, SaveResult
from tiercache.room import DiskRoom, HostRoom, evict_keys
from tiercache.saves import HostSaves, fill_slots
from tiercache.sessions import Sessions
from tiercache.sharing import SharedTier, Sharing
from tiercache.spec import KVSpec
from tiercache.stats import Stats, timed
from tiercache.storage_format import store_rows
from tiercache.tiers.device import DeviceTier
from tiercache.tiers.disk import DiskTier
from tiercache.tiers.host import HostArena, slot_count
from tiercache.tiers.remote import RemoteOptions, RemoteTier
from tiercache.transaction import save_rounds

log = logging.getLogger(__name__)


class TierManager:
    def __init__(
        self,
        *,
        host_bytes: int,
        disk: DiskTier | None = None,
        slot_bytes: int | None = None,
        eviction: str = "lru",
        write: str | WritePolicy = "write-back",
        admission: int = 1,
        shared_host: bool = False,
        stats: Stats | None = None,
        remote: RemoteTier | None = None,
        sharing: Sharing | None = None,
        device: DeviceTier | None = None,
    ) -> None:
        make_policy(eviction, 1)  # reject a bad name before anything is allocated
        self.eviction = eviction
        self.write = make_write_policy(write) if isinstance(write, str) else write
        self.admission = Admission(admission)
        self.stats = stats or Stats()
        self.index = Index()
        self.namespaces: dict[str, Namespace] = {}  # array path -> namespace registered here
        self._lock = CacheLock()
        self._closed = False
        self.draining = False  # set by drain/shutdown: saves are refused, reads served
        self.disk = disk
        self.device = device  # a read cache with its own LRU; formatted with the host
        if device is not None:
            device.on_evict = lambda key: self.index.drop_tier(key, DEVICE)
        self.disk_room = (
            DiskRoom(disk, eviction, self.index, self._lock, self.stats, self._gone)
            if disk is not None
            else None
        )
        # Allocated (and faulted in) now, carved into slots at the first namespace.
        self.host = HostArena(None, host_bytes, shared=shared_host)
        self.host_room = HostRoom(
            self.host, eviction, self.index, self._lock, self.stats, self._gone, self.disk_room
        )
        self.sessions = Sessions(self.index, disk, self.stats)
        self.shared = (
            SharedTier(
                remote,
                sharing or Sharing(),
                self.index,
                self._lock,
                self.host_room,
                self.disk_room,
                self.stats,
                self.namespaces,
                self._ensure_format,
            )
            if remote is not None
            else None
        )
        self.promoter = Promoter(
            self.index,
            self._lock,
            self.host_room,
            self.disk_room,
            device,
            self.stats,
            self._touch,
            self._ensure_format,
        )
        self.saves = HostSaves(self)
        if slot_bytes is not None:
            self._ensure_format(slot_bytes)

    @classmethod
    async def open(
        cls,
        *,
        host_bytes: int,
        disk_url: str | None = None,
        disk_bytes: int = 0,
        remote_url: str | None = None,
        remote_options: RemoteOptions | None = None,
        device_bytes: int = 0,
        device_name: str = "cuda:0",
        **kwargs: object,
    ) -> TierManager:
        """A manager over the tiers named; ``device_bytes`` > 0 adds a device tier on
        ``device_name`` (``cuda:N``, or ``cpu`` for the CPU twin)."""
        disk = await DiskTier.open(disk_url, disk_bytes) if disk_url else None
        try:
            remote = await RemoteTier.open(remote_url, remote_options) if remote_url else None
            device = DeviceTier(device_bytes, device_name) if device_bytes else None
            manager = cls(
                host_bytes=host_bytes,
                disk=disk,
                remote=remote,
                device=device,
                **kwargs,  # type: ignore[arg-type]
            )
            await _restore(manager)
        except BaseException:
            if disk is not None:
                await disk.close()  # release its lock: the caller may fix the config and retry
            raise
        return manager

    @property
    def remote(self) -> RemoteTier | None:
        return self.shared.remote if self.shared is not None else None

    def _ensure_format(self, slot_bytes: int) -> None:
        """Carve the host arena (and the device tier) into slots, once."""
        if self.host.formatted:
            return
        slot_count(self.host.budget_bytes, slot_bytes)  # a size the host refuses formats nothing
        if self.device is not None and not self.device.formatted:  # first: if it fails, it
            self.device.format(slot_bytes)  # fails every time, never once and then off
        self.host_room.format(slot_bytes)

    def _gone(self, e: Entry) -> None:
        """A local tier let go of ``e``: with no local copy left it leaves the index, and its
        device copy (a read cache over the local tiers) goes too."""
        if self.index.drop_if_empty(e):
            self.stats.dropped()
            if self.device is not None:
                e.at.pop(DEVICE, None)
                self.device.discard(e.key)  # a copy being stored too

    def _refresh(self, entries: list[Entry]) -> None:
        """``entries`` are in use: their recency in every tier's policy (a lookup of a long
        prefix refreshes thousands: one clock read, no call per entry it can spare)."""
        now, host, disk = time.monotonic(), self.host_room, self.disk_room
        for e in entries:
            e.last_use = now
            host.touch(e)
            if disk is not None:
                disk.touch(e)

    def _touch(self, entries: list[Entry]) -> None:
        """``entries`` were served: refreshed, and sighted for the shared tier."""
        self._refresh(entries)
        if self.shared is not None:
            for e in entries:
                self.shared.sighted(e)

    def _check_open(self) -> None:
        if self._closed:
            raise CacheError("the cache is closed")

    async def _expire_due(self) -> None:
        if self.sessions.next_expiry <= time.time():
            await self.expire()

    # -- namespaces -------------------------------------------------------

    async def register(self, ns: Namespace) -> str:
        """Make ``ns`` known here; the first one sets the host slot size (unless configured)."""
        path = ns.array
        if path in self.namespaces:
            return path
        nbytes = ns.block_nbytes
        self._ensure_format(nbytes)
        if nbytes > self.host.slot_bytes:
            raise BlockShapeError(
                f"a block of {ns.model} is {nbytes} B but host slots are {self.host.slot_bytes} B; "
                f"set [tiers.host] slot_bytes to at least {nbytes}"
            )
        if self.disk is not None and self.disk_room is not None:
            await self.disk.register(ns)
            self.disk_room.prepare(nbytes)
        self.namespaces[path] = ns
        return path

    # -- save -------------------------------------------------------------

    @timed("save")
    async def save(
        self,
        ns: Namespace,
        tokens: Tokens,
        blocks: torch.Tensor,
        *,
        first_block: int = 0,
        session: str | None = None,
    ) -> SaveResult:
        """Store the KV of ``tokens``' full blocks ``first_block ..`` (one row of ``blocks`` each).

        Blocks the cache already holds are not written again. With a session, the session's
        chain becomes these keys; a pinned session pins them. These are the save rounds a
        socket client runs through the shared arena (``tiercache.transaction``).
        """
        first_block, data = check_first_block(first_block), store_rows(ns, blocks)
        keys = keys_of(ns, tokens)

        async def reserve(done: int, left: int) -> Reservation:
            return await self.reserve(
                ns, keys, first_block=first_block + done, count=left, session=session
            )

        async def fill(r: Reservation, done: int) -> None:
            fill_slots(self.host, r, data, done)

        return await save_rounds(data.shape[0], reserve, fill, self.commit, self.abort)

    async def reserve(
        self,
        ns: Namespace,
        tokens: Tokens,
        *,
        first_block: int = 0,
        count: int | None = None,
        session: str | None = None,
    ) -> Reservation:
        """Host slots for the blocks the cache lacks (``tiercache.saves``)."""
        return await self.saves.reserve(ns, tokens, first_block, count, session)

    async def commit(self, r: Reservation) -> SaveResult:
        """Make a filled reservation's blocks visible (``tiercache.saves``)."""
        return await self.saves.commit(r)

    async def abort(self, r: Reservation) -> None:
        """Give back a reservation's slots unfilled (``tiercache.saves``)."""
        await self.saves.abort(r)

    # -- lookup / load ----------------------------------------------------

    @timed("lookup")
    async def lookup(self, ns: Namespace, tokens: Tokens, *, first_block: int = 0) -> LookupResult:
        """How many blocks of ``tokens`` from ``first_block`` on are cached without a gap, and in
        which tier each is. With a shared tier, blocks past the local run are fetched from it
        (waiting at most its deadline) and promoted to host; they are reported as ``remote``.
        """
        await self._expire_due()  # a session past its TTL is no hit that a load then misses
        keys = keys_of(ns, tokens)
        run = keys[check_first_block(first_block) :]
        hit = self.index.prefix(run)
        tiers = [e.best_tier or "miss" for e in hit]
        if self.shared is not None and len(hit) < len(run):
            fetched = await self._fill(ns, run, len(hit))
            more = self.index.prefix(run[len(hit) :])
            tiers += [REMOTE if e.key in fetched else (e.best_tier or "miss") for e in more]
            hit += more
        for t, n in (Counter(tiers) + Counter({"miss": len(run) - len(hit)})).items():
            self.stats.lookup(t, n)  # a Counter sum keeps positive counts only
        async with self._lock:
            self._refresh(hit)  # a prefix found again is in use, even if the engine keeps it
        return LookupResult(keys, tiers, ns.spec.block_size, first_block)

    @timed("lookup_tail")
    async def lookup_tail(self, ns: Namespace, candidates: list[BlockKey]) -> tuple[int, str]:
        """The longest cached tail among ``candidates`` (``Namespace.tail_keys``, shortest
        first): its index and tier, or ``(-1, "miss")``. Local tiers only (a tail is not
        fetched from the shared tier). A hit counts one block in the lookup metrics; a miss
        counts nothing (the missing full block after the chain was already counted)."""
        await self._expire_due()
        for i in range(len(candidates) - 1, -1, -1):
            e = self.index.get(candidates[i])
            if e is not None and (tier := e.best_tier) is not None:
                self.stats.lookup(tier, 1)
                return i, tier
        return -1, "miss"

    async def _lease(self, keys: list[BlockKey]) -> Lease:
        """The cached prefix of ``keys``, leased (not evictable) until ``release`` (or
        ``Lease.end`` under the lock)."""
        async with self._lock:
            self._check_open()
            lease = Lease(self.index.prefix(keys), [])
            self.index.lease(lease.entries)
        return lease

    async def _ready(
        self, ns: Namespace, keys: list[BlockKey]
    ) -> tuple[list[BlockKey], set[BlockKey]]:
        """Before a read of ``keys``: TTLs applied, ``ns`` known, a prefetch of them finished
        and, with a shared tier, what lies past the local prefix fetched (returned)."""
        await self._expire_due()
        if ns.array not in self.namespaces:  # checked here first: no coroutine on the hot path
            await self.register(ns)
        await self.promoter.wait(keys)
        if self.shared is None:
            return keys, set()
        return keys, await self._fill(ns, keys, len(self.index.prefix(keys)))

    async def _fill(self, ns: Namespace, keys: list[BlockKey], start: int) -> set[BlockKey]:
        """Blocks ``keys[start:]`` fetched from the shared tier in time (``sharing.py``)."""
        if self.shared is None or start >= len(keys) or not self.shared.remote.available():
            return set()
        array = await self.register(ns)
        return await self.shared.fill(array, ns.block_nbytes, keys, start)

    @timed("load")
    async def load(
        self,
        ns: Namespace,
        tokens: Tokens,
        *,
        first_block: int = 0,
        max_blocks: int | None = None,
        out: torch.Tensor | None = None,
        into: torch.Tensor | None = None,
    ) -> LoadResult:
        """Read the cached run of ``tokens``' blocks from ``first_block`` (at most ``max_blocks``)
        into ``out`` (records) or ``into`` (the engine's blocks: ``reads.load_rows``), byte-exact;
        a block missing or failing its checksum ends it: a run of verified blocks."""
        t0 = time.perf_counter()
        run = keys_of(ns, tokens)[check_first_block(first_block) :][: check_max_blocks(max_blocks)]
        keys, fetched = await self._ready(ns, run)
        lease = await self._lease(keys)
        entries = lease.entries
        try:
            pin = self.device is not None and self.device.device.type == "cuda"  # async DMA
            out = load_rows(ns, len(entries), out, into, pin)
            self._lock.free()
            tiers, ok, from_disk, failed = await read_entries(
                entries, out, self.device, self.host, self.disk, self.stats
            )
            async with self._lock:
                lease.end(self.index)  # first: room for the disk-read blocks to stay in host
                if failed and self.disk_room is not None:
                    self.disk_room.forget_corrupt(failed)
                self.promoter.served(entries[:ok])
                if from_disk:
                    await self.promoter.keep([(i, e) for i, e in from_disk if i < ok], out, entries)
        finally:
            if lease.entries:  # not ended above (an error or a cancel on the way)
                await self.release(lease)
        if fetched:
            tiers = [REMOTE if e.key in fetched else t for e, t in zip(entries, tiers, strict=True)]
        per_tier = {t: tiers[:ok].count(t) for t in set(tiers[:ok])}
        got = LoadResult(out[:ok], tiers[:ok], ns, time.perf_counter() - t0, per_tier, first_block)
        return got.land(into)

    # -- leases (the socket data plane) ---------------------------------------

    @timed("acquire")
    async def acquire(
        self, ns: Namespace, tokens: Tokens, *, first_block: int = 0, max_blocks: int | None = None
    ) -> Lease:
        """Lease cached blocks ``first_block ..`` of ``tokens`` in host memory (disk promoted).

        The leased blocks cannot be evicted until ``release``; a reader copies them out of
        their host slots (a CPU engine maps the shared arena). The lease stops at the first
        block that is missing, fails verification, or finds no host room, and never covers
        more blocks than the host tier has slots: ``Lease.prefix`` says how far the cached
        run goes, so a reader takes a longer prefix in rounds (``transaction.lease_rounds``).
        """
        keys, fetched = await self._ready(ns, keys_of(ns, tokens)[first_block:])
        async with self._lock:
            self._check_open()
            run = self.index.prefix(keys)
            window = (
                self.host.num_slots if max_blocks is None else min(max_blocks, self.host.num_slots)
            )
            entries = run[:window]
            tiers = [REMOTE if e.key in fetched else (e.best_tier or "miss") for e in entries]
            # Where the lease reads from: host memory (the device tier is not leased here).
            tiers = [HOST if t == DEVICE else t for t in tiers]
            self.index.lease(entries)
        if self.disk_room is not None and any(HOST not in e.at for e in entries):
            await self.promoter.to_host(entries, chained=True)
        async with self._lock:
            n = next((i for i, e in enumerate(entries) if HOST not in e.at), len(entries))
            self.index.unlease(entries[n:])
            self.promoter.served(entries[:n])
            # Counted, not timed: the copy out of the arena happens in the client's process.
            self.stats.transfer(HOST, "client", sum(e.nbytes for e in entries[:n]), None)
        return Lease(entries[:n], tiers[:n], len(run))

    async def release(self, lease: Lease) -> None:
        async with self._lock:
            lease.end(self.index)

    @timed("touch")
    async def touch(self, ns: Namespace, tokens: Tokens) -> int:
        """Blocks of ``tokens`` an engine served from its own prefix cache: their recency is
        refreshed as if read here (they are the hottest). Returns how many are cached."""
        keys = keys_of(ns, tokens)
        async with self._lock:
            hit = self.index.prefix(keys)
            self._refresh(hit)
        return len(hit)

    # -- prefetch ---------------------------------------------------------

    @timed("prefetch")
    async def prefetch(
        self,
        ns: Namespace | None = None,
        tokens: Tokens | None = None,
        *,
        session: str | None = None,
    ) -> int:
        """Promote the blocks of ``tokens`` (or of a session) from disk to host, and with a device
        tier on to the device; returns how many blocks moved up (each counted once)."""
        keys = await _prefetch_keys(self, ns, tokens, session)
        if self.disk is None and self.device is None:
            return 0
        lease = await self._lease(keys)
        try:
            return await self.promoter.prefetch(lease.entries, chained=session is None)
        finally:
            await self.release(lease)

    # -- sessions, pins, eviction -------------------------------------------

    async def pin(self, session: str) -> int:
        """Pin ``session``'s blocks (how many are stored); its host-only blocks go to disk
        now and its later saves write through (``HostSaves``): a pin outlives a crash."""
        async with self._lock:
            n = await self.sessions.pin(session)
            if n is not None and self.disk_room is not None:
                await self.disk_room.flush(self.host, self.sessions[session].protected, quiet=True)
            if self.shared is not None and n is not None:
                self.shared.share_pinned(self.sessions[session].keys)
            return n or 0

    async def unpin(self, session: str) -> int:
        async with self._lock:
            return await self.sessions.unpin(session)

    async def set_ttl(self, session: str, seconds: float | None) -> None:
        """After ``seconds`` the session is forgotten and its blocks evicted (``None`` clears it)."""
        async with self._lock:
            await self.sessions.set_ttl(session, seconds)

    async def expire(self, now: float | None = None) -> list[str]:
        """Forget every session whose TTL has passed; returns their ids.

        Saves, lookups and loads call it whenever the earliest deadline has passed, so TTLs
        hold in embedded mode too; the daemon also runs it on a timer.
        """
        async with self._lock:  # due when forgotten: not forgotten twice, nor after a new TTL
            gone = self.sessions.due(time.time() if now is None else now)
            for sid in gone:
                targets = await self.sessions.forget(sid, force=True)
                await evict_keys(targets, self.index, self.host_room, self.disk_room)
        return gone

    async def evict(
        self,
        *,
        session: str | None = None,
        keys: Sequence[BlockKey] | None = None,
        force: bool = False,
    ) -> int:
        """Remove blocks from every tier: a session's (and forget it), or the given keys.

        A session's blocks still used by another session are kept. A pinned session needs
        ``force`` (TTL expiry) or an unpin first.
        """
        async with self._lock:
            if session is not None:
                targets = await self.sessions.forget(session, force=force)
            else:
                targets = list(keys or [])
            return await evict_keys(targets, self.index, self.host_room, self.disk_room)

    # -- flush / close ------------------------------------------------------

    async def flush(self) -> int:
        """Write every host-only block to disk and sync the journal; returns bytes written."""
        if self.disk_room is None:
            return 0
        async with self._lock:
            return await self.disk_room.flush(self.host)

    async def close(self, flush: bool = True) -> None:
        if self._closed:
            return
        if flush and self.disk_room is not None:
            async with self._lock:  # a full disk is counted and logged: the close goes on
                await self.disk_room.flush(self.host, quiet=True)
        if self.shared is not None:
            await self.shared.close(drain=flush)
        self._closed = True
        if self.disk is not None:
            await self.disk.close()
        self.host.close()
        if self.device is not None:
            self.device.close()

    def usage(self) -> dict[str, dict[str, int]]:
        return usage(self.device, self.host, self.disk, self.host_room.kv_bytes)

    def blocks_by_format(self) -> dict[str, dict[str, int]]:
        """Blocks per storage format per tier (one walk of the index). A namespace not
        registered since the start is named by its disk array's attributes."""
        fmt_of: dict[str, str] = {}
        out: dict[str, dict[str, int]] = {}
        for e in self.index:
            fmt = fmt_of.get(e.array)
            if fmt is None:
                ns = self.namespaces.get(e.array)
                known = ns.store_dtype if ns is not None else None
                if known is None and self.disk is not None:
                    known = self.disk.store_dtype(e.array)
                fmt = fmt_of[e.array] = known or "unknown"
            tiers = out.setdefault(fmt, {})
            for tier in e.at:
                tiers[tier] = tiers.get(tier, 0) + 1
        return out


__all__ = ["Sharing", "TierManager"]


async def _prefetch_keys(
    m: TierManager, ns: Namespace | None, tokens: Tokens | None, session: str | None
) -> list[BlockKey]:
    """What a prefetch reads: the keys of ``tokens``, or ``session``'s stored runs (a
    session past its TTL is gone first, not promoted)."""
    await m._expire_due()
    if session is not None:
        return _session_runs(m, session)
    if ns is not None and tokens is not None:
        return keys_of(ns, tokens)
    raise ValueError("prefetch needs a session, or a namespace and tokens")


def _session_runs(m: TierManager, session: str) -> list[BlockKey]:
    """What a prefetch of ``session`` reads (``Session.stored_runs``), knowing the spec of each
    chain's namespace where this cache does: registered here, or an array of its disk tier."""

    def spec_of(hex_id: str) -> KVSpec | None:
        ns = m.namespaces.get(f"ns/{hex_id}")
        if ns is not None:
            return ns.spec
        return m.disk.spec(f"ns/{hex_id}") if m.disk is not None and hex_id else None

    return m.sessions.get(session).stored_runs(m.index, spec_of)


async def _restore(m: TierManager) -> None:
    """At open: the sessions persisted on disk (their pins first), then the disk tier within
    its budget. Outside the class, which is at its size limit (tests/test_layout.py)."""
    await m.sessions.restore()
    if m.disk_room is not None:
        async with m._lock:
            await m.disk_room.fit_budget()
