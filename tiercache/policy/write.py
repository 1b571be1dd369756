"""Write policies (when a saved block reaches disk) and admission (whether it is kept at all)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tiercache.keys import BlockKey


@dataclass(frozen=True, slots=True)
class WritePolicy:
    """``write-through``: a save writes host and disk before it returns.
    ``write-back``: a save writes host; disk gets the block when it is evicted
    from host, and on ``flush`` or shutdown (faster saves, lost on a crash). Either
    way a pinned session's blocks are written when it is pinned and as it saves
    (``TierManager.pin``): a pin outlives a crash."""

    name: str
    write_on_save: bool


WRITE_THROUGH = WritePolicy("write-through", True)
WRITE_BACK = WritePolicy("write-back", False)


def make_write_policy(name: str) -> WritePolicy:
    for policy in (WRITE_THROUGH, WRITE_BACK):
        if policy.name == name:
            return policy
    raise ValueError(
        f"unknown write policy {name!r}; choose 'write-through' or 'write-back' ([policy] write)"
    )


class Admission:
    """Admit a block on its ``threshold``-th offer (1 admits everything).

    Sightings of blocks not yet admitted are remembered in a bounded LRU so a
    stream of one-off prompts cannot grow memory without bound.
    """

    def __init__(self, threshold: int = 1, memory: int = 1 << 16) -> None:
        if threshold < 1:
            raise ValueError(f"admission threshold must be >= 1, got {threshold}")
        self.threshold = threshold
        self.memory = memory
        self._seen: OrderedDict[BlockKey, int] = OrderedDict()

    def admit(self, key: BlockKey) -> bool:
        if self.threshold == 1:
            return True
        count = self._seen.pop(key, 0) + 1
        if count >= self.threshold:
            return True
        self._remember(key, count)
        return False

    def refund(self, key: BlockKey) -> None:
        """``key`` was admitted but not stored (no room for it): its next offer admits it."""
        if self.threshold > 1:
            self._remember(key, self.threshold - 1)

    def _remember(self, key: BlockKey, count: int) -> None:
        self._seen[key] = count
        if len(self._seen) > self.memory:
            self._seen.popitem(last=False)
