"""The eviction-policy interface: the tier tells the policy what happened, the policy names victims.

A policy only orders keys; it never frees anything. The manager walks
``victims()`` and skips what it may not evict (pinned or leased blocks), so the
policies stay free of those rules and the manager never branches on a policy's
name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from tiercache.keys import BlockKey


class EvictionPolicy(Protocol):
    name: str

    def insert(self, key: BlockKey) -> None:
        """``key`` entered the tier."""

    def touch(self, key: BlockKey) -> None:
        """``key`` was read or written again."""

    def remove(self, key: BlockKey) -> None:
        """``key`` left the tier (evicted, demoted or deleted)."""

    def victims(self) -> Iterator[BlockKey]:
        """Keys in the order they should go; stable while the caller only calls ``remove``."""
        ...

    def __len__(self) -> int: ...


def make_policy(name: str, capacity_blocks: int) -> EvictionPolicy:
    from tiercache.policy.arc import ARCPolicy
    from tiercache.policy.lru import LRUPolicy

    if name == "lru":
        return LRUPolicy()
    if name == "arc":
        return ARCPolicy(capacity_blocks)
    raise ValueError(f"unknown eviction policy {name!r}; choose 'lru' or 'arc' ([policy] eviction)")
