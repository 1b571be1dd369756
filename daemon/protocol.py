"""The socket wire format: length-prefixed msgpack frames, one request -> one reply, and one
dataclass per request and reply, encoded and decoded here only.

A frame is a 4-byte big-endian length and that many bytes of msgpack. A request is
``{"id": int, "op": str, "args": {...}}``; its reply is ``{"id": same, "ok": true,
"result": ...}`` or ``{"id": same, "ok": false, "error": {"code": str, "message": str}}``.
The first request of a connection must be ``hello`` with ``{"version": PROTOCOL_VERSION}``.

``args`` is a request dataclass's fields by name (``Request.to_wire``); ``result`` a reply
dataclass's (``None`` for the replies that carry nothing, the operator verb's own JSON
object for ``ctl``). ``decode_request`` checks every field's type against the dataclass and
names the field that is wrong (a ``bad_request`` error); unknown fields are ignored, so a
newer client's optional fields do not break an older daemon.

Block bytes never travel here: a CPU client maps the daemon's host arena (``/dev/shm``)
and copies into and out of the slots the replies name. Frames carry block keys (16 bytes a
block), slot ids and metadata, so ``MAX_FRAME`` (4 MiB) bounds what a peer can make the
other side buffer.

JSON was rejected: token ids and keys would travel as text, several times the bytes and
the parse time of msgpack's binary strings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union, cast, get_args, get_origin, get_type_hints

import msgpack
import numpy as np

from tiercache.errors import BlockShapeError, Draining, NoRoom, SessionPinned, UnknownSession
from tiercache.ipc import IpcError
from tiercache.keys import KeyChain, TokenError
from tiercache.spec import SpecError

PROTOCOL_VERSION = 1
MAX_FRAME = 4 * 2**20
MAX_MESSAGE = 1024  # characters of an error message
_LEN = struct.Struct(">I")

# What an operator verb answers (``ctl``): the same JSON object MQTT carries, shaped by
# each verb (``daemon/control.py``), so it stays a plain map here.
OperatorResult = dict[str, Any]


class ProtocolError(Exception):
    """A frame or message that breaks the protocol; ``code`` goes back to the peer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- frames -------------------------------------------------------------------------------


# A decoded frame: the envelope around a message (``id`` with ``op`` and ``args``, or with
# ``ok`` and ``result`` or ``error``). Only the framing reads it; messages are typed.
Frame = dict[str, Any]


def encode(msg: Frame) -> bytes:
    body: bytes = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(
            "frame_too_large", f"message of {len(body)} B exceeds the {MAX_FRAME} B frame limit"
        )
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> Frame:
    """One frame body -> a message dict; anything else is a ProtocolError, never another exception."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises a zoo of types on garbage
        raise ProtocolError(
            "bad_frame", f"frame is not valid msgpack: {type(e).__name__}"
        ) from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_frame", f"a message must be a map, got {type(msg).__name__}")
    return msg


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame body, or None at a clean end of stream."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ProtocolError("truncated", "connection closed inside a frame header") from None
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ProtocolError("frame_too_large", f"frame of {n} B exceeds the {MAX_FRAME} B limit")
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise ProtocolError("truncated", f"connection closed inside a {n} B frame") from None


def pack_tokens(tokens: Any) -> bytes:
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= 2**32):
        raise ValueError("token ids must lie in [0, 2^32)")
    return arr.astype("<u4").tobytes()


def unpack_tokens(raw: Any) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) % 4:
        raise ProtocolError("bad_request", "'tokens' must be packed little-endian uint32 bytes")
    return np.frombuffer(raw, dtype="<u4")


# -- typed messages -----------------------------------------------------------------------

M = TypeVar("M", bound="Message")


def _what(name: str, kind: object, meta: Any) -> str:
    """How a field of type ``kind`` is described in an error naming it."""
    if kind is int:
        least = "positive" if meta.get("positive") else "non-negative"
        return f"'{name}' must be a {least} integer"
    if kind is str:
        return f"'{name}' must be a string"
    if kind is bytes:
        return f"'{name}' must be bytes"
    if kind is bool:
        return f"'{name}' must be true or false"
    if get_origin(kind) is dict:
        return f"'{name}' must be a map"
    if get_origin(kind) is list:
        (item,) = get_args(kind)
        return f"'{name}' must be a list" + (" of integers" if item is int else "")
    return f"'{name}' is malformed"


def _checker(name: str, kind: object, meta: Any) -> Callable[[Any], Any]:
    """The check of a field of type ``kind``: its value as it is, or a bad_request naming
    the field. Worked out once per message class (``_Codec``), so that a request costs one
    call per field and no type introspection (it was a fifth of the daemon's time per
    request under 16 clients)."""
    hint = meta.get("hint", "")

    def bad(value: Any) -> Any:
        raise ProtocolError("bad_request", hint or f"{_what(name, kind, meta)}, got {value!r:.80}")

    origin = get_origin(kind)
    if kind is Any:
        return lambda value: value
    if origin in (Union, types.UnionType):
        options = get_args(kind)
        (inner,) = (k for k in options if k is not type(None))
        check = _checker(name, inner, meta)
        if type(None) not in options:
            return check
        return lambda value: None if value is None else check(value)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        cls = cast("type[Message]", kind)

        def nested(value: Any) -> Any:
            if not isinstance(value, dict):
                raise ProtocolError("bad_request", hint or f"'{name}' must be a map")
            return _codec(cls).from_wire(value, name)

        return nested
    if kind is int:
        signed = bool(meta.get("signed", False))
        low = 1 if meta.get("positive") else 0
        # type() and not isinstance: a bool is an int to Python, never to the protocol.
        return lambda value: (
            value if type(value) is int and (signed or value >= low) else bad(value)
        )
    if kind in (str, bytes, bool):
        return lambda value: value if type(value) is kind else bad(value)
    if origin is dict:
        return lambda value: value if isinstance(value, dict) else bad(value)
    if origin is list:
        if get_args(kind)[0] is int:
            return lambda value: (
                value
                if isinstance(value, list) and all(type(v) is int for v in value)
                else bad(value)
            )
        return lambda value: value if isinstance(value, list) else bad(value)
    return bad


class _Codec:
    """How one message class goes to and from the wire, worked out once per class: its
    fields' checks (resolving string annotations per message cost ~0.1 ms of daemon CPU a
    request) and defaults. Decoding builds the message from positional values: the
    per-message cost is one loop over the fields (every request and reply runs through
    here, twice per round trip)."""

    __slots__ = ("cls", "fields", "names", "nested")

    def __init__(self, cls: Any) -> None:
        hints = get_type_hints(cls)

        def holds_message(kind: object) -> bool:
            if isinstance(kind, type):
                return issubclass(kind, Message)
            return any(holds_message(k) for k in get_args(kind)) or kind is Any

        fields = [f for f in dataclasses.fields(cls) if f.init]
        self.cls = cls
        # (name, required, hint, check, default): default is a factory, called when absent.
        self.fields: tuple[tuple[str, bool, str, Callable[[Any], Any], Callable[[], Any]], ...]
        self.fields = tuple(
            (
                f.name,
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                f.metadata.get("hint", ""),
                _checker(f.name, hints[f.name], f.metadata),
                _default(f),
            )
            for f in fields
        )
        self.names = tuple(f.name for f in dataclasses.fields(cls))
        self.nested = any(holds_message(hints[f.name]) for f in dataclasses.fields(cls))

    def to_wire(self, msg: Any) -> dict[str, Any]:
        if self.nested:
            return {name: _to_wire(getattr(msg, name)) for name in self.names}
        return {name: getattr(msg, name) for name in self.names}  # plain values: the common case

    def from_wire(self, args: dict[str, Any], where: str) -> Any:
        values = []
        for name, required, hint, check, default in self.fields:
            value = args.get(name)
            if value is None:
                if required:
                    raise ProtocolError("bad_request", hint or f"{where} needs '{name}'")
                if name not in args:
                    values.append(default())
                    continue
            values.append(check(value))
        return self.cls(*values)


def _default(f: dataclasses.Field[Any]) -> Callable[[], Any]:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory
    value = f.default
    return lambda: value


_CODECS: dict[type, _Codec] = {}


def _codec(cls: type) -> _Codec:
    codec = _CODECS.get(cls)
    if codec is None:
        codec = _CODECS[cls] = _Codec(cls)
    return codec


def _hint(text: str) -> Any:
    """A field whose error message explains more than its type."""
    return {"hint": text}


_POSITIVE = {"positive": True}  # an int field that must be at least 1


@dataclass(frozen=True, slots=True)
class Message:
    def to_wire(self) -> dict[str, Any]:
        return _codec(type(self)).to_wire(self)

    @classmethod
    def from_wire(cls: type[M], args: dict[str, Any]) -> M:
        return cast("M", _codec(cls).from_wire(args, getattr(cls, "op", cls.__name__)))


def _to_wire(value: Any) -> Any:
    return value.to_wire() if isinstance(value, Message) else value


@dataclass(frozen=True, slots=True)
class Request(Message):
    op: ClassVar[str]


_SEQUENCE = "'keys' (the concatenated 16-byte block keys) or 'tokens' (packed little-endian uint32)"


@dataclass(frozen=True, slots=True)
class Chain(Request):
    """A request about a sequence: ``keys`` (the block keys the client hashed: the normal
    case) or ``tokens`` (packed uint32, hashed by the daemon)."""

    ns: str = field(metadata=_hint("'ns' must name a namespace registered on this connection"))
    keys: bytes | None = field(
        default=None, metadata=_hint("'keys' must be the concatenated 16-byte block keys")
    )
    tokens: bytes | None = None

    def sequence(self) -> KeyChain | np.ndarray:
        if self.keys is not None:
            return self.chain()
        if self.tokens is None:
            raise ProtocolError("bad_request", f"{self.op} needs {_SEQUENCE}")
        return unpack_tokens(self.tokens)

    def chain(self) -> KeyChain:
        if self.keys is None:
            raise ProtocolError("bad_request", "'keys' must be the concatenated 16-byte block keys")
        return KeyChain.from_bytes(self.keys)


@dataclass(frozen=True, slots=True)
class Hello(Request):
    op = "hello"
    version: Any = None  # checked by the server, which answers bad_version
    client: str = ""


@dataclass(frozen=True, slots=True)
class Bye(Request):
    op = "bye"


@dataclass(frozen=True, slots=True)
class Register(Request):
    op = "register"
    _HINT: ClassVar[str] = (
        "register needs 'model' (str), 'spec' (map), optional 'salt' and 'group' (str), "
        "optional 'store_dtype' (exact | int8 | fp8_e4m3)"
    )
    model: str = field(metadata=_hint(_HINT))
    spec: dict[str, Any] = field(metadata=_hint(_HINT))
    salt: str = field(default="", metadata=_hint(_HINT))
    store_dtype: str = field(default="exact", metadata=_hint(_HINT))
    group: str = field(default="", metadata=_hint(_HINT))  # a KV cache group (Namespace.group)


@dataclass(frozen=True, slots=True)
class Lookup(Chain):
    """The cached run of blocks from ``first_block`` on (absent, as from a protocol-1 client
    of before it existed: 0, the prefix)."""

    op = "lookup"
    first_block: int = 0


@dataclass(frozen=True, slots=True)
class LookupTail(Request):
    op = "lookup_tail"
    ns: str = field(metadata=_hint("'ns' must name a namespace registered on this connection"))
    keys: bytes = field(metadata=_hint("'keys' must be the concatenated 16-byte tail keys"))


@dataclass(frozen=True, slots=True)
class Touch(Chain):
    op = "touch"


@dataclass(frozen=True, slots=True)
class Reserve(Chain):
    op = "reserve"
    first_block: int = 0
    # Positive: a reservation of no block would be held, empty, until the connection ends.
    count: int | None = field(default=None, metadata=_POSITIVE)
    session: str | None = None


@dataclass(frozen=True, slots=True)
class Commit(Request):
    op = "commit"
    txn: int


@dataclass(frozen=True, slots=True)
class Abort(Request):
    op = "abort"
    txn: int


@dataclass(frozen=True, slots=True)
class Acquire(Chain):
    op = "acquire"
    first_block: int = 0
    max_blocks: int | None = field(default=None, metadata=_POSITIVE)  # as Reserve's count


@dataclass(frozen=True, slots=True)
class Release(Request):
    op = "release"
    lease: int


@dataclass(frozen=True, slots=True)
class Prefetch(Request):
    """By ``session``, or by the sequence (``ns`` with ``keys`` or ``tokens``)."""

    op = "prefetch"
    session: str | None = None
    ns: str | None = None
    keys: bytes | None = None
    tokens: bytes | None = None

    def by_chain(self) -> Chain:
        if self.ns is None or (self.keys is None and self.tokens is None):
            raise ProtocolError(
                "bad_request", f"prefetch needs 'session', or 'ns' with {_SEQUENCE}"
            )
        return Lookup(self.ns, self.keys, self.tokens)


@dataclass(frozen=True, slots=True)
class Attach(Request):
    op = "attach"
    ns: str = field(metadata=_hint("'ns' must name a namespace registered on this connection"))
    layers: Any = None  # tensor handles, checked by tiercache.ipc (errors name the layer)
    event: Any = None


@dataclass(frozen=True, slots=True)
class Detach(Request):
    op = "detach"
    engine: int


@dataclass(frozen=True, slots=True)
class SaveKV(Request):
    op = "save_kv"
    ns: str
    engine: int
    keys: bytes = field(metadata=_hint("'keys' must be the concatenated 16-byte block keys"))
    block_ids: list[int] = field(
        metadata=_hint("'block_ids' must be a list of the engine's block ids")
    )
    first_block: int = 0
    session: str | None = None


@dataclass(frozen=True, slots=True)
class LoadKV(Request):
    op = "load_kv"
    ns: str
    engine: int
    keys: bytes = field(metadata=_hint("'keys' must be the concatenated 16-byte block keys"))
    block_ids: list[int] = field(
        metadata=_hint("'block_ids' must be a list of the engine's block ids")
    )
    first_block: int = 0


@dataclass(frozen=True, slots=True)
class Ctl(Request):
    op = "ctl"
    verb: str = field(metadata=_hint("ctl needs 'verb' (str) and optional 'args' (map)"))
    args: dict[str, Any] | None = None


REQUESTS: dict[str, type[Request]] = {
    cls.op: cls
    for cls in (
        Hello, Bye, Register, Lookup, LookupTail, Touch, Reserve, Commit, Abort, Acquire,
        Release, Prefetch, Attach, Detach, SaveKV, LoadKV, Ctl,
    )
}  # fmt: skip


def decode_envelope(msg: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    """A request frame's ``(id, op, args)``, checked for shape only."""
    rid = msg.get("id")
    if rid is not None and type(rid) is not int:
        # Echoed in the reply: anything else could make the reply too big to send.
        raise ProtocolError("bad_request", f"'id' must be an integer, got {rid!r:.80}")
    op, args = msg.get("op"), msg.get("args", {})
    if not isinstance(op, str):
        raise ProtocolError("bad_request", "'op' must be a string")
    if not isinstance(args, dict):
        raise ProtocolError("bad_request", f"{op}: 'args' must be a map")
    return rid, op, args


def decode_request(op: str, args: dict[str, Any]) -> Request:
    """The typed request ``op`` with ``args``; a ProtocolError names what is wrong."""
    cls = REQUESTS.get(op)
    if cls is None:
        raise ProtocolError(
            "unknown_op", f"unknown operation {op!r}; operations: {', '.join(REQUESTS)}"
        )
    return cls.from_wire(args)


def encode_request(rid: int, req: Request) -> bytes:
    return encode({"id": rid, "op": req.op, "args": req.to_wire()})


# -- replies ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloReply(Message):
    version: int
    server: str


@dataclass(frozen=True, slots=True)
class Arena(Message):
    """The daemon's shared host arena, which a CPU client maps by name."""

    name: str
    slot_bytes: int
    num_slots: int


@dataclass(frozen=True, slots=True)
class RegisterReply(Message):
    ns: str
    arena: Arena | None = None  # None: a server over an unshared cache (not a daemon)


@dataclass(frozen=True, slots=True)
class LookupReply(Message):
    blocks: int
    tokens: int
    tiers: list[str]
    full_blocks: int


@dataclass(frozen=True, slots=True)
class LookupTailReply(Message):
    index: int = field(metadata={"signed": True})  # of the longest tail held; -1: none
    tier: str = "miss"


@dataclass(frozen=True, slots=True)
class Stored(Message):
    """What a save did (commit, save_kv)."""

    stored: int
    present: int
    rejected: int


@dataclass(frozen=True, slots=True)
class Reserved(Message):
    txn: int
    slots: list[int]
    rows: list[int]
    walked: int
    present: int
    rejected: int


@dataclass(frozen=True, slots=True)
class Leased(Message):
    lease: int
    slots: list[int]
    tiers: list[str]
    prefix: int


@dataclass(frozen=True, slots=True)
class Blocks(Message):
    """A count of blocks (prefetch, touch)."""

    blocks: int


@dataclass(frozen=True, slots=True)
class Attached(Message):
    engine: int
    event: bytes | None


@dataclass(frozen=True, slots=True)
class Loaded(Message):
    """An attached load: the tiers of the blocks scattered, and whether the engine's stream
    must wait on the daemon's event."""

    tiers: list[str]
    wait: bool


Reply = Message | OperatorResult | None


class RemoteError(RuntimeError):
    """The daemon answered a request with an error; ``code`` is stable, ``message`` explains.

    A code the daemon gives for one of the embedded cache's errors arrives as a subclass of
    that error too (:func:`remote_error`): ``except NoRoom`` or ``except ValueError`` catches
    the same failure from a daemon as from an in-process cache."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.code, self.message)


# The codes daemon/server.py's _classify gives, each as the embedded error it stands for.
class RemoteBlockShapeError(RemoteError, BlockShapeError): ...


class RemoteTokenError(RemoteError, TokenError): ...


class RemoteSpecError(RemoteError, SpecError): ...


class RemoteUnknownSession(RemoteError, UnknownSession): ...


class RemoteSessionPinned(RemoteError, SessionPinned): ...


class RemoteDraining(RemoteError, Draining): ...


class RemoteNoRoom(RemoteError, NoRoom): ...


class RemoteIpcError(RemoteError, IpcError): ...


class RemoteValueError(RemoteError, ValueError): ...


_TYPED: dict[str, type[RemoteError]] = {
    "bad_shape": RemoteBlockShapeError,
    "bad_tokens": RemoteTokenError,
    "bad_spec": RemoteSpecError,
    "unknown_session": RemoteUnknownSession,
    "session_pinned": RemoteSessionPinned,
    "draining": RemoteDraining,
    "no_room": RemoteNoRoom,
    "ipc_failed": RemoteIpcError,
    "bad_request": RemoteValueError,
}


def remote_error(code: str, message: str) -> RemoteError:
    """The RemoteError for a reply's ``code``: typed as the embedded error it stands for."""
    return _TYPED.get(code, RemoteError)(code, message)


def reply_frame(rid: Any, result: Reply) -> bytes:
    """The frame of a successful reply to request ``rid``."""
    wire = result.to_wire() if isinstance(result, Message) else result
    return encode({"id": rid, "ok": True, "result": wire})


def error_frame(rid: Any, code: str, message: str) -> bytes:
    """The frame of a failed request ``rid`` (``rid`` None: a frame that could not be read).
    The message is cut at ``MAX_MESSAGE`` characters: it may quote what the peer sent (an
    operation, a session name), and a reply over ``MAX_FRAME`` could not be sent at all."""
    if len(message) > MAX_MESSAGE:
        message = f"{message[:MAX_MESSAGE]}... ({len(message)} characters)"
    return encode({"id": rid, "ok": False, "error": {"code": code, "message": message}})


def reply_result(reply: Any) -> Any:
    """A decoded reply's ``result``, or the RemoteError it carries."""
    if not isinstance(reply, dict):
        raise ProtocolError("bad_reply", f"a reply must be a map, got {reply!r:.80}")
    if not reply.get("ok"):
        err = reply.get("error") or {}
        raise remote_error(str(err.get("code", "unknown")), str(err.get("message", "")))
    return reply.get("result")


def decode_reply(cls: type[M], result: Any) -> M:
    if not isinstance(result, dict):
        raise ProtocolError("bad_reply", f"a {cls.__name__} must be a map, got {result!r:.80}")
    return cls.from_wire(result)
