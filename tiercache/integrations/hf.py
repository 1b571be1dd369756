"""Hugging Face transformers: save a conversation's KV after a turn, restore it before the next.

    chat = HFChatCache(cache, model)
    past, reused = chat.restore("chat-42", prompt_ids)          # before a turn (empty: a miss)
    out = model.generate(prompt_ids[None], **{generate_cache_kwarg(): past}, ...)  # the rest only
    chat.save("chat-42", out[0, :-1], past)                    # after it

``restore`` always leaves at least one token of the prompt uncached, because
``generate`` needs one position to compute the next-token logits from. The
partial tail block of a turn is not stored (see ``tiercache.keys``): up to
``block_size - 1`` tokens are recomputed on resume.

Every attention layout transformers caches per token is stored, one KV cache group each
(``tiercache.modelkv``, ``tiercache.groups``): full attention (``DynamicLayer``), sliding
windows (``DynamicSlidingWindowLayer``: Gemma 2/3 and gpt-oss alternate them with full
layers, Mistral-style models slide everywhere) and DeepSeek-V2/V3's MLA, which
transformers caches as the compressed latent (its ``keys`` are the normalized
``kv_lora_rank`` part, its ``values`` the rotated ``qk_rope_head_dim`` part): tiercache
stores the two side by side as one plane of ``kv_lora_rank + qk_rope_head_dim`` values
per token and layer, the same latent vLLM's MLA cache holds, not K and V per head. A model
whose cache layers keep anything else (DeepSeek-V3.2's indexer keys, chunked attention,
recurrent state) is refused when the ``HFChatCache`` is made, naming the layer.

A sliding layer of transformers keeps only the last ``window - 1`` tokens, so the whole
blocks of the window a resume needs are not all in a plain ``DynamicCache`` any more
after a turn. The caches ``restore`` returns (and ``new_cache``) have sliding layers that
keep the whole blocks of their window (``hf_window.WindowBlocksLayer``): attention still
sees only the window, the layer holds at most a block more (and the last forward's tokens),
however long the turn or the conversation, and ``save`` stores whole blocks of the window. A plain ``DynamicCache`` may be saved too: its sliding groups get the
whole blocks it still holds, so the next resume is shorter or a miss, never wrong.
Restoring rebuilds each sliding layer with the tokens of its window and the full
sequence length, as if it had seen the whole conversation.

The namespace fingerprints the model by hashing its config and weights (xxh3, fast);
a ``model_id`` stands for the weights instead (no hashing), and is joined by a hash of the
config: two models with one config but different weights, or one ``model_id`` under two
configs (another RoPE base, say), must never share blocks. The fingerprint is taken again
whenever the weights may have changed under the same model object (``weights_version``:
each tensor's version counter, which every in-place write torch tracks bumps, such as an
optimizer step or ``load_state_dict``; and which PEFT adapters are active, merged or
disabled, which a ``model_id`` is joined by too). Writes torch does not track (through
``.data``) are not seen: pass a new ``model_id`` after those.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import xxhash

from tiercache.groups import BlockCache, GroupedCache, GroupedLoad
from tiercache.kernels.reference import LayerCache, gather
from tiercache.keys import Namespace, as_tokens
from tiercache.modelkv import KVGroup, ModelKV
from tiercache.results import SaveResult
from tiercache.spec import AttentionKind, Layout, SpecError


def generate_cache_kwarg() -> str:
    """The keyword the installed transformers' ``generate`` takes a cache by: ``cache`` in the
    releases that renamed it (5.25 has), ``past_key_values`` before them. The renaming releases
    still take ``past_key_values``, with a ``FutureWarning`` on every call until 6.0 drops it."""
    from transformers.generation import utils

    names = getattr(utils, "ALL_CACHE_NAMES", None) or ["past_key_values"]
    return "cache" if names[0] == "cache" else "past_key_values"


def config_fingerprint(config: Any) -> str:
    """A hash of everything in ``config`` but where it was loaded from."""
    what = config.to_dict()
    what.pop("_name_or_path", None)
    return xxhash.xxh3_128_hexdigest(json.dumps(what, sort_keys=True, default=str).encode())


def adapter_state(model: Any) -> tuple[tuple[str, tuple[str, ...], tuple[str, ...], bool], ...]:
    """The switches of ``model``'s PEFT adapter layers: per layer, its active adapters, the
    ones merged into its base weights, and whether adapters are disabled. They change the KV
    without changing the state dict (which holds every adapter loaded, active or not)."""
    return tuple(
        (name, tuple(m.active_adapters), tuple(m.merged_adapters), bool(m.disable_adapters))
        for name, m in model.named_modules()
        if hasattr(m, "merged_adapters") and hasattr(m, "active_adapters")  # BaseTunerLayer
    )


def weights_version(model: Any) -> tuple[Any, ...]:
    """What changes whenever ``model_fingerprint`` may: each state-dict tensor's name, where
    it lives and its version counter (bumped by every in-place write torch tracks: an
    optimizer step, ``load_state_dict``, a ``copy_`` under ``no_grad``), and the adapter
    switches. Cheap: no weight is read."""
    tensors = tuple(
        (name, p.data_ptr(), p._version) for name, p in model.state_dict(keep_vars=True).items()
    )
    return tensors, adapter_state(model)


def model_fingerprint(model: Any) -> str:
    """``<name>@<hash of config, weights and adapter switches>``: equal exactly when the KV
    would be equal."""
    h = xxhash.xxh3_128()
    h.update(model.config.to_json_string(use_diff=False).encode())
    if adapters := adapter_state(model):  # nothing for a model without PEFT layers
        h.update(repr(adapters).encode())
    for name, p in sorted(model.state_dict().items()):
        if p.is_meta:
            raise SpecError(
                f"the model's weight {name!r} is on the meta device (offloaded, or not loaded), "
                "so it cannot be hashed into the namespace: pass HFChatCache(model_id=...), a "
                "name that changes whenever the weights do"
            )
        h.update(name.encode())
        # reshape: a 0-d tensor (a scalar scale) cannot be viewed as bytes
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    name = getattr(model.config, "_name_or_path", "") or model.config.model_type
    return f"{name}@{h.hexdigest()}"


def _check_cache_layers(kv: ModelKV, config: Any) -> None:
    """A SpecError unless transformers caches each layer of ``kv`` as its group says: K and V
    per token (``DynamicLayer``; ``DynamicSlidingWindowLayer`` of the group's window), and
    nothing more. A layer that also caches something tiercache does not store (DeepSeek-V3.2's
    and GLM-5's indexer keys) would be restored without it."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = DynamicCache(config=config).layers
    if len(layers) != kv.num_layers:
        raise SpecError(
            f"transformers caches {len(layers)} layers of this model, its config names "
            f"{kv.num_layers} in KV cache groups; HFChatCache cannot tell which is which"
        )
    for g in kv.groups:
        sliding = g.spec.kind is AttentionKind.SLIDING
        for i in g.layers:
            layer = layers[i]
            window = getattr(layer, "sliding_window", None)
            want = DynamicSlidingWindowLayer if sliding else DynamicLayer
            if type(layer) is not want or (sliding and window != g.spec.window):
                what = type(layer).__name__ + (f" of window {window}" if window else "")
                raise SpecError(
                    f"layer {i} of the model is cached as a {what}, but its KV cache group "
                    f"{g.name!r} is {g.describe()}: HFChatCache stores the K and V (or MLA "
                    "latent) of DynamicLayer and DynamicSlidingWindowLayer caches, nothing else "
                    "a layer keeps"
                )


# Config attributes naming the token ids that stand for an image, a video or audio.
_MEDIA_TOKENS = (
    "image_token_id", "image_token_index", "video_token_id", "video_token_index",
    "audio_token_id", "audio_token_index",
)  # fmt: skip


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
        self.model = model
        self.kv = ModelKV.from_hf_config(
            model.config, dtype=model.dtype, block_size=block_size, layout=Layout.HF
        )
        for g in self.kv.groups:
            if g.spec.kind is AttentionKind.CHUNKED or g.spec.sinks:
                chunked = g.spec.kind is AttentionKind.CHUNKED
                what = "attends in chunks" if chunked else "keeps sink tokens"
                raise SpecError(
                    f"layer {g.layers[0]} of the model {what} (KV cache group {g.name!r}: "
                    f"{g.describe()}, layers {', '.join(map(str, g.layers))}): HFChatCache stores "
                    "full, sliding and MLA layers only; a resume through transformers' cache of "
                    "chunked or sink-token layers was never checked against recompute"
                )
        _check_cache_layers(self.kv, model.config)
        text = model.config.get_text_config(decoder=True)
        self._lora = int(getattr(text, "kv_lora_rank", 0) or 0)  # MLA: where keys end
        # Placeholder ids whose embeddings come from pixels or audio: the KV from the first one
        # on depends on more than the token ids, which are all a block key hashes.
        self._media = torch.tensor(
            sorted({
                v for c in (model.config, text) for name in _MEDIA_TOKENS
                if isinstance(v := getattr(c, name, None), int) and not isinstance(v, bool)
            }), dtype=torch.long,
        )  # fmt: skip
        self._model_id, self._salt, self._store_dtype = model_id, salt, store_dtype
        self._version: tuple[Any, ...] = ()
        self._grouped = self._namespaced(cache)
        self.last_load: GroupedLoad | None = None  # the last restore's load (tiers, seconds)

    def _namespaced(self, cache: BlockCache) -> GroupedCache:
        """The model's groups under the fingerprint of its weights as they are now (and their
        KV dtype: the model may have been cast since)."""
        self._version = self._weights()
        if self.kv.groups[0].spec.torch_dtype != self.model.dtype:
            self.kv = ModelKV.from_hf_config(
                self.model.config, dtype=self.model.dtype, block_size=self.kv.block_size,
                layout=Layout.HF,
            )  # fmt: skip
        if self._model_id:
            name = f"{self._model_id}#config={config_fingerprint(self.model.config)}"
            if adapters := self._version[-1]:
                name += "#adapters=" + xxhash.xxh3_64_hexdigest(repr(adapters).encode())
        else:
            name = model_fingerprint(self.model)
        return GroupedCache(cache, name, self.kv, salt=self._salt, store_dtype=self._store_dtype)

    def _weights(self) -> tuple[Any, ...]:
        # A model_id names the weights: only the adapter switches (and a cast) are watched then.
        if self._model_id:
            return (str(self.model.dtype), adapter_state(self.model))
        return weights_version(self.model)

    @property
    def grouped(self) -> GroupedCache:
        """The model's groups and their namespaces. Fingerprinted again when the weights may
        have changed since (an optimizer step, ``load_state_dict``, an adapter loaded, switched
        or merged): KV computed under other weights is never restored."""
        if self._weights() != self._version:
            self._grouped = self._namespaced(self._grouped.cache)
        return self._grouped

    @property
    def cache(self) -> BlockCache:
        return self.grouped.cache

    @cache.setter
    def cache(self, cache: BlockCache) -> None:
        self.grouped.cache = cache

    @property
    def namespaces(self) -> dict[str, Namespace]:
        """The namespace of each KV cache group, by group name."""
        return self.grouped.namespaces

    def new_cache(self) -> Any:
        """An empty ``DynamicCache`` for the model whose sliding layers keep what a save needs
        (``tiercache.integrations.hf_window``): the whole blocks of their window, no more."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicSlidingWindowLayer

        from tiercache.integrations.hf_window import WindowBlocksLayer

        past = DynamicCache(config=self.model.config)
        for i, layer in enumerate(past.layers):
            if isinstance(layer, DynamicSlidingWindowLayer):
                past.layers[i] = WindowBlocksLayer(layer.sliding_window, self.kv.block_size)
        return past

    def _planes(self, group: KVGroup, layer: Any, a: int, b: int) -> tuple[torch.Tensor, ...]:
        """Positions ``a:b`` of a layer's cache as the group's planes: (K, V), or the MLA latent
        (keys ‖ values)."""
        k, v = layer.keys[:, :, a:b], layer.values[:, :, a:b]
        return (torch.cat([k, v], dim=-1),) if group.spec.kind is AttentionKind.MLA else (k, v)

    def _text(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` up to the first image, video or audio placeholder: the blocks whose KV the
        token ids determine (an image's KV, and every later token's, depends on its pixels)."""
        media = torch.isin(ids.long(), self._media).nonzero()  # isin promotes no uint32
        return ids[: int(media[0])] if media.numel() else ids

    def save(self, session: str, tokens: Any, past: Any) -> SaveResult:
        """Store the KV of ``tokens`` held in ``past`` (a DynamicCache of one conversation: a
        batch of several rows is refused, since the tokens name one row's KV).

        ``tokens`` are the ids whose KV is in ``past``, in order, all of them (a cache holding
        more positions than ``tokens`` is refused: what it holds is not known). Of every group only the
        blocks a resume needs and the cache lacks are gathered and written; the result counts
        blocks of all groups together. Blocks from a multimodal model's first image (video,
        audio) placeholder on are not stored: their KV depends on the pixels, which no key
        names.
        """
        ids = torch.as_tensor(as_tokens(tokens))
        bs = self.kv.block_size
        held: dict[str, range] = {}
        offsets: dict[str, int] = {}
        for g in self.kv.groups:
            # A cache nothing ran through yet has no layers (DynamicCache()) or empty ones.
            layer = past.layers[g.layers[0]] if g.layers[0] < len(past.layers) else None
            seen = 0 if layer is None else layer.get_seq_length()
            if ids.numel() > seen:
                raise ValueError(
                    f"{ids.numel()} tokens given but the cache holds only {seen} positions"
                )
            if ids.numel() < seen:  # its positions are not these tokens: stored under their keys
                raise ValueError(
                    f"{ids.numel()} tokens given but the cache holds {seen} positions: save takes "
                    "the ids of every position it holds, in order (after generate, out[0, :-1]); "
                    "transformers' assisted generation (assistant_model) runs the whole prompt "
                    "again on top of a restored cache"
                )
            if layer is None or not seen:
                held[g.name], offsets[g.name] = range(0), 0
                continue
            if layer.keys.shape[0] != 1:
                raise ValueError(
                    f"the cache holds a batch of {layer.keys.shape[0]} conversations; "
                    "save takes one (batch size 1)"
                )
            first = -(-(seen - layer.keys.shape[-2]) // bs)  # the first whole block it holds
            held[g.name] = range(first, ids.numel() // bs)
            offsets[g.name] = first * bs - (seen - layer.keys.shape[-2])

        def gather_group(g: KVGroup, block_ids: list[int]) -> torch.Tensor:
            # Positions of the blocks asked for, in the layers' tensors (which may not start
            # at position 0: a sliding layer holds the last tokens only).
            lo, hi = min(block_ids), max(block_ids) + 1
            a = offsets[g.name] + (lo - held[g.name].start) * bs
            caches: list[LayerCache] = [
                self._planes(g, past.layers[i], a, a + (hi - lo) * bs) for i in g.layers
            ]
            return gather(g.spec, caches, [b - lo for b in block_ids]).cpu()

        results = self.grouped.save(self._text(ids), gather_group, held=held, session=session)
        return sum(results.values(), SaveResult(0, 0, 0))

    def restore(self, session: str, tokens: Any) -> tuple[Any, int]:
        """A DynamicCache holding the longest prefix of ``tokens`` every group can resume at,
        and its length in tokens (an empty cache and 0 on a miss).

        At most ``len(tokens) - 1`` tokens are restored, and none from the first image (video,
        audio) placeholder on: the model computes those from the pixels it is given.
        ``session`` names the chat for pin/evict/prefetch.
        """
        ids = torch.as_tensor(as_tokens(tokens))
        most = max(0, (ids.numel() - 1) // self.kv.block_size)
        got = self.grouped.load(self._text(ids), max_blocks=most)
        self.last_load = got
        past = self.new_cache()
        if got.blocks == 0:
            return past, 0
        device = next(self.model.parameters()).device
        for g in self.kv.groups:
            (part,) = got.groups[g.name]  # one run: chunked and sink groups are refused above
            kv = part.kv()  # [n, layers, planes, bs, heads, head_dim]
            n, spec = part.blocks, g.spec
            for j, i in enumerate(g.layers):
                planes = [
                    kv[:, j, p].reshape(n * spec.block_size, spec.num_kv_heads, spec.head_dim)
                    .permute(1, 0, 2).unsqueeze(0).contiguous().to(device)
                    for p in range(spec.planes)
                ]  # fmt: skip
                if spec.kind is AttentionKind.MLA:
                    latent = planes[0]
                    planes = [latent[..., : self._lora].contiguous(), latent[..., self._lora :]]
                layer = past.layers[i]
                if spec.kind is AttentionKind.SLIDING:  # it holds the window of got.tokens
                    layer.cumulative_length = got.tokens - n * spec.block_size
                layer.update(*planes)
        assert past.get_seq_length() == got.tokens
        return past, got.tokens
