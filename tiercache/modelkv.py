"""ModelKV: a model's KV cache as a list of KV cache groups, and how to read it from a Hugging
Face config.

A *KV cache group* is the layers of a model that cache alike: one attention kind (full,
sliding window, chunked local, MLA latent), one shape, one layout, so one ``KVSpec`` and one
stored block per ``block_size`` tokens. Gemma 3 is a sliding group of five layers in six and
a full group of the rest; gpt-oss alternates sliding and full layers; a Mistral-style model
is one sliding group; Llama 4 is chunked layers and full (NoPE) layers; DeepSeek-V2/V3 and
Kimi K2 are one MLA group; a plain dense model is one full group. Each group is stored under
a namespace of its own (``tiercache.groups``), so groups never share blocks.

The sizing follows from the kinds: a full or MLA layer holds every token, a sliding layer at
most its window (and sink tokens), a chunked layer at most its chunk. So a long Gemma 3 chat
costs the full layers' bytes per token times its length plus the sliding layers' bytes per
token times the window, not all layers times its length.

``from_hf_config`` recognises the ways configs say which layer is which: an explicit
``layer_types`` list (Gemma 2/3, gpt-oss and newer configs of most families),
``use_sliding_window`` with ``max_window_layers`` (Qwen2), ``sliding_window_pattern`` (older
Gemma configs, with transformers' defaults where a Gemma or gpt-oss config leaves it out),
``attention_chunk_size`` with ``no_rope_layers`` (Llama 4), ``sliding_window`` alone (every
layer slides: Mistral 7B v0.1, Phi-3), ``kv_lora_rank`` with ``qk_rope_head_dim`` (MLA). A
layer type that keeps no per-token KV (linear attention, state-space layers) is a SpecError
naming it: there is nothing for tiercache to store for it. Layers that reuse an earlier
layer's KV (Gemma 3n and 4's ``num_kv_shared_layers``, the last layers of the model) cache
none of their own and belong to no group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tiercache.spec import AttentionKind, KVSpec, Layout, SpecError, dtype_name

FULL, SLIDING, CHUNKED, MLA = (
    AttentionKind.FULL,
    AttentionKind.SLIDING,
    AttentionKind.CHUNKED,
    AttentionKind.MLA,
)

# transformers' own defaults for configs that leave the sliding pattern out (a layer i is full
# when (i + 1) % pattern == 0): Gemma 2 and gpt-oss alternate, Gemma 3 and 4 have five local
# to one, Gemma 3n four to one. Gemma 4's last layer is full whatever the pattern says.
_GEMMA4 = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
_PATTERNS = {
    "gemma2": 2, "gemma3": 6, "gemma3_text": 6, "gpt_oss": 2, "gemma3n": 5, "gemma3n_text": 5,
    **dict.fromkeys(_GEMMA4, 6),
}  # fmt: skip
# transformers' defaults for the KV shape where a family's published configs leave it out
# (gemma-3-4b-it's text_config names no heads; gemma-3-12b-it's no head_dim, which is not
# hidden_size / heads there: 3840 / 16 = 240, where the model has 256).
_GEMMA_SHAPE = {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256}
_SHAPES = {"gemma2": _GEMMA_SHAPE, "gemma3": _GEMMA_SHAPE, "gemma3_text": _GEMMA_SHAPE}
_QWEN2_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config default
_LLAMA4_NO_ROPE_INTERVAL = 4  # transformers' Llama4TextConfig no_rope_layer_interval default


@dataclass(frozen=True, slots=True)
class KVGroup:
    """Layers of one model that cache alike: ``layers`` are the model's layer indices, in the
    order their K/V (or latent) appear in the group's blocks."""

    name: str
    layers: tuple[int, ...]
    spec: KVSpec

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"KVGroup.name must be a non-empty string, got {self.name!r}")
        layers = tuple(self.layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise SpecError(f"KVGroup {self.name!r}: layers must be layer indices >= 0")
        if len(set(layers)) != len(layers):
            raise SpecError(f"KVGroup {self.name!r}: a layer is listed twice in {list(layers)}")
        if len(layers) != self.spec.num_layers:
            raise SpecError(
                f"KVGroup {self.name!r} lists {len(layers)} layers but its spec has "
                f"num_layers={self.spec.num_layers}"
            )
        object.__setattr__(self, "layers", layers)

    def describe(self) -> str:
        """``52 layers, window 1,024 tokens`` and the like."""
        spec = self.spec
        what = {
            FULL: "full attention",
            SLIDING: f"window {spec.window:,} tokens"
            + (f" + {spec.sinks:,} sinks" if spec.sinks else ""),
            CHUNKED: f"chunks of {spec.window:,} tokens",
            MLA: f"MLA latent of {spec.head_dim} values",
        }[spec.kind]
        return f"{spec.num_layers} layers, {what}"


@dataclass(frozen=True, slots=True)
class ModelKV:
    """A model's KV cache groups. Every group has the same ``block_size``: block ``i`` of each
    group covers the same tokens, which is what lets the hit rule line groups up."""

    groups: tuple[KVGroup, ...]

    def __post_init__(self) -> None:
        groups = tuple(self.groups)
        if not groups:
            raise SpecError("a ModelKV needs at least one KV cache group")
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise SpecError(f"KV cache group names must be unique, got {names}")
        layers = [i for g in groups for i in g.layers]
        if len(set(layers)) != len(layers):
            raise SpecError("a layer belongs to two KV cache groups")
        sizes = {g.spec.block_size for g in groups}
        if len(sizes) > 1:
            raise SpecError(
                f"every KV cache group needs the same block_size, got {sorted(sizes)}: a block "
                "of each group must cover the same tokens"
            )
        object.__setattr__(self, "groups", groups)

    @property
    def block_size(self) -> int:
        return self.groups[0].spec.block_size

    @property
    def num_layers(self) -> int:
        return sum(g.spec.num_layers for g in self.groups)

    @property
    def bytes_per_token(self) -> int:
        """KV bytes each token adds while it is inside every window."""
        return sum(g.spec.bytes_per_token for g in self.groups)

    def bytes_for(self, tokens: int, batch: int = 1) -> int:
        """KV bytes of ``batch`` sequences of ``tokens`` tokens, each group holding what it keeps."""
        return sum(g.spec.bytes_for(tokens, batch) for g in self.groups)

    def tokens_in(self, nbytes: int, slot_bytes: int = 0) -> int | None:
        """The longest sequence (whole blocks) whose KV fits in ``nbytes``; None when any
        length fits (every group is windowed and the windows fit).

        ``slot_bytes``: a tier of fixed-size slots (host, device), where a block of every
        group takes one slot, so a small group's blocks cost as much as the largest's.
        """
        bs = self.block_size

        def cost(tokens: int) -> int:
            if not slot_bytes:
                return self.bytes_for(tokens)
            return slot_bytes * sum(-(-g.spec.tokens_held(tokens) // bs) for g in self.groups)

        if all(g.spec.max_tokens is not None for g in self.groups):
            longest = max(g.spec.max_tokens or 0 for g in self.groups) + bs
            if cost(longest) <= nbytes:
                return None
        block = slot_bytes or min(g.spec.bytes_per_token for g in self.groups) * bs
        lo, hi = 0, nbytes // block + 1
        while lo < hi:  # the most blocks that fit: the cost only grows with the length
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid * bs) <= nbytes else (lo, mid - 1)
        return lo * bs

    def group(self, name: str) -> KVGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise SpecError(
            f"no KV cache group {name!r}; groups: {', '.join(g.name for g in self.groups)}"
        )

    @classmethod
    def from_hf_config(
        cls,
        config: str | Path | dict[str, Any] | Any,
        *,
        dtype: str | torch.dtype | None = None,
        block_size: int = 16,
        layout: Layout | str = Layout.VLLM,
    ) -> ModelKV:
        """The KV cache groups of a Hugging Face model, from its ``config.json`` (a path, a
        model directory, a dict or a PretrainedConfig); multimodal configs are read through
        their ``text_config``.

        GQA and MQA come from ``num_key_value_heads`` (absent: one KV head per attention
        head); an explicit ``head_dim`` wins over hidden/heads, and a layer's own
        (``per_layer_config``: Gemma 4's full layers) over the model's. Layers of one kind with
        another window or KV shape are another group. Groups are named by kind (``full``,
        ``sliding``, ``chunked``, ``mla``; ``sliding-<window>`` where windows differ) in the
        order their first layer appears. ``dtype`` overrides the config's own
        (the KV cache may be stored narrower than the weights).
        """
        cfg = read_hf_config(config)
        cfg = {**_SHAPES.get(cfg.get("model_type", ""), {}), **cfg}

        def need(key: str) -> int:
            if cfg.get(key) is None:
                raise SpecError(f"model config has no {key!r}; is it a decoder LLM config?")
            return int(cfg[key])

        n = need("num_hidden_layers")
        # Gemma 3n and 4: the last ``num_kv_shared_layers`` layers attend to the KV of an earlier
        # layer of their kind and cache none of their own (transformers' DynamicCache has no
        # layer for them), so they are in no group.
        shared = int(cfg.get("num_kv_shared_layers") or 0)
        if not 0 <= shared < n:
            raise SpecError(
                f"model config's num_kv_shared_layers is {shared}, but num_hidden_layers is {n}: "
                "at least one layer must cache KV of its own"
            )
        if dtype is None:
            dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        assert dtype is not None
        common: dict[str, Any] = dict(
            dtype=dtype_name(dtype), block_size=block_size, layout=Layout(layout)
        )
        if cfg.get("kv_lora_rank"):
            # Every layer caches the latent (DeepSeek-V3.2's indexed layers keep their indexer
            # keys beside it); a layer of another type (Kimi Linear's KDA layers) is refused.
            typed_layers(cfg, n, {"full_attention": MLA, "indexed_attention": MLA})
            latent = need("kv_lora_rank") + need("qk_rope_head_dim")
            spec = KVSpec(
                num_layers=n - shared, num_kv_heads=1, head_dim=latent, kind=MLA, **common
            )
            return cls((KVGroup("mla", tuple(range(n - shared)), spec),))
        kinds = layer_kinds(cfg, n)
        by_kind: dict[tuple[AttentionKind, int, int, int], list[int]] = {}
        for i, override in enumerate(layer_overrides(cfg, kinds)[: n - shared]):
            layer = {**cfg, **override}
            kind, window = kinds[i]
            if kind is not FULL and override:
                kind, window = window_of(layer, kind)
            heads = int(layer.get("num_attention_heads") or need("num_attention_heads"))
            kv_heads = int(layer.get("num_key_value_heads") or heads)
            head_dim = int(layer.get("head_dim") or need("hidden_size") // heads)
            by_kind.setdefault((kind, window, kv_heads, head_dim), []).append(i)
        groups = []
        for (kind, window, kv_heads, head_dim), layers in by_kind.items():
            spec = KVSpec(
                num_layers=len(layers), num_kv_heads=kv_heads, head_dim=head_dim,
                kind=kind, window=window, **common,
            )  # fmt: skip
            groups.append(KVGroup(group_name(list(by_kind), spec), tuple(layers), spec))
        return cls(tuple(groups))


def group_name(keys: list[tuple[AttentionKind, int, int, int]], spec: KVSpec) -> str:
    """The kind, and where several groups have it the window, and where several have that too
    the KV shape: ``full``, ``sliding-1024``, ``full-0-4x512``."""
    same = [k for k in keys if k[0] is spec.kind]
    if len(same) == 1:
        return str(spec.kind)
    name = f"{spec.kind}-{spec.window}"
    if sum(k[1] == spec.window for k in same) > 1:
        name += f"-{spec.num_kv_heads}x{spec.head_dim}"
    return name


# Gemma 4: its full layers' head_dim, where a config.json leaves it out (transformers'
# Gemma4TextConfig turns global_head_dim into ``per_layer_config``).
_GEMMA4_GLOBAL_HEAD_DIM = 512


def layer_overrides(
    cfg: dict[str, Any], kinds: list[tuple[AttentionKind, int]]
) -> list[dict[str, Any]]:
    """What each layer's config sets over the model's (``per_layer_config``: Gemma 4's full
    layers have a head_dim of their own, other models a window or heads per layer)."""
    per_layer = cfg.get("per_layer_config")
    if per_layer is None and cfg.get("model_type") in _GEMMA4:
        full: dict[str, Any] = {"head_dim": cfg.get("global_head_dim", _GEMMA4_GLOBAL_HEAD_DIM)}
        if cfg.get("attention_k_eq_v") and cfg.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = cfg["num_global_key_value_heads"]
        per_layer = {i: full for i, (kind, _) in enumerate(kinds) if kind is FULL}
    if per_layer is None:
        return [{} for _ in kinds]
    if not (
        isinstance(per_layer, dict)
        and all(str(i).isdigit() and isinstance(v, dict) for i, v in per_layer.items())
    ):
        raise SpecError(
            "model config's per_layer_config must map layer indices to the fields each layer "
            f"sets, got {per_layer!r:.80}"
        )
    by_index = {int(i): v for i, v in per_layer.items()}
    return [by_index.get(i, {}) for i in range(len(kinds))]


def window_of(cfg: dict[str, Any], kind: AttentionKind) -> tuple[AttentionKind, int]:
    """``(kind, window)`` of a sliding or chunked layer configured by ``cfg``."""
    key = "sliding_window" if kind is SLIDING else "attention_chunk_size"
    if not cfg.get(key):
        raise SpecError(f"model config has {kind} attention layers but no {key!r}")
    return kind, int(cfg[key])


def read_hf_config(config: str | Path | dict[str, Any] | Any) -> dict[str, Any]:
    """A Hugging Face config as a dict (a copy), its ``text_config`` merged over the top level."""
    if isinstance(config, str | Path):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError(f"model config not found: {path}") from None
        except json.JSONDecodeError as e:
            raise SpecError(f"model config {path} is not valid JSON: {e}") from None
    elif isinstance(config, dict):
        cfg = dict(config)
    else:
        cfg = config.to_dict()
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    return cfg


def typed_layers(
    cfg: dict[str, Any], n: int, named: dict[str, AttentionKind]
) -> list[AttentionKind] | None:
    """The kind of each of the ``n`` layers the config's layer types name (``declared_types``;
    None where it names none), or a SpecError for a layer type ``named`` has no kind for."""
    types = declared_types(cfg, n)
    if types is None:
        return None
    if len(types) != n:
        raise SpecError(
            f"model config's layer_types lists {len(types)} layers, but num_hidden_layers is {n}"
        )
    for i, t in enumerate(types):
        if t not in named:
            raise SpecError(
                f"layer {i} of the model is a {t!r} layer: tiercache stores the per-token KV "
                f"of attention layers ({', '.join(named)}), and a {t!r} layer has none"
            )
    return [named[t] for t in types]


# transformers' newer names for layer types older configs use.
_LEGACY_TYPES = {
    "attention": "full_attention", "mamba": "linear_attention",
    "deepseek_sparse_attention": "indexed_attention",
}  # fmt: skip
_NEMOTRON_H = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}


def declared_types(cfg: dict[str, Any], n: int) -> list[str] | None:
    """Each layer's type as transformers names it, from ``layer_types`` (Bamba and Nemotron-H
    write it ``layers_block_type``) or what a family's config.json says instead (None where it
    says nothing of the kind)."""
    types = cfg.get("layer_types") or cfg.get("layers_block_type") or _family_types(cfg, n)
    if types is None:
        return None
    return [_LEGACY_TYPES.get(t, t) if isinstance(t, str) else t for t in types]


def _family_types(cfg: dict[str, Any], n: int) -> list[str] | None:
    linear = cfg.get("linear_attn_config")
    if "full_attention_interval" in cfg:
        # Qwen3-Next and Qwen3.5: every interval-th layer attends, the rest are Gated DeltaNet.
        every = int(cfg["full_attention_interval"])
        return ["linear_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    if isinstance(linear, dict) and linear.get("kda_layers"):
        # Kimi Linear: its KDA layers, numbered from 1, are linear.
        kda = {int(i) - 1 for i in linear["kda_layers"]}
        return ["linear_attention" if i in kda else "full_attention" for i in range(n)]
    if "attn_layer_period" in cfg:
        # Jamba: one attention layer a period, at its offset; the others are Mamba.
        period, offset = int(cfg["attn_layer_period"]), int(cfg.get("attn_layer_offset") or 0)
        return ["attention" if i % period == offset else "mamba" for i in range(n)]
    if cfg.get("attn_layer_indices") is not None:
        # Bamba: the attention layers by index; the others are Mamba.
        attn = {int(i) for i in cfg["attn_layer_indices"]}
        return ["attention" if i in attn else "mamba" for i in range(n)]
    if cfg.get("full_attn_idxs") is not None:
        # LFM2: the attention layers by index; the others are short convolutions.
        attn = {int(i) for i in cfg["full_attn_idxs"]}
        return ["full_attention" if i in attn else "conv" for i in range(n)]
    if isinstance(cfg.get("hybrid_override_pattern"), str):
        # Nemotron-H: a letter a layer (Mamba, attention, MLP, MoE).
        return [_NEMOTRON_H.get(c, c) for c in cfg["hybrid_override_pattern"]]
    return None


def layer_kinds(cfg: dict[str, Any], n: int) -> list[tuple[AttentionKind, int]]:
    """``(kind, window)`` of each of the ``n`` layers a config describes (see the module doc)."""
    full = (FULL, 0)
    named = {"full_attention": FULL, "sliding_attention": SLIDING, "chunked_attention": CHUNKED}
    types = typed_layers(cfg, n, named)
    if types is not None:
        return [full if t is FULL else window_of(cfg, t) for t in types]
    if "use_sliding_window" in cfg:  # Qwen2: the layers from max_window_layers on slide
        if not cfg["use_sliding_window"] or not cfg.get("sliding_window"):
            return [full] * n
        first = int(cfg.get("max_window_layers", _QWEN2_MAX_WINDOW_LAYERS))
        return [window_of(cfg, SLIDING) if i >= first else full for i in range(n)]
    pattern = cfg.get("sliding_window_pattern") or _PATTERNS.get(cfg.get("model_type", ""))
    if pattern and cfg.get("sliding_window"):
        last = n - 1 if cfg.get("model_type") in _GEMMA4 else n
        return [
            full if (i + 1) % int(pattern) == 0 or i == last else window_of(cfg, SLIDING)
            for i in range(n)
        ]
    if cfg.get("attention_chunk_size"):  # Llama 4: chunked RoPE layers, full NoPE layers
        every = int(cfg.get("no_rope_layer_interval") or _LLAMA4_NO_ROPE_INTERVAL)
        uses_rope = cfg.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(n)]
        if len(uses_rope) != n:
            raise SpecError(
                f"model config's no_rope_layers lists {len(uses_rope)} layers, "
                f"but num_hidden_layers is {n}"
            )
        return [window_of(cfg, CHUNKED) if r else full for r in uses_rope]
    if cfg.get("sliding_window"):
        return [window_of(cfg, SLIDING)] * n
    return [full] * n
