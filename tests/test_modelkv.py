"""KV cache groups: the attention kinds of KVSpec, ModelKV read from Hugging Face configs of every
family, and the sizing of Gemma-3-27B, gpt-oss-120b and DeepSeek-V3 checked by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import llama3_70b_config
from tiercache.modelkv import KVGroup, ModelKV
from tiercache.spec import AttentionKind, KVSpec, Layout, SpecError

CONFIGS = Path(__file__).parent / "fixtures" / "model_configs"
FULL, SLIDING, CHUNKED, MLA = "full", "sliding", "chunked", "mla"
T8K = 8192


def spec(**overrides: Any) -> KVSpec:
    kwargs: dict[str, Any] = {"num_layers": 2, "num_kv_heads": 4, "head_dim": 8}
    return KVSpec(**(kwargs | overrides))


def kinds(model: ModelKV) -> list[tuple[str, str, int, tuple[int, ...]]]:
    return [(g.name, str(g.spec.kind), g.spec.window, g.layers) for g in model.groups]


# --- KVSpec kinds ---------------------------------------------------------------------------


def test_a_full_spec_serializes_without_the_new_fields() -> None:
    assert spec().to_dict() == {
        "num_layers": 2,
        "num_kv_heads": 4,
        "head_dim": 8,
        "dtype": "bfloat16",
        "block_size": 16,
        "layout": "vllm",
    }


def test_kind_window_and_sinks_serialize_and_round_trip() -> None:
    s = spec(kind="sliding", window=4096, sinks=4)

    d = s.to_dict()

    assert (d["kind"], d["window"], d["sinks"]) == ("sliding", 4096, 4)
    assert type(d["kind"]) is str
    assert KVSpec.from_dict(d) == s
    assert s.kind is AttentionKind.SLIDING


def test_mla_is_one_plane_of_the_latent() -> None:
    s = KVSpec(num_layers=61, num_kv_heads=1, head_dim=576, kind="mla")

    assert s.planes == 1
    assert s.block_shape == (61, 1, 16, 1, 576)
    assert s.bytes_per_token == 61 * 576 * 2 == 70_272
    assert s.block_nbytes == 16 * 70_272


def test_windowed_groups_hold_at_most_their_window() -> None:
    sliding = spec(kind="sliding", window=100, sinks=4, dtype="float32")
    chunked = spec(kind="chunked", window=64)

    assert sliding.bytes_per_token == 2 * 2 * 4 * 8 * 4 == 512
    assert [sliding.tokens_held(t) for t in (50, 104, 5000)] == [50, 104, 104]
    assert sliding.bytes_for(5000, batch=3) == 104 * 512 * 3
    assert chunked.tokens_held(5000) == 64
    assert spec().tokens_held(5000) == 5000


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "global"}, r"^KVSpec\.kind must be one of full, sliding, chunked, mla, got 'global'$"),
        ({"kind": "sliding"}, r"^KVSpec\.window must be > 0 for kind sliding \(the window in tokens\)$"),
        ({"kind": "chunked"}, r"^KVSpec\.window must be > 0 for kind chunked \(the chunk in tokens\)$"),
        ({"window": 4096}, r"^KVSpec\.window is for sliding and chunked groups; kind full needs window=0, got 4096$"),
        ({"kind": "sliding", "window": -1}, r"^KVSpec\.window must be a non-negative integer, got -1$"),
        ({"kind": "sliding", "window": 8, "sinks": 1.5}, r"^KVSpec\.sinks must be a non-negative integer, got 1\.5$"),
        ({"kind": "chunked", "window": 8, "sinks": 4}, r"^KVSpec\.sinks \(sink tokens kept at the start\) needs kind sliding, got kind chunked$"),
        ({"kind": "mla"}, r"^KVSpec\.num_kv_heads must be 1 for kind mla \(one latent vector per token: head_dim = kv_lora_rank \+ qk_rope_head_dim\), got 4$"),
        ({"kind": "mla", "num_kv_heads": 1, "window": 8}, r"^KVSpec\.window is for sliding and chunked groups; kind mla needs window=0"),
    ],
)  # fmt: skip
def test_impossible_kind_combinations_are_refused_naming_the_field(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        spec(**fields)


# --- ModelKV ------------------------------------------------------------------------------


def test_group_layer_count_must_match_its_spec() -> None:
    with pytest.raises(
        SpecError, match=r"^KVGroup 'full' lists 3 layers but its spec has num_layers=2$"
    ):
        KVGroup("full", (0, 1, 2), spec())


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ((), r"^a ModelKV needs at least one KV cache group$"),
        ((KVGroup("a", (0, 1), spec()), KVGroup("a", (2, 3), spec())), r"^KV cache group names must be unique, got \['a', 'a'\]$"),
        ((KVGroup("a", (0, 1), spec()), KVGroup("b", (1, 2), spec())), r"^a layer belongs to two KV cache groups$"),
        ((KVGroup("a", (0, 1), spec()), KVGroup("b", (2, 3), spec(block_size=8))), r"^every KV cache group needs the same block_size, got \[8, 16\]"),
    ],
)  # fmt: skip
def test_inconsistent_groups_are_refused(groups: tuple[KVGroup, ...], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        ModelKV(groups)


def test_a_dense_model_is_one_full_group_equal_to_its_kvspec() -> None:
    model = ModelKV.from_hf_config(llama3_70b_config(), block_size=32, layout="flashinfer")

    assert kinds(model) == [(FULL, FULL, 0, tuple(range(80)))]
    assert model.groups[0].spec == KVSpec(
        num_layers=80, num_kv_heads=8, head_dim=128, block_size=32, layout=Layout.FLASHINFER
    )
    assert (
        KVSpec.from_hf_config(llama3_70b_config())
        == ModelKV.from_hf_config(llama3_70b_config()).groups[0].spec
    )


def test_gemma3_without_a_pattern_gets_transformers_default_of_five_local_to_one_global() -> None:
    model = ModelKV.from_hf_config(CONFIGS / "gemma-3-27b-it.json")

    full_layers = tuple(range(5, 62, 6))
    assert kinds(model) == [
        (SLIDING, SLIDING, 1024, tuple(i for i in range(62) if i not in full_layers)),
        (FULL, FULL, 0, full_layers),
    ]
    assert len(full_layers) == 10


@pytest.mark.parametrize(
    ("text_config", "heads", "kv_heads"),
    [
        # google/gemma-3-12b-it, as published: no head_dim, which is not 3840 / 16 = 240
        ({"hidden_size": 3840, "num_attention_heads": 16, "num_hidden_layers": 48,
          "num_key_value_heads": 8}, 16, 8),
        # google/gemma-3-4b-it, as published: no heads either
        ({"hidden_size": 2560, "num_hidden_layers": 34}, 8, 4),
    ],
)  # fmt: skip
def test_gemma3_configs_that_leave_the_kv_shape_out_get_transformers_defaults(
    text_config: dict[str, Any], heads: int, kv_heads: int
) -> None:
    from transformers import Gemma3TextConfig

    text = {**text_config, "model_type": "gemma3_text", "sliding_window": 1024}
    model = ModelKV.from_hf_config({"model_type": "gemma3", "text_config": text})

    hf = Gemma3TextConfig(**{k: v for k, v in text.items() if k != "model_type"})
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (heads, kv_heads, 256)
    for g in model.groups:
        assert (g.spec.num_kv_heads, g.spec.head_dim) == (kv_heads, 256)


def test_gemma2_alternates_starting_with_a_sliding_layer() -> None:
    cfg = {**llama3_70b_config(num_hidden_layers=4), "model_type": "gemma2", "sliding_window": 4096}

    assert kinds(ModelKV.from_hf_config(cfg)) == [
        (SLIDING, SLIDING, 4096, (0, 2)),
        (FULL, FULL, 0, (1, 3)),
    ]


def test_an_explicit_sliding_window_pattern_wins_over_the_default() -> None:
    cfg = {
        **llama3_70b_config(num_hidden_layers=6),
        "model_type": "gemma3_text",
        "sliding_window": 512,
        "sliding_window_pattern": 3,
    }

    assert kinds(ModelKV.from_hf_config(cfg))[1] == (FULL, FULL, 0, (2, 5))


def test_gpt_oss_layer_types_alternate_sliding_and_full() -> None:
    model = ModelKV.from_hf_config(CONFIGS / "gpt-oss-120b.json")

    assert kinds(model) == [
        (SLIDING, SLIDING, 128, tuple(range(0, 36, 2))),
        (FULL, FULL, 0, tuple(range(1, 36, 2))),
    ]
    assert model.groups[0].spec.sinks == 0  # gpt-oss's sinks are learned logits, not tokens


def test_mistral_style_sliding_window_makes_every_layer_slide() -> None:
    model = ModelKV.from_hf_config(llama3_70b_config(num_hidden_layers=3, sliding_window=4096))

    assert kinds(model) == [(SLIDING, SLIDING, 4096, (0, 1, 2))]
    assert KVSpec.from_hf_config(llama3_70b_config(sliding_window=4096)).window == 4096


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"use_sliding_window": False, "sliding_window": 4096}, [(FULL, FULL, 0, (0, 1, 2, 3))]),
        (
            {"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 2},
            [(FULL, FULL, 0, (0, 1)), (SLIDING, SLIDING, 4096, (2, 3))],
        ),
    ],
)
def test_qwen2_slides_only_from_max_window_layers_and_only_when_enabled(
    extra: dict[str, Any], expected: list[Any]
) -> None:
    cfg = {**llama3_70b_config(num_hidden_layers=4), "model_type": "qwen2", **extra}

    assert kinds(ModelKV.from_hf_config(cfg)) == expected


def test_llama4_rope_layers_are_chunked_and_every_fourth_is_full() -> None:
    cfg = {
        **llama3_70b_config(num_hidden_layers=8),
        "attention_chunk_size": 8192,
        "no_rope_layers": [],
    }

    assert kinds(ModelKV.from_hf_config(cfg)) == [
        (CHUNKED, CHUNKED, 8192, (0, 1, 2, 4, 5, 6)),
        (FULL, FULL, 0, (3, 7)),
    ]


def test_llama4_no_rope_layer_interval_sets_which_layers_are_full() -> None:
    cfg = {
        **llama3_70b_config(num_hidden_layers=4),
        "attention_chunk_size": 8192,
        "no_rope_layer_interval": 2,
    }

    assert kinds(ModelKV.from_hf_config(cfg)) == [
        (CHUNKED, CHUNKED, 8192, (0, 2)),
        (FULL, FULL, 0, (1, 3)),
    ]


def test_layer_types_with_two_windows_name_their_groups_by_window() -> None:
    cfg = {
        **llama3_70b_config(num_hidden_layers=3),
        "sliding_window": 64,
        "attention_chunk_size": 32,
    }
    cfg["layer_types"] = ["sliding_attention", "chunked_attention", "full_attention"]

    assert [g.name for g in ModelKV.from_hf_config(cfg).groups] == [SLIDING, CHUNKED, FULL]


def test_layers_that_reuse_an_earlier_layers_kv_are_in_no_group() -> None:
    # gemma-3n-E2B's text config: 30 layers, four sliding to one full, the last 10 attend to the
    # KV of layers 18 (sliding) and 19 (full) and cache none of their own.
    cfg = {
        "model_type": "gemma3n_text", "num_hidden_layers": 30, "num_kv_shared_layers": 10,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
        "hidden_size": 2048, "sliding_window": 512,
        "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 6,
    }  # fmt: skip

    model = ModelKV.from_hf_config(cfg)

    assert kinds(model) == [
        (SLIDING, SLIDING, 512, tuple(i for i in range(20) if i % 5 != 4)),
        (FULL, FULL, 0, (4, 9, 14, 19)),
    ]
    assert model.bytes_per_token == 2 * 20 * 2 * 256 * 2
    with pytest.raises(SpecError, match=r"num_kv_shared_layers is 30, but num_hidden_layers is 30"):
        ModelKV.from_hf_config({**cfg, "num_kv_shared_layers": 30})


@pytest.mark.parametrize(
    ("model_type", "full"),
    [
        ("gemma3n_text", (4,)),  # four sliding to one full
        ("gemma4_text", (5, 6)),  # five to one, and the last layer is full
    ],
)
def test_gemma3n_and_4_without_layer_types_get_transformers_default_patterns(
    model_type: str, full: tuple[int, ...]
) -> None:
    cfg = {
        "model_type": model_type, "num_hidden_layers": 7, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 256, "global_head_dim": 256, "hidden_size": 2048,
        "sliding_window": 512,
    }  # fmt: skip

    assert kinds(ModelKV.from_hf_config(cfg)) == [
        (SLIDING, SLIDING, 512, tuple(i for i in range(7) if i not in full)),
        (FULL, FULL, 0, full),
    ]


GEMMA4_TEXT = {
    "model_type": "gemma4_text", "num_hidden_layers": 12, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 256, "hidden_size": 4096, "sliding_window": 1024,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 2,
}  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "full_heads", "full_head_dim"),
    [
        ({}, 8, 512),  # transformers' default global_head_dim
        ({"global_head_dim": 384, "num_global_key_value_heads": 2}, 8, 384),  # K != V: heads kept
        ({"global_head_dim": 384, "num_global_key_value_heads": 2, "attention_k_eq_v": True}, 2, 384),
        ({"per_layer_config": {"5": {"head_dim": 128}, "11": {"head_dim": 128}}}, 8, 128),
    ],
)  # fmt: skip
def test_gemma4_full_layers_have_a_kv_shape_of_their_own(
    fields: dict[str, Any], full_heads: int, full_head_dim: int
) -> None:
    sliding, full = ModelKV.from_hf_config({**GEMMA4_TEXT, **fields}).groups

    assert (sliding.name, sliding.layers, sliding.spec.num_kv_heads, sliding.spec.head_dim) == (
        SLIDING, (0, 1, 2, 3, 4, 6, 7, 8, 9, 10), 8, 256,
    )  # fmt: skip
    assert (full.name, full.layers, full.spec.num_kv_heads, full.spec.head_dim) == (
        FULL, (5, 11), full_heads, full_head_dim,
    )  # fmt: skip


def test_layers_of_one_kind_with_another_window_or_shape_are_groups_of_their_own() -> None:
    cfg = {
        **llama3_70b_config(num_hidden_layers=4), "sliding_window": 64,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
        "per_layer_config": {1: {"sliding_window": 128}, 3: {"num_key_value_heads": 2}},
    }  # fmt: skip

    model = ModelKV.from_hf_config(cfg)

    assert [(g.name, g.layers, g.spec.window, g.spec.num_kv_heads) for g in model.groups] == [
        ("sliding-64", (0,), 64, 8), ("sliding-128", (1,), 128, 8),
        ("full-0-8x128", (2,), 0, 8), ("full-0-2x128", (3,), 0, 2),
    ]  # fmt: skip
    with pytest.raises(SpecError, match="per_layer_config must map layer indices"):
        ModelKV.from_hf_config({**cfg, "per_layer_config": {"last": {"head_dim": 64}}})


def test_deepseek_v3_is_one_mla_group_of_the_576_value_latent() -> None:
    model = ModelKV.from_hf_config(CONFIGS / "deepseek-v3.json")

    (group,) = model.groups
    assert (group.name, group.layers) == (MLA, tuple(range(61)))
    assert group.spec == KVSpec(num_layers=61, num_kv_heads=1, head_dim=576, kind="mla")


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"layer_types": ["full_attention", "linear_attention"]}, r"^layer 1 of the model is a 'linear_attention' layer: tiercache stores the per-token KV of attention layers"),
        ({"layer_types": ["full_attention"]}, r"^model config's layer_types lists 1 layers, but num_hidden_layers is 2$"),
        ({"layer_types": ["sliding_attention"] * 2}, r"^model config has sliding attention layers but no 'sliding_window'$"),
        ({"kv_lora_rank": 512}, r"^model config has no 'qk_rope_head_dim'; is it a decoder LLM config\?$"),
        # Kimi Linear (MLA and KDA layers), as transformers writes it and as its config.json does
        ({"kv_lora_rank": 512, "qk_rope_head_dim": 64, "layer_types": ["linear_attention", "full_attention"]}, r"^layer 0 of the model is a 'linear_attention' layer"),
        ({"kv_lora_rank": 512, "qk_rope_head_dim": 64, "linear_attn_config": {"kda_layers": [1], "full_attn_layers": [2]}}, r"^layer 0 of the model is a 'linear_attention' layer"),
        # a Qwen3-Next / Qwen3.5 config.json: three linear layers to one full
        ({"full_attention_interval": 2}, r"^layer 0 of the model is a 'linear_attention' layer"),
        # Mamba hybrids, as their config.json files give the layers: Jamba, Bamba, Nemotron-H,
        # and layers_block_type (Bamba and Nemotron-H as transformers writes them); LFM2's convs
        ({"attn_layer_period": 2, "attn_layer_offset": 1}, r"^layer 0 of the model is a 'linear_attention' layer"),
        ({"attn_layer_indices": [1]}, r"^layer 0 of the model is a 'linear_attention' layer"),
        ({"hybrid_override_pattern": "M*"}, r"^layer 0 of the model is a 'linear_attention' layer"),
        ({"layers_block_type": ["attention", "mamba"]}, r"^layer 1 of the model is a 'linear_attention' layer"),
        ({"full_attn_idxs": [1]}, r"^layer 0 of the model is a 'conv' layer"),
        ({"attention_chunk_size": 64, "no_rope_layers": [1, 1, 0]}, r"^model config's no_rope_layers lists 3 layers, but num_hidden_layers is 2$"),
    ],
)  # fmt: skip
def test_configs_tiercache_cannot_store_are_refused_naming_why(
    cfg: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        ModelKV.from_hf_config({**llama3_70b_config(num_hidden_layers=2), **cfg})


@pytest.mark.parametrize(
    "fields",
    [
        {"layers_block_type": ["attention", "attention"]},
        {"attn_layer_period": 1, "attn_layer_offset": 0},
        {"attn_layer_indices": [0, 1]},
        {"full_attn_idxs": [0, 1]},
    ],
)
def test_hybrid_family_fields_naming_only_attention_layers_are_one_full_group(
    fields: dict[str, Any],
) -> None:
    model = ModelKV.from_hf_config({**llama3_70b_config(num_hidden_layers=2), **fields})

    assert kinds(model) == [(FULL, FULL, 0, (0, 1))]


def test_deepseek_v32_indexed_layers_cache_the_mla_latent() -> None:
    cfg = {
        "num_hidden_layers": 2, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
        "layer_types": ["indexed_attention"] * 2,
    }  # fmt: skip

    assert kinds(ModelKV.from_hf_config(cfg)) == [(MLA, MLA, 0, (0, 1))]


def test_kvspec_from_hf_config_points_a_hybrid_model_to_modelkv() -> None:
    with pytest.raises(
        SpecError,
        match=r"^this model's KV is 2 KV cache groups \(sliding: 18 layers, window 128 tokens; "
        r"full: 18 layers, full attention\), not one KVSpec: use tiercache\.modelkv\.ModelKV",
    ):
        KVSpec.from_hf_config(CONFIGS / "gpt-oss-120b.json")


# --- sizing, by hand ----------------------------------------------------------------------


def test_gemma3_27b_at_8k_tokens() -> None:
    model = ModelKV.from_hf_config(CONFIGS / "gemma-3-27b-it.json")
    sliding, full = (g.spec for g in model.groups)

    # K and V x layers x 16 KV heads x head dim 128 x 2 bytes (bfloat16)
    assert sliding.bytes_per_token == 2 * 52 * 16 * 128 * 2 == 425_984
    assert full.bytes_per_token == 2 * 10 * 16 * 128 * 2 == 81_920
    # the sliding layers hold their 1,024-token window, the global ones all 8,192 tokens
    assert sliding.bytes_for(T8K) == 1024 * 425_984 == 436_207_616
    assert full.bytes_for(T8K) == T8K * 81_920 == 671_088_640
    assert model.bytes_for(T8K) == 1_107_296_256
    # against 62 layers all holding 8,192 tokens: 0.27x
    assert 62 * 16 * 128 * 2 * 2 * T8K == 4_160_749_568


def test_gpt_oss_120b_at_8k_tokens() -> None:
    model = ModelKV.from_hf_config(CONFIGS / "gpt-oss-120b.json")
    sliding, full = (g.spec for g in model.groups)

    assert sliding.bytes_per_token == full.bytes_per_token == 2 * 18 * 8 * 64 * 2 == 36_864
    assert sliding.bytes_for(T8K) == 128 * 36_864 == 4_718_592
    assert full.bytes_for(T8K) == T8K * 36_864 == 301_989_888
    assert model.bytes_for(T8K) == 306_708_480


def test_deepseek_v3_at_8k_tokens() -> None:
    model = ModelKV.from_hf_config(CONFIGS / "deepseek-v3.json")

    # one latent of kv_lora_rank 512 + rope 64 values per token and layer, 2 bytes each
    assert model.bytes_per_token == 61 * (512 + 64) * 2 == 70_272
    assert model.bytes_for(T8K) == T8K * 70_272 == 575_668_224
    # decompressed K (128 heads x 192) and V (128 heads x 128) would be 71x that
    assert 61 * 128 * (192 + 128) * 2 == 4_997_120


def test_tokens_in_fills_the_bytes_left_after_the_windows() -> None:
    model = ModelKV.from_hf_config(CONFIGS / "gemma-3-27b-it.json")

    # 1 GiB less the sliding layers' full window, in whole 16-token blocks of the global layers
    assert model.tokens_in(2**30) == (2**30 - 436_207_616) // (16 * 81_920) * 16 == 7776
    assert ModelKV.from_hf_config(llama3_70b_config()).tokens_in(2**30) == (
        KVSpec.from_hf_config(llama3_70b_config()).tokens_in(2**30)
    )


def test_an_all_sliding_model_whose_window_fits_holds_any_length() -> None:
    model = ModelKV.from_hf_config(llama3_70b_config(sliding_window=4096))

    assert model.tokens_in(2**40) is None
    assert model.tokens_in(2**20) == 0
