"""The eviction-policy interface: the tier tells the policy what happened, the policy names victims.

A policy only orders keys; it never frees anything. The manager walks
``victims()`` and skips what it may not evict (pinned or leased blocks), so the
policies stay free of those rules and the manager never branches on a policy's
name. Every step is O(1): policies keep intrusive lists (``links.py``) and
``victims()`` is a lazy walk, never a copy of the order.

A block's ``parent`` (the key before it in its prompt) and ``position`` (the
offset of its first token in the prompt) are what the manager knows when it
stores a block. The prefix policy uses the parent; none uses the position
(the prefix policy's docstring says why a cost by position was measured and left
out), which stays in the interface for a policy that can. ``None``/0 when
unknown (blocks found on disk at start).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from tiercache.keys import BlockKey

POLICIES = ("lru", "arc", "prefix")


class EvictionPolicy(Protocol):
    name: str

    def insert(self, key: BlockKey, parent: BlockKey | None = None, position: int = 0) -> None:
        """``key`` entered the tier (re-inserting a present key is a ``touch``)."""

    def touch(self, key: BlockKey) -> None:
        """``key`` was read or written again (a lookup hit, a load, an engine-side hit)."""

    def remove(self, key: BlockKey) -> None:
        """``key`` left the tier (evicted, demoted or deleted)."""

    def victims(self) -> Iterator[BlockKey]:
        """Keys in the order they should go, lazily, O(1) per step. Stable while the caller
        only calls ``remove`` on keys it was given; keys that become candidates during the walk
        (new orphans) may wait for the next walk."""
        ...

    def __len__(self) -> int: ...


@runtime_checkable
class RetainingPolicy(EvictionPolicy, Protocol):
    """A policy that holds blocks out of its victims: pinned sessions' blocks (every policy
    here), and windows refreshed on use the way hosted prompt caching keeps a prefix
    (``prefix`` only). The rooms ask ``isinstance(policy, RetainingPolicy)``, a capability,
    never a name."""

    def retain(self, key: BlockKey, seconds: float | None) -> None:
        """Keep ``key`` out of the victims until ``seconds`` after its last use (``math.inf``:
        a pin; ``None``: back to normal); every touch starts the window again."""


@runtime_checkable
class SizedPolicy(EvictionPolicy, Protocol):
    """A policy whose bounds count blocks: ARC's target and ghost lists, the prefix policy's
    ghosts and counting window. A tier whose blocks differ in size (namespaces of several
    models, or a model's KV cache groups) holds a count that follows its mix of sizes, and
    tells the policy (``room.DiskRoom``); LRU has no such bound."""

    capacity: int

    def resize(self, capacity_blocks: int) -> None:
        """The tier holds ``capacity_blocks`` when full, from now on."""


def check_pin(policy: str, seconds: float | None) -> None:
    """A policy that holds pins but no retention windows (LRU, ARC) refuses a window."""
    if seconds is not None and seconds != math.inf:
        raise ValueError(
            f"the {policy} policy holds pins (math.inf) only, not a {seconds} s window; "
            "retention windows are the prefix policy's"
        )


def make_policy(name: str, capacity_blocks: int) -> EvictionPolicy:
    from tiercache.policy.arc import ARCPolicy
    from tiercache.policy.lru import LRUPolicy
    from tiercache.policy.prefix import PrefixPolicy

    if name == "lru":
        return LRUPolicy()
    if name == "arc":
        return ARCPolicy(capacity_blocks)
    if name == "prefix":
        return PrefixPolicy(capacity_blocks)
    raise ValueError(
        f"unknown eviction policy {name!r}; choose 'lru', 'arc' or 'prefix' ([policy] eviction)"
    )
