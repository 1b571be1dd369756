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
import grp
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tiercache
from tiercache.daemon.control import Control, ControlError
from tiercache.daemon.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    decode,
    encode,
    read_frame,
    unpack_tokens,
)
from tiercache.engine_kv import EngineKV
from tiercache.ipc import IpcError
from tiercache.keys import KeyChain, Namespace, TokenError
from tiercache.manager import (
    BlockShapeError,
    Draining,
    Lease,
    NoRoom,
    Reservation,
    SessionPinned,
    TierManager,
    UnknownSession,
)
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


Handler = Callable[[Connection, dict[str, Any]], Awaitable[Any]]


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
        self._handlers: dict[str, Handler] = {
            "register": self._register,
            "lookup": self._lookup,
            "lookup_tail": self._lookup_tail,
            "reserve": self._reserve,
            "commit": self._commit,
            "abort": self._abort,
            "acquire": self._acquire,
            "release": self._release,
            "prefetch": self._prefetch,
            "attach": self._attach,
            "detach": self._detach,
            "save_kv": self._save_kv,
            "load_kv": self._load_kv,
            "ctl": self._ctl,
        }

    @property
    def clients(self) -> int:
        return len(self._conns)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._remove_stale_socket()
        # Created owner-only: the umask closes the window between bind() and chmod().
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        if self.group:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ValueError(
                    f"[daemon] socket_group {self.group!r} is not a group on this machine"
                ) from None
            os.chown(self.path, -1, gid)
            os.chmod(self.path, 0o660)
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
        raise RuntimeError(
            f"another daemon is serving {self.path}; give this one its own [daemon] socket"
        )

    async def close(self) -> None:
        """Stop accepting, end every connection (releasing what it held)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.path.unlink(missing_ok=True)

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
                body = await read_frame(reader)
            except ProtocolError as e:
                # The stream is no longer delimited: answer once, then hang up.
                await self._send(
                    writer,
                    {"id": None, "ok": False, "error": {"code": e.code, "message": e.message}},
                )
                return
            if body is None:
                return
            reply, keep_open = await self._handle(conn, body)
            await self._send(writer, reply)
            if not keep_open:
                return

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        writer.write(encode(msg))
        await writer.drain()

    async def _handle(self, conn: Connection, body: bytes) -> tuple[dict[str, Any], bool]:
        """One request -> (reply, keep the connection open)."""
        rid: Any = None
        try:
            msg = decode(body)
            rid = msg.get("id")
            op, args = msg.get("op"), msg.get("args", {})
            if not isinstance(op, str):
                raise ProtocolError("bad_request", "'op' must be a string")
            if not isinstance(args, dict):
                raise ProtocolError("bad_request", f"{op}: 'args' must be a map")
            if op == "hello":
                return {"id": rid, "ok": True, "result": self._hello(conn, args)}, True
            if not conn.greeted:
                raise ProtocolError("no_hello", f"the first request must be 'hello', got {op!r}")
            if op == "bye":
                return {"id": rid, "ok": True, "result": None}, False
            handler = self._handlers.get(op)
            if handler is None:
                known = ", ".join(["hello", "bye", *self._handlers])
                raise ProtocolError("unknown_op", f"unknown operation {op!r}; operations: {known}")
            t0 = time.perf_counter()
            result = await handler(conn, args)
            self.manager.stats.request(op, time.perf_counter() - t0)
            return {"id": rid, "ok": True, "result": result}, True
        except ProtocolError as e:
            return self._error(rid, e.code, e.message), e.code not in ("bad_version", "no_hello")
        except ControlError as e:
            return self._error(rid, e.code, e.message), True
        except Exception as e:
            code, message = _classify(e)
            if code == "internal":
                log.exception("request failed")
            return self._error(rid, code, message), True

    def _error(self, rid: Any, code: str, message: str) -> dict[str, Any]:
        self.manager.stats.error(f"request_{code}")
        return {"id": rid, "ok": False, "error": {"code": code, "message": message}}

    def _hello(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        version = args.get("version")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                "bad_version",
                f"protocol version {version!r} is not supported; this daemon speaks {PROTOCOL_VERSION}",
            )
        conn.greeted = True
        conn.peer = str(args.get("client", ""))
        return {"version": PROTOCOL_VERSION, "server": f"tiercache {tiercache.__version__}"}

    # -- operations -----------------------------------------------------------

    def _ns(self, conn: Connection, args: dict[str, Any]) -> Namespace:
        ns = conn.namespaces.get(args.get("ns"))  # type: ignore[arg-type]
        if ns is None:
            raise ProtocolError(
                "unknown_namespace", "'ns' must name a namespace registered on this connection"
            )
        return ns

    @staticmethod
    def _int(args: dict[str, Any], name: str, default: int | None = None) -> int | None:
        value = args.get(name, default)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise ProtocolError(
                "bad_request", f"'{name}' must be a non-negative integer, got {value!r}"
            )
        return value

    async def _register(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        model, spec, salt = args.get("model"), args.get("spec"), args.get("salt", "")
        if not isinstance(model, str) or not isinstance(spec, dict) or not isinstance(salt, str):
            raise ProtocolError(
                "bad_request", "register needs 'model' (str), 'spec' (map), optional 'salt' (str)"
            )
        ns = Namespace(model, KVSpec.from_dict(spec), salt)
        await self.manager.register(ns)
        conn.namespaces[ns.hex] = ns
        host = self.manager.host
        assert host is not None
        return {
            "ns": ns.hex,
            "arena": {"name": host.name, "slot_bytes": host.slot_bytes, "num_slots": host.num_slots}
            if host.shared
            else None,
        }

    async def _lookup(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        hit = await self.manager.lookup(self._ns(conn, args), _sequence(args))
        return {
            "blocks": hit.blocks,
            "tokens": hit.tokens,
            "tiers": hit.tiers,
            "full_blocks": len(hit.keys),
        }

    async def _lookup_tail(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        ns = self._ns(conn, args)
        raw = args.get("keys")
        if not isinstance(raw, bytes):
            raise ProtocolError("bad_request", "'keys' must be the concatenated 16-byte tail keys")
        index, tier = await self.manager.lookup_tail(ns, KeyChain.from_bytes(raw))
        return {"index": index, "tier": tier}

    @staticmethod
    def _session(args: dict[str, Any]) -> str | None:
        session = args.get("session")
        if session is not None and not isinstance(session, str):
            raise ProtocolError("bad_request", "'session' must be a string")
        return session

    async def _reserve(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        r = await self.manager.reserve(
            self._ns(conn, args),
            _sequence(args),
            first_block=self._int(args, "first_block", 0) or 0,
            count=self._int(args, "count"),
            session=self._session(args),
        )
        txn = next(self._ids)
        conn.reservations[txn] = r
        return {
            "txn": txn,
            "slots": r.slots,
            "rows": r.rows,
            "walked": r.walked,
            "present": r.present,
            "rejected": r.rejected,
        }

    async def _commit(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        r = conn.reservations.pop(self._int(args, "txn") or 0, None)
        if r is None:
            raise ProtocolError(
                "unknown_txn", "'txn' must name an open reservation of this connection"
            )
        res = await self.manager.commit(r)
        return {"stored": res.stored, "present": res.present, "rejected": res.rejected}

    async def _abort(self, conn: Connection, args: dict[str, Any]) -> None:
        r = conn.reservations.pop(self._int(args, "txn") or 0, None)
        if r is None:
            raise ProtocolError(
                "unknown_txn", "'txn' must name an open reservation of this connection"
            )
        await self.manager.abort(r)

    async def _acquire(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        lease = await self.manager.acquire(
            self._ns(conn, args),
            _sequence(args),
            first_block=self._int(args, "first_block", 0) or 0,
            max_blocks=self._int(args, "max_blocks"),
        )
        lid = next(self._ids)
        conn.leases[lid] = lease
        return {"lease": lid, "slots": lease.slots, "tiers": lease.tiers, "prefix": lease.prefix}

    async def _release(self, conn: Connection, args: dict[str, Any]) -> None:
        lease = conn.leases.pop(self._int(args, "lease") or 0, None)
        if lease is None:
            raise ProtocolError(
                "unknown_lease", "'lease' must name an open lease of this connection"
            )
        await self.manager.release(lease)

    async def _prefetch(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        if "session" in args:
            session = args["session"]
            if not isinstance(session, str):
                raise ProtocolError("bad_request", "'session' must be a string")
            return {"blocks": await self.manager.prefetch(session=session)}
        ns = self._ns(conn, args)
        return {"blocks": await self.manager.prefetch(ns, _sequence(args))}

    async def _attach(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Map an engine's KV caches (CUDA IPC handles) so that ``save_kv`` / ``load_kv`` move
        its blocks with the daemon's kernels; the mappings go when the connection ends."""
        ns = self._ns(conn, args)
        if not torch.cuda.is_available():
            raise ProtocolError(
                "no_cuda",
                "attach maps an engine's GPU memory, but this daemon sees no CUDA device; "
                "CPU engines copy through the shared host arena (save/load)",
            )
        engine = EngineKV.attach(ns.spec, args.get("layers"), args.get("event"))
        eid = next(self._ids)
        conn.engines[eid] = engine
        log.info("connection %d attached an engine's %d-layer KV cache on %s",
                 conn.id, ns.spec.num_layers, engine.device)  # fmt: skip
        return {"engine": eid, "event": engine.done_handle}

    def _engine(self, conn: Connection, args: dict[str, Any], *, pop: bool = False) -> EngineKV:
        eid = self._int(args, "engine") or 0
        engine = conn.engines.pop(eid, None) if pop else conn.engines.get(eid)
        if engine is None:
            raise ProtocolError(
                "unknown_engine", "'engine' must name a KV cache attached on this connection"
            )
        return engine

    async def _detach(self, conn: Connection, args: dict[str, Any]) -> None:
        await self._engine(conn, args, pop=True).close()

    @staticmethod
    def _block_ids(args: dict[str, Any]) -> list[int]:
        """The request's 'block_ids', a list of integers (the engine checks their range)."""
        ids = args.get("block_ids")
        if not isinstance(ids, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) for b in ids
        ):
            raise ProtocolError(
                "bad_request", "'block_ids' must be a list of the engine's block ids"
            )
        return ids

    async def _save_kv(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        res = await self._engine(conn, args).save(
            self.manager, self._ns(conn, args), _chain(args), self._block_ids(args),
            first_block=self._int(args, "first_block", 0) or 0, session=self._session(args),
        )  # fmt: skip
        return {"stored": res.stored, "present": res.present, "rejected": res.rejected}

    async def _load_kv(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        engine = self._engine(conn, args)
        tiers = await engine.load(
            self.manager, self._ns(conn, args), _chain(args), self._block_ids(args),
            first_block=self._int(args, "first_block", 0) or 0,
        )  # fmt: skip
        return {"tiers": tiers, "wait": engine.done_event is not None and bool(tiers)}

    async def _ctl(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        verb = args.get("verb")
        if not isinstance(verb, str):
            raise ProtocolError("bad_request", "ctl needs 'verb' (str) and optional 'args' (map)")
        return await self.control.run(verb, args.get("args") or {})

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


def _sequence(args: dict[str, Any]) -> KeyChain | Any:
    """A request's sequence: ``keys`` (the client hashed its tokens: the normal case) or
    ``tokens`` (packed uint32, hashed here)."""
    if "keys" in args:
        return _chain(args)
    return unpack_tokens(args.get("tokens"))


def _chain(args: dict[str, Any]) -> KeyChain:
    """A request's ``keys``: the block keys the client hashed."""
    raw = args.get("keys")
    if not isinstance(raw, bytes):
        raise ProtocolError("bad_request", "'keys' must be the concatenated 16-byte block keys")
    return KeyChain.from_bytes(raw)


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
