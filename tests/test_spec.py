"""KVSpec sizing, dtype names, Hugging Face config reading, and size strings."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import llama3_70b_config
from tiercache.spec import (
    DTYPES,
    KVSpec,
    Layout,
    SpecError,
    dtype_name,
    format_size,
    parse_size,
)


def small_spec(**overrides: Any) -> KVSpec:
    kwargs: dict[str, Any] = {"num_layers": 3, "num_kv_heads": 2, "head_dim": 5}
    kwargs.update(overrides)
    return KVSpec(**kwargs)


class FakePretrainedConfig:
    """Stands in for transformers' PretrainedConfig: from_hf_config only calls to_dict()."""

    def __init__(self, d: dict[str, Any]) -> None:
        self._d = d

    def to_dict(self) -> dict[str, Any]:
        return dict(self._d)


# --- sizing ---------------------------------------------------------------------------------


def test_llama3_70b_is_327680_bytes_per_token() -> None:
    spec = KVSpec.from_hf_config(llama3_70b_config())

    assert spec == KVSpec(num_layers=80, num_kv_heads=8, head_dim=128, dtype="bfloat16")
    assert spec.bytes_per_token == 327_680


def test_llama3_70b_full_128k_context_is_42_9_gigabytes() -> None:
    spec = KVSpec.from_hf_config(llama3_70b_config())

    assert spec.bytes_for(131_072) == 42_949_672_960
    assert format_size(spec.bytes_for(131_072)) == "40.0 GiB"


def test_bytes_per_token_is_two_times_layers_heads_head_dim_element_bytes() -> None:
    spec = small_spec(dtype="float32")

    assert spec.bytes_per_token == 2 * 3 * 2 * 5 * 4 == 240


@pytest.mark.parametrize(
    ("dtype", "element_bytes"),
    [("float32", 4), ("bfloat16", 2), ("float16", 2), ("float8_e4m3fn", 1), ("int8", 1)],
)
def test_element_bytes_per_dtype(dtype: str, element_bytes: int) -> None:
    spec = small_spec(dtype=dtype)

    assert spec.element_bytes == element_bytes
    assert spec.torch_dtype.itemsize == element_bytes


def test_block_is_block_size_tokens_page_first() -> None:
    spec = small_spec(dtype="float16", block_size=7)

    assert spec.block_shape == (3, 2, 7, 2, 5)
    assert spec.block_nbytes == 7 * 2 * 3 * 2 * 5 * 2 == 840


def test_bytes_for_multiplies_by_batch() -> None:
    spec = small_spec(dtype="float32")

    assert spec.bytes_for(10, batch=3) == 240 * 10 * 3


@pytest.mark.parametrize(
    ("nbytes", "tokens"),
    [(0, 0), (3839, 0), (3840, 16), (3840 * 2 - 1, 16), (3840 * 5, 80)],
)
def test_tokens_in_counts_whole_blocks_only(nbytes: int, tokens: int) -> None:
    spec = small_spec(dtype="float32")  # 240 B per token, 3840 B per 16-token block

    assert spec.tokens_in(nbytes) == tokens


# --- construction and validation ------------------------------------------------------------


def test_defaults_are_bfloat16_sixteen_token_blocks_vllm_layout() -> None:
    spec = KVSpec(num_layers=1, num_kv_heads=1, head_dim=1)

    assert (spec.dtype, spec.block_size, spec.layout) == ("bfloat16", 16, Layout.VLLM)


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim", "block_size"])
@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4", None])
def test_dimension_that_is_not_a_positive_int_is_rejected(field: str, bad: object) -> None:
    with pytest.raises(SpecError, match=rf"^KVSpec\.{field} must be a positive integer, got "):
        small_spec(**{field: bad})


@pytest.mark.parametrize(
    ("given_dtype", "canonical"),
    [
        ("bf16", "bfloat16"),
        ("BF16", "bfloat16"),
        ("fp16", "float16"),
        ("half", "float16"),
        ("fp32", "float32"),
        ("float", "float32"),
        ("fp8", "float8_e4m3fn"),
        ("fp8_e4m3", "float8_e4m3fn"),
        ("float8", "float8_e4m3fn"),
        ("Float16", "float16"),
        ("int8", "int8"),
        (torch.bfloat16, "bfloat16"),
        (torch.float8_e4m3fn, "float8_e4m3fn"),
        (torch.int8, "int8"),
    ],
)
def test_dtype_aliases_and_torch_dtypes_resolve_to_canonical_name(
    given_dtype: str | torch.dtype, canonical: str
) -> None:
    assert dtype_name(given_dtype) == canonical
    assert small_spec(dtype=given_dtype).dtype == canonical


def test_every_canonical_dtype_name_maps_to_its_torch_dtype() -> None:
    for name, (torch_dtype, _) in DTYPES.items():
        assert dtype_name(name) == name
        assert dtype_name(torch_dtype) == name


def test_unsupported_dtype_name_is_rejected_with_supported_list() -> None:
    with pytest.raises(SpecError, match=r"^unsupported KV dtype 'float64'; supported: float32, "):
        dtype_name("float64")


def test_unsupported_torch_dtype_is_rejected() -> None:
    with pytest.raises(SpecError, match=r"^unsupported KV dtype torch\.float64; supported: "):
        dtype_name(torch.float64)


@pytest.mark.parametrize("layout", ["vllm", "flashinfer", "hf"])
def test_layout_accepts_its_string_name(layout: str) -> None:
    assert small_spec(layout=layout).layout is Layout(layout)


def test_unknown_layout_is_rejected() -> None:
    with pytest.raises(
        SpecError,
        match=r"^KVSpec\.layout must be one of vllm, flashinfer, hf, vllm-cpu, got 'sglang'$",
    ):
        small_spec(layout="sglang")


def test_specs_with_dtype_alias_are_equal() -> None:
    assert small_spec(dtype="bf16") == small_spec(dtype=torch.bfloat16) == small_spec()


def test_to_dict_is_plain_and_round_trips() -> None:
    spec = small_spec(dtype="fp8", block_size=7, layout="flashinfer")

    d = spec.to_dict()

    assert d == {
        "num_layers": 3,
        "num_kv_heads": 2,
        "head_dim": 5,
        "dtype": "float8_e4m3fn",
        "block_size": 7,
        "layout": "flashinfer",
    }
    assert type(d["layout"]) is str
    assert KVSpec.from_dict(d) == spec


def test_from_dict_rejects_unknown_fields_by_name() -> None:
    d = {**small_spec().to_dict(), "rope_theta": 1.0, "alpha": 2}

    with pytest.raises(SpecError, match=r"^unknown KVSpec field\(s\): alpha, rope_theta$"):
        KVSpec.from_dict(d)


# --- from_hf_config -------------------------------------------------------------------------


def test_gqa_kv_heads_come_from_num_key_value_heads() -> None:
    spec = KVSpec.from_hf_config(llama3_70b_config(num_key_value_heads=4))

    assert spec.num_kv_heads == 4
    assert spec.head_dim == 8192 // 64


def test_mqa_has_one_kv_head() -> None:
    spec = KVSpec.from_hf_config(llama3_70b_config(num_key_value_heads=1))

    assert spec.num_kv_heads == 1
    assert spec.bytes_per_token == 2 * 80 * 1 * 128 * 2


@pytest.mark.parametrize("absent", ["missing", None, 0])
def test_without_num_key_value_heads_every_attention_head_is_a_kv_head(absent: object) -> None:
    cfg = llama3_70b_config()
    if absent == "missing":
        del cfg["num_key_value_heads"]
    else:
        cfg["num_key_value_heads"] = absent

    assert KVSpec.from_hf_config(cfg).num_kv_heads == 64


def test_explicit_head_dim_wins_over_hidden_size_by_heads() -> None:
    # Mistral-Nemo-12B: hidden 5120 / 32 heads would be 160, the config says 128.
    cfg = {
        "hidden_size": 5120,
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "torch_dtype": "bfloat16",
    }

    spec = KVSpec.from_hf_config(cfg)

    assert spec.head_dim == 128
    assert spec.bytes_per_token == 2 * 40 * 8 * 128 * 2 == 163_840


def test_null_head_dim_falls_back_to_hidden_size_by_heads() -> None:
    assert KVSpec.from_hf_config(llama3_70b_config(head_dim=None)).head_dim == 128


def test_multimodal_config_is_read_through_text_config() -> None:
    cfg = {
        "architectures": ["LlavaForConditionalGeneration"],
        "torch_dtype": "float16",
        "vision_config": {"hidden_size": 1024, "num_attention_heads": 16},
        "text_config": {
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
        },
    }

    spec = KVSpec.from_hf_config(cfg)

    assert spec == KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16")


def test_text_config_values_win_over_top_level_values() -> None:
    cfg = {**llama3_70b_config(), "text_config": {"num_hidden_layers": 2}}

    assert KVSpec.from_hf_config(cfg).num_layers == 2


@pytest.mark.parametrize(
    ("dtype_fields", "expected"),
    [
        ({"torch_dtype": "float16"}, "float16"),
        ({"dtype": "float32"}, "float32"),  # the key newer transformers write
        ({"torch_dtype": "float16", "dtype": "float32"}, "float16"),
        ({}, "bfloat16"),
    ],
)
def test_dtype_comes_from_config(dtype_fields: dict[str, str], expected: str) -> None:
    cfg = llama3_70b_config()
    del cfg["torch_dtype"]
    cfg.update(dtype_fields)

    assert KVSpec.from_hf_config(cfg).dtype == expected


@pytest.mark.parametrize(
    ("override", "expected"),
    [("fp8", "float8_e4m3fn"), (torch.float16, "float16"), ("int8", "int8")],
)
def test_dtype_argument_overrides_config_dtype(override: str | torch.dtype, expected: str) -> None:
    spec = KVSpec.from_hf_config(llama3_70b_config(), dtype=override)

    assert spec.dtype == expected


def test_fp8_override_halves_llama3_70b_bytes_per_token() -> None:
    assert KVSpec.from_hf_config(llama3_70b_config(), dtype="fp8").bytes_per_token == 163_840


def test_block_size_and_layout_arguments_are_kept() -> None:
    spec = KVSpec.from_hf_config(llama3_70b_config(), block_size=32, layout="flashinfer")

    assert (spec.block_size, spec.layout) == (32, Layout.FLASHINFER)


def test_unsupported_config_dtype_is_rejected() -> None:
    with pytest.raises(SpecError, match=r"^unsupported KV dtype 'float64'"):
        KVSpec.from_hf_config(llama3_70b_config(torch_dtype="float64"))


def test_pretrained_config_object_is_read_through_to_dict() -> None:
    spec = KVSpec.from_hf_config(FakePretrainedConfig(llama3_70b_config()))

    assert spec.bytes_per_token == 327_680


def test_config_json_file_path_is_read(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(llama3_70b_config()))

    assert KVSpec.from_hf_config(path).bytes_per_token == 327_680
    assert KVSpec.from_hf_config(str(path)).bytes_per_token == 327_680


def test_model_directory_is_read_through_its_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(llama3_70b_config()))

    assert KVSpec.from_hf_config(tmp_path).bytes_per_token == 327_680


def test_missing_config_file_is_a_spec_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(
        SpecError, match=rf"^model config not found: {re.escape(str(tmp_path))}/config\.json$"
    ):
        KVSpec.from_hf_config(tmp_path)


def test_invalid_json_config_is_a_spec_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")

    with pytest.raises(
        SpecError, match=rf"^model config {re.escape(str(path))} is not valid JSON: "
    ):
        KVSpec.from_hf_config(path)


@pytest.mark.parametrize("key", ["num_hidden_layers", "num_attention_heads", "hidden_size"])
def test_config_missing_a_required_key_names_it(key: str) -> None:
    cfg = llama3_70b_config()
    del cfg[key]

    with pytest.raises(
        SpecError, match=rf"^model config has no '{key}'; is it a decoder LLM config\?$"
    ):
        KVSpec.from_hf_config(cfg)


def test_from_hf_config_does_not_modify_the_callers_dict() -> None:
    cfg = {**llama3_70b_config(), "text_config": {"num_hidden_layers": 2}}
    before = json.dumps(cfg, sort_keys=True)

    KVSpec.from_hf_config(cfg)

    assert json.dumps(cfg, sort_keys=True) == before


# --- parse_size / format_size ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("32GiB", 32 * 2**30),
        ("500 GB", 500 * 10**9),
        ("64KiB", 65_536),
        ("8gib", 8 * 2**30),
        ("1.5GiB", 1_610_612_736),
        ("2 TiB", 2 * 2**40),
        ("3TB", 3 * 10**12),
        ("7MiB", 7 * 2**20),
        ("7MB", 7_000_000),
        ("1KB", 1000),
        ("12B", 12),
        ("12", 12),
        ("  4 KiB  ", 4096),
        ("0", 0),
    ],
)
def test_parse_size_reads_decimal_and_binary_units(text: str, nbytes: int) -> None:
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("n", [0, 1, 4096, 2**45])
def test_parse_size_passes_integers_through(n: int) -> None:
    assert parse_size(n) == n


@pytest.mark.parametrize(
    "text", ["lots", "", "GiB", "32 GiBs", "32PB", "32 XB", "1.2.3GB", "--1GB"]
)
def test_parse_size_rejects_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match=r"^bad size "):
        parse_size(text)


def test_parse_size_error_lists_the_units() -> None:
    with pytest.raises(
        ValueError,
        match=r"^bad size 'lots': expected a number with a unit B, KB, MB, GB, TB, KiB, MiB, GiB or TiB$",
    ):
        parse_size("lots")


def test_parse_size_rejects_negative_integer() -> None:
    with pytest.raises(ValueError, match=r"^size must not be negative, got -1$"):
        parse_size(-1)


@pytest.mark.parametrize("value", [True, 1.5, None, [1]])
def test_parse_size_rejects_non_string_non_integer(value: object) -> None:
    with pytest.raises(
        ValueError, match=r"^size must be a string like '32GiB' or an integer, got "
    ):
        parse_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["-1GiB", "-5"])
def test_parse_size_rejects_negative_string(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text", ["1e400", "1e300TiB", "9" * 400])
def test_parse_size_rejects_overflowing_number_with_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_of_integer_string_is_exact() -> None:
    assert parse_size("9007199254740993") == 9_007_199_254_740_993


@given(st.integers(min_value=0, max_value=2**53))
def test_parse_size_reads_back_a_plain_integer_string(n: int) -> None:
    assert parse_size(str(n)) == n


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (44_040_192, "42.0 MiB"),
        (32 * 2**30, "32.0 GiB"),
        (2**40, "1.0 TiB"),
        (2**50, "1024.0 TiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_size_uses_binary_units(nbytes: int, text: str) -> None:
    assert format_size(nbytes) == text
