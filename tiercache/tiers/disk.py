"""Disk tier: blocks as chunks of zarr v3 arrays, with a journal that survives kill -9.

Layout in the store (any zarr store URL; ``file://`` by default)::

    ns/<namespace-hex>/zarr.json     uint8 array (slots, block_nbytes), chunks (1, block_nbytes),
                                     no compressor; attributes: model, KVSpec, logical dtype
    ns/<namespace-hex>/c/<slot>/0    one block's raw bytes (a valid zarr chunk)
    journal/<seq>                    msgpack records + xxh64 trailer: put / del of slots
    sessions/<blake2b(id)>           one session: id, key chains, pinned, TTL deadline (+ xxh64)

Blocks are read and written at the *store* level (``store.set`` / ``store.get``
on the chunk key), many at a time with ``asyncio.gather``. The data stays a
valid zarr array that zarr itself can read, but the per-chunk codec pipeline
and indexing machinery stay out of the hot path; going through
``AsyncArray.__setitem__`` per block measured 7% of plain file write at 64 KiB
(see docs/disk-layout.md for the measurements behind this choice). The logical
dtype (bf16, fp8, ...) lives in the array attributes, since zarr has no such
dtypes.

Integrity: every block has an xxh3-128 checksum, verified on every read; a
block that fails (torn, truncated, overwritten, missing) is a miss and is
counted, never served. A block becomes visible only after its chunk *and* its
journal record are written, so after kill -9 the journal names exactly the
blocks whose writes completed. A freed slot is reused only once its ``del``
record is in the journal, so a crash can never leave a record pointing at
another block's bytes.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch
import xxhash
import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import Buffer
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from tiercache.keys import BlockKey, Namespace
from tiercache.spec import KVSpec
from tiercache.storage_format import parse_format, zarr_attrs
from tiercache.tiers.blockio import BlockIO, SlabIO, block_io_for
from tiercache.transfer import outlast_cancel

log = logging.getLogger(__name__)

JOURNAL = "journal/"
SESSIONS = "sessions/"
_PUT, _DEL = 1, 2
# A journal record's fields: put (op, array, slot, key, nbytes, checksum), del (op, array, slot).
_RECORD: dict[int, tuple[type, ...]] = {
    _PUT: (int, str, int, bytes, int, bytes),
    _DEL: (int, str, int),
}
# Compact the journal (one snapshot segment) once it has this many segments.
COMPACT_AFTER = 512


class DiskFull(RuntimeError):
    """The disk tier's byte budget (or the device itself) has no room for a block."""


class StoreError(RuntimeError):
    """The disk store cannot be opened or used (bad URL, unwritable, locked)."""


def as_store_error(e: OSError, what: str) -> DiskFull | StoreError:
    """An OSError from the store as the typed error callers handle: full, or otherwise failed."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk tier {what} failed: the device is full ({e.strerror})")
    return StoreError(f"disk tier {what} failed: {e}")


@dataclass(slots=True)
class DiskRecord:
    """Where one block lives on disk; immutable once visible."""

    key: BlockKey
    array: str
    slot: int
    nbytes: int
    checksum: bytes


@dataclass(slots=True)
class _Array:
    path: str
    block_nbytes: int
    meta: Any
    free: list[int]
    next_slot: int
    pending_free: list[int]


def _segment(body: bytes) -> tuple[bool, list[list[Any]]]:
    """A journal segment's (snapshot, records); a ValueError saying what is wrong where its
    bytes are not a segment of this format."""
    try:
        segment = msgpack.unpackb(body)
    except (ValueError, msgpack.UnpackException) as e:
        raise ValueError(f"not msgpack: {type(e).__name__}") from None
    if not isinstance(segment, dict) or set(segment) != {"snapshot", "records"}:
        raise ValueError("not a map of snapshot and records")
    snapshot, recs = segment["snapshot"], segment["records"]
    if not isinstance(snapshot, bool) or not isinstance(recs, list):
        raise ValueError("snapshot is not a bool or records not a list")
    for r in recs:
        shape = _RECORD.get(r[0]) if isinstance(r, list) and r and type(r[0]) is int else None
        if shape is None or len(r) != len(shape) or not all(map(isinstance, r, shape)):
            raise ValueError(f"record {r!r:.80} is neither a put nor a del")
    return snapshot, recs


def _session(body: bytes) -> dict[str, Any]:
    """A session record (``DiskTier.put_session``'s map; ``chains`` may be absent, in a record
    from before it); a ValueError where its bytes are not one."""
    try:
        rec = msgpack.unpackb(body)
    except (ValueError, msgpack.UnpackException) as e:
        raise ValueError(f"not msgpack: {type(e).__name__}") from None
    keys = rec.get("keys") if isinstance(rec, dict) else None
    chains = rec.get("chains", [["", len(keys)]]) if isinstance(keys, list) else None
    if not (
        isinstance(rec, dict)
        and isinstance(rec.get("id"), str)
        and isinstance(keys, list)
        and all(isinstance(k, bytes) for k in keys)
        and isinstance(chains, list)
        and all(
            isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and type(c[1]) is int
            for c in chains
        )
        and sum(n for _, n in chains) == len(keys)
        and isinstance(rec.get("pinned"), bool)
        and "expires" in rec
        and (rec["expires"] is None or isinstance(rec["expires"], int | float))
    ):
        raise ValueError("not a map of id, keys, chains, pinned and expires")
    return rec


def _sort_out(
    records: list[DiskRecord], present: dict[str, dict[int, int]]
) -> tuple[list[DiskRecord], list[DiskRecord], int]:
    """Replayed records -> (to adopt, to drop, how many were missing or cut short on disk).
    Dropped too: a second copy of a block (a del record lost, say to a power cut): the index
    holds one, so the other would take its bytes for good, evicted never."""
    keep: list[DiskRecord] = []
    drop: list[DiskRecord] = []
    keys: set[BlockKey] = set()
    missing = 0
    for rec in records:
        if present.get(rec.array, {}).get(rec.slot, -1) < rec.nbytes:
            log.warning(
                "disk block in slot %s/%d is missing or truncated; dropped", rec.array, rec.slot
            )
            missing += 1
            drop.append(rec)
        elif rec.key in keys:
            log.warning("disk block in slot %s/%d is a second copy; dropped", rec.array, rec.slot)
            drop.append(rec)
        else:
            keys.add(rec.key)
            keep.append(rec)
    return keep, drop, missing


async def _journal_keys(store: Store) -> list[str]:
    """The journal's files, or a StoreError saying why they cannot be listed."""
    try:
        return [k async for k in store.list_prefix(JOURNAL)]
    except OSError as e:
        raise as_store_error(e, "journal listing") from e


async def _drop_segments(store: Store, keys: list[str]) -> None:
    """Delete journal segments a snapshot replaced. One that cannot go (a read-only or
    immutable file, a store that refuses) is left, logged: it is older than the snapshot,
    which the replay reads over it, and the next compaction tries it again. It was raised
    before, and made an open (whose compaction deletes them) fail outright."""
    for k in keys:
        try:
            await store.delete(k)
        except OSError as e:
            log.warning("journal segment %s outlived its compaction (left for the next): %s", k, e)


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """A zarr store for ``url``: a plain path or ``file://``, ``memory://``, or any fsspec URL."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" not in url:
        return LocalStore(Path(url).expanduser())
    if url.startswith("memory://"):
        return MemoryStore()
    try:
        return FsspecStore.from_url(url, storage_options=storage_options or {})
    except Exception as e:
        raise StoreError(f"cannot open disk store {url!r}: {e}") from e


class DiskTier:
    """Slot allocation, journal and verified I/O over one zarr store."""

    def __init__(self, store: Store, capacity_bytes: int, url: str = "") -> None:
        self.store = store
        self.url = url
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._arrays: dict[str, _Array] = {}
        self._live: dict[tuple[str, int], DiskRecord] = {}
        self._pending: list[tuple[Any, ...]] = []
        self._seq = 0
        self._segments = 0
        self._journal_lock = asyncio.Lock()
        self._register_lock = asyncio.Lock()  # serialises array creation
        self._lockfile: int | None = None
        self.io: BlockIO = block_io_for(store)
        self.corrupt_reads = 0

    # -- open / recover ---------------------------------------------------

    @classmethod
    async def open(
        cls, url: str, capacity_bytes: int, storage_options: dict[str, Any] | None = None
    ) -> DiskTier:
        """Open (or create) the store and replay its journal.

        Every block the journal names is checked for presence and size; a
        missing or short chunk is dropped here, a corrupted one on first read.
        The journal is then compacted; on a full device it opens on the journal
        as it stands. A failed open releases the store's lock (a retry can follow).
        """
        store = open_store(url, storage_options)
        tier = cls(store, capacity_bytes, url)
        if isinstance(store, LocalStore):
            tier._lock_local(Path(store.root))
        try:
            await tier._recover()
        except BaseException:
            tier._release()  # a caller may retry in this process: the lock must not stay held
            raise
        return tier

    async def _recover(self) -> None:
        records = await self._replay()
        present = {path: await self.io.present(path) for path in self._arrays}
        keep, drop, missing = _sort_out(records, present)
        self._pending += [(_DEL, rec.array, rec.slot) for rec in drop]
        self.corrupt_reads += missing
        for rec in keep:
            self._adopt(rec)
        for arr in self._arrays.values():
            used = {s for (a, s) in self._live if a == arr.path}
            arr.free = [s for s in range(arr.next_slot) if s not in used]
        try:
            await self._compact()
        except (DiskFull, StoreError) as e:
            # The journal as it stands is the state just replayed: open on it. What the
            # replay dropped stays pending, written by the next sync once there is room.
            log.warning("journal compaction at open failed, will retry: %s", e)

    def _release(self) -> None:
        """Let go of the files and the lock without writing anything (``close`` syncs)."""
        self.io.close()
        self.store.close()
        if self._lockfile is not None:
            os.close(self._lockfile)
            self._lockfile = None

    def _lock_local(self, root: Path) -> None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"cannot create disk tier directory {root}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"disk tier {root} is in use by another process; give each daemon its own "
                "[tiers.disk] url"
            ) from None
        self._lockfile = fd

    async def _replay(self) -> list[DiskRecord]:
        keys = sorted([k async for k in self.store.list_prefix(JOURNAL)])
        live: dict[tuple[str, int], DiskRecord] = {}
        for k in keys:
            if not re.fullmatch(r"[0-9]{16}", k[len(JOURNAL) :]):
                # A store's temporary file (``<seq>.<uuid>.partial``): a write killed before
                # its rename never happened, whatever its bytes; compaction removes it.
                log.warning("journal file %s was never completed; ignored", k)
                continue
            buf = await self.store.get(k, prototype=default_buffer_prototype())
            if buf is None:
                continue
            raw = buf.to_bytes()
            body, trailer = raw[:-8], raw[-8:]
            if len(raw) <= 8 or xxhash.xxh64_digest(body) != trailer:
                log.warning("journal segment %s is torn; its records are ignored", k)
                continue
            try:
                snapshot, recs = _segment(body)
            except ValueError as e:
                # Written whole (its checksum holds) but not in this version's format: a
                # newer release's journal, or another program's file. Dropping it would lose
                # the blocks it names at the next compaction.
                raise StoreError(
                    f"disk tier journal segment {k} in {self.url or 'the store'} is not a "
                    f"journal this version of tiercache reads ({e}); open the store with the "
                    "release that wrote it, or give [tiers.disk] url a new directory"
                ) from None
            self._seq = max(self._seq, int(k[len(JOURNAL) :]) + 1)
            if snapshot:
                # A snapshot is the whole state; older segments may survive a
                # crash during compaction and must not add to it.
                live.clear()
            for r in recs:
                if r[0] == _PUT:
                    _, array, slot, key, nbytes, csum = r
                    live[(array, slot)] = DiskRecord(key, array, slot, nbytes, csum)
                else:
                    live.pop((r[1], r[2]), None)
        for array in {a for (a, _) in live}:
            await self._open_array(array)
        for arr in self._arrays.values():
            arr.next_slot = 1 + max((s for (a, s) in live if a == arr.path), default=-1)
        return list(live.values())

    def _adopt(self, rec: DiskRecord) -> None:
        self._live[(rec.array, rec.slot)] = rec
        self.used_bytes += self._arrays[rec.array].block_nbytes

    @property
    def num_blocks(self) -> int:
        return len(self._live)

    @property
    def records(self) -> list[DiskRecord]:
        return list(self._live.values())

    # -- arrays -----------------------------------------------------------

    async def _open_array(self, path: str) -> _Array:
        arr = self._arrays.get(path)
        if arr is not None:
            return arr
        try:
            za = await zarr.api.asynchronous.open_array(store=self.store, path=path)
        except (FileNotFoundError, KeyError) as e:
            raise StoreError(f"disk tier array {path} is missing its metadata: {e}") from e
        except ValueError as e:  # its zarr.json cut short, garbage, or not an array's
            raise StoreError(f"disk tier array {path} has unreadable metadata: {e}") from e
        try:
            za = await self._fit(za, path)
        except OSError as e:  # a full device: this tier reads and writes its slots all the same
            log.warning("disk tier array %s keeps its shape %s: %s", path, za.shape, e)
        arr = _Array(path, int(za.shape[1]), za.metadata, [], 0, [])
        try:
            self.io.attach(path, za.metadata, arr.block_nbytes)
        except ValueError as e:
            raise StoreError(str(e)) from e
        self._arrays[path] = arr
        return arr

    async def _fit(self, za: Any, path: str) -> Any:
        """``za`` grown to the slots this tier's byte budget gives blocks of its size (a
        budget raised since it was created): zarr reads no chunk beyond an array's shape."""
        nbytes = int(za.shape[1])
        slots = max(1, self.capacity_bytes // nbytes)
        if za.shape[0] >= slots:
            return za
        await za.resize((slots, nbytes))
        return await zarr.api.asynchronous.open_array(store=self.store, path=path)

    async def register(self, ns: Namespace) -> str:
        """Create (or open) the array that holds ``ns``'s blocks; returns its path."""
        path = ns.array
        if path in self._arrays:
            return path
        # Many clients register the same model at once: without the lock two of them
        # both find no array and both create it, and the second creation fails.
        async with self._register_lock:
            if path not in self._arrays:
                await self._create_or_open(ns, path)
        return path

    async def _create_or_open(self, ns: Namespace, path: str) -> None:
        nbytes = ns.block_nbytes
        slots = max(1, self.capacity_bytes // nbytes)
        try:
            za = await zarr.api.asynchronous.open_array(store=self.store, path=path)
        except FileNotFoundError:
            za = await zarr.api.asynchronous.create_array(
                store=self.store,
                name=path,
                shape=(slots, nbytes),
                dtype="uint8",
                **self.io.array_kwargs(nbytes),
                compressors=None,
                filters=None,
                fill_value=0,
                attributes={
                    "tiercache": {
                        "model": ns.model,
                        "group": ns.group,
                        "spec": ns.spec.to_dict(),
                        "logical_dtype": ns.spec.dtype,
                        "block_shape": list(ns.spec.block_shape),
                        "format": zarr_attrs(ns.spec, parse_format(ns.store_dtype)),
                    }
                },
            )
        except OSError as e:
            raise StoreError(f"cannot create disk tier array {path} in {self.url}: {e}") from e
        except ValueError as e:  # its zarr.json cut short, garbage, or not an array's
            raise StoreError(
                f"disk tier array {path} in {self.url} has unreadable metadata: {e}"
            ) from e
        za = await self._fit(za, path)
        try:
            self.io.attach(path, za.metadata, nbytes)
        except ValueError as e:
            raise StoreError(str(e)) from e
        self._arrays[path] = _Array(path, nbytes, za.metadata, [], 0, [])

    def store_dtype(self, path: str) -> str | None:
        """The storage format a namespace array on this tier was created with (its zarr
        attributes), or None for an array this tier does not have open."""
        arr = self._arrays.get(path)
        if arr is None:
            return None
        attrs = getattr(arr.meta, "attributes", {}) or {}
        fmt = attrs.get("tiercache", {}).get("format", {}).get("store_dtype")
        return str(fmt) if fmt else None

    def spec(self, path: str) -> KVSpec | None:
        """The KVSpec a namespace array on this tier was created for (its zarr attributes),
        or None for an array this tier does not have open."""
        arr = self._arrays.get(path)
        attrs = (getattr(arr.meta, "attributes", {}) or {}) if arr is not None else {}
        spec = attrs.get("tiercache", {}).get("spec")
        return KVSpec.from_dict(dict(spec)) if spec else None

    def location(self, rec: DiskRecord) -> tuple[Path, int]:
        """The file and byte offset of a block on a local disk tier (for scrubbing and tests)."""
        if not isinstance(self.io, SlabIO):
            raise StoreError(f"blocks of {self.url} are not in local files")
        return self.io.location(rec.array, rec.slot)

    # -- data path --------------------------------------------------------

    def has_room(self, nbytes: int) -> bool:
        return self.used_bytes + nbytes <= self.capacity_bytes

    async def _allocate(self, arr: _Array) -> int:
        if not self.has_room(arr.block_nbytes):
            raise DiskFull(
                f"disk tier budget of {self.capacity_bytes} B is full; raise [tiers.disk] bytes "
                "or let eviction make room"
            )
        if not arr.free and arr.pending_free:
            await self.sync_journal()
        if arr.free:
            slot = arr.free.pop()
        else:
            slot = arr.next_slot
            arr.next_slot += 1
        self.used_bytes += arr.block_nbytes
        return slot

    async def put_many(
        self, array: str, items: Iterable[tuple[BlockKey, torch.Tensor]]
    ) -> list[DiskRecord | BaseException]:
        """Write blocks (key, uint8 tensor) in one batch; journal the ones that landed.

        Returns one DiskRecord (with the checksum of the bytes written) per
        item, or the error that stopped it (``DiskFull``, ``StoreError``); a
        failed block takes no slot.
        """
        arr = self._arrays[array]
        items = list(items)
        slots: list[int | DiskFull | StoreError] = []
        for _ in items:
            try:
                slots.append(await self._allocate(arr))
            except (DiskFull, StoreError) as e:  # no room, or the journal could not free a slot
                slots.append(e)
        writes = [
            (s, data) for s, (_, data) in zip(slots, items, strict=True) if isinstance(s, int)
        ]
        write = asyncio.ensure_future(self.io.write(arr.path, writes))
        try:
            outcomes = iter(await asyncio.shield(write))
        except asyncio.CancelledError:
            # The caller gave up (a cancelled save or eviction) while the I/O threads write
            # on: their slots go back once those writes end, journaled nowhere. Otherwise
            # their bytes stayed counted in used_bytes for the life of the process.
            taken = [s for s, _ in writes]
            write.add_done_callback(lambda _: self._unallocate(arr, taken))
            raise
        results: list[DiskRecord | BaseException] = []
        for (key, data), slot in zip(items, slots, strict=True):
            if not isinstance(slot, int):
                results.append(slot)
                continue
            out = next(outcomes)
            if isinstance(out, bytes):
                results.append(DiskRecord(key, arr.path, slot, int(data.numel()), out))
            else:
                self._unallocate(arr, [slot])
                results.append(as_store_error(out, "block write"))
        done = [r for r in results if isinstance(r, DiskRecord)]
        for rec in done:
            # In _live before the journal write so a concurrent compaction keeps it;
            # the caller makes it visible only after this returns.
            self._live[(rec.array, rec.slot)] = rec
            self._pending.append((_PUT, rec.array, rec.slot, rec.key, rec.nbytes, rec.checksum))
        if done:
            try:
                await self.sync_journal()
            except asyncio.CancelledError:
                # No caller will make these blocks visible: a del follows their put.
                for rec in done:
                    self.discard(rec)
                raise
            except (DiskFull, StoreError) as e:
                # The blocks landed but their records did not: forget them. Their
                # slots are reusable at once, since no journal record names them.
                ours = {(r.array, r.slot) for r in done}
                self._pending = [
                    p for p in self._pending if not (p[0] == _PUT and (p[1], p[2]) in ours)
                ]
                for rec in done:
                    self._live.pop((rec.array, rec.slot), None)
                self._unallocate(arr, [rec.slot for rec in done])
                return [e if isinstance(r, DiskRecord) else r for r in results]
        return results

    def _unallocate(self, arr: _Array, slots: list[int]) -> None:
        """Give back slots ``_allocate`` took for blocks that were never recorded."""
        for slot in slots:
            self.used_bytes -= arr.block_nbytes
            arr.free.append(slot)

    async def get_many(
        self, recs: Sequence[DiskRecord], outs: Sequence[torch.Tensor]
    ) -> list[bool]:
        """Read blocks into ``outs`` (uint8, at least ``nbytes`` each); False where one does not
        verify (missing, truncated, torn or corrupted): a miss, counted, never data. A cancel
        is raised once the reads have ended: nothing lands in the caller's ``outs`` after."""
        by_array: dict[str, list[int]] = {}
        for i, rec in enumerate(recs):
            by_array.setdefault(rec.array, []).append(i)
        oks = [False] * len(recs)
        for array, idx in by_array.items():
            items = [(recs[i].slot, recs[i].nbytes, recs[i].checksum, outs[i]) for i in idx]
            got = await outlast_cancel(asyncio.ensure_future(self.io.read(array, items)))
            for i, ok in zip(idx, got, strict=True):
                oks[i] = ok
                if not ok:
                    self.corrupt_reads += 1
                    log.warning(
                        "disk block %s/%d failed verification; treated as a miss",
                        array,
                        recs[i].slot,
                    )
        return oks

    async def get(self, rec: DiskRecord, out: torch.Tensor) -> bool:
        return (await self.get_many([rec], [out]))[0]

    def discard(self, rec: DiskRecord) -> None:
        """Forget a block; its slot is reused once the ``del`` is journaled."""
        if self._live.pop((rec.array, rec.slot), None) is None:
            return
        arr = self._arrays[rec.array]
        self.used_bytes -= arr.block_nbytes
        arr.pending_free.append(rec.slot)
        self._pending.append((_DEL, rec.array, rec.slot))

    # -- sessions -----------------------------------------------------------

    @staticmethod
    def _session_key(sid: str) -> str:
        return SESSIONS + hashlib.blake2b(sid.encode(), digest_size=16).hexdigest()

    async def put_session(
        self, sid: str, chains: dict[str, list[BlockKey]], pinned: bool, expires: float | None
    ) -> None:
        """One record per session: its keys, chain after chain, and each chain's namespace and
        length (``chains``; a record without it, from before namespaces had several chains
        per session, is one chain)."""
        keys = [k for chain in chains.values() for k in chain]
        split = [[name, len(chain)] for name, chain in chains.items()]
        record = {"id": sid, "keys": keys, "chains": split, "pinned": pinned, "expires": expires}
        body = msgpack.packb(record)
        await self.store.set(
            self._session_key(sid), Buffer.from_bytes(body + xxhash.xxh64_digest(body))
        )

    async def delete_session(self, sid: str) -> None:
        await self.store.delete(self._session_key(sid))

    async def load_sessions(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async for k in self.store.list_prefix(SESSIONS):
            buf = await self.store.get(k, prototype=default_buffer_prototype())
            raw = buf.to_bytes() if buf is not None else b""
            if len(raw) <= 8 or xxhash.xxh64_digest(raw[:-8]) != raw[-8:]:
                log.warning("session record %s is torn; ignored", k)
                continue
            try:
                out.append(_session(raw[:-8]))
            except ValueError as e:
                # Whole (its checksum holds): dropping it would unpin the session's blocks.
                raise StoreError(
                    f"session record {k} in {self.url or 'the store'} is not one this version "
                    f"of tiercache reads ({e}); open the store with the release that wrote it, "
                    "or remove the file (the session's name and pin go, its blocks stay)"
                ) from None
        return out

    # -- journal ----------------------------------------------------------

    async def sync_journal(self) -> None:
        """Write pending put/del records as one journal segment.

        On failure (``DiskFull``, ``StoreError``) the records stay pending for
        the next sync; freed slots stay unusable until their ``del`` is written.
        """
        async with self._journal_lock:
            if not self._pending:
                return
            records, self._pending = self._pending, []
            try:
                await self._write_segment(records)
            except BaseException:
                self._pending = records + self._pending
                raise
            for arr in self._arrays.values():
                arr.free.extend(arr.pending_free)
                arr.pending_free.clear()
        if self._segments >= COMPACT_AFTER:
            try:
                await self._compact()
            except (DiskFull, StoreError) as e:
                log.warning("journal compaction failed, will retry: %s", e)

    async def _write_segment(self, records: list[tuple[Any, ...]], snapshot: bool = False) -> None:
        body = msgpack.packb({"snapshot": snapshot, "records": records})
        seq = self._seq
        self._seq += 1
        try:
            await self.store.set(
                f"{JOURNAL}{seq:016d}", Buffer.from_bytes(body + xxhash.xxh64_digest(body))
            )
        except OSError as e:
            raise as_store_error(e, "journal write") from e
        self._segments += 1

    async def _compact(self) -> None:
        """Replace the journal with one snapshot of the live records."""
        async with self._journal_lock:
            old = await _journal_keys(self.store)
            snapshot = [
                (_PUT, r.array, r.slot, r.key, r.nbytes, r.checksum) for r in self._live.values()
            ]
            pending, self._pending = self._pending, []  # the snapshot holds their outcome
            try:
                await self._write_segment(snapshot, snapshot=True)
            except BaseException:
                self._pending = pending + self._pending  # still to write: nothing is lost
                raise
            self._segments = 0
            for arr in self._arrays.values():
                arr.free.extend(arr.pending_free)
                arr.pending_free.clear()
            latest = f"{JOURNAL}{self._seq - 1:016d}"
            await _drop_segments(self.store, [k for k in old if k != latest])

    async def close(self) -> None:
        """Sync the journal and let go of the store. On a full or failing disk the journal
        stays as it stands, the state a restart finds (as after kill -9: a block whose
        ``del`` is not written kept its slot, and its bytes); the lock is let go all the same."""
        try:
            await self.sync_journal()
        except (DiskFull, StoreError) as e:
            log.warning(
                "disk tier closed with %d journal records unwritten: %s", len(self._pending), e
            )
        finally:
            self._release()
