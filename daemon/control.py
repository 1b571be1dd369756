"""The operator verbs: pin, unpin, evict, flush, prefetch, stats, set, drain.

One implementation serves every channel (MQTT commands, ``tiercache ctl`` over
the socket, tests): a channel decodes its payload into a dict, calls
``Control.run(verb, args)`` and encodes either the result or the
``ControlError`` it raised. Every error has a stable ``code`` a program can
branch on and a message that names what was wrong; nothing a caller sends can
raise anything else out of ``run``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tiercache.errors import CacheError, SessionPinned, UnknownSession
from tiercache.keys import KEY_BYTES
from tiercache.manager import TierManager
from tiercache.policy.write import make_write_policy
from tiercache.tiers.disk import DiskFull, StoreError

log = logging.getLogger(__name__)

MAX_INT64 = 2**63 - 1
VERBS = ("pin", "unpin", "evict", "flush", "prefetch", "stats", "set", "drain")
# The arguments each verb takes; any other is refused (`drain node=gpu-2` is not a drain of gpu-2).
ARGUMENTS: dict[str, tuple[str, ...]] = {
    "pin": ("session",),
    "unpin": ("session",),
    "evict": ("session", "keys"),
    "flush": (),
    "prefetch": ("session",),
    "stats": (),
    "set": ("name", "value", "session"),
    "drain": (),
}

# The settings `set` may change at run time: name -> (kind, description).
SETTABLE = {
    "policy.admission": "int >= 1: store a block on its N-th offer",
    "policy.write": "'write-through' or 'write-back'",
    "session.ttl": "seconds > 0 or null, with 'session'",
    "daemon.log_level": "'debug', 'info', 'warning' or 'error'",
}


class ControlError(Exception):
    """A verb that could not be carried out; ``code`` is stable, ``message`` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass
class Control:
    manager: TierManager
    # Called once a drain has flushed; the daemon publishes status and events from it.
    on_drained: Callable[[int], Awaitable[None]] | None = None
    draining: bool = False
    # Set by close(): the manager is about to close, so only `stats` still runs.
    closing: bool = False
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    # The verbs running now, each in a task of its own: close() waits for them.
    _verbs: set[asyncio.Task[dict[str, Any]]] = field(default_factory=set, init=False, repr=False)
    _cut: bool = field(default=False, init=False, repr=False)

    def cut_short(self) -> bool:
        """Cancel the verbs running now (a second stop signal): close() waits for them, and a
        flush or prefetch of a large tier may take minutes. A cancelled flush leaves what a
        cancelled drain does (``Daemon._close_tiers``); each caller gets ``shutting_down``.
        Whether any was running."""
        self._cut = True
        for task in self._verbs:
            task.cancel()
        return bool(self._verbs)

    async def close(self) -> None:
        """Refuse every verb but ``stats`` from now on and wait for those already running:
        the daemon closes the manager next, and a verb must not touch it while or after it
        closes (an evict would delete blocks from a disk tier another daemon may own)."""
        self.closing = True
        while self._verbs:
            self._idle.clear()
            await self._idle.wait()

    async def run(self, verb: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if verb not in VERBS:
            raise ControlError("unknown_verb", f"unknown verb {verb!r}; verbs: {', '.join(VERBS)}")
        if self.closing and verb != "stats":
            raise ControlError("shutting_down", f"{verb}: the daemon is shutting down")
        verb_task = asyncio.ensure_future(self._run(verb, args))
        self._verbs.add(verb_task)
        try:
            # Its own task, so that cut_short() stops the verb and not the caller (an MQTT
            # command's reply, a socket connection); cancelling the caller cancels it too.
            return await verb_task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if self._cut and verb_task.cancelled() and not (me and me.cancelling()):
                raise ControlError(
                    "shutting_down", f"{verb}: cut short, the daemon was told to stop at once"
                ) from None
            raise
        finally:
            self._verbs.discard(verb_task)
            if not self._verbs:
                self._idle.set()

    async def _run(self, verb: str, args: Mapping[str, Any] | None) -> dict[str, Any]:
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            raise ControlError(
                "bad_request", f"{verb}: arguments must be a JSON object, got {type(args).__name__}"
            )
        takes = ARGUMENTS[verb]
        unknown = next((k for k in args if k not in takes), None)
        if unknown is not None:
            raise ControlError(
                "bad_request",
                f"{verb}: unknown argument {unknown!r}; {verb} takes "
                f"{', '.join(takes) or 'no arguments'}",
            )
        handler: Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]] = getattr(
            self, f"_{verb}"
        )
        try:
            return await handler(args)
        except ControlError:
            raise
        except UnknownSession as e:
            raise ControlError("unknown_session", str(e)) from None
        except SessionPinned as e:
            raise ControlError("session_pinned", str(e)) from None
        except DiskFull as e:
            raise ControlError("disk_full", str(e)) from None
        except (StoreError, CacheError) as e:
            raise ControlError("failed", str(e)) from None
        except Exception as e:  # a bug, not bad input: say so, keep serving
            log.exception("control verb %s failed", verb)
            raise ControlError("internal", f"{verb} failed: {type(e).__name__}: {e}") from None

    @staticmethod
    def _session(verb: str, args: Mapping[str, Any]) -> str:
        sid = args.get("session")
        if not isinstance(sid, str) or not sid:
            raise ControlError("bad_request", f"{verb}: 'session' must be a non-empty string")
        return sid

    async def _pin(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {"blocks": await self.manager.pin(self._session("pin", args))}

    async def _unpin(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {"blocks": await self.manager.unpin(self._session("unpin", args))}

    async def _evict(self, args: Mapping[str, Any]) -> dict[str, Any]:
        if "keys" in args and "session" in args:
            raise ControlError("bad_request", "evict: give 'session' or 'keys', not both")
        if "keys" in args:
            keys = args["keys"]
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise ControlError("bad_request", "evict: 'keys' must be a list of hex block keys")
            try:
                raw = [bytes.fromhex(k) for k in keys]
            except ValueError:
                raise ControlError("bad_request", "evict: 'keys' must be hex strings") from None
            # A key of another length names no block: evicting nothing would look like a miss.
            short = next((k for k, b in zip(keys, raw, strict=True) if len(b) != KEY_BYTES), None)
            if short is not None:
                raise ControlError(
                    "bad_request",
                    f"evict: a block key is {2 * KEY_BYTES} hex digits, got {short[:80]!r}",
                )
            return {"blocks": await self.manager.evict(keys=raw)}
        return {"blocks": await self.manager.evict(session=self._session("evict", args))}

    async def _flush(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {"bytes": await self.manager.flush()}

    async def _prefetch(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {"blocks": await self.manager.prefetch(session=self._session("prefetch", args))}

    async def _stats(self, args: Mapping[str, Any]) -> dict[str, Any]:
        m = self.manager
        return {
            "tiers": m.usage(),
            "blocks": len(m.index),
            "formats": m.blocks_by_format(),  # store_dtype -> tier -> blocks
            "sessions": len(m.sessions),
            # Counted without walking every block: stats is polled during a flush (the
            # progress bar) and runs on the same event loop as the flush.
            "pinned_blocks": m.sessions.pinned_blocks(),
            # Host-only blocks a flush would write: every block is on disk, host, or both.
            "dirty_blocks": len(m.index) - m.disk.num_blocks if m.disk is not None else 0,
            # Blocks a reader holds (a dead client's are released with its connection).
            "leased_blocks": sum(1 for e in m.index if e.leases > 0),
            # Host slots neither free nor holding a visible block (the host policy tracks
            # exactly the visible ones): open save reservations and promotions in flight.
            "reserved_slots": (
                m.host.num_slots - m.host.free_slots - len(m.host_room.policy)
                if m.host_room.policy is not None
                else 0
            ),
            "draining": self.draining,
            "remote": m.shared.state() if m.shared is not None else None,
            "policy": {
                "eviction": m.eviction,
                "write": m.write.name,
                "admission": m.admission.threshold,
            },
            **m.stats.as_dict(),
        }

    async def _set(self, args: Mapping[str, Any]) -> dict[str, Any]:
        name, value = args.get("name"), args.get("value")
        if not isinstance(name, str) or name not in SETTABLE:  # a list or object is unhashable
            known = "; ".join(f"{k} ({v})" for k, v in SETTABLE.items())
            raise ControlError("bad_request", f"set: unknown setting {name!r}; settable: {known}")
        m = self.manager
        if name == "policy.admission":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ControlError(
                    "bad_value", f"set policy.admission: must be an integer >= 1, got {value!r}"
                )
            if value > MAX_INT64:  # JSON carries it; the socket's msgpack (stats) could not
                raise ControlError(
                    "bad_value",
                    f"set policy.admission: must be at most {MAX_INT64} (a 64-bit integer, "
                    f"as in the config file), got {value!r}",
                )
            m.admission.threshold = value
        elif name == "policy.write":
            try:
                m.write = make_write_policy(str(value))
            except ValueError as e:
                raise ControlError("bad_value", f"set policy.write: {e}") from None
        elif name == "session.ttl":
            ok = value is None or (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                # Not math.isfinite: an integer beyond a float's range would raise.
                and 0 < value <= sys.float_info.max
            )
            if not ok:
                raise ControlError(
                    "bad_value", f"set session.ttl: must be seconds > 0 or null, got {value!r}"
                )
            await m.set_ttl(self._session("set session.ttl", args), value)
        else:
            levels = ("debug", "info", "warning", "error")
            if value not in levels:
                raise ControlError(
                    "bad_value", f"set daemon.log_level: must be one of {', '.join(levels)}"
                )
            logging.getLogger().setLevel(str(value).upper())
        return {"name": name, "value": value}

    async def _drain(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Stop taking saves, flush write-back blocks; reads keep being served."""
        self.draining = True
        self.manager.draining = True
        flushed = await self.manager.flush()
        if self.on_drained is not None:
            await self.on_drained(flushed)
        return {"flushed_bytes": flushed, "draining": True}
