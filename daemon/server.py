"""The Unix-socket data plane: engines' connectors talk to the daemon's manager here.

One connection = one client. Requests on a connection are answered in order.
What a connection holds (namespaces it registered, save reservations, read
leases) is released when it ends for any reason: a clean ``bye``, a closed
socket, a killed process, or a protocol error. That is what keeps a dead
client from pinning blocks forever.

Every request gets a reply; every failure is a typed error (``code``) with a
message naming what was wrong. A frame the daemon cannot even delimit
(oversized, truncated) ends the connection after the error reply, since the
stream can no longer be trusted; a well-delimited but bad message does not.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tiercache
from tiercache.daemon import protocol as wire
from tiercache.daemon.config import ConfigError, socket_gid
from tiercache.daemon.control import Control, ControlError
from tiercache.daemon.protocol import PROTOCOL_VERSION, ProtocolError, Reply, Request
from tiercache.engine_kv import EngineKV
from tiercache.errors import BlockShapeError, Draining, NoRoom, SessionPinned, UnknownSession
from tiercache.ipc import IpcError
from tiercache.keys import KeyChain, Namespace, TokenError
from tiercache.manager import TierManager
from tiercache.results import Lease, Reservation
from tiercache.spec import KVSpec, SpecError

log = logging.getLogger(__name__)


@dataclass
class Connection:
    """What one client holds; all of it is given back when the connection ends."""

    id: int
    peer: str = ""
    greeted: bool = False
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    reservations: dict[int, Reservation] = field(default_factory=dict)
    leases: dict[int, Lease] = field(default_factory=dict)
    engines: dict[int, EngineKV] = field(default_factory=dict)  # attached KV caches (CUDA IPC)


Handler = Callable[[Connection, Any], Awaitable[Reply]]


class SocketServer:
    def __init__(
        self, manager: TierManager, control: Control, path: str | Path, *, group: str = ""
    ) -> None:
        self.manager = manager
        self.control = control
        self.path = Path(path)
        self.group = group
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[int, Connection] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        handlers: list[tuple[type[Request], Handler]] = [
            (wire.Register, self._register),
            (wire.Lookup, self._lookup),
            (wire.LookupTail, self._lookup_tail),
            (wire.Touch, self._touch),
            (wire.Reserve, self._reserve),
            (wire.Commit, self._commit),
            (wire.Abort, self._abort),
            (wire.Acquire, self._acquire),
            (wire.Release, self._release),
            (wire.Prefetch, self._prefetch),
            (wire.Attach, self._attach),
            (wire.Detach, self._detach),
            (wire.SaveKV, self._save_kv),
            (wire.LoadKV, self._load_kv),
            (wire.Ctl, self._ctl),
        ]
        self._handlers: dict[type[Request], Handler] = dict(handlers)

    @property
    def clients(self) -> int:
        return len(self._conns)

    async def start(self) -> None:
        gid = socket_gid(self.group) if self.group else None  # before anything is created
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._remove_stale_socket()
        # Created owner-only: the umask closes the window between bind() and chmod().
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        if gid is not None:
            # The group's engines connect, then map the shared arena read-write: both
            # are theirs. Nothing else is (the arena was created owner-only).
            for path in (self.path, self.manager.host.path):
                if path is not None:
                    os.chown(path, -1, gid)
                    os.chmod(path, 0o660)
        log.info("listening on %s", self.path)

    def _remove_stale_socket(self) -> None:
        if not self.path.exists():
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            self.path.unlink(missing_ok=True)  # left by a daemon that died
            return
        finally:
            probe.close()
        raise ConfigError(
            f"daemon.socket: another daemon is serving {self.path}; give this one its own socket"
        )

    async def close(self) -> None:
        """Stop accepting, end every connection (releasing what it held).

        Connections end before ``wait_closed()``: from Python 3.12.1 on it waits for
        every connection to finish, so a client still connected would hang the drain.
        """
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
            self.path.unlink(missing_ok=True)  # ours: a start refused did not bind it

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Connection(next(self._ids))
        self._conns[conn.id] = conn
        try:
            await self._loop(conn, reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            await self._release_all(conn)
            del self._conns[conn.id]
            self._tasks.discard(task)
            writer.close()

    async def _loop(
        self, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                body = await wire.read_frame(reader)
            except ProtocolError as e:
                # The stream is no longer delimited: answer once, then hang up.
                await self._send(writer, wire.error_frame(None, e.code, e.message))
                return
            if body is None:
                return
            reply, keep_open = await self._handle(conn, body)
            await self._send(writer, reply)
            if not keep_open:
                return

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, frame: bytes) -> None:
        writer.write(frame)
        await writer.drain()

    async def _handle(self, conn: Connection, body: bytes) -> tuple[bytes, bool]:
        """One request -> (reply, keep the connection open)."""
        rid: Any = None
        try:
            rid, op, args = wire.decode_envelope(wire.decode(body))
            if op == "hello":
                hello = wire.Hello.from_wire(args)
                return wire.reply_frame(rid, self._hello(conn, hello)), True
            if not conn.greeted:
                raise ProtocolError("no_hello", f"the first request must be 'hello', got {op!r}")
            req = wire.decode_request(op, args)
            if isinstance(req, wire.Bye):
                return wire.reply_frame(rid, None), False
            with self.manager.stats.timing(op):
                result = await self._handlers[type(req)](conn, req)
            return wire.reply_frame(rid, result), True
        except ProtocolError as e:
            return self._error(rid, e.code, e.message), e.code not in ("bad_version", "no_hello")
        except ControlError as e:
            return self._error(rid, e.code, e.message), True
        except Exception as e:
            code, message = _classify(e)
            if code == "internal":
                log.exception("request failed")
            return self._error(rid, code, message), True

    def _error(self, rid: Any, code: str, message: str) -> bytes:
        self.manager.stats.error(f"request_{code}")
        return wire.error_frame(rid, code, message)

    def _hello(self, conn: Connection, req: wire.Hello) -> wire.HelloReply:
        if req.version != PROTOCOL_VERSION:
            raise ProtocolError(
                "bad_version",
                f"protocol version {req.version!r} is not supported; this daemon speaks {PROTOCOL_VERSION}",
            )
        conn.greeted = True
        conn.peer = req.client
        return wire.HelloReply(PROTOCOL_VERSION, f"tiercache {tiercache.__version__}")

    # -- operations -----------------------------------------------------------

    @staticmethod
    def _ns(conn: Connection, name: str) -> Namespace:
        ns = conn.namespaces.get(name)
        if ns is None:
            raise ProtocolError(
                "unknown_namespace", "'ns' must name a namespace registered on this connection"
            )
        return ns

    async def _register(self, conn: Connection, req: wire.Register) -> wire.RegisterReply:
        spec = KVSpec.from_dict(req.spec)
        ns = Namespace(req.model, spec, req.salt, req.store_dtype, req.group)
        await self.manager.register(ns)
        conn.namespaces[ns.hex] = ns
        host = self.manager.host
        arena = wire.Arena(host.name, host.slot_bytes, host.num_slots) if host.shared else None
        return wire.RegisterReply(ns.hex, arena)

    async def _lookup(self, conn: Connection, req: wire.Lookup) -> wire.LookupReply:
        hit = await self.manager.lookup(
            self._ns(conn, req.ns), req.sequence(), first_block=req.first_block
        )
        return wire.LookupReply(hit.blocks, hit.tokens, hit.tiers, len(hit.keys))

    async def _lookup_tail(self, conn: Connection, req: wire.LookupTail) -> wire.LookupTailReply:
        ns = self._ns(conn, req.ns)
        index, tier = await self.manager.lookup_tail(ns, KeyChain.from_bytes(req.keys))
        return wire.LookupTailReply(index, tier)

    async def _touch(self, conn: Connection, req: wire.Touch) -> wire.Blocks:
        return wire.Blocks(await self.manager.touch(self._ns(conn, req.ns), req.sequence()))

    async def _reserve(self, conn: Connection, req: wire.Reserve) -> wire.Reserved:
        r = await self.manager.reserve(
            self._ns(conn, req.ns),
            req.sequence(),
            first_block=req.first_block,
            count=req.count,
            session=req.session,
        )
        txn = next(self._ids)
        conn.reservations[txn] = r
        return wire.Reserved(txn, r.slots, r.rows, r.walked, r.present, r.rejected)

    @staticmethod
    def _txn(conn: Connection, txn: int) -> Reservation:
        r = conn.reservations.pop(txn, None)
        if r is None:
            raise ProtocolError(
                "unknown_txn", "'txn' must name an open reservation of this connection"
            )
        return r

    async def _commit(self, conn: Connection, req: wire.Commit) -> wire.Stored:
        res = await self.manager.commit(self._txn(conn, req.txn))
        return wire.Stored(res.stored, res.present, res.rejected)

    async def _abort(self, conn: Connection, req: wire.Abort) -> None:
        await self.manager.abort(self._txn(conn, req.txn))

    async def _acquire(self, conn: Connection, req: wire.Acquire) -> wire.Leased:
        lease = await self.manager.acquire(
            self._ns(conn, req.ns),
            req.sequence(),
            first_block=req.first_block,
            max_blocks=req.max_blocks,
        )
        lid = next(self._ids)
        conn.leases[lid] = lease
        return wire.Leased(lid, lease.slots, lease.tiers, lease.prefix)

    async def _release(self, conn: Connection, req: wire.Release) -> None:
        lease = conn.leases.pop(req.lease, None)
        if lease is None:
            raise ProtocolError(
                "unknown_lease", "'lease' must name an open lease of this connection"
            )
        await self.manager.release(lease)

    async def _prefetch(self, conn: Connection, req: wire.Prefetch) -> wire.Blocks:
        if req.session is not None:
            return wire.Blocks(await self.manager.prefetch(session=req.session))
        chain = req.by_chain()
        return wire.Blocks(await self.manager.prefetch(self._ns(conn, chain.ns), chain.sequence()))

    async def _attach(self, conn: Connection, req: wire.Attach) -> wire.Attached:
        """Map an engine's KV caches (CUDA IPC handles) so that ``save_kv`` / ``load_kv`` move
        its blocks with the daemon's kernels; the mappings go when the connection ends."""
        ns = self._ns(conn, req.ns)
        if ns.store_dtype != "exact":
            # bad_layout: the engine copies through host memory, where blocks are quantized.
            raise ProtocolError(
                "bad_layout",
                f"attach moves an engine's blocks as they are; a {ns.store_dtype!r} "
                "namespace saves and loads through host memory (save/load)",
            )
        if not torch.cuda.is_available():
            raise ProtocolError(
                "no_cuda",
                "attach maps an engine's GPU memory, but this daemon sees no CUDA device; "
                "CPU engines copy through the shared host arena (save/load)",
            )
        engine = EngineKV.attach(ns.spec, req.layers, req.event)
        eid = next(self._ids)
        conn.engines[eid] = engine
        log.info("connection %d attached an engine's %d-layer KV cache on %s",
                 conn.id, ns.spec.num_layers, engine.device)  # fmt: skip
        return wire.Attached(eid, engine.done_handle)

    @staticmethod
    def _engine(conn: Connection, eid: int, *, pop: bool = False) -> EngineKV:
        engine = conn.engines.pop(eid, None) if pop else conn.engines.get(eid)
        if engine is None:
            raise ProtocolError(
                "unknown_engine", "'engine' must name a KV cache attached on this connection"
            )
        return engine

    async def _detach(self, conn: Connection, req: wire.Detach) -> None:
        await self._engine(conn, req.engine, pop=True).close()

    async def _save_kv(self, conn: Connection, req: wire.SaveKV) -> wire.Stored:
        res = await self._engine(conn, req.engine).save(
            self.manager, self._ns(conn, req.ns), KeyChain.from_bytes(req.keys), req.block_ids,
            first_block=req.first_block, session=req.session,
        )  # fmt: skip
        return wire.Stored(res.stored, res.present, res.rejected)

    async def _load_kv(self, conn: Connection, req: wire.LoadKV) -> wire.Loaded:
        engine = self._engine(conn, req.engine)
        tiers = await engine.load(
            self.manager, self._ns(conn, req.ns), KeyChain.from_bytes(req.keys), req.block_ids,
            first_block=req.first_block,
        )  # fmt: skip
        return wire.Loaded(tiers, engine.done_event is not None and bool(tiers))

    async def _ctl(self, conn: Connection, req: wire.Ctl) -> wire.OperatorResult:
        return await self.control.run(req.verb, req.args or {})

    async def _release_all(self, conn: Connection) -> None:
        for engine in conn.engines.values():
            await engine.close()  # its loads' leases first, then the mappings
        if conn.engines:
            log.info(
                "connection %d ended with %d attached engines: unmapped", conn.id, len(conn.engines)
            )
        conn.engines.clear()
        for lease in conn.leases.values():
            await self.manager.release(lease)
        for r in conn.reservations.values():
            await self.manager.abort(r)
        if conn.leases or conn.reservations:
            log.info(
                "connection %d ended holding %d leases, %d reservations: released",
                conn.id,
                len(conn.leases),
                len(conn.reservations),
            )
        conn.leases.clear()
        conn.reservations.clear()


def _classify(e: Exception) -> tuple[str, str]:
    """A manager exception -> (error code, message)."""
    for kind, code in (
        (BlockShapeError, "bad_shape"),
        (TokenError, "bad_tokens"),
        (SpecError, "bad_spec"),
        (UnknownSession, "unknown_session"),
        (SessionPinned, "session_pinned"),
        (Draining, "draining"),
        (NoRoom, "no_room"),
        (IpcError, "ipc_failed"),
    ):
        if isinstance(e, kind):
            return code, str(e)
    if isinstance(e, ValueError):
        return "bad_request", str(e)
    return "internal", f"{type(e).__name__}: {e}"
