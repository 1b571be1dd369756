"""Keys and traces the eviction policies' tests drive them with, the way a tier does."""

from __future__ import annotations

from collections.abc import Iterable

from tiercache.policy.base import EvictionPolicy


def k(name: str) -> bytes:
    return name.encode()


def names(keys: Iterable[bytes]) -> list[str]:
    return [key.decode() for key in keys]


def filled(policy: EvictionPolicy, *keys: str) -> EvictionPolicy:
    for key in keys:
        policy.insert(k(key))
    return policy


def replay(
    policy: EvictionPolicy, capacity: int, trace: Iterable[str]
) -> tuple[list[str], set[str]]:
    """Drive ``policy`` the way a tier does: a hit touches, a miss evicts the first victim
    when full and inserts. Returns the evicted keys in order and the keys left resident."""
    resident: set[bytes] = set()
    evicted: list[bytes] = []
    for key in map(k, trace):
        if key in resident:
            policy.touch(key)
            continue
        if len(resident) == capacity:
            victim = next(policy.victims())
            policy.remove(victim)
            resident.remove(victim)
            evicted.append(victim)
        policy.insert(key)
        resident.add(key)
    return names(evicted), set(names(resident))


HOT = ["h1", "h2", "h1", "h2"]  # two keys, each seen twice
SCAN = [f"s{i}" for i in range(10)]  # ten one-time keys
