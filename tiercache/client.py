"""The engine-side client of a tiercache daemon: ``AsyncClient`` and its blocking twin ``Client``.

It speaks the socket protocol (``tiercache.daemon.protocol``) and moves block
bytes through the daemon's shared host arena, never through the socket: a save
reserves slots, copies the blocks into them and commits; a load leases the
cached prefix, copies it out of the slots and releases the lease. If the client
dies in between, the daemon gives the slots and leases back.

The methods mirror the embedded ``TierManager`` (save, lookup, load, prefetch,
pin, unpin, evict, flush, stats), so code moves between embedded mode and the
daemon by swapping the object.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from tiercache.daemon import protocol as wire
from tiercache.daemon.protocol import PROTOCOL_VERSION, ProtocolError, RemoteError, read_frame
from tiercache.kernels import reference
from tiercache.kernels.reference import LayerCache
from tiercache.keys import (
    Namespace,
    Tokens,
    block_count,
    check_first_block,
    check_max_blocks,
    keys_of,
)
from tiercache.loop import LoopThread
from tiercache.results import LoadResult, SaveResult, check_into, stored_in_place
from tiercache.storage_format import decode, parse_format, store_rows
from tiercache.tiers.host import MappedArena
from tiercache.transaction import abort_later, lease_rounds, save_rounds

M = TypeVar("M", bound=wire.Message)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RemoteLookup:
    blocks: int
    tokens: int
    tiers: list[str]


class _Protocol(asyncio.StreamReaderProtocol):
    """A stream whose owner hears at once when the daemon ends the connection, even while
    no request is in flight."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self.on_lost: Callable[[], None] | None = None

    def eof_received(self) -> bool:
        keep_open = bool(super().eof_received())
        self._lost()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._lost()

    def _lost(self) -> None:
        if self.on_lost is not None:
            self.on_lost()


class AsyncClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        # One request in flight per connection: replies come back in order.
        self._lock = asyncio.Lock()
        self._ns: dict[str, str] = {}  # namespace id hex -> the daemon's handle (the same hex)
        self._arena: MappedArena | None = None
        self._unshared = False  # the daemon offered no shared arena
        self._lost = False
        # Requests whose callers were cancelled after sending them: id -> undo of the reply.
        self._late: dict[int, Callable[[Any], Awaitable[None]]] = {}

    @classmethod
    async def connect(cls, path: str | Path, *, name: str = "") -> AsyncClient:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        try:
            transport, protocol = await loop.create_unix_connection(
                lambda: _Protocol(reader), str(path)
            )
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise ConnectionError(
                f"no tiercache daemon at {path} ({e.strerror}); start one with `tiercache serve` "
                "or set [daemon] socket"
            ) from None
        client = cls(reader, asyncio.StreamWriter(transport, protocol, reader, loop))
        protocol.on_lost = client._connection_lost
        hello = wire.Hello(PROTOCOL_VERSION, name or f"pid-{os.getpid()}")
        try:
            await client.request(hello, wire.HelloReply)
        except BaseException:
            transport.close()  # refused (another protocol version) or cut off: not kept open
            raise
        return client

    def _connection_lost(self) -> None:
        """The daemon is gone (stopped, restarted or killed): unmap its arena now. Held until
        the next request instead, this client's mapping could be the last one of the whole
        arena, and the request that found the daemon gone would pay for freeing every page
        of it (measured: 0.35 s of kernel time for 2 GiB, slowing the daemon that replaced
        it). Callbacks run between the client's own steps, never inside a copy; a request
        that resumes after this finds no arena and fails as a lost connection."""
        self._lost = True
        self._late.clear()  # the daemon gives back what a closed connection held
        if self._arena is not None:
            arena, self._arena = self._arena, None
            arena.close()

    def _mapped(self) -> MappedArena:
        """The daemon's arena, or ConnectionError once the connection is gone."""
        if self._arena is None:
            if self._unshared and not self._lost:
                raise RemoteError(
                    "no_shared_arena",
                    "this server's host arena is not shared (a tiercache daemon's always is; "
                    "this one serves a cache opened unshared): it cannot move bytes for this "
                    "client; GPU engines attach their caches instead",
                )
            raise ConnectionError("the tiercache daemon closed the connection")
        return self._arena

    async def _roundtrip(
        self, rid: int, frame: bytes, undo: Callable[[Any], Awaitable[None]] | None = None
    ) -> Any:
        """Send request ``rid``'s frame; its reply's ``result`` (a RemoteError when refused).

        Replies come in request order. One whose caller was cancelled while it waited (a
        timeout, a client shutting down) still arrives: it is read and dropped, so the next
        request never takes an earlier request's reply for its own. With ``undo``, what the
        request did is undone when its reply lands (a reservation given back): by the next
        request that reads it, or by a reader started for it (only then: a task per call
        would cost every save ~30 us)."""
        async with self._lock:
            self._writer.write(frame)
            try:
                await self._writer.drain()
                while True:
                    reply = await self._next_reply()
                    if reply.get("id") in (rid, None):
                        break
                    self._landed(reply)
            except asyncio.CancelledError:
                if undo is not None:  # the frame is on its way: the daemon will run it
                    self._late[rid] = undo
                    abort_later(self._collect(rid))
                raise
        return wire.reply_result(reply)

    async def _next_reply(self) -> wire.Frame:
        try:
            body = await read_frame(self._reader)
        except ProtocolError as e:
            # Cut off inside a frame (the daemon died while it wrote a reply) or a length no
            # reply has: either way the replies can no longer be told apart.
            self._writer.close()
            raise ConnectionError(f"lost the tiercache daemon's reply: {e.message}") from None
        if body is None:
            raise ConnectionError("the tiercache daemon closed the connection")
        return wire.decode(body)

    def _landed(self, reply: wire.Frame) -> None:
        """The reply of a request whose caller was cancelled: dropped, or undone."""
        undo = self._late.pop(reply["id"], None)
        if undo is None:
            return
        try:
            result = wire.reply_result(reply)
        except RemoteError:
            return  # refused: it did nothing to undo
        abort_later(undo(result))

    async def _collect(self, rid: int) -> None:
        """Read the late reply of request ``rid`` if no request after it did."""
        async with self._lock:
            while rid in self._late:
                try:
                    reply = await self._next_reply()
                except (ConnectionError, ProtocolError):
                    # The connection is gone: the daemon gave back all it held.
                    self._late.clear()
                    return
                if reply.get("id") is not None:
                    self._landed(reply)

    async def _send(self, req: wire.Request) -> Any:
        """Send ``req``; its reply's raw ``result`` (for replies without a message type)."""
        rid = next(self._ids)
        return await self._roundtrip(rid, wire.encode_request(rid, req))

    async def request(
        self,
        req: wire.Request,
        reply: type[M],
        undo: Callable[[M], Awaitable[None]] | None = None,
    ) -> M:
        """Send ``req``; its reply, typed. ``undo(reply)`` runs if the caller is cancelled
        after the request left (the daemon still runs it)."""
        rid = next(self._ids)
        frame = wire.encode_request(rid, req)
        if undo is None:
            return wire.decode_reply(reply, await self._roundtrip(rid, frame))

        def undo_raw(result: Any) -> Awaitable[None]:
            return undo(wire.decode_reply(reply, result))

        return wire.decode_reply(reply, await self._roundtrip(rid, frame, undo_raw))

    async def call(self, op: str, **args: Any) -> Any:
        """A raw request (for tests and tools that speak the protocol by hand)."""
        rid = next(self._ids)
        return await self._roundtrip(rid, wire.encode({"id": rid, "op": op, "args": args}))

    async def register(self, ns: Namespace) -> None:
        if ns.hex in self._ns:
            return
        res = await self.request(
            wire.Register(ns.model, ns.spec.to_dict(), ns.salt, ns.store_dtype, ns.group),
            wire.RegisterReply,
        )
        if self._lost:
            raise ConnectionError("the tiercache daemon closed the connection")
        if res.ns != ns.hex:  # a daemon older than the spec's kind or the namespace's group
            raise RemoteError(
                "bad_namespace",
                f"the daemon registered namespace {res.ns} for {ns.hex}: it does not know "
                "KV cache kinds or groups; upgrade the daemon",
            )
        # No shared arena: this client can still attach GPU caches (save_kv / load_kv);
        # save and load say why they cannot run (``_mapped``).
        self._unshared = res.arena is None
        if self._arena is None and res.arena is not None:
            a = res.arena
            self._arena = MappedArena(a.name, a.slot_bytes, a.num_slots)
        self._ns[ns.hex] = res.ns

    async def lookup(self, ns: Namespace, tokens: Tokens, *, first_block: int = 0) -> RemoteLookup:
        """How many blocks of ``tokens`` from ``first_block`` on the daemon holds without a gap
        (``blocks``, ``tokens`` they cover) and their tiers."""
        await self.register(ns)
        req = wire.Lookup(ns.hex, _chain(ns, tokens), first_block=check_first_block(first_block))
        res = await self.request(req, wire.LookupReply)
        return RemoteLookup(res.blocks, res.tokens, res.tiers)

    async def lookup_tail(self, ns: Namespace, candidates: list[bytes]) -> tuple[int, str]:
        """The longest cached tail among ``candidates`` (``Namespace.tail_keys``, shortest
        first): ``(index, tier)``, or ``(-1, "miss")``."""
        if not candidates:
            return -1, "miss"
        await self.register(ns)
        res = await self.request(
            wire.LookupTail(ns.hex, b"".join(candidates)), wire.LookupTailReply
        )
        return res.index, res.tier

    async def touch(self, ns: Namespace, tokens: Tokens) -> int:
        """Blocks an engine served from its own prefix cache: the daemon refreshes their
        recency (``TierManager.touch``). Returns how many it holds."""
        await self.register(ns)
        return (await self.request(wire.Touch(ns.hex, _chain(ns, tokens)), wire.Blocks)).blocks

    async def save(
        self,
        ns: Namespace,
        tokens: Tokens,
        blocks: torch.Tensor,
        *,
        first_block: int = 0,
        session: str | None = None,
    ) -> SaveResult:
        """Store blocks ``first_block ..`` of ``tokens`` (page-first rows, typed or uint8)."""
        first_block = check_first_block(first_block)
        await self.register(ns)
        data = store_rows(ns, blocks)
        packed = _chain(ns, tokens)

        async def reserve(done: int, left: int) -> wire.Reserved:
            req = wire.Reserve(
                ns.hex, keys=packed, first_block=first_block + done, count=left, session=session
            )
            # A caller that gives up while the reply is on its way leaves no reservation.
            return await self.request(req, wire.Reserved, undo=abort)

        async def fill(r: wire.Reserved, done: int) -> None:
            self._mapped().write(r.slots, data, [done + row for row in r.rows])

        async def commit(r: wire.Reserved) -> SaveResult:
            c = await self.request(wire.Commit(r.txn), wire.Stored)
            return SaveResult(c.stored, c.present, c.rejected)

        async def abort(r: wire.Reserved) -> None:
            try:
                await self._send(wire.Abort(r.txn))
            except RemoteError as e:  # a commit the daemon took before this caller gave up
                if e.code != "unknown_txn":
                    raise

        return await save_rounds(data.shape[0], reserve, fill, commit, abort)

    async def load(
        self,
        ns: Namespace,
        tokens: Tokens,
        *,
        first_block: int = 0,
        max_blocks: int | None = None,
        into: torch.Tensor | None = None,
    ) -> LoadResult:
        """The cached run of blocks ``first_block ..`` of ``tokens``, byte-exact (or shorter: a
        miss ends it). An engine that already holds the first blocks starts after them.

        ``into``, the engine's blocks to fill (as ``TierManager.load``: ``[>= n,
        *block_shape]`` of the KV dtype, contiguous, CPU), takes at most its rows of blocks
        straight out of the daemon's arena: exact ones copied once, quantized ones dequantized
        there (no copy of their records: the result's ``data`` is then empty). ``kv()`` of the
        result is ``into``'s first ``blocks`` rows."""
        t0 = time.perf_counter()
        first_block = check_first_block(first_block)
        nbytes = ns.block_nbytes
        parts: list[torch.Tensor] = []
        rows: torch.Tensor | None = None
        fmt = parse_format(ns.store_dtype)
        if into is not None:
            check_into(ns, 0, into)
            max_blocks = into.shape[0] if max_blocks is None else min(max_blocks, into.shape[0])
            rows = stored_in_place(ns, into)

        def copy_out(arena: MappedArena, slots: list[int], done: int) -> None:
            if into is None:
                part = torch.empty((len(slots), nbytes), dtype=torch.uint8)
                arena.read(slots, part)
                parts.append(part)
            elif rows is not None:
                arena.read(slots, rows[done : done + len(slots)])
            else:
                for row, view in arena.runs(slots, nbytes):
                    at = done + row
                    decode(ns.spec, view, fmt, into[at : at + view.shape[0]])

        tiers = await self._leased(ns, tokens, first_block, max_blocks, copy_out)
        if rows is not None:
            data = rows[: len(tiers)]
        elif len(parts) == 1:
            data = parts[0]
        else:  # several rounds, none, or decoded in the arena: a miss is a [0, nbytes] tensor
            data = torch.cat(parts) if parts else torch.empty((0, nbytes), dtype=torch.uint8)
        seconds, per_tier = time.perf_counter() - t0, {t: tiers.count(t) for t in set(tiers)}
        filled = None if into is None else into[: len(tiers)]
        return LoadResult(data, tiers, ns, seconds, per_tier, first_block, filled)

    async def load_into(
        self,
        ns: Namespace,
        tokens: Tokens,
        consume: Callable[[int, torch.Tensor], None],
        *,
        first_block: int = 0,
        max_blocks: int | None = None,
    ) -> list[str]:
        """``load`` without its copy out of the arena: ``consume(i, rows)`` gets each run of
        consecutive cached blocks where it lies in the shared arena, while the daemon holds
        them leased: ``rows`` is uint8 ``[n, block_nbytes]`` (a view, valid only during the
        call) of blocks ``first_block + i ..``. An engine copies them straight into its KV
        cache. Returns the tiers of the blocks served (a miss ends them, as in ``load``)."""
        nbytes = ns.block_nbytes

        def hand_over(arena: MappedArena, slots: list[int], done: int) -> None:
            for row, view in arena.runs(slots, nbytes):
                consume(done + row, view)

        return await self._leased(ns, tokens, first_block, max_blocks, hand_over)

    async def _leased(
        self,
        ns: Namespace,
        tokens: Tokens,
        first_block: int,
        max_blocks: int | None,
        use: Callable[[MappedArena, list[int], int], None],
    ) -> list[str]:
        """The read rounds (``transaction.lease_rounds``) of blocks ``first_block ..``, calling
        ``use(arena, slots, blocks before them)`` while each round's slots are held."""
        first_block, max_blocks = check_first_block(first_block), check_max_blocks(max_blocks)
        await self.register(ns)
        packed = _chain(ns, tokens)

        async def acquire(done: int, left: int | None) -> wire.Leased:
            req = wire.Acquire(ns.hex, keys=packed, first_block=first_block + done, max_blocks=left)
            # A caller that gives up while the reply is on its way leaves no lease (its blocks
            # would stay unevictable for as long as this connection lives).
            return await self.request(req, wire.Leased, undo=release)

        async def used(lease: wire.Leased, done: int) -> list[str]:
            use(self._mapped(), lease.slots, done)
            return lease.tiers

        async def release(lease: wire.Leased) -> None:
            await self._send(wire.Release(lease.lease))

        return await lease_rounds(max_blocks, acquire, used, release)

    # -- GPU engines: the daemon moves blocks in and out of the engine's own cache -------------

    async def attach(self, ns: Namespace, caches: Sequence[LayerCache]) -> AttachedCache:
        """Hand the daemon the engine's KV ``caches`` (CUDA tensors in ``ns.spec``'s layout) by
        CUDA IPC, once; ``save_kv`` and ``load_kv`` then move blocks with the daemon's kernels,
        ordered against this process's streams by interprocess events. The daemon unmaps them
        when this connection ends."""
        from tiercache import ipc

        await self.register(ns)
        tensors = reference.tensors(caches)
        if not tensors or tensors[0].device.type != "cuda":
            raise ipc.IpcError("attach takes the engine's CUDA caches; CPU engines use save/load")
        device = tensors[0].device
        written = ipc.interprocess_event(device)
        layers = [
            [ipc.export_tensor(t).to_wire() for t in reference.layer_tensors(c)] for c in caches
        ]
        res = await self.request(
            wire.Attach(ns.hex, layers, ipc.event_handle(written)), wire.Attached
        )
        done = ipc.open_event(res.event, device, "the daemon's event")
        return AttachedCache(res.engine, ns, device, written, done)

    async def save_kv(
        self,
        cache: AttachedCache,
        tokens: Tokens,
        block_ids: Sequence[int],
        *,
        first_block: int = 0,
        session: str | None = None,
        stream: torch.cuda.Stream | None = None,
    ) -> SaveResult:
        """Store blocks ``first_block ..`` of ``tokens`` from the engine's blocks ``block_ids``.
        The daemon's copy waits for the work queued on ``stream`` (default: the current one) so
        far; when this returns the blocks are copied and the engine may reuse them."""
        s = stream if stream is not None else torch.cuda.current_stream(cache.device)
        cache.written.record(s)
        req = wire.SaveKV(
            cache.ns.hex, cache.id, _chain(cache.ns, tokens), _block_ids(block_ids),
            check_first_block(first_block), session,
        )  # fmt: skip
        res = await self.request(req, wire.Stored)
        return SaveResult(res.stored, res.present, res.rejected)

    async def load_kv(
        self,
        cache: AttachedCache,
        tokens: Tokens,
        block_ids: Sequence[int],
        *,
        first_block: int = 0,
        stream: torch.cuda.Stream | None = None,
    ) -> list[str]:
        """Have the daemon scatter the cached run of blocks ``first_block ..`` of ``tokens``
        into the engine's blocks ``block_ids`` (as many as are cached, at most
        ``len(block_ids)``); returns their tiers. Work queued on ``stream`` (default: the current
        one) after this returns runs after the scatter."""
        req = wire.LoadKV(
            cache.ns.hex, cache.id, _chain(cache.ns, tokens), _block_ids(block_ids),
            check_first_block(first_block),
        )  # fmt: skip
        res = await self.request(req, wire.Loaded)
        if res.wait:
            s = stream if stream is not None else torch.cuda.current_stream(cache.device)
            s.wait_event(cache.done)
        return res.tiers

    async def detach(self, cache: AttachedCache) -> None:
        await self._send(wire.Detach(cache.id))

    async def prefetch(
        self,
        ns: Namespace | None = None,
        tokens: Tokens | None = None,
        *,
        session: str | None = None,
    ) -> int:
        if session is not None:
            req = wire.Prefetch(session=session)
        elif ns is not None and tokens is not None:
            await self.register(ns)
            req = wire.Prefetch(ns=ns.hex, keys=_chain(ns, tokens))
        else:
            raise ValueError("prefetch needs a session, or a namespace and tokens")
        return (await self.request(req, wire.Blocks)).blocks

    async def ctl(self, verb: str, **args: Any) -> wire.OperatorResult:
        """An operator verb (pin, unpin, evict, flush, prefetch, stats, set, drain)."""
        result: wire.OperatorResult = await self._send(wire.Ctl(verb, args))
        return result

    async def pin(self, session: str) -> int:
        return int((await self.ctl("pin", session=session))["blocks"])

    async def unpin(self, session: str) -> int:
        return int((await self.ctl("unpin", session=session))["blocks"])

    async def evict(
        self, *, session: str | None = None, keys: Sequence[bytes] | None = None
    ) -> int:
        """Evict a session's blocks (and forget it), or the blocks of ``keys``; returns how many
        went (pinned and leased blocks stay)."""
        if (session is None) == (keys is None):
            raise ValueError("evict needs a session or keys, not both")
        if keys is not None:
            return int((await self.ctl("evict", keys=[k.hex() for k in keys]))["blocks"])
        return int((await self.ctl("evict", session=session))["blocks"])

    async def flush(self) -> int:
        return int((await self.ctl("flush"))["bytes"])

    async def stats(self) -> wire.OperatorResult:
        return await self.ctl("stats")

    async def close(self) -> None:
        try:
            with contextlib.suppress(ConnectionError, RemoteError):
                await self._send(wire.Bye())
        finally:  # a daemon that never answers the bye (cancelled: a timeout) is left too
            self._writer.close()
            if self._arena is not None:
                self._arena.close()
                self._arena = None


def _block_ids(block_ids: Sequence[int]) -> list[int]:
    """The engine's block ids as the protocol carries them (a float or a bool is refused, not
    truncated into another block's id)."""
    return [block_count("block_ids", b) for b in block_ids]


def _chain(ns: Namespace, tokens: Tokens) -> bytes:
    """The block keys of ``tokens``, hashed here so the daemon does not have to."""
    return keys_of(ns, tokens).to_bytes()


@dataclass(frozen=True, slots=True)
class AttachedCache:
    """An engine's KV cache attached to the daemon (``AsyncClient.attach``)."""

    id: int
    ns: Namespace
    device: torch.device
    written: torch.cuda.Event  # ours: recorded behind the engine's writes before a save
    done: torch.cuda.Event  # the daemon's: recorded behind each scatter


class Client:
    """Blocking ``AsyncClient``, run on a private event-loop thread.

    ``timeout``: seconds a call may wait for the daemon (connecting included) before it is
    cancelled and raises TimeoutError (an OSError), so an engine whose daemon hangs (stopped,
    deadlocked) is not stuck with it; None waits for ever. ``save_kv`` and ``load_kv``
    always wait: the daemon copies the engine's own memory there, which the engine must not
    reuse before the copy is done."""

    def __init__(self, path: str | Path, *, name: str = "", timeout: float | None = None) -> None:
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout < math.inf
        ):
            # Not the daemon's fault: a timeout of 0 or less times out every call at once.
            raise ValueError(f"timeout must be positive seconds or None, got {timeout!r:.80}")
        self._thread = LoopThread("tiercache-client")
        self._timeout = timeout
        self._calls = 0  # calls running on the loop now (``_run``), close() waits for them
        self._idle = threading.Condition()
        self._closed = False
        try:
            self._c: AsyncClient = self._run(AsyncClient.connect(path, name=name))
        except BaseException:
            self._thread.stop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T], bounded: bool = True) -> T:
        """``coro`` on the client's loop (within the client's ``timeout`` if ``bounded``);
        ConnectionError once the client is closed."""
        with self._idle:
            if self._closed:
                coro.close()
                raise ConnectionError("this tiercache client is closed")
            self._calls += 1
        try:
            try:
                return self._thread.run(coro, self._timeout if bounded else None)
            except TimeoutError as e:
                raise TimeoutError(f"the tiercache daemon did not answer: {e}") from None
        finally:
            with self._idle:
                self._calls -= 1
                self._idle.notify_all()

    def lookup(self, ns: Namespace, tokens: Tokens, *, first_block: int = 0) -> RemoteLookup:
        return self._run(self._c.lookup(ns, tokens, first_block=first_block))

    def lookup_tail(self, ns: Namespace, candidates: list[bytes]) -> tuple[int, str]:
        return self._run(self._c.lookup_tail(ns, candidates))

    def save(
        self,
        ns: Namespace,
        tokens: Tokens,
        blocks: torch.Tensor,
        *,
        first_block: int = 0,
        session: str | None = None,
    ) -> SaveResult:
        return self._run(self._c.save(ns, tokens, blocks, first_block=first_block, session=session))

    def load(
        self,
        ns: Namespace,
        tokens: Tokens,
        *,
        first_block: int = 0,
        max_blocks: int | None = None,
        into: torch.Tensor | None = None,
    ) -> LoadResult:
        return self._run(
            self._c.load(ns, tokens, first_block=first_block, max_blocks=max_blocks, into=into)
        )

    def load_into(
        self,
        ns: Namespace,
        tokens: Tokens,
        consume: Callable[[int, torch.Tensor], None],
        *,
        first_block: int = 0,
        max_blocks: int | None = None,
    ) -> list[str]:
        """``AsyncClient.load_into``; ``consume`` runs on the client's loop thread."""
        return self._run(
            self._c.load_into(ns, tokens, consume, first_block=first_block, max_blocks=max_blocks)
        )

    def attach(self, ns: Namespace, caches: Sequence[LayerCache]) -> AttachedCache:
        return self._run(self._c.attach(ns, caches))

    def save_kv(
        self,
        cache: AttachedCache,
        tokens: Tokens,
        block_ids: Sequence[int],
        *,
        first_block: int = 0,
        session: str | None = None,
    ) -> SaveResult:
        """``AsyncClient.save_kv``, ordered after the calling thread's current stream."""
        stream = torch.cuda.current_stream(cache.device)
        return self._run(
            self._c.save_kv(
                cache, tokens, block_ids, first_block=first_block, session=session, stream=stream
            ),
            bounded=False,
        )

    def load_kv(
        self,
        cache: AttachedCache,
        tokens: Tokens,
        block_ids: Sequence[int],
        *,
        first_block: int = 0,
    ) -> list[str]:
        """``AsyncClient.load_kv``: the calling thread's current stream waits for the scatter."""
        stream = torch.cuda.current_stream(cache.device)
        return self._run(
            self._c.load_kv(cache, tokens, block_ids, first_block=first_block, stream=stream),
            bounded=False,
        )

    def detach(self, cache: AttachedCache) -> None:
        self._run(self._c.detach(cache))

    def prefetch(
        self,
        ns: Namespace | None = None,
        tokens: Tokens | None = None,
        *,
        session: str | None = None,
    ) -> int:
        return self._run(self._c.prefetch(ns, tokens, session=session))

    def ctl(self, verb: str, **args: Any) -> wire.OperatorResult:
        return self._run(self._c.ctl(verb, **args))

    def pin(self, session: str) -> int:
        return self._run(self._c.pin(session))

    def unpin(self, session: str) -> int:
        return self._run(self._c.unpin(session))

    def evict(self, *, session: str | None = None, keys: Sequence[bytes] | None = None) -> int:
        return self._run(self._c.evict(session=session, keys=keys))

    def flush(self) -> int:
        return self._run(self._c.flush())

    def stats(self) -> wire.OperatorResult:
        return self._run(self._c.stats())

    def touch(self, ns: Namespace, tokens: Tokens) -> int:
        return self._run(self._c.touch(ns, tokens))

    def close(self) -> None:
        """Close the connection (once: closing again does nothing). Calls other threads have
        in flight end first (on a closed connection: ConnectionError), so that none is left
        waiting on a stopped loop."""
        with self._idle:
            if self._closed:
                return
            self._closed = True
        try:
            with contextlib.suppress(TimeoutError):  # a hung daemon: left without its bye
                self._thread.run(self._c.close(), self._timeout)
        finally:
            with self._idle:
                self._idle.wait_for(lambda: self._calls == 0)
            self._thread.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AsyncClient", "AttachedCache", "Client", "RemoteError", "RemoteLookup"]
