"""What the cache's operations return: save, lookup and load results, and the two halves of a
transaction that a caller holds between its steps (a save's ``Reservation``, a read's
``Lease``).

A ``Reservation`` and a ``Lease`` are handles on entries the index holds for the caller: the
reservation's host slots are invisible to everyone else until its commit, the lease's blocks
cannot be evicted until its release. The socket server keeps them per connection and gives
them back when the connection ends (``daemon/server.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tiercache.errors import BlockShapeError
from tiercache.index import Entry, Index
from tiercache.keys import BlockKey, Namespace
from tiercache.storage_format import decode, parse_format


@dataclass(frozen=True, slots=True)
class SaveResult:
    stored: int  # new blocks written
    present: int  # blocks the cache already had
    rejected: int  # blocks not admitted (admission threshold) or without room

    def __add__(self, other: SaveResult) -> SaveResult:
        return SaveResult(
            self.stored + other.stored,
            self.present + other.present,
            self.rejected + other.rejected,
        )


@dataclass(frozen=True, slots=True)
class LookupResult:
    keys: list[BlockKey]  # keys of every full block of the tokens
    tiers: list[str]  # best tier of each block of the cached run from first_block
    block_size: int
    first_block: int = 0  # where the run was looked for (0: the prefix)

    @property
    def blocks(self) -> int:
        """Blocks of the cached run (from ``first_block``)."""
        return len(self.tiers)

    @property
    def tokens(self) -> int:
        """Tokens the cached run covers (from ``first_block``)."""
        return len(self.tiers) * self.block_size


@dataclass(slots=True)
class LoadResult:
    # uint8 [blocks, block_nbytes], page-first: the stored records (after a quantized
    # load(into=), decoded over in into's blocks: read kv())
    data: torch.Tensor
    tiers: list[str]
    namespace: Namespace
    seconds: float = 0.0
    per_tier: dict[str, int] = field(default_factory=dict)
    first_block: int = 0  # the block of the sequence the data starts at
    into: torch.Tensor | None = None  # the engine's blocks ``load(into=)`` filled

    @property
    def blocks(self) -> int:
        return len(self.tiers)

    @property
    def tokens(self) -> int:
        return self.blocks * self.namespace.spec.block_size

    def kv(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks as ``[blocks, layers, 2, block_size, kv_heads, head_dim]`` of the KV dtype
        (written into ``out``, an engine's buffer of that shape and dtype, when given: a
        quantized block is dequantized straight into it). After ``load(into=)``, the blocks
        it filled (decoded once; ``out`` gets a copy of them)."""
        ns = self.namespace
        if self.into is None:
            return decode(ns.spec, self.data[: self.blocks], parse_format(ns.store_dtype), out)
        if out is None:
            return self.into
        if out.dtype != self.into.dtype or out.shape != self.into.shape:
            raise BlockShapeError(
                f"out must be {ns.spec.dtype} {list(self.into.shape)}, "
                f"got {out.dtype} {list(out.shape)}"
            )
        return out.copy_(self.into)

    def land(self, into: torch.Tensor | None) -> LoadResult:
        """After a load into ``into`` (``reads.load_rows``): its first ``blocks`` rows are the
        blocks (exact records were read into its bytes; quantized ones are decoded into it
        here)."""
        if into is not None:
            filled = into[: self.blocks]
            exact = stored_in_place(self.namespace, filled) is not None
            # A quantized record read into its block's tail (``record_rows``) is decoded over.
            self.into = filled if exact else self.kv(out=filled)
        return self


def record_rows(ns: Namespace, into: torch.Tensor) -> torch.Tensor | None:
    """Where a load into the engine's blocks ``into`` reads ``ns``'s stored records: uint8
    ``[rows, ns.block_nbytes]`` views of ``into``'s own bytes. An exact record is its block's
    bytes. A quantized record (one byte per element, then the scales) is smaller than the
    block it decodes to, so it is read into the *tail* of that block's bytes, and ``land``
    decodes it in place: ``decode`` copies the scales out first and reads each chunk of
    blocks whole before writing any of it. So a quantized resume needs no staging rows (64
    MiB of fresh pages at 8k tokens of the benchmark's model, whose first touch cost as much
    as the reads). None where a record would not fit in its block (a block with fewer than
    four tokens x head_dim elements per head and layer): staging rows then."""
    if parse_format(ns.store_dtype) == "exact":
        return stored_in_place(ns, into)
    whole, stored = ns.spec.block_nbytes, ns.block_nbytes
    if stored > whole:
        return None
    return into.view(torch.uint8).view(into.shape[0], whole)[:, whole - stored :]


def stored_in_place(ns: Namespace, into: torch.Tensor) -> torch.Tensor | None:
    """``into``'s bytes as ``ns``'s stored records (uint8 ``[rows, block_nbytes]``) where the
    namespace stores the engine's exact bytes, so a load can read straight into it; None for
    a quantized namespace, whose records are decoded into ``into`` instead."""
    if parse_format(ns.store_dtype) != "exact":
        return None
    return into.view(torch.uint8).view(into.shape[0], ns.block_nbytes)


def check_into(ns: Namespace, n: int, into: torch.Tensor) -> None:
    """``into`` can take ``n`` engine blocks of ``ns`` (``load(into=)``): the KV dtype, the
    block shape, at least ``n`` rows, a contiguous CPU tensor; else a BlockShapeError naming
    what is wrong."""
    spec = ns.spec
    want = f"{spec.dtype} [{f'>= {n}' if n else 'n'}, {', '.join(map(str, spec.block_shape))}]"
    if (
        into.dtype != spec.torch_dtype
        or into.dim() != 1 + len(spec.block_shape)
        or tuple(into.shape[1:]) != tuple(spec.block_shape)
        or into.shape[0] < n
    ):
        raise BlockShapeError(f"into must be {want}, got {into.dtype} {list(into.shape)}")
    if into.device.type != "cpu" or not into.is_contiguous():
        raise BlockShapeError(
            f"into must be a contiguous CPU tensor, got a "
            f"{'' if into.is_contiguous() else 'non-contiguous '}{into.device.type} one"
        )


@dataclass(slots=True)
class Reservation:
    """Host slots reserved for a save, invisible until ``commit``."""

    ns: Namespace
    array: str
    keys: list[BlockKey]
    session: str | None
    first_block: int
    entries: list[Entry] = field(default_factory=list)  # pending, each with its host slot
    rows: list[int] = field(default_factory=list)  # row (from first_block) of each entry
    present: int = 0
    rejected: int = 0
    walked: int = 0  # blocks from first_block this reservation covered
    # How long the fill's copy took, where this process made it (an embedded save, an attached
    # engine's gather): the commit's transfer sample. None where a socket client copied in its
    # own process: the commit then counts the bytes, untimed (it cannot see that copy).
    fill_seconds: float | None = None

    @property
    def slots(self) -> list[int]:
        return [s for e in self.entries if (s := e.host_slot) is not None]


@dataclass(slots=True)
class Lease:
    """Host-resident blocks a reader may copy out of until ``release``."""

    entries: list[Entry]
    tiers: list[str]  # where each block was found (before any promotion)
    prefix: int = 0  # how many blocks the cached run had from the lease's first block

    def end(self, index: Index) -> None:
        """Under the lock: the blocks are evictable again (once: a second end is a no-op)."""
        index.unlease(self.entries)
        self.entries = []

    @property
    def slots(self) -> list[int]:
        return [s for e in self.entries if (s := e.host_slot) is not None]
