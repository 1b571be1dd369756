"""The errors the cache reports to its callers, one class per thing that can go wrong.

Every error is a ``CacheError``; the socket server maps each class to a stable error code
(``daemon/server.py``), so a client can tell a full tier from a bad request without parsing
messages. Messages name what was wrong and what fixes it (the setting to change).
"""

from __future__ import annotations


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


class LeaseError(CacheError):
    """A lease released more often than it was taken (a caller's bookkeeping bug)."""
