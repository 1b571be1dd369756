"""KVSpec: the shape of one KV cache group (the layers of a model that share one attention kind
and layout), and the sizing arithmetic.

Every sizing question reduces to one formula: bytes per token = planes (2 for K and V, 1
for an MLA latent) x layers x kv_heads x head_dim x bytes per element. A *block* is
``block_size`` tokens across all layers of the group, stored page-first as ``[layers,
planes, block_size, kv_heads, head_dim]`` so that one block is one contiguous buffer: one
DMA, one disk chunk, one object.

The ``kind`` says which earlier tokens a layer attends to, and so which blocks a resumed
conversation needs (``tiercache.groups``): all of them (full attention, MLA), the last
``window`` tokens and the first ``sinks`` (sliding window), or the tokens of the current
``window``-token chunk (chunked local attention). An MLA layer caches one latent vector
per token instead of K and V per head: one plane, one "head" of ``kv_lora_rank +
qk_rope_head_dim`` values (576 for DeepSeek-V3). A model with several kinds of layers is a
``tiercache.modelkv.ModelKV`` of several groups; a plain dense model is one full group,
and its spec serializes exactly as it did before kinds existed (``to_dict`` leaves the
new fields out at their defaults), so its namespaces and stored block keys are unchanged.

The spec also names the engine's layout of its paged KV cache, which is what
the gather/scatter code (``tiercache.kernels``) needs to find a block's bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from tiercache.errors import BlockShapeError


class Layout(StrEnum):
    """How an engine lays out one layer of its KV cache."""

    VLLM = "vllm"  # flash-attn: [2, num_blocks, block_size, heads, head_dim] per layer
    FLASHINFER = "flashinfer"  # [num_blocks, 2, block_size, heads, head_dim] per layer
    HF = "hf"  # transformers: K and V each [batch, heads, seq, head_dim] per layer
    # vLLM's CPU attention backend: [num_blocks, heads, block_size, 2 * head_dim] per layer, K
    # tiled in an order that depends on the CPU's ISA. Its blocks are moved as opaque engine
    # bytes (same element count as a page-first layer block), never interpreted.
    VLLM_CPU = "vllm-cpu"


# name -> (torch dtype, bytes per element). fp8 and int8 are storage formats:
# the bytes are moved as they are, the scale (if any) travels beside them.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, 4),
    "bfloat16": (torch.bfloat16, 2),
    "float16": (torch.float16, 2),
    "float8_e4m3fn": (torch.float8_e4m3fn, 1),
    "int8": (torch.int8, 1),
}

_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "float8": "float8_e4m3fn",
}


class AttentionKind(StrEnum):
    """Which earlier tokens the layers of a group attend to."""

    FULL = "full"  # every earlier token
    SLIDING = "sliding"  # the last ``window`` tokens, and the first ``sinks``
    CHUNKED = "chunked"  # the tokens of the current ``window``-token chunk (Llama 4's local layers)
    MLA = "mla"  # every earlier token, cached as one latent vector each (DeepSeek-V2/V3, Kimi K2)


class SpecError(ValueError):
    """A KV spec or model config that cannot describe a KV cache."""


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical dtype name for ``dtype`` (a name, an alias or a torch dtype)."""
    if isinstance(dtype, torch.dtype):
        for name, (td, _) in DTYPES.items():
            if td == dtype:
                return name
        raise SpecError(f"unsupported KV dtype {dtype}; supported: {', '.join(DTYPES)}")
    if not isinstance(dtype, str):  # a spec decoded from a request: any type may come in
        raise SpecError(f"KVSpec.dtype must be a dtype name, got {dtype!r:.80}")
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in DTYPES:
        raise SpecError(
            f"unsupported KV dtype {dtype!r}; supported: {', '.join(DTYPES)} "
            f"(aliases: {', '.join(_DTYPE_ALIASES)})"
        )
    return name


@dataclass(frozen=True, slots=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    block_size: int = 16
    layout: Layout = Layout.VLLM
    kind: AttentionKind = AttentionKind.FULL
    # Sliding: the window in tokens. Chunked: the chunk in tokens. 0 for full and MLA.
    window: int = 0
    # Sink tokens a sliding layer always keeps at the start (StreamingLLM-style). Not
    # gpt-oss's "attention sinks": those are learned per-head logits, no tokens, so sinks=0.
    sinks: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SpecError(f"KVSpec.{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for name, kinds in (("layout", Layout), ("kind", AttentionKind)):
            try:
                object.__setattr__(self, name, kinds(getattr(self, name)))
            except ValueError:
                raise SpecError(
                    f"KVSpec.{name} must be one of {', '.join(kinds)}, got {getattr(self, name)!r}"
                ) from None
        for name in ("window", "sinks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SpecError(f"KVSpec.{name} must be a non-negative integer, got {value!r}")
        self._check_kind()

    def _check_kind(self) -> None:
        kind = self.kind
        windowed = kind in (AttentionKind.SLIDING, AttentionKind.CHUNKED)
        if windowed and self.window == 0:
            what = "window" if kind is AttentionKind.SLIDING else "chunk"
            raise SpecError(f"KVSpec.window must be > 0 for kind {kind!s} (the {what} in tokens)")
        if not windowed and self.window:
            raise SpecError(
                f"KVSpec.window is for sliding and chunked groups; kind {kind!s} needs window=0, "
                f"got {self.window}"
            )
        if self.sinks and kind is not AttentionKind.SLIDING:
            raise SpecError(
                f"KVSpec.sinks (sink tokens kept at the start) needs kind sliding, got kind {kind!s}"
            )
        if kind is AttentionKind.MLA and self.num_kv_heads != 1:
            raise SpecError(
                "KVSpec.num_kv_heads must be 1 for kind mla (one latent vector per token: "
                f"head_dim = kv_lora_rank + qk_rope_head_dim), got {self.num_kv_heads}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def element_bytes(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def planes(self) -> int:
        """Vectors cached per token, layer and head: K and V (2), or an MLA latent (1)."""
        return 1 if self.kind is AttentionKind.MLA else 2

    @property
    def bytes_per_token(self) -> int:
        return (
            self.planes * self.num_layers * self.num_kv_heads * self.head_dim * self.element_bytes
        )

    @property
    def max_tokens(self) -> int | None:
        """The most tokens a layer of this group attends to (and an engine keeps): None for
        full and MLA, window + sinks for sliding, the chunk for chunked."""
        if self.kind in (AttentionKind.FULL, AttentionKind.MLA):
            return None
        return self.window + self.sinks

    def tokens_held(self, tokens: int) -> int:
        """Tokens of a ``tokens``-token sequence whose KV a layer of this group holds."""
        cap = self.max_tokens
        return tokens if cap is None else min(tokens, cap)

    @property
    def block_nbytes(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Page-first shape of one stored block."""
        return (self.num_layers, self.planes, self.block_size, self.num_kv_heads, self.head_dim)

    def bytes_for(self, tokens: int, batch: int = 1) -> int:
        """KV bytes of ``batch`` sequences of ``tokens`` tokens (a windowed group holds at most
        its window of each)."""
        return self.bytes_per_token * self.tokens_held(tokens) * batch

    def tokens_in(self, nbytes: int) -> int:
        """Tokens whose KV fits in ``nbytes``, counted in whole blocks."""
        return (nbytes // self.block_nbytes) * self.block_size

    def to_dict(self) -> dict[str, Any]:
        """Plain fields; ``kind``, ``window`` and ``sinks`` only where they are not the default,
        so a full-attention spec (and every namespace id derived from it) reads as before."""
        d = asdict(self)
        d["layout"] = str(self.layout)
        d["kind"] = str(self.kind)
        for name, default in (("kind", str(AttentionKind.FULL)), ("window", 0), ("sinks", 0)):
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise SpecError(f"unknown KVSpec field(s): {', '.join(sorted(unknown))}")
        missing = {"num_layers", "num_kv_heads", "head_dim"} - set(d)
        if missing:
            raise SpecError(f"KVSpec is missing field(s): {', '.join(sorted(missing))}")
        return cls(**d)

    @classmethod
    def from_hf_config(
        cls,
        config: str | Path | dict[str, Any] | Any,
        *,
        dtype: str | torch.dtype | None = None,
        block_size: int = 16,
        layout: Layout | str = Layout.VLLM,
    ) -> KVSpec:
        """Spec of a Hugging Face model whose layers all cache alike (one KV cache group), from
        its ``config.json`` (path, dict or PretrainedConfig); see
        ``tiercache.modelkv.ModelKV.from_hf_config``, which reads every family. A model with
        several groups (Gemma 3, gpt-oss, Llama 4) is a SpecError that names them."""
        from tiercache.modelkv import ModelKV

        model = ModelKV.from_hf_config(config, dtype=dtype, block_size=block_size, layout=layout)
        if len(model.groups) > 1:
            raise SpecError(
                f"this model's KV is {len(model.groups)} KV cache groups "
                f"({'; '.join(f'{g.name}: {g.describe()}' for g in model.groups)}), not one KVSpec: "
                "use tiercache.modelkv.ModelKV.from_hf_config"
            )
        return model.groups[0].spec


def block_rows(spec: KVSpec, blocks: torch.Tensor) -> torch.Tensor:
    """Blocks for ``spec`` (typed ``[n, *block_shape]`` or uint8 ``[n, block_nbytes]``) as uint8
    rows; anything else is a BlockShapeError naming the expected shape."""
    if blocks.device.type != "cpu":
        raise BlockShapeError(f"blocks must be on the CPU here, got {blocks.device}")
    if blocks.dtype == torch.uint8:
        if blocks.dim() != 2 or blocks.shape[1] != spec.block_nbytes:
            raise BlockShapeError(
                f"uint8 blocks must be [n, {spec.block_nbytes}] for this namespace, got {list(blocks.shape)}"
            )
        return blocks.contiguous()
    if blocks.dtype != spec.torch_dtype:
        raise BlockShapeError(f"blocks have dtype {blocks.dtype}, namespace stores {spec.dtype}")
    if tuple(blocks.shape[1:]) != spec.block_shape:
        raise BlockShapeError(
            f"blocks must be [n, {', '.join(map(str, spec.block_shape))}] "
            f"(layers, {'latent' if spec.planes == 1 else 'K/V'}, block_size, kv_heads, head_dim), "
            f"got {list(blocks.shape)}"
        )
    return blocks.contiguous().view(torch.uint8).view(blocks.shape[0], spec.block_nbytes)


def parse_size(value: str | int) -> int:
    """``"32GiB"``, ``"500 GB"``, ``"64KiB"`` or a plain integer -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"size must be a string like '32GiB' or an integer, got {value!r}")
    units = {
        "": 1, "B": 1,
        "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
        "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    }  # fmt: skip
    s = value.strip().replace(" ", "").upper()
    i = len(s)
    while i > 0 and not s[i - 1].isdigit():
        i -= 1
    number, unit = s[:i], s[i:]
    if unit not in units or not number:
        raise ValueError(
            f"bad size {value!r}: expected a number with a unit B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
        )
    if number.startswith("-"):
        raise ValueError(f"bad size {value!r}: a size must not be negative")
    try:
        # Decimal, not float: exact for large integers, no overflow to infinity.
        n = Decimal(number)
    except InvalidOperation:
        raise ValueError(f"bad size {value!r}: {number!r} is not a number") from None
    if not n.is_finite() or n.adjusted() > 30:
        raise ValueError(f"bad size {value!r}: out of range")
    return int(n * units[unit])


def format_size(nbytes: int | float) -> str:
    """Binary-unit rendering, e.g. 44040192 -> '42.0 MiB'."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
