"""Hugging Face transformers: save a conversation's KV after a turn, restore it before the next.

    chat = HFChatCache(cache, model)
    out = model.generate(ids, past_key_values=DynamicCache(config=model.config), ...)
    chat.save("chat-42", out[0, :-1], past_key_values)          # after the turn
    past, reused = chat.restore("chat-42", next_prompt_ids)     # before the next one
    model.generate(next_prompt_ids, past_key_values=past, ...)  # prefills only the new tokens

``restore`` always leaves at least one token of the prompt uncached, because
``generate`` needs one position to compute the next-token logits from. The
partial tail block of a turn is not stored (see ``tiercache.keys``): up to
``block_size - 1`` tokens are recomputed on resume.

The namespace fingerprints the model by hashing its weights (xxh3, fast) unless
a ``model_id`` is given: two models with one config but different weights must
never share blocks.
"""

from __future__ import annotations

from typing import Any

import torch
import xxhash

from tiercache.groups import BlockCache
from tiercache.kernels.reference import gather
from tiercache.keys import Namespace, Tokens
from tiercache.results import SaveResult
from tiercache.spec import KVSpec, Layout


def model_fingerprint(model: Any) -> str:
    """``<name>@<hash of config and weights>``: equal exactly when the KV would be equal."""
    h = xxhash.xxh3_128()
    h.update(model.config.to_json_string(use_diff=False).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().data)
    name = getattr(model.config, "_name_or_path", "") or model.config.model_type
    return f"{name}@{h.hexdigest()}"


def _layers(past: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(past, "layers"):
        return [(layer.keys, layer.values) for layer in past.layers]
    return [(k, v) for k, v in zip(past.key_cache, past.value_cache, strict=True)]


class HFChatCache:
    """Session save/restore of a transformers model's ``DynamicCache`` through tiercache."""

    def __init__(
        self,
        cache: BlockCache,
        model: Any,
        *,
        block_size: int = 16,
        salt: str = "",
        model_id: str | None = None,
        store_dtype: str = "exact",
    ) -> None:
        self.cache = cache
        self.model = model
        spec = KVSpec.from_hf_config(
            model.config, dtype=model.dtype, block_size=block_size, layout=Layout.HF
        )
        self.namespace = Namespace(
            model_id or model_fingerprint(model), spec, salt, store_dtype=store_dtype
        )
        self.last_load: Any = None  # the last load's result (blocks, tiers, seconds)

    @property
    def spec(self) -> KVSpec:
        return self.namespace.spec

    def save(self, session: str, tokens: Tokens, past: Any) -> SaveResult:
        """Store the KV of ``tokens`` held in ``past`` (a DynamicCache, batch row 0).

        ``tokens`` are the ids whose KV is in ``past``, in order; only full
        blocks not already cached are gathered and written.
        """
        ids = torch.as_tensor(tokens).reshape(-1)
        layers = _layers(past)
        seq = layers[0][0].shape[2]
        if ids.numel() > seq:
            raise ValueError(f"{ids.numel()} tokens given but the cache holds only {seq} positions")
        n_blocks = ids.numel() // self.spec.block_size
        have = self.cache.lookup(self.namespace, ids).blocks
        if have >= n_blocks:
            self.cache.save(
                self.namespace,
                ids,
                torch.empty((0, self.namespace.block_nbytes), dtype=torch.uint8),
                session=session,
            )
            return SaveResult(0, n_blocks, 0)
        blocks = gather(self.spec, layers, list(range(have, n_blocks)))
        result = self.cache.save(self.namespace, ids, blocks, first_block=have, session=session)
        return SaveResult(result.stored, result.present + have, result.rejected)

    def restore(self, session: str, tokens: Tokens) -> tuple[Any, int]:
        """A DynamicCache holding the longest cached prefix of ``tokens``, and its length.

        At most ``len(tokens) - 1`` tokens are restored. Returns an empty cache
        and 0 on a miss. ``session`` names the chat for pin/evict/prefetch.
        """
        from transformers import DynamicCache

        ids = torch.as_tensor(tokens).reshape(-1)
        spec = self.spec
        max_blocks = max(0, (ids.numel() - 1) // spec.block_size)
        result = self.cache.load(self.namespace, ids, max_blocks=max_blocks)
        self.last_load = result
        past = DynamicCache(config=self.model.config)
        if result.blocks == 0:
            return past, 0
        kv = result.kv()  # [n, layers, 2, bs, heads, d]
        n, seq = result.blocks, result.tokens
        device = next(self.model.parameters()).device
        for layer in range(spec.num_layers):
            k, v = (
                kv[:, layer, i]
                .reshape(seq, spec.num_kv_heads, spec.head_dim)
                .permute(1, 0, 2)
                .unsqueeze(0)
                for i in (0, 1)
            )
            past.update(k.contiguous().to(device), v.contiguous().to(device), layer)
        assert past.get_seq_length() == n * spec.block_size
        return past, seq
