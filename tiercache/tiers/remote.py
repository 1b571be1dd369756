"""Remote tier: blocks shared between machines as objects in an S3-compatible store.

Layout under ``s3://bucket/prefix``::

    tiercache.json                  marker: format version (written at open: proves the
                                    bucket exists and the credentials may write)
    ns/<namespace-hex>/zarr.json    a zarr v3 group; attributes: model, KVSpec, storage
                                    format (``storage_format.zarr_attrs``; never the salt)
    ns/<namespace-hex>/b/<key-hex>  one block: its raw bytes + a 44-byte trailer

Blocks are immutable and content-addressed by their key (the chained hash of
the token prefix under the namespace), so there is no shared index and no
coordination: a daemon that misses locally asks for ``ns/<ns>/b/<key>``, and
two daemons writing the same block write equivalent bytes; S3 PUTs are atomic,
so a reader sees one whole object or none. The trailer (``TCB1``, the key,
the length, the xxh3-128 of the bytes) makes every object self-verifying: a
daemon that never saw the block can still check it. A torn, truncated,
misplaced or corrupted object is a miss, counted, never data.

I/O goes through zarr's store layer (``zarr.storage.ObjectStore`` over
obstore's ``S3Store``). Rejected: ``FsspecStore`` over s3fs, which measured
1.0-2.5x slower on writes and 2-6x slower on reads against SeaweedFS through
the same ``Store.set``/``Store.get`` calls (64 KiB-4 MiB objects, 16 in
flight; ``tiercache bench remote`` keeps the comparison).

Namespaces keep models and tenants apart: the namespace hex hashes the model
fingerprint, the KV spec and the tenant salt. Retention (``retention``)
deletes block objects by age (since written) or total size, oldest first,
and touches nothing else in the bucket.

Outage: every request has a deadline; a failure marks the tier down for a
backoff that doubles up to ``MAX_BACKOFF``. While down, the data plane does
not ask it anything; the next attempt after the backoff is the health probe
(the shared tier's own probe, when nothing else asks: ``sharing.py``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import re
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import xxhash

from tiercache.keys import KEY_BYTES, BlockKey, Namespace
from tiercache.storage_format import parse_format, zarr_attrs
from tiercache.tiers.disk import StoreError

log = logging.getLogger(__name__)

MARKER = "tiercache.json"
FORMAT = 1
MAGIC = b"TCB1"
_TRAILER = struct.Struct(f"<4s{KEY_BYTES}sQ16s")  # magic, key, nbytes, xxh3-128 of the bytes
TRAILER_BYTES = _TRAILER.size
MAX_BACKOFF = 5.0  # seconds: a down store is probed at least this often (one small request)
_METADATA_PATHS = ("/latest/api/token", "/latest/meta-data/")  # EC2's credentials service
_BLOCK_PATH = re.compile(r"^ns/([0-9a-f]+)/b/([0-9a-f]{32})$")


def object_key(array: str, key: BlockKey) -> str:
    """The object of one block: ``ns/<namespace-hex>/b/<key-hex>`` (``array`` is ``ns/<hex>``)."""
    return f"{array}/b/{key.hex()}"


def encode(key: BlockKey, data: torch.Tensor) -> tuple[bytearray, bytes]:
    """A block's object body (bytes + trailer, built in one buffer) and the xxh3-128 of its bytes."""
    nbytes = data.numel()
    body = bytearray(nbytes + TRAILER_BYTES)
    np.frombuffer(body, dtype=np.uint8, count=nbytes)[:] = data.numpy()
    csum = xxhash.xxh3_128_digest(memoryview(body)[:nbytes])
    _TRAILER.pack_into(body, nbytes, MAGIC, key, nbytes, csum)
    return body, csum


def decode(key: BlockKey, body: bytes | memoryview, nbytes: int) -> tuple[np.ndarray, bytes] | None:
    """The verified bytes and checksum of an object, or None if it is not a whole, intact copy
    of block ``key`` of ``nbytes`` bytes."""
    if len(body) != nbytes + TRAILER_BYTES:
        return None
    magic, k, n, csum = _TRAILER.unpack(body[nbytes:])
    data = np.frombuffer(body, dtype=np.uint8, count=nbytes)
    if magic != MAGIC or k != key or n != nbytes or xxhash.xxh3_128_digest(data.data) != csum:
        return None
    return data, csum


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """How to reach the store: credentials default to the usual ``AWS_*`` environment."""

    endpoint: str = ""  # "" : AWS (or AWS_ENDPOINT_URL)
    region: str = ""  # "" : AWS_REGION, else us-east-1
    key_id: str = ""  # "" : AWS_ACCESS_KEY_ID
    secret_file: str = ""  # "" : AWS_SECRET_ACCESS_KEY
    timeout: float = 1.0  # seconds: one request's deadline (and a lookup's wait)


def _s3_store(url: str, opts: RemoteOptions) -> tuple[Any, str]:
    from obstore.store import S3Store

    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc:
        raise StoreError(f"remote tier url {url!r} is not s3://bucket/prefix ([tiers.remote] url)")
    kwargs: dict[str, Any] = {
        "region": opts.region or os.environ.get("AWS_REGION") or "us-east-1",
    }
    endpoint = opts.endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
    if endpoint:
        # Checked here too: AWS_ENDPOINT_URL (or an embedded caller's options) never went through
        # the config's check, and obstore panics on every request to an endpoint with no scheme.
        e = urlparse(endpoint)
        if e.scheme not in ("http", "https") or not e.netloc:
            source = "[tiers.remote] endpoint" if opts.endpoint else "AWS_ENDPOINT_URL"
            raise StoreError(
                f"remote tier {url}: {source} {endpoint!r} is not http(s)://host[:port]"
            )
        kwargs["endpoint"] = endpoint
    if opts.key_id:
        kwargs["access_key_id"] = opts.key_id
    if opts.secret_file:
        try:
            kwargs["secret_access_key"] = Path(opts.secret_file).read_text().strip()
        except OSError as e:
            raise StoreError(
                f"[tiers.remote] secret_file {opts.secret_file!r} cannot be read: {e.strerror}"
            ) from None
    timeout = dt.timedelta(seconds=opts.timeout)
    try:
        store = _make_s3(S3Store, u, endpoint, timeout, kwargs)
    except Exception as e:  # obstore checks its configuration here (e.g. a key id, no secret)
        raise StoreError(
            f"remote tier {url}: {_first_line(e)}; set [tiers.remote] key_id and secret_file, "
            "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    return store, endpoint or "AWS S3"


def _make_s3(cls: Any, u: Any, endpoint: str, timeout: dt.timedelta, kwargs: dict[str, Any]) -> Any:
    return cls(
        u.netloc,
        prefix=u.path.strip("/") or None,
        client_options={
            "allow_http": endpoint.startswith("http://"),
            "timeout": timeout,
            "connect_timeout": timeout,
        },
        # One retry at most, inside the deadline: the caller decides what a failure costs.
        retry_config={
            "max_retries": 1,
            "retry_timeout": timeout,
            "backoff": {"init_backoff": dt.timedelta(milliseconds=50), "max_backoff": timeout},
        },
        **kwargs,
    )


class RemoteTier:
    """Verified, deadline-bounded block I/O on one bucket prefix, with an up/down state."""

    def __init__(self, url: str, obj: Any, where: str, timeout: float) -> None:
        from zarr.storage import ObjectStore

        self.url = url
        self.where = where  # the endpoint, for messages
        self.obj = obj  # the obstore S3Store (listing with metadata, batch delete)
        self.store = ObjectStore(obj)
        self.timeout = timeout
        self.up = True
        self.down_until = 0.0  # monotonic time before which the tier is not asked
        self.backoff = 0.0
        self.last_error = ""
        self.on_down: Callable[[], None] | None = None  # told when the store goes down
        self._groups: set[str] = set()  # namespace groups known to exist

    @classmethod
    async def open(cls, url: str, opts: RemoteOptions | None = None) -> RemoteTier:
        """Connect and prove access by writing the marker object.

        Bad or missing credentials and a missing bucket are ``StoreError``s naming the fix.
        An unreachable store is not: the tier starts down and comes up when the
        store answers (the same as an outage later on).
        """
        opts = opts or RemoteOptions()
        obj, where = _s3_store(url, opts)
        tier = cls(url, obj, where, opts.timeout)
        try:
            await tier._check_marker()
            await tier._call(tier._put(MARKER, json.dumps({"format": FORMAT}).encode()))
        except StoreError:
            raise
        except Exception as e:
            if (err := _no_credentials(url, where, e)) is not None:
                raise err from None
            tier.failed(e)
            log.error(
                "remote tier %s at %s is unreachable, starting without it: %s",
                url,
                where,
                _first_line(e),
            )
        return tier

    # -- health -------------------------------------------------------------

    def available(self) -> bool:
        """Whether the data plane should ask the store now (up, or its backoff has passed)."""
        return self.up or time.monotonic() >= self.down_until

    def failed(self, err: BaseException) -> None:
        """A request failed: down for a backoff that doubles once per failed probe. Requests
        that were in flight together (an upload batch, a fill's window) fail together:
        one outage, not one doubling each."""
        self.last_error = f"{type(err).__name__}: {_first_line(err)}"
        if not self.up and time.monotonic() < self.down_until:
            return
        went_down, self.up = self.up, False
        self.backoff = min(MAX_BACKOFF, max(0.1, self.backoff * 2))
        self.down_until = time.monotonic() + self.backoff
        if went_down and self.on_down is not None:
            self.on_down()

    def succeeded(self) -> None:
        if not self.up:
            log.info("remote tier %s is back", self.url)
        self.up = True
        self.backoff = 0.0

    async def _call(self, coro: Any) -> Any:
        """One request under the deadline; access errors become ``StoreError``s."""
        import obstore.exceptions as oe

        try:
            result = await asyncio.wait_for(coro, self.timeout * 2)
        except (
            oe.PermissionDeniedError,
            oe.UnauthenticatedError,
            oe.NotFoundError,
            FileNotFoundError,
        ) as e:
            if (err := self.access_error(e)) is None:
                raise
            raise err from None
        self.succeeded()
        return result

    def access_error(self, e: BaseException) -> StoreError | None:
        """The ``StoreError`` naming the fix for a store that refused the credentials or has
        no such bucket; None for any other failure (an outage)."""
        import obstore.exceptions as oe

        if isinstance(e, oe.PermissionDeniedError | oe.UnauthenticatedError):
            return StoreError(
                f"remote tier {self.url} at {self.where} refused the credentials ({_first_line(e)}); "
                "set [tiers.remote] key_id and secret_file, or AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(e, FileNotFoundError | oe.NotFoundError) and "NoSuchBucket" in str(e):
            bucket = urlparse(self.url).netloc
            return StoreError(
                f"remote tier {self.url}: bucket {bucket!r} does not exist at {self.where}; "
                "create it, or fix [tiers.remote] url"
            )
        return None

    async def _check_marker(self) -> None:
        """Refuse a bucket prefix a newer release laid out (its marker names a later format):
        writing this release's marker over it would hide that from the daemons that use it."""
        from zarr.core.buffer import default_buffer_prototype

        buf = await self._call(self.store.get(MARKER, prototype=default_buffer_prototype()))
        if buf is None:
            return
        try:
            found = json.loads(buf.to_bytes())["format"]
        except (ValueError, TypeError, KeyError):
            found = None
        if not isinstance(found, int) or found > FORMAT:
            raise StoreError(
                f"remote tier {self.url}: {MARKER} says format {found!r}, this tiercache "
                f"reads format {FORMAT}; upgrade it, or use another [tiers.remote] url"
            )

    async def probe(self) -> None:
        """One small request (the marker's metadata): returns (and the tier is up) when the
        store answers, the marker there or not; raises the store's error otherwise."""
        import obstore
        import obstore.exceptions as oe

        try:
            await self._call(obstore.head_async(self.obj, MARKER))
        except (FileNotFoundError, oe.NotFoundError):
            self.succeeded()

    async def _put(self, key: str, body: bytes | bytearray) -> None:
        from zarr.core.buffer.cpu import Buffer

        await self.store.set(key, Buffer.from_bytes(body))

    # -- blocks -------------------------------------------------------------

    async def ensure_namespace(self, ns: Namespace) -> None:
        """Write the namespace's zarr group (model, spec and storage format, for people and
        tools browsing the bucket: ``format`` says how to split and dequantize a block)."""
        path = ns.array
        if path in self._groups:
            return
        meta = {
            "zarr_format": 3,
            "node_type": "group",
            "attributes": {
                "tiercache": {
                    "model": ns.model,
                    "spec": ns.spec.to_dict(),
                    "group": ns.group,
                    "format": zarr_attrs(ns.spec, parse_format(ns.store_dtype)),
                }
            },
        }
        await self._call(self._put(f"{path}/zarr.json", json.dumps(meta).encode()))
        self._groups.add(path)

    async def put(self, array: str, key: BlockKey, data: torch.Tensor) -> bytes:
        """Upload one block (whole, in one PUT); returns its checksum. Raises on failure."""
        body, csum = encode(key, data)
        await self._call(self._put(object_key(array, key), body))
        return csum

    async def get(self, array: str, key: BlockKey, nbytes: int) -> tuple[np.ndarray, bytes] | None:
        """The verified bytes of a block and their checksum; None if absent. Raises
        ``CorruptObject`` for an object that does not verify, and the store's error on failure."""
        from zarr.core.buffer import default_buffer_prototype

        buf = await self._call(
            self.store.get(object_key(array, key), prototype=default_buffer_prototype())
        )
        if buf is None:
            return None
        got = decode(key, buf.as_numpy_array().reshape(-1).view(np.uint8).data, nbytes)
        if got is None:
            raise CorruptObject(f"remote block {object_key(array, key)} failed verification")
        return got

    async def stored(self, array: str, key: BlockKey, nbytes: int) -> bool:
        """Whether block ``key``'s object is in the store at its whole length (one HEAD: the
        bytes are not read). Raises the store's error on failure."""
        import obstore
        import obstore.exceptions as oe

        try:
            meta = await self._call(obstore.head_async(self.obj, object_key(array, key)))
        except (FileNotFoundError, oe.NotFoundError):
            self.succeeded()  # it answered
            return False
        return int(meta["size"]) == nbytes + TRAILER_BYTES

    def state(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "up": self.up,
            "retry_in_s": round(max(0.0, self.down_until - time.monotonic()), 3)
            if not self.up
            else 0.0,
            "last_error": self.last_error,
        }

    async def close(self) -> None:
        pass


class CorruptObject(Exception):
    """A remote object that is not a whole, intact copy of its block."""


def _no_credentials(url: str, where: str, e: BaseException) -> StoreError | None:
    """The ``StoreError`` for a store opened with no credentials, else None. With none given
    (no key_id, no ``AWS_*`` keys), obstore asks the instance metadata service for them: off
    EC2 that fails before the store is asked, which is no outage to wait out."""
    if not any(path in str(e) for path in _METADATA_PATHS):
        return None
    return StoreError(
        f"remote tier {url} at {where}: no credentials; set [tiers.remote] key_id and "
        "secret_file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the instance metadata "
        f"service gave none: {_first_line(e)})"
    )


def _first_line(e: BaseException) -> str:
    return str(e).split("\n")[0][:200]


class UploadQueue:
    """The write-behind queue: blocks waiting to go to the shared tier, bounded in count.

    A block offered while the queue is full is dropped and counted (a lost
    chance to share, never lost data: it stays in the local tiers). Blocks taken
    for upload count against the bound until they are done, so a failed batch
    always finds its room again: a block the queue accepted is never dropped
    for the blocks offered after it.
    """

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._items: OrderedDict[BlockKey, str] = OrderedDict()  # key -> namespace array
        self.in_flight = 0  # taken and not yet ``done``
        self.dropped: Counter[str] = Counter()  # reason -> blocks
        self.uploaded = 0
        self.ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._items

    def offer(self, key: BlockKey, array: str) -> bool:
        if key in self._items:
            return True
        if len(self._items) + self.in_flight >= self.bound:
            self.dropped["queue_full"] += 1
            return False
        self._items[key] = array
        self.ready.set()
        return True

    def take(self, n: int) -> list[tuple[BlockKey, str]]:
        out: list[tuple[BlockKey, str]] = []
        while self._items and len(out) < n:
            out.append(self._items.popitem(last=False))
        if not self._items:
            self.ready.clear()
        self.in_flight += len(out)
        return out

    def put_back(self, items: Sequence[tuple[BlockKey, str]]) -> None:
        """Return taken blocks whose upload failed to the head of the queue (before ``done``:
        their room was kept for them)."""
        for key, array in reversed(items):
            if key in self._items:
                continue
            self._items[key] = array
            self._items.move_to_end(key, last=False)
        if self._items:
            self.ready.set()

    def done(self, taken: int) -> None:
        """A batch of ``taken`` blocks is finished (uploaded, or put back)."""
        self.in_flight -= taken


# -- retention ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredBlock:
    path: str  # relative to the tier's prefix
    namespace: str  # hex
    size: int
    written: float  # epoch seconds (the object's last-modified time)


@dataclass(slots=True)
class RetentionReport:
    scanned: int = 0
    removed: int = 0
    removed_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    failed: int = 0
    removed_paths: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "scanned": self.scanned,
            "removed": self.removed,
            "removed_bytes": self.removed_bytes,
            "kept": self.kept,
            "kept_bytes": self.kept_bytes,
            "failed": self.failed,
        }


def plan_retention(
    blocks: Sequence[StoredBlock], *, now: float, max_age: float = 0, max_bytes: int = 0
) -> list[StoredBlock]:
    """The blocks to delete: older than ``max_age`` seconds, then the oldest (by write time,
    then path) until the rest fit in ``max_bytes``. 0 disables either rule."""
    doomed = [b for b in blocks if max_age and now - b.written > max_age]
    if max_bytes:
        gone = {b.path for b in doomed}
        rest = sorted((b for b in blocks if b.path not in gone), key=lambda b: (b.written, b.path))
        total = sum(b.size for b in rest)
        for b in rest:
            if total <= max_bytes:
                break
            doomed.append(b)
            total -= b.size
    return doomed


async def list_blocks(tier: RemoteTier, namespace: str | None = None) -> list[StoredBlock]:
    """Every block object under the tier's prefix (of one namespace, when given)."""
    import obstore

    prefix = f"ns/{namespace}/b/" if namespace else "ns/"
    out: list[StoredBlock] = []
    async for batch in obstore.list(tier.obj, prefix, chunk_size=1000):
        for meta in batch:
            m = _BLOCK_PATH.match(meta["path"])
            if m is None:  # group metadata, or anything else someone put there
                continue
            out.append(
                StoredBlock(
                    meta["path"], m[1], int(meta["size"]), meta["last_modified"].timestamp()
                )
            )
    return out


async def retention(
    tier: RemoteTier,
    *,
    max_age: float = 0,
    max_bytes: int = 0,
    namespace: str | None = None,
    now: float | None = None,
    dry_run: bool = False,
) -> RetentionReport:
    """Apply the retention policy to the shared tier's blocks; returns what it did.

    Only block objects (``ns/<hex>/b/<key>``) are candidates: the marker,
    namespace groups and anything else in the bucket are never touched.
    Safe while daemons run: a block deleted under a reader is a miss.
    """
    import obstore

    # Checked first: a negative limit would doom every block, and a namespace that is no
    # namespace id would match nothing and say nothing.
    if max_age < 0 or max_bytes < 0:
        raise ValueError(
            f"retention: max_age and max_bytes must be >= 0, got {max_age} and {max_bytes}"
        )
    if namespace is not None and not re.fullmatch(f"[0-9a-f]{{{2 * KEY_BYTES}}}", namespace):
        raise ValueError(f"retention: namespace {namespace!r} is not a namespace's hex id")
    try:
        blocks = await list_blocks(tier, namespace)
    except Exception as e:  # one line naming the store, not obstore's multi-page debug dump
        raise tier.access_error(e) or ConnectionError(
            f"retention: remote tier {tier.url} at {tier.where} did not list its blocks: "
            f"{_first_line(e)}"
        ) from None
    doomed = plan_retention(
        blocks, now=time.time() if now is None else now, max_age=max_age, max_bytes=max_bytes
    )
    report = RetentionReport(scanned=len(blocks))
    removed: list[StoredBlock] = doomed if dry_run else []
    for i in range(0, 0 if dry_run else len(doomed), 1000):
        chunk = doomed[i : i + 1000]
        try:
            await obstore.delete_async(tier.obj, [b.path for b in chunk])
        except Exception as e:
            report.failed += len(chunk)
            log.warning("retention: deleting %d objects failed: %s", len(chunk), _first_line(e))
            continue
        removed.extend(chunk)
    gone = {b.path for b in removed}
    report.removed = len(removed)
    report.removed_bytes = sum(b.size for b in removed)
    report.removed_paths = sorted(gone)
    kept = [b for b in blocks if b.path not in gone]
    report.kept, report.kept_bytes = len(kept), sum(b.size for b in kept)
    return report
