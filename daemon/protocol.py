"""The socket wire format: length-prefixed msgpack frames, one request -> one reply.

A frame is a 4-byte big-endian length and that many bytes of msgpack. A
request is ``{"id": int, "op": str, "args": {...}}``; its reply is
``{"id": same, "ok": true, "result": ...}`` or ``{"id": same, "ok": false,
"error": {"code": str, "message": str}}``. The first request of a connection
must be ``hello`` with ``{"version": PROTOCOL_VERSION}``.

Block bytes never travel here: a CPU client maps the daemon's host arena
(``/dev/shm``) and copies into and out of the slots the replies name. Frames
carry token ids (packed uint32), slot ids and metadata, so ``MAX_FRAME`` (4 MiB,
about a million tokens) bounds what a peer can make the other side buffer.

JSON was rejected: token ids would travel as decimal text, several times the
bytes and the parse time of packed uint32 in msgpack.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
MAX_FRAME = 4 * 2**20
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame or message that breaks the protocol; ``code`` goes back to the peer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode(msg: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(
            "frame_too_large", f"message of {len(body)} B exceeds the {MAX_FRAME} B frame limit"
        )
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
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
