"""The sliding layer of the caches ``HFChatCache`` hands out: transformers' sliding window that
also keeps the whole blocks of its window a save stores, and nothing older.

transformers' ``DynamicSlidingWindowLayer`` keeps the last ``window - 1`` tokens, which start
inside a block, so a save after it could not store the window's first block. Its past
recording (``activate_past_recording``) keeps every token until a ``crop``, which plain
``generate`` never calls: a sliding layer then held the whole turn, and a cache carried from
turn to turn the whole conversation, as much as a full-attention layer and copied again on
every decode step. This layer drops, after each forward, what neither attention nor a save
needs: it holds at most the window, the partial block it begins in and the last forward's
tokens (so that transformers can still roll that forward back, as assisted decoding does).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def window_start(length: int, window: int, block_size: int) -> int:
    """The first position a save after ``length`` tokens stores of a sliding layer: where the
    block holding the first token of the window before its last whole block begins (what
    ``tiercache.groups.needed_blocks`` asks of a sliding group)."""
    return max(0, length // block_size * block_size - window) // block_size * block_size


class WindowBlocksLayer(DynamicSlidingWindowLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicSlidingWindowLayer`` holding the whole blocks of its window (see above)."""

    def __init__(self, sliding_window: int, block_size: int) -> None:
        super().__init__(sliding_window=sliding_window)
        self.block_size = block_size

    @property
    def held(self) -> int:
        """How many of the last tokens the layer holds."""
        keys = self.keys if self.is_initialized else None
        return int(keys.shape[-2]) if keys is not None and keys.dim() > 1 else 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        before, held = self.cumulative_length, self.held
        keys, values = DynamicLayer.update(self, key_states, value_states)  # held ‖ new
        self.cumulative_length = before + key_states.shape[-2]
        # What a save (or a rollback to) before this forward needs, and this forward's tokens.
        drop = max(0, window_start(before, self.sliding_window, self.block_size) - (before - held))
        self.keys, self.values = keys[:, :, drop:], values[:, :, drop:]
        visible = self.sliding_window - 1 + key_states.shape[-2]  # get_mask_sizes' kv_length
        return keys[:, :, -visible:], values[:, :, -visible:]

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (or keep the first ``tokens_to_remove``,
        transformers' older meaning of a positive count); the whole blocks of the window stay."""
        length = self.cumulative_length
        n = length - tokens_to_remove if tokens_to_remove > 0 else -tokens_to_remove
        if n <= 0 or not self.is_initialized:
            return
        held, keys, values = self.held, self.keys, self.values
        if keys is None or values is None:
            return
        if n > held or length - held > max(0, length - n - self.sliding_window + 1):
            raise RuntimeError(
                f"cannot remove the last {n} tokens of a sliding layer that holds the last "
                f"{held} of {length}: the window before them is gone (it keeps what one "
                "forward added since the one before, no more)"
            )
        self.keys, self.values = keys[:, :, : held - n], values[:, :, : held - n]
        self.cumulative_length = length - n
