"""tiercache: a tiered KV-cache offload store for LLM inference (GPU, pinned host, zarr disk)."""

from tiercache.embedded import SyncCache, open_cache
from tiercache.errors import (
    BlockShapeError,
    CacheError,
    Draining,
    NoRoom,
    SessionPinned,
    UnknownSession,
)
from tiercache.keys import BlockKey, Namespace
from tiercache.manager import TierManager
from tiercache.results import LoadResult, LookupResult, SaveResult
from tiercache.spec import KVSpec, Layout

__version__ = "0.1.0"

__all__ = [
    "BlockKey",
    "BlockShapeError",
    "CacheError",
    "Draining",
    "KVSpec",
    "Layout",
    "LoadResult",
    "LookupResult",
    "Namespace",
    "NoRoom",
    "SaveResult",
    "SessionPinned",
    "SyncCache",
    "TierManager",
    "UnknownSession",
    "__version__",
    "open_cache",
]
