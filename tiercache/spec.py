"""KVSpec: the shape of one model's KV cache, and the sizing arithmetic.

Every sizing question reduces to one formula: bytes per token =
2 (K and V) x layers x kv_heads x head_dim x bytes per element. A *block* is
``block_size`` tokens across all layers, K and V, stored page-first as
``[layers, 2, block_size, kv_heads, head_dim]`` so that one block is one
contiguous buffer: one DMA, one disk chunk, one object.

The spec also names the engine's layout of its paged KV cache, which is what
the gather/scatter code (``tiercache.kernels``) needs to find a block's bytes.
"""

from __future__ import annotations

import json
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


class SpecError(ValueError):
    """A KV spec or model config that cannot describe a KV cache."""


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical dtype name for ``dtype`` (a name, an alias or a torch dtype)."""
    if isinstance(dtype, torch.dtype):
        for name, (td, _) in DTYPES.items():
            if td == dtype:
                return name
        raise SpecError(f"unsupported KV dtype {dtype}; supported: {', '.join(DTYPES)}")
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

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SpecError(f"KVSpec.{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        try:
            object.__setattr__(self, "layout", Layout(self.layout))
        except ValueError:
            raise SpecError(
                f"KVSpec.layout must be one of {', '.join(Layout)}, got {self.layout!r}"
            ) from None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def element_bytes(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_bytes

    @property
    def block_nbytes(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Page-first shape of one stored block."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    def bytes_for(self, tokens: int, batch: int = 1) -> int:
        return self.bytes_per_token * tokens * batch

    def tokens_in(self, nbytes: int) -> int:
        """Tokens whose KV fits in ``nbytes``, counted in whole blocks."""
        return (nbytes // self.block_nbytes) * self.block_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layout"] = str(self.layout)
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
        """Spec of a Hugging Face model from its ``config.json`` (path, dict or PretrainedConfig).

        GQA and MQA come from ``num_key_value_heads`` (absent: one KV head per
        attention head); an explicit ``head_dim`` wins over hidden/heads;
        multimodal configs are read through their ``text_config``. ``dtype``
        overrides the config's own dtype (the KV cache may be stored narrower
        than the weights).
        """
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

        def need(key: str) -> int:
            if key not in cfg:
                raise SpecError(f"model config has no {key!r}; is it a decoder LLM config?")
            return int(cfg[key])

        layers = need("num_hidden_layers")
        heads = need("num_attention_heads")
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = cfg.get("head_dim")
        if not head_dim:
            head_dim = need("hidden_size") // heads
        if dtype is None:
            dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        assert dtype is not None
        return cls(
            num_layers=layers,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            dtype=dtype_name(dtype),
            block_size=block_size,
            layout=Layout(layout),
        )


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
            f"(layers, K/V, block_size, kv_heads, head_dim), got {list(blocks.shape)}"
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
