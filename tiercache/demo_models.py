"""Small real transformers models with seeded random weights, for the demo, tests and benchmarks.

No model hub is needed: a config is built here and the weights are drawn from
a seeded generator. ``initializer_range`` is raised above the usual 0.02 so
that the next-token distribution is sharp and depends on the whole prompt:
near-uniform logits (like vLLM's ``load_format="dummy"``) would make any
output-equality test pass even with garbage KV.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "qwen2")


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    """A small decoder config with GQA (8 query heads, 2 KV heads by default)."""
    common: dict[str, Any] = dict(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def tiny_model(
    arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> Any:
    """The model for ``tiny_config(arch, **overrides)`` with weights drawn from ``seed``, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call,unused-ignore]
    return model.eval()


def save_tiny(
    path: str | Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    **overrides: Any,
) -> Path:
    """``tiny_model(...)`` saved with ``save_pretrained`` as a model directory an engine such as
    vLLM loads (no tokenizer: engines run on token ids)."""
    path = Path(path)
    model = tiny_model(arch, seed, dtype, **overrides)
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(path)
    return path
