"""The tier manager: save, lookup, load, prefetch, pin, evict, flush over host and disk.

This is the whole cache in one process; the daemon serves it over a socket and
embedded mode (``tiercache.Cache``) calls it directly. Every public method is a
coroutine so disk I/O never blocks the event loop; ``tiercache.SyncCache``
wraps them for synchronous callers.

Concurrency: one asyncio lock serialises changes to the index and the tiers'
allocation state. Disk reads run outside it, protected by leases (a leased
block is never evicted, so the slot under a read cannot be reused). Disk
writes of a save run outside it too, again under leases.

Data flows host -> disk (write-through on save, write-back on host eviction
or flush) and disk -> host (promotion on load or prefetch). With a device tier
(``tiers/device.py``, off unless configured), a prefetch also copies its blocks
host -> device, and a load serves the blocks it finds there; the device holds
copies of blocks a lower tier also holds, so dropping one loses nothing. With a shared
(remote) tier, blocks worth sharing also go host/disk -> remote through a
bounded write-behind queue, and a local miss is looked for there: see
"Shared tier" below. A block is served
only from a tier whose copy is complete: host copies are made under the lock
before the entry becomes visible; disk copies are verified by checksum on
every read, and a copy that fails is dropped and counted, never returned.

Shared tier (``tiers/remote.py``): network I/O is never awaited under the
lock nor without a deadline. ``lookup``, ``load`` and ``acquire`` that miss
locally start a *fill*: a background task that fetches the missing blocks in
chain order (the first alone, then windows in parallel; it stops at the first
absent block) and promotes each verified one into host memory. The caller
waits for the fill at most the tier's ``timeout``, then answers with what
has arrived (tier ``remote``); the fill goes on in the background, so a
later lookup or load finds the rest locally. After a fill outlives the
deadline, callers stop waiting (they still start fills) until one finishes in
time; while the store is down they do not ask it at all. So a slow store
costs one lookup one deadline, and a dead one costs nothing.
Uploads run in one background task: blocks are copied out of host memory
under the lock (or read, verified, from disk under a lease) and PUT outside
it; a failure marks the store down and puts the blocks back in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tiercache.index import Entry, Index, Session
from tiercache.keys import BlockKey, KeyChain, Namespace
from tiercache.policy.base import EvictionPolicy, make_policy
from tiercache.policy.write import Admission, WritePolicy, make_write_policy
from tiercache.spec import KVSpec
from tiercache.stats import Stats
from tiercache.tiers.device import DeviceTier
from tiercache.tiers.disk import DiskFull, DiskRecord, DiskTier, StoreError
from tiercache.tiers.host import ArenaFull, HostArena
from tiercache.tiers.remote import CorruptObject, RemoteOptions, RemoteTier, UploadQueue

log = logging.getLogger(__name__)

UPLOAD_BATCH = 16  # blocks in flight to the shared tier at once
FETCH_WINDOW = 32  # blocks a fill asks the shared tier for at once

# Token ids, or the chain of block keys a client already computed from them.
Tokens = Sequence[int] | np.ndarray | torch.Tensor | KeyChain


class CacheError(RuntimeError):
    """Base of the errors the cache reports to its callers."""


class BlockShapeError(CacheError, ValueError):
    """Blocks whose shape or dtype do not match the namespace's KVSpec."""


class UnknownSession(CacheError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class SessionPinned(CacheError):
    pass


class NoRoom(CacheError):
    """A tier is full of pinned or in-use blocks; nothing can be evicted to make room."""


class Draining(CacheError):
    """The cache is draining (shutdown or an operator's drain): it serves reads, takes no saves."""


@dataclass(frozen=True, slots=True)
class Sharing:
    """Which blocks go to the shared tier, and how many may wait for it.

    ``admission``: a block goes out on its N-th sighting (its save, then each
    save or load that finds it); 0 shares only pinned sessions' blocks.
    ``pinned``: a pinned session's blocks go out whatever their count.
    """

    queue_blocks: int = 4096
    admission: int = 1
    pinned: bool = True
    drain_seconds: float = 10.0  # how long close() keeps uploading what is queued


@dataclass(frozen=True, slots=True)
class SaveResult:
    stored: int  # new blocks written
    present: int  # blocks the cache already had
    rejected: int  # blocks not admitted (admission threshold) or without room


@dataclass(frozen=True, slots=True)
class LookupResult:
    keys: list[BlockKey]  # keys of every full block of the tokens
    tiers: list[str]  # best tier of each block of the cached prefix
    block_size: int

    @property
    def blocks(self) -> int:
        return len(self.tiers)

    @property
    def tokens(self) -> int:
        return len(self.tiers) * self.block_size


@dataclass(slots=True)
class LoadResult:
    data: torch.Tensor  # uint8 [blocks, block_nbytes], page-first
    tiers: list[str]
    namespace: Namespace
    seconds: float = 0.0
    per_tier: dict[str, int] = field(default_factory=dict)

    @property
    def blocks(self) -> int:
        return len(self.tiers)

    @property
    def tokens(self) -> int:
        return self.blocks * self.namespace.spec.block_size

    def kv(self) -> torch.Tensor:
        """The blocks as ``[blocks, layers, 2, block_size, kv_heads, head_dim]`` of the KV dtype."""
        spec = self.namespace.spec
        return self.data.view(spec.torch_dtype).view(self.blocks, *spec.block_shape)


@dataclass(slots=True)
class Reservation:
    """Host slots reserved for a save, invisible until ``commit``."""

    ns: Namespace
    array: str
    keys: list[BlockKey]
    session: str | None
    first_block: int
    entries: list[Entry] = field(default_factory=list)  # pending, each with its host slot
    rows: list[int] = field(default_factory=list)  # row (from first_block) of each entry
    present: int = 0
    rejected: int = 0
    walked: int = 0  # blocks from first_block this reservation covered

    @property
    def slots(self) -> list[int]:
        return [e.host_slot for e in self.entries if e.host_slot is not None]


@dataclass(slots=True)
class Lease:
    """Host-resident blocks a reader may copy out of until ``release``."""

    entries: list[Entry]
    tiers: list[str]  # where each block was found (before any promotion)
    prefix: int = 0  # how many blocks the cached run had from the lease's first block

    @property
    def slots(self) -> list[int]:
        return [e.host_slot for e in self.entries if e.host_slot is not None]


def block_rows(spec: KVSpec, blocks: torch.Tensor) -> torch.Tensor:
    """Blocks for ``spec`` (typed ``[n, *block_shape]`` or uint8 ``[n, block_nbytes]``) as uint8
    rows; anything else is a BlockShapeError naming the expected shape."""
    if blocks.device.type != "cpu":
        raise BlockShapeError(f"blocks must be on the CPU here, got {blocks.device}")
    if blocks.dtype == torch.uint8:
        if blocks.dim() != 2 or blocks.shape[1] != spec.block_nbytes:
            raise BlockShapeError(
                f"uint8 blocks must be [n, {spec.block_nbytes}] for this namespace, got {list(blocks.shape)}"
            )
        return blocks.contiguous()
    if blocks.dtype != spec.torch_dtype:
        raise BlockShapeError(f"blocks have dtype {blocks.dtype}, namespace stores {spec.dtype}")
    if tuple(blocks.shape[1:]) != spec.block_shape:
        raise BlockShapeError(
            f"blocks must be [n, {', '.join(map(str, spec.block_shape))}] "
            f"(layers, K/V, block_size, kv_heads, head_dim), got {list(blocks.shape)}"
        )
    return blocks.contiguous().view(torch.uint8).view(blocks.shape[0], spec.block_nbytes)


def _keys(ns: Namespace, tokens: Tokens) -> list[BlockKey]:
    """The block keys of ``tokens`` in ``ns``: hashed here, or as a client sent them."""
    if isinstance(tokens, KeyChain):
        return list(tokens)
    return ns.block_keys(_as_tokens(tokens))


def _as_tokens(tokens: Tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().reshape(-1).numpy()
    return np.asarray(tokens)


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
        self.host_bytes = host_bytes
        self.disk = disk
        self.slot_bytes = slot_bytes
        self.eviction = eviction
        self.write = make_write_policy(write) if isinstance(write, str) else write
        self.admission = Admission(admission)
        self.shared_host = shared_host
        self.stats = stats or Stats()
        self.index = Index()
        self.namespaces: dict[str, Namespace] = {}  # array path -> namespace registered here
        # Allocated (and faulted in) now, carved into slots at the first namespace.
        self.host: HostArena | None = HostArena(None, host_bytes, shared=shared_host)
        self.host_policy: EvictionPolicy | None = None
        self.disk_policy: EvictionPolicy | None = None
        self.device = device  # its own LRU; formatted with the host
        self._next_expiry = math.inf  # earliest session TTL deadline (time.time())
        # Keys being promoted by a prefetch -> the event set when it is done.
        self._prefetching: dict[BlockKey, asyncio.Event] = {}
        # Serialises every change to the index and to tier allocation state.
        self._lock = asyncio.Lock()
        self._closed = False
        self.draining = False  # set by drain/shutdown: saves are refused, reads served
        self.remote = remote
        self.sharing = sharing or Sharing()
        self.uploads = UploadQueue(self.sharing.queue_blocks)
        self._share_admission = Admission(max(1, self.sharing.admission))
        self._uploader: asyncio.Task[None] | None = None
        self._in_flight = 0  # blocks the uploader has taken from the queue and not finished
        self._upload_done = asyncio.Event()  # set after every upload batch (drain waits on it)
        # Fills in flight, by the first key they fetch -> (task, keys promoted so far).
        self._fills: dict[BlockKey, tuple[asyncio.Task[None], set[BlockKey]]] = {}
        self._remote_slow = False  # a fill outlived the deadline: callers do not wait
        if slot_bytes is not None:
            self._format_host(slot_bytes)
        if disk is not None and disk.records:
            policy = self._make_disk_policy(min(r.nbytes for r in disk.records))
            for rec in disk.records:
                self.index.add(Entry(rec.key, rec.array, rec.nbytes, rec.checksum, disk=rec))
                policy.insert(rec.key)

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
                host_bytes=host_bytes, disk=disk, remote=remote, device=device, **kwargs  # type: ignore[arg-type]
            )
        except BaseException:
            if disk is not None:
                await disk.close()  # release its lock: the caller may fix the config and retry
            raise
        if disk is not None:
            for rec in await disk.load_sessions():
                sess = Session(
                    rec["id"], list(rec["keys"]), pinned=rec["pinned"], expires=rec["expires"]
                )
                manager.index.sessions[sess.id] = sess
                if sess.pinned:
                    manager._pin_keys(sess)
                if sess.expires is not None:
                    manager._next_expiry = min(manager._next_expiry, sess.expires)
        return manager

    def _format_host(self, slot_bytes: int) -> None:
        assert self.host is not None
        self.host.format(slot_bytes)
        self.slot_bytes = slot_bytes
        self.host_policy = make_policy(self.eviction, self.host.num_slots)
        if self.device is not None and not self.device.formatted:
            self.device.format(slot_bytes)

    def _make_disk_policy(self, block_nbytes: int) -> EvictionPolicy:
        assert self.disk is not None
        if self.disk_policy is None:
            capacity_blocks = max(1, self.disk.capacity_bytes // block_nbytes)
            self.disk_policy = make_policy(self.eviction, capacity_blocks)
        return self.disk_policy

    # -- namespaces -------------------------------------------------------

    async def register(self, ns: Namespace) -> str:
        """Make ``ns`` known here; the first one sets the host slot size (unless configured)."""
        path = f"ns/{ns.hex}"
        if path in self.namespaces:
            return path
        nbytes = ns.spec.block_nbytes
        assert self.host is not None
        if not self.host.formatted:
            self._format_host(nbytes)
        if nbytes > self.host.slot_bytes:
            raise BlockShapeError(
                f"a block of {ns.model} is {nbytes} B but host slots are {self.host.slot_bytes} B; "
                f"set [tiers.host] slot_bytes to at least {nbytes}"
            )
        if self.disk is not None:
            await self.disk.register(ns)
            self._make_disk_policy(nbytes)
        self.namespaces[path] = ns
        return path

    # -- save -------------------------------------------------------------

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

        Blocks the cache already holds are not written again. With a session,
        the session's chain becomes these keys; a pinned session pins them.
        This is reserve, copy into the reserved host slots, commit: the same
        steps a socket client takes through the shared arena.
        """
        t0 = time.perf_counter()
        data = block_rows(ns.spec, blocks)
        stored = present = rejected = 0
        done = 0
        while done < data.shape[0]:
            r = await self.reserve(
                ns,
                tokens,
                first_block=first_block + done,
                count=data.shape[0] - done,
                session=session,
            )
            assert self.host is not None
            try:
                self.host.write(r.slots, data, [done + row for row in r.rows])
            except BaseException:
                await self.abort(r)
                raise
            result = await self.commit(r)
            stored, present, rejected = (
                stored + result.stored,
                present + result.present,
                rejected + result.rejected,
            )
            done += r.walked
        self.stats.request("save", time.perf_counter() - t0)
        return SaveResult(stored, present, rejected)

    async def reserve(
        self,
        ns: Namespace,
        tokens: Tokens,
        *,
        first_block: int = 0,
        count: int | None = None,
        session: str | None = None,
    ) -> Reservation:
        """Host slots for the blocks ``first_block .. first_block+count`` the cache lacks.

        The slots are the caller's to fill until ``commit`` makes them visible
        (or ``abort`` frees them); nothing else can see or evict them. When the
        host tier runs out of evictable room the reservation stops early:
        ``walked`` says how many blocks it covered, and the caller commits and
        asks again for the rest (its own committed blocks are then evictable).
        """
        if self.draining:
            raise Draining("the cache is draining: saves are not taken (reads are served)")
        await self._expire_due()
        array = await self.register(ns)
        keys = _keys(ns, tokens)
        n = len(keys) - first_block if count is None else count
        if first_block < 0 or n < 0 or first_block + n > len(keys):
            raise BlockShapeError(
                f"{n} blocks from block {first_block} do not fit the "
                f"{len(keys)} full blocks of the sequence"
            )
        r = Reservation(ns, array, keys, session, first_block)
        async with self._lock:
            self._check_open()
            if (
                self.admission.threshold == 1
            ):  # else the per-block path evicts only for admitted blocks
                await self._make_host_room(
                    sum(1 for k in keys[first_block : first_block + n] if k not in self.index)
                )
            if session:
                sess = self._session_for(session, keys)
                if sess.keys is keys:
                    await self._persist(sess)
            for i in range(n):
                key = keys[first_block + i]
                entry = self.index.get(key)
                if entry is not None:
                    r.present += 1
                    self._touch(entry)
                elif not self.admission.admit(key):
                    r.rejected += 1
                else:
                    try:
                        slot = await self._host_slot()
                    except NoRoom:
                        if not r.entries:
                            r.rejected += n - i
                            r.walked = n
                            self.stats.error("host_full")
                        return r
                    r.entries.append(Entry(key, array, ns.spec.block_nbytes, host_slot=slot))
                    r.rows.append(i)
                r.walked = i + 1
        return r

    async def commit(self, r: Reservation) -> SaveResult:
        """Make a filled reservation's blocks visible (and write them through to disk)."""
        t0 = time.perf_counter()
        async with self._lock:
            assert self.host_policy is not None
            now = time.monotonic()
            for e, row in zip(r.entries, r.rows, strict=True):
                e.last_use = now
                self.index.add(e)
                i = r.first_block + row  # the block's place in its sequence: its parent, position
                parent = r.keys[i - 1] if i else None
                self.host_policy.insert(e.key, parent, i * r.ns.spec.block_size)
            sess = self.index.sessions.get(r.session) if r.session else None
            if sess is not None and sess.pinned:
                self._pin_keys(sess)
            for e in r.entries:
                self._sighted(e)
            if sess is not None and sess.pinned:
                self._share_session(sess)
            nbytes = len(r.entries) * r.ns.spec.block_nbytes
            self.stats.transfer("client", "host", nbytes, time.perf_counter() - t0)
            if self.write.write_on_save and self.disk is not None and r.entries:
                # Under the lock: disk eviction and slot allocation change shared
                # state. Loads of host blocks wait for it; write-back avoids that.
                await self._write_to_disk([e for e in r.entries if e.host_slot is not None])
        result = SaveResult(len(r.entries), r.present, r.rejected)
        r.entries = []
        return result

    async def abort(self, r: Reservation) -> None:
        """Give back a reservation's slots unfilled (a client that died or gave up)."""
        async with self._lock:
            assert self.host is not None
            for e in r.entries:
                if e.host_slot is not None:
                    self.host.free(e.host_slot)
            r.entries = []

    def _session_for(self, sid: str, keys: list[BlockKey]) -> Session:
        """The session ``sid``, its chain extended to ``keys`` (a longer or new chain replaces it)."""
        sess = self.index.sessions.get(sid)
        if sess is None:
            sess = self.index.sessions[sid] = Session(sid)
        if len(keys) >= len(sess.keys) and keys != sess.keys:
            sess.keys = keys
        return sess

    async def _persist(self, sess: Session) -> None:
        """Write a session's record to the disk tier, so pins and TTLs survive a restart."""
        if self.disk is None:
            return
        try:
            await self.disk.put_session(sess.id, sess.keys, sess.pinned, sess.expires)
        except OSError as e:
            self.stats.error("session_write")
            log.warning("could not persist session record: %s", e)

    # -- lookup / load ----------------------------------------------------

    async def lookup(self, ns: Namespace, tokens: Tokens) -> LookupResult:
        """How much of ``tokens``' prefix is cached, and in which tier each block is.

        With a shared tier, blocks past the local prefix are fetched from it
        (waiting at most its deadline) and promoted to host; they are reported
        as ``remote``.
        """
        t0 = time.perf_counter()
        keys = _keys(ns, tokens)
        hit = self.index.prefix(keys)
        tiers = [self._best_tier(e) for e in hit]
        if self.remote is not None and len(hit) < len(keys):
            fetched = await self._remote_fill(ns, keys, len(hit))
            more = self.index.prefix(keys[len(hit) :])
            tiers += ["remote" if e.key in fetched else (e.best_tier or "miss") for e in more]
            hit += more
        for t in ("device", "host", "disk", "remote"):
            n = tiers.count(t)
            if n:
                self.stats.lookup(t, n)
        if len(keys) > len(hit):
            self.stats.lookup("miss", len(keys) - len(hit))
        for e in hit:
            self._refresh(e)  # a prefix found again is in use, even if the engine keeps it
        self.stats.request("lookup", time.perf_counter() - t0)
        return LookupResult(keys, tiers, ns.spec.block_size)

    async def touch(self, ns: Namespace, tokens: Tokens) -> int:
        """Refresh the recency of the cached blocks of ``tokens``: an engine served them from its
        own prefix cache, so no lookup or load saw them; returns how many are cached here."""
        t0 = time.perf_counter()
        n = 0
        for key in _keys(ns, tokens):
            e = self.index.get(key)
            if e is not None:
                self._refresh(e)
                n += 1
        self.stats.request("touch", time.perf_counter() - t0)
        return n

    async def lookup_tail(self, ns: Namespace, candidates: list[BlockKey]) -> tuple[int, str]:
        """The longest cached tail among ``candidates`` (``Namespace.tail_keys``, shortest
        first): its index and tier, or ``(-1, "miss")``. Local tiers only (a tail is not
        fetched from the shared tier). A hit counts one block in the lookup metrics; a miss
        counts nothing (the missing full block after the chain was already counted)."""
        t0 = time.perf_counter()
        found = (-1, "miss")
        for i in range(len(candidates) - 1, -1, -1):
            e = self.index.get(candidates[i])
            tier = "miss" if e is None else self._best_tier(e)
            if tier != "miss":
                found = (i, tier)
                self.stats.lookup(tier, 1)
                break
        self.stats.request("lookup_tail", time.perf_counter() - t0)
        return found

    async def load(
        self,
        ns: Namespace,
        tokens: Tokens,
        *,
        max_blocks: int | None = None,
        out: torch.Tensor | None = None,
    ) -> LoadResult:
        """Read the cached prefix of ``tokens`` (up to ``max_blocks`` blocks), byte-exact.

        The result stops at the first block that is missing or fails its
        checksum: a load is always a contiguous prefix of verified blocks.
        """
        t0 = time.perf_counter()
        await self._expire_due()
        await self.register(ns)
        keys = _keys(ns, tokens)
        if max_blocks is not None:
            keys = keys[:max_blocks]
        await self._await_prefetch(keys)
        fetched = await self._remote_fill(ns, keys, len(self.index.prefix(keys)))
        nbytes = ns.spec.block_nbytes
        async with self._lock:
            self._check_open()
            entries = self.index.prefix(keys)
            for e in entries:
                e.leases += 1
        if out is None:
            # Pinned when a device tier serves it: device -> host is then an async DMA.
            pin = self.device is not None and self.device.device.type == "cuda"
            out = torch.empty((len(entries), nbytes), dtype=torch.uint8, pin_memory=pin)
        elif (
            out.dtype != torch.uint8
            or out.dim() != 2
            or out.shape[0] < len(entries)
            or out.shape[1] != nbytes
        ):
            raise BlockShapeError(
                f"out must be uint8 [>= {len(entries)}, {nbytes}], got {out.dtype} {list(out.shape)}"
            )
        tiers: list[str] = []
        from_disk: list[tuple[int, Entry]] = []
        failed: list[tuple[Entry, DiskRecord]] = []
        ok = 0
        try:
            ok = await self._read(entries, out, tiers, from_disk, failed)
        finally:
            async with self._lock:
                for e in entries:
                    e.leases -= 1
                self._forget_corrupt(failed)
                await self._after_read(entries[:ok], from_disk, out)
        if fetched:
            tiers = [
                "remote" if e.key in fetched else t for e, t in zip(entries, tiers, strict=False)
            ]
        per_tier = {t: tiers[:ok].count(t) for t in set(tiers[:ok])}
        result = LoadResult(out[:ok], tiers[:ok], ns, time.perf_counter() - t0, per_tier)
        self.stats.request("load", result.seconds)
        return result

    async def _read(
        self,
        entries: list[Entry],
        out: torch.Tensor,
        tiers: list[str],
        from_disk: list[tuple[int, Entry]],
        failed: list[tuple[Entry, DiskRecord]],
    ) -> int:
        """Copy ``entries`` into ``out``; returns how many leading blocks are verified."""
        t0 = time.perf_counter()
        device_rows: list[int] = []
        device_keys: list[BlockKey] = []
        host_rows: list[int] = []
        host_slots: list[int] = []
        disk_jobs: list[tuple[int, Entry, DiskRecord]] = []
        for i, e in enumerate(entries):
            if self.device is not None and e.key in self.device:
                device_rows.append(i)
                device_keys.append(e.key)
                tiers.append("device")
            elif e.host_slot is not None:
                host_rows.append(i)
                host_slots.append(e.host_slot)
                tiers.append("host")
            else:
                assert e.disk is not None and self.disk is not None
                disk_jobs.append((i, e, e.disk))
                tiers.append("disk")
        if device_rows:
            assert self.device is not None
            await self.device.read(device_keys, out, device_rows)
            nbytes = len(device_rows) * out.shape[1]
            self.stats.transfer("device", "client", nbytes, time.perf_counter() - t0)
        if host_rows:
            t0 = time.perf_counter()
            assert self.host is not None
            self.host.read(host_slots, out, host_rows)
            nbytes = len(host_rows) * out.shape[1]
            self.stats.transfer("host", "client", nbytes, time.perf_counter() - t0)
        if not disk_jobs:
            return len(entries)
        assert self.disk is not None
        t1 = time.perf_counter()
        disk = self.disk
        oks = await disk.get_many(
            [rec for _, _, rec in disk_jobs], [out[i] for i, _, _ in disk_jobs]
        )
        good = len(entries)
        for (i, e, rec), ok in zip(disk_jobs, oks, strict=True):
            if ok:
                from_disk.append((i, e))
            else:
                failed.append((e, rec))
                good = min(good, i)
        served = sum(e.nbytes for i, e in from_disk if i < good)
        self.stats.transfer("disk", "client", served, time.perf_counter() - t1)
        return good

    async def _after_read(
        self, good: list[Entry], from_disk: list[tuple[int, Entry]], out: torch.Tensor
    ) -> None:
        """Under the lock: touch what was read, promote verified disk blocks to host."""
        for e in good:
            self._touch(e)
        self._note_prefetch_lead(good)
        t0 = time.perf_counter()
        promoted = 0
        for i, e in from_disk:
            if i >= len(good) or e.host_slot is not None or e.key not in self.index:
                continue
            try:
                slot = await self._host_slot()
            except NoRoom:
                break
            assert self.host is not None and self.host_policy is not None
            self.host.view(slot, e.nbytes).copy_(out[i])
            e.host_slot = slot
            self.host_policy.insert(e.key)
            promoted += e.nbytes
        if promoted:
            self.stats.transfer("disk", "host", promoted, time.perf_counter() - t0)

    def _forget_corrupt(self, failed: list[tuple[Entry, DiskRecord]]) -> None:
        """Under the lock: drop disk copies that failed verification (counted, never served)."""
        for e, rec in failed:
            self.stats.corrupt()
            if e.disk is rec:
                self._drop_disk(e)

    def _best_tier(self, e: Entry) -> str:
        if self.device is not None and e.key in self.device:
            return "device"
        return e.best_tier or "miss"

    def _touch(self, e: Entry) -> None:
        self._refresh(e)
        self._sighted(e)

    def _refresh(self, e: Entry) -> None:
        """``e`` is in use: its recency in every tier's policy (no sighting for the shared tier)."""
        e.last_use = time.monotonic()
        if e.host_slot is not None and self.host_policy is not None:
            self.host_policy.touch(e.key)
        if e.disk is not None and self.disk_policy is not None:
            self.disk_policy.touch(e.key)

    # -- prefetch ---------------------------------------------------------

    async def prefetch(
        self,
        ns: Namespace | None = None,
        tokens: Tokens | None = None,
        *,
        session: str | None = None,
    ) -> int:
        """Promote the blocks of ``tokens`` (or of a session) from disk to host, and with a device
        tier on to the device; returns how many blocks moved up (each counted once)."""
        if session is not None:
            sess = self.index.sessions.get(session)
            if sess is None:
                raise UnknownSession(f"unknown session {session!r}")
            keys = sess.keys
        elif ns is not None and tokens is not None:
            keys = _keys(ns, tokens)
        else:
            raise ValueError("prefetch needs a session, or a namespace and tokens")
        t0 = time.perf_counter()
        if (self.disk is None and self.device is None) or self.host is None:
            return 0
        device = self.device
        async with self._lock:
            self._check_open()
            todo = [
                e
                for e in self.index.prefix(keys)
                if (e.host_slot is None and e.disk is not None)
                or (device is not None and e.key not in device)
            ]
            for e in todo:
                e.leases += 1
        if not todo:
            self.stats.prefetched("noop")
            self.stats.request("prefetch", time.perf_counter() - t0)
            return 0
        done = asyncio.Event()
        for e in todo:
            self._prefetching[e.key] = done
        try:
            cold = [e for e in todo if e.host_slot is None]
            promoted = await self._promote(cold) if cold and self.disk is not None else 0
            if device is not None:
                # Every block now in host memory goes on to the device (those already in
                # host memory too); a block counts once however far it moved.
                onto = await self._promote_to_device(todo)
                promoted = len({e.key for e in cold if e.host_slot is not None} | onto)
        finally:
            now = time.monotonic()
            async with self._lock:
                for e in todo:
                    e.leases -= 1
                    if e.host_slot is not None:
                        e.prefetched_at = now
                    if self._prefetching.get(e.key) is done:
                        del self._prefetching[e.key]
            done.set()
        self.stats.prefetched("done" if promoted == len(todo) else "partial")
        self.stats.request("prefetch", time.perf_counter() - t0)
        return promoted

    async def _promote(self, entries: list[Entry]) -> int:
        """Copy disk-only ``entries`` (leased by the caller) into host slots; returns how many.

        Slots are allocated first and the verified bytes read straight into
        them; a block that fails verification is forgotten (counted), and its
        slot goes back. Stops allocating when the host tier has no evictable room.
        """
        assert self.disk is not None and self.host is not None
        host = self.host
        t0 = time.perf_counter()
        async with self._lock:
            if not host.formatted:
                # A prefetch by session right after a restart, before any engine registered.
                self._format_host(max(e.nbytes for e in entries))
            targets: list[tuple[Entry, DiskRecord, int]] = []
            await self._make_host_room(
                sum(1 for e in entries if e.host_slot is None and e.disk is not None)
            )
            for e in entries:
                if e.host_slot is not None or e.disk is None:
                    continue
                try:
                    targets.append((e, e.disk, await self._host_slot()))
                except NoRoom:
                    break
        if not targets:
            return 0
        oks = [False] * len(targets)
        try:
            oks = await self.disk.get_many(
                [rec for _, rec, _ in targets],
                [host.view(slot, e.nbytes) for e, _, slot in targets],
            )
        finally:
            async with self._lock:
                assert self.host_policy is not None
                promoted = 0
                for (e, rec, slot), ok in zip(targets, oks, strict=True):
                    if ok and e.host_slot is None and e.key in self.index:
                        e.host_slot = slot
                        self.host_policy.insert(e.key)
                        promoted += 1
                    else:
                        host.free(slot)
                        if not ok:
                            self._forget_corrupt([(e, rec)])
                nbytes = sum(e.nbytes for (e, _, _), ok in zip(targets, oks, strict=True) if ok)
                self.stats.transfer("disk", "host", nbytes, time.perf_counter() - t0)
        return promoted

    async def _promote_to_device(self, entries: list[Entry]) -> set[BlockKey]:
        """Copy the host-resident ``entries`` (leased by the caller, so their host slots stay)
        into the device tier on its store stream; returns the keys now there."""
        assert self.device is not None and self.host is not None
        hot = [e for e in entries if e.host_slot is not None and e.key not in self.device]
        if not hot or not self.device.formatted:
            return set()
        t0 = time.perf_counter()
        slots = [e.host_slot for e in hot if e.host_slot is not None]
        put = await self.device.put([e.key for e in hot], self.host.buffer, slots)
        if put.evicted:
            self.stats.evicted("device", put.evicted)
        # A block may have left the index while it was copied: its copy must not stay.
        for e in hot:
            if e.key in self.device and e.key not in self.index:
                self.device.discard(e.key)
        done = {e.key for e in hot if e.key in self.device}
        nbytes = sum(e.nbytes for e in hot if e.key in done)
        self.stats.transfer("host", "device", nbytes, time.perf_counter() - t0)
        return done

    async def _await_prefetch(self, keys: list[BlockKey]) -> None:
        """A load that arrives while a prefetch of its blocks is in flight waits for it (rather
        than reading the same blocks twice) and records how late the prefetch was."""
        pending = {ev for k in keys if (ev := self._prefetching.get(k)) is not None}
        if not pending:
            return
        t0 = time.perf_counter()
        await asyncio.gather(*(ev.wait() for ev in pending))
        self.stats.prefetched("late", time.perf_counter() - t0)

    def _note_prefetch_lead(self, entries: list[Entry]) -> None:
        """Under the lock: record how early a prefetch served this read (once per read)."""
        now = time.monotonic()
        leads = [now - e.prefetched_at for e in entries if e.prefetched_at]
        for e in entries:
            e.prefetched_at = 0.0
        if leads:
            self.stats.prefetched("early", min(leads))

    # -- lease-based reads (the socket data plane) ---------------------------

    async def acquire(
        self, ns: Namespace, tokens: Tokens, *, first_block: int = 0, max_blocks: int | None = None
    ) -> Lease:
        """Lease cached blocks ``first_block ..`` of ``tokens`` in host memory, promoting disk
        blocks first.

        The leased blocks cannot be evicted until ``release``; a reader copies
        them out of their host slots (a CPU engine maps the shared arena). The
        lease stops at the first block that is missing, fails verification, or
        finds no host room, and never covers more blocks than the host tier has
        slots: ``Lease.prefix`` says how far the cached run goes, so a reader
        takes a longer prefix in rounds.
        """
        t0 = time.perf_counter()
        await self._expire_due()
        await self.register(ns)
        assert self.host is not None
        keys = _keys(ns, tokens)[first_block:]
        await self._await_prefetch(keys)
        fetched = await self._remote_fill(ns, keys, len(self.index.prefix(keys)))
        async with self._lock:
            self._check_open()
            run = self.index.prefix(keys)
            window = (
                self.host.num_slots if max_blocks is None else min(max_blocks, self.host.num_slots)
            )
            entries = run[:window]
            tiers = ["remote" if e.key in fetched else (e.best_tier or "miss") for e in entries]
            for e in entries:
                e.leases += 1
        if self.disk is not None and any(e.host_slot is None for e in entries):
            await self._promote(entries)
        async with self._lock:
            n = next((i for i, e in enumerate(entries) if e.host_slot is None), len(entries))
            for e in entries[n:]:
                e.leases -= 1
            for e in entries[:n]:
                self._touch(e)
            self._note_prefetch_lead(entries[:n])
            # Counted, not timed: the copy out of the arena happens in the client's process.
            self.stats.transfer("host", "client", sum(e.nbytes for e in entries[:n]), None)
        self.stats.request("acquire", time.perf_counter() - t0)
        return Lease(entries[:n], tiers[:n], len(run))

    async def release(self, lease: Lease) -> None:
        async with self._lock:
            for e in lease.entries:
                e.leases -= 1
            lease.entries = []

    # -- room making ------------------------------------------------------

    async def _host_slot(self) -> int:
        """A free host slot, evicting (and writing back) as needed. Call under the lock."""
        assert self.host is not None and self.host_policy is not None
        try:
            return self.host.allocate()
        except ArenaFull:
            pass
        for key in self.host_policy.victims():
            e = self.index.get(key)
            if e is None or not self.index.evictable(e) or e.host_slot is None:
                continue
            if e.disk is None and self.disk is not None:
                await self._write_to_disk([e])
            self._drop_host(e)
            self.stats.evicted("host")
            return self.host.allocate()
        raise NoRoom(
            f"host tier is full: all {self.host.num_slots} slots hold pinned or in-use blocks; "
            "unpin a session or raise [tiers.host] bytes"
        )

    async def _make_host_room(self, n: int) -> None:
        """Under the lock: free host slots for ``n`` new blocks in one go, writing the dirty
        victims back to disk in one batch (one journal record, not one per block)."""
        assert self.host is not None and self.host_policy is not None
        need = n - self.host.free_slots
        if need <= 0:
            return
        victims: list[Entry] = []
        for key in self.host_policy.victims():
            e = self.index.get(key)
            if e is not None and self.index.evictable(e) and e.host_slot is not None:
                victims.append(e)
                if len(victims) == need:
                    break
        dirty = [e for e in victims if e.disk is None]
        if dirty and self.disk is not None:
            await self._write_to_disk(dirty)
        for e in victims:
            self._drop_host(e)
            self.stats.evicted("host")

    def _drop_host(self, e: Entry) -> None:
        assert self.host is not None and self.host_policy is not None and e.host_slot is not None
        self.host.free(e.host_slot)
        e.host_slot = None
        self.host_policy.remove(e.key)
        if self.index.drop_if_empty(e):
            self.stats.dropped()
            if self.device is not None:
                self.device.discard(e.key)

    def _drop_disk(self, e: Entry) -> None:
        assert self.disk is not None and self.disk_policy is not None and e.disk is not None
        self.disk.discard(e.disk)
        e.disk = None
        self.disk_policy.remove(e.key)
        if self.index.drop_if_empty(e):
            self.stats.dropped()
            if self.device is not None:
                self.device.discard(e.key)

    async def _disk_room(self, nbytes: int, keep: set[BlockKey]) -> bool:
        assert self.disk is not None and self.disk_policy is not None
        if self.disk.has_room(nbytes):
            return True
        for key in self.disk_policy.victims():
            e = self.index.get(key)
            if e is None or key in keep or e.disk is None or not self.index.evictable(e):
                continue
            self._drop_disk(e)
            self.stats.evicted("disk")
            if self.disk.has_room(nbytes):
                return True
        return False

    async def _write_to_disk(self, entries: list[Entry]) -> int:
        """Copy host-resident ``entries`` to disk (evicting disk blocks as needed)."""
        assert self.disk is not None and self.host is not None and self.disk_policy is not None
        t0 = time.perf_counter()
        by_array: dict[str, list[Entry]] = {}
        keep = {e.key for e in entries}
        for e in entries:
            if e.disk is None and e.host_slot is not None:
                by_array.setdefault(e.array, []).append(e)
        written = 0
        for array, group in by_array.items():
            fits: list[Entry] = []
            for e in group:
                if not await self._disk_room(e.nbytes * (len(fits) + 1), keep):
                    self.stats.error("disk_full")
                    break
                fits.append(e)
            items = [
                (e.key, self.host.view(e.host_slot, e.nbytes))
                for e in fits
                if e.host_slot is not None
            ]
            results = await self.disk.put_many(array, items)
            for e, res in zip(fits, results, strict=True):
                if isinstance(res, DiskRecord):
                    # The checksum is taken when a block first leaves memory (in the
                    # disk tier's I/O threads): it guards the copies that can tear or
                    # rot, and keeps a host save at memcpy speed.
                    e.checksum = res.checksum
                    e.disk = res
                    self.disk_policy.insert(e.key)
                    written += e.nbytes
                elif isinstance(res, DiskFull):
                    self.stats.error("disk_full")
                else:
                    self.stats.error("disk_write")
                    log.warning("disk write failed: %s", res)
        if written:
            self.stats.transfer("host", "disk", written, time.perf_counter() - t0)
        return written

    # -- shared tier ----------------------------------------------------------

    def _sighted(self, e: Entry) -> None:
        """A save or a read met ``e``: queue it for the shared tier once it is worth sharing."""
        if self.remote is None or e.remote or e.key in self.uploads or not self.sharing.admission:
            return
        if self._share_admission.admit(e.key):
            self._share(e)

    def _share_session(self, sess: Session) -> None:
        if self.remote is None or not self.sharing.pinned:
            return
        for k in sess.keys:
            e = self.index.get(k)
            if e is not None and not e.remote:
                self._share(e)

    def _share(self, e: Entry) -> None:
        if self._closed:
            return
        self.uploads.offer(e.key, e.array)
        if self._uploader is None or self._uploader.done():
            self._uploader = asyncio.create_task(self._upload_loop(), name="tiercache-upload")

    async def _upload_loop(self) -> None:
        remote = self.remote
        assert remote is not None
        while True:
            await self.uploads.ready.wait()
            pause = remote.down_until - time.monotonic()
            if not remote.up and pause > 0:
                await asyncio.sleep(pause)  # the next upload is the health probe
            batch = self.uploads.take(UPLOAD_BATCH)
            self._in_flight = len(batch)
            try:
                await self._upload(batch)
            finally:
                self._in_flight = 0
                self._upload_done.set()

    async def _upload(self, batch: list[tuple[BlockKey, str]]) -> None:
        """PUT a batch of queued blocks; failures go back to the queue and mark the store down."""
        remote = self.remote
        assert remote is not None
        t0 = time.perf_counter()
        sources = await self._upload_sources(batch)

        async def one(e: Entry, data: torch.Tensor) -> None:
            ns = self.namespaces.get(e.array)
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
                    self.stats.error("remote_write")
            else:
                e.remote = True
                self.uploads.uploaded += 1
                moved[src] = moved.get(src, 0) + e.nbytes
        for src, nbytes in moved.items():
            self.stats.transfer(src, "remote", nbytes, time.perf_counter() - t0)
        if retry:
            log.warning(
                "shared tier: %d uploads failed, will retry: %s", len(retry), remote.last_error
            )
            self.uploads.put_back(retry)

    async def _upload_sources(
        self, batch: list[tuple[BlockKey, str]]
    ) -> list[tuple[Entry, str, torch.Tensor]]:
        """The bytes of queued blocks: copied out of host memory under the lock, or read (and
        verified) from disk under a lease. A block no longer cached is dropped and counted."""
        out: list[tuple[Entry, str, torch.Tensor]] = []
        from_disk: list[tuple[Entry, DiskRecord]] = []
        async with self._lock:
            for key, _ in batch:
                e = self.index.get(key)
                if e is None:
                    self.uploads.dropped["evicted"] += 1
                elif e.remote:
                    continue
                elif e.host_slot is not None:
                    assert self.host is not None
                    out.append((e, "host", self.host.view(e.host_slot, e.nbytes).clone()))
                elif e.disk is not None:
                    e.leases += 1
                    from_disk.append((e, e.disk))
        if from_disk:
            assert self.disk is not None
            bufs = [torch.empty(e.nbytes, dtype=torch.uint8) for e, _ in from_disk]
            oks = [False] * len(from_disk)
            try:
                oks = await self.disk.get_many([rec for _, rec in from_disk], bufs)
            finally:
                async with self._lock:
                    for e, _ in from_disk:
                        e.leases -= 1
                    self._forget_corrupt(
                        [j for j, ok in zip(from_disk, oks, strict=True) if not ok]
                    )
            out += [
                (e, "disk", b) for (e, _), b, ok in zip(from_disk, bufs, oks, strict=True) if ok
            ]
            if not all(oks):
                self.uploads.dropped["corrupt"] += oks.count(False)
        return out

    async def _remote_fill(self, ns: Namespace, keys: list[BlockKey], start: int) -> set[BlockKey]:
        """Fetch ``keys[start:]`` from the shared tier into host memory (see the module doc):
        waits for the fill at most the tier's timeout; returns the keys it promoted so far."""
        remote = self.remote
        if remote is None or start >= len(keys) or not remote.available():
            return set()
        array = await self.register(ns)
        first = keys[start]
        fill = self._fills.get(first)
        if fill is None:
            got: set[BlockKey] = set()
            task = asyncio.create_task(
                self._fetch(array, ns.spec.block_nbytes, keys[start:], got), name="tiercache-fill"
            )
            fill = self._fills[first] = (task, got)
            task.add_done_callback(lambda t: self._fill_done(first, t))
        task, got = fill
        if not self._remote_slow:
            done, _ = await asyncio.wait({task}, timeout=remote.timeout)
            if not done:
                self._remote_slow = True
                self.stats.error("remote_timeout")
        return set(got)

    def _fill_done(self, first: BlockKey, task: asyncio.Task[None]) -> None:
        if self._fills.get(first, (None,))[0] is task:
            del self._fills[first]
        if not task.cancelled() and task.exception() is None and self.remote and self.remote.up:
            self._remote_slow = False  # the store answered a whole fill: wait for it again
        elif not task.cancelled():
            log.warning("shared tier fill failed: %s", task.exception())

    async def _fetch(
        self, array: str, nbytes: int, keys: list[BlockKey], got: set[BlockKey]
    ) -> None:
        """The fill task: fetch blocks in chain order, promote the verified ones, stop at the
        first block that is absent, corrupt, unreadable or finds no host room."""
        remote = self.remote
        assert remote is not None
        i, window = 0, 1
        while i < len(keys) and not self._closed:
            chunk = keys[i : i + window]
            t0 = time.perf_counter()
            results = await asyncio.gather(
                *(self._fetch_one(remote, array, k, nbytes) for k in chunk),
                return_exceptions=True,
            )
            good: list[tuple[BlockKey, tuple[np.ndarray, bytes] | None]] = []
            for k, res in zip(chunk, results, strict=True):
                if isinstance(res, CorruptObject):
                    log.warning("%s; treated as a miss", res)
                    self.stats.corrupt()
                elif isinstance(res, BaseException):
                    remote.failed(res)
                    self.stats.error("remote_read")
                elif not isinstance(res, str):
                    good.append((k, res))
                    continue
                elif res == "local":
                    good.append((k, None))
                    continue
                break
            adopted, complete = await self._adopt_remote(array, nbytes, good, got)
            if adopted:
                self.stats.transfer("remote", "host", adopted * nbytes, time.perf_counter() - t0)
            if len(good) < len(chunk) or not complete:
                return
            i += len(chunk)
            window = min(window * 4, FETCH_WINDOW)

    async def _fetch_one(
        self, remote: RemoteTier, array: str, key: BlockKey, nbytes: int
    ) -> tuple[np.ndarray, bytes] | str:
        """A block's verified bytes and checksum, or "local" (already here) or "absent"."""
        if key in self.index:
            return "local"
        got = await remote.get(array, key, nbytes)
        return "absent" if got is None else got

    async def _adopt_remote(
        self,
        array: str,
        nbytes: int,
        blocks: list[tuple[BlockKey, tuple[np.ndarray, bytes] | None]],
        got: set[BlockKey],
    ) -> tuple[int, bool]:
        """Under the lock: put fetched blocks into host slots and the index (visible from now).
        Returns how many were adopted, and whether all of ``blocks`` are now local."""
        adopted = 0
        async with self._lock:
            if self._closed or not blocks:
                return 0, not blocks
            assert self.host is not None
            if not self.host.formatted:
                self._format_host(nbytes)
            await self._make_host_room(sum(1 for k, _ in blocks if k not in self.index))
            now = time.monotonic()
            parent: BlockKey | None = None  # the blocks come in chain order
            for key, fetched in blocks:
                parent, up = key, parent
                if key in self.index or fetched is None:
                    continue
                try:
                    slot = await self._host_slot()
                except NoRoom:
                    return adopted, False
                data, csum = fetched
                np.copyto(self.host.view(slot, nbytes).numpy(), data)
                e = Entry(key, array, nbytes, csum, host_slot=slot, last_use=now, remote=True)
                self.index.add(e)
                assert self.host_policy is not None
                self.host_policy.insert(key, up)
                got.add(key)
                adopted += 1
        return adopted, True

    async def drain_uploads(self, seconds: float) -> int:
        """Wait until the write-behind queue is empty (or ``timeout``); returns what is left."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while len(self.uploads) or self._in_flight:
                    self._upload_done.clear()
                    await self._upload_done.wait()
        return len(self.uploads) + self._in_flight

    def remote_state(self) -> dict[str, object] | None:
        """The shared tier's state for ``stats``: health, queue, uploads, losses."""
        if self.remote is None:
            return None
        return {
            **self.remote.state(),
            "queue_blocks": len(self.uploads),
            "queue_bound": self.uploads.bound,
            "uploaded_blocks": self.uploads.uploaded,
            "dropped_blocks": dict(self.uploads.dropped),
            "admission": self.sharing.admission,
        }

    # -- sessions, pins, eviction -------------------------------------------

    async def pin(self, session: str) -> int:
        async with self._lock:
            sess = self.index.sessions.get(session)
            if sess is None:
                raise UnknownSession(f"unknown session {session!r}")
            if sess.pinned:
                return 0
            sess.pinned = True
            n = self._pin_keys(sess)
            self._share_session(sess)
            await self._persist(sess)
            return n

    async def unpin(self, session: str) -> int:
        async with self._lock:
            sess = self.index.sessions.get(session)
            if sess is None:
                raise UnknownSession(f"unknown session {session!r}")
            if not sess.pinned:
                return 0
            sess.pinned = False
            n = self._unpin_keys(sess)
            await self._persist(sess)
            return n

    def _pin_keys(self, sess: Session) -> int:
        """Pin every key of ``sess`` not yet pinned by it; returns how many of them are stored.

        Pins belong to keys, not entries: a block of a pinned session stays
        protected even if it is dropped (a corrupt disk copy) and saved again.
        """
        n = 0
        for k in sess.keys:
            if k not in sess.pinned_keys:
                self.index.pins[k] += 1
                sess.pinned_keys.add(k)
                n += k in self.index
        return n

    def _unpin_keys(self, sess: Session) -> int:
        n = 0
        for k in sess.pinned_keys:
            self.index.pins[k] -= 1
            if self.index.pins[k] <= 0:
                del self.index.pins[k]
            n += k in self.index
        sess.pinned_keys.clear()
        return n

    async def set_ttl(self, session: str, seconds: float | None) -> None:
        """After ``seconds`` the session is forgotten and its blocks evicted (``None`` clears it)."""
        if seconds is not None and seconds <= 0:
            raise ValueError(f"ttl must be positive seconds, got {seconds}")
        async with self._lock:
            sess = self.index.sessions.get(session)
            if sess is None:
                raise UnknownSession(f"unknown session {session!r}")
            sess.expires = None if seconds is None else time.time() + seconds
            if sess.expires is not None:
                self._next_expiry = min(self._next_expiry, sess.expires)
            await self._persist(sess)

    async def expire(self, now: float | None = None) -> list[str]:
        """Forget every session whose TTL has passed; returns their ids.

        Saves and loads call it whenever the earliest deadline has passed, so
        TTLs hold in embedded mode too; the daemon also runs it on a timer.
        """
        now = time.time() if now is None else now
        deadlines = [s.expires for s in self.index.sessions.values() if s.expires is not None]
        gone = [
            s.id for s in self.index.sessions.values() if s.expires is not None and s.expires <= now
        ]
        self._next_expiry = min((d for d in deadlines if d > now), default=math.inf)
        for sid in gone:
            await self.evict(session=sid, force=True)
        return gone

    async def _expire_due(self) -> None:
        if self._next_expiry <= time.time():
            await self.expire()

    async def evict(
        self,
        *,
        session: str | None = None,
        keys: Sequence[BlockKey] | None = None,
        force: bool = False,
    ) -> int:
        """Remove blocks from every tier: a session's (and forget it), or the given keys.

        A session's blocks still used by another session are kept. A pinned
        session needs ``force`` (TTL expiry) or an unpin first.
        """
        async with self._lock:
            if session is not None:
                sess = self.index.sessions.get(session)
                if sess is None:
                    raise UnknownSession(f"unknown session {session!r}")
                if sess.pinned and not force:
                    raise SessionPinned(f"session {session!r} is pinned; unpin it first")
                self._unpin_keys(sess)
                del self.index.sessions[session]
                if self.disk is not None:
                    try:
                        await self.disk.delete_session(session)
                    except OSError as err:
                        self.stats.error("session_write")
                        log.warning("could not delete the session record: %s", err)
                shared = {k for s in self.index.sessions.values() for k in s.keys}
                targets = [k for k in sess.keys if k not in shared]
            else:
                targets = list(keys or [])
            n = 0
            for k in targets:
                e = self.index.get(k)
                if e is None or not self.index.evictable(e):
                    continue
                if e.host_slot is not None:
                    self._drop_host(e)
                if e.disk is not None:
                    self._drop_disk(e)
                n += 1
            if self.disk is not None:
                try:
                    await self.disk.sync_journal()
                except (DiskFull, StoreError) as err:
                    # The blocks are gone from the index; their slots stay unused
                    # until the del records can be written.
                    self.stats.error("disk_full" if isinstance(err, DiskFull) else "disk_write")
                    log.warning("evict: %s", err)
            return n

    # -- flush / close ------------------------------------------------------

    async def flush(self) -> int:
        """Write every host-only block to disk and sync the journal; returns bytes written."""
        if self.disk is None:
            return 0
        async with self._lock:
            dirty = [e for e in self.index if e.host_slot is not None and e.disk is None]
            for e in dirty:
                e.leases += 1
            try:
                written = await self._write_to_disk(dirty) if dirty else 0
            finally:
                for e in dirty:
                    e.leases -= 1
            await self.disk.sync_journal()
            return written

    def _check_open(self) -> None:
        if self._closed:
            raise CacheError("the cache is closed")

    async def close(self, flush: bool = True) -> None:
        if self._closed:
            return
        if flush:
            await self.flush()
            if self.remote is not None and self.remote.available():
                await self.drain_uploads(self.sharing.drain_seconds)
        self._closed = True
        tasks = [t for t, _ in self._fills.values()]
        if self._uploader is not None:
            tasks.append(self._uploader)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if len(self.uploads):
            self.uploads.dropped["shutdown"] += len(self.uploads)
            log.warning("shared tier: %d queued blocks not uploaded at close", len(self.uploads))
        if self.disk is not None:
            await self.disk.close()
        if self.host is not None:
            self.host.close()
        if self.device is not None:
            self.device.close()

    def usage(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        if self.device is not None:
            out["device"] = {
                "capacity_bytes": self.device.capacity_bytes,
                "used_bytes": self.device.used_bytes,
                "blocks": len(self.device),
            }
        if self.host is not None:
            out["host"] = {
                "capacity_bytes": self.host.capacity_bytes,
                "used_bytes": self.host.used_bytes,
                "blocks": self.host.num_slots - self.host.free_slots,
            }
        if self.disk is not None:
            out["disk"] = {
                "capacity_bytes": self.disk.capacity_bytes,
                "used_bytes": self.disk.used_bytes,
                "blocks": self.disk.num_blocks,
            }
        return out
