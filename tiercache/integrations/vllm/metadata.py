"""What the vLLM connector's scheduler side sends its worker side each step: the loads to run
before the step's forward and the saves to run after it, one ``Transfer`` per request and
KV cache group."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class Transfer:
    """Blocks ``first .. first + count`` of one group's key chain, and the vLLM blocks they
    map to (``per_block`` engine blocks per tiercache block; fewer for a tail, whose last
    engine blocks may not exist)."""

    req_id: str
    keys: bytes  # packed KeyChain up to the last block of this transfer (a tail key last)
    first: int
    count: int
    block_ids: list[int]
    session: str | None = None
    skip: int = 0  # load only: leading engine blocks already computed locally (not written)
    background: bool = False  # load only: asynchronous, reported by get_finished
    finish: bool = False  # save only: the request finished; its blocks wait for this save
    # save only (finish): packed keys of the old windows to evict once the request's finish
    # saves are all stored (its last one carries them)
    evict: bytes = b""
    group: int = 0  # the KV cache group
    # save only: the request's tokens computed before the step that saves (its end, for a
    # finished request's); a save past a failed load's first token was scheduled before
    # vLLM rolled the request back (async scheduling), over KV that never loaded
    after: int = 0


@dataclass
class TierCacheMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
