"""``tiercache bench vllm --quick`` runs its engines end to end and writes JSON and PNG.

It asserts what the benchmark measured, never how fast: every variant gave the
recompute's first token, and the cached variants really loaded the prefix. One run of the
benchmark serves every test here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tiercache.bench.vllm_families import FAMILIES, QUICK_PREFIX
from tiercache.bench.vllm_resume import QUICK_PREFIXES
from tiercache.daemon.cli import main

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench-vllm")
    assert main(["bench", "vllm", "--quick", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def result(out: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / "vllm.json").read_text())
    return loaded


def test_the_vllm_benchmark_loads_the_prefix_and_writes_json_and_png(
    out: Path, result: dict[str, Any]
) -> None:
    (row,) = result["prefixes"]
    assert row["prefix_tokens"] == QUICK_PREFIXES[0]
    assert row["same_first_token"] and row["chat_same_first_token"]
    # tiercache loads all of the prompt but its last token (2 whole blocks and the 44-token
    # tail); ExampleConnector loads its (300 - 1) // 128 = 2 whole blocks.
    assert row["tiercache_loaded_tokens"] == 299
    assert row["example_loaded_tokens"] == 256
    # A chat's next turn: tiercache loads turn 1 (its prompt, and the reply but its last
    # token, whose KV turn 1 never computed). ExampleConnector's key is a hash of a prompt's
    # whole blocks before its last token: turn 2 (348 tokens) has turn 1's 2 blocks there.
    assert row["chat_tiercache_loaded_tokens"] == 300 + result["reply_tokens"] - 1
    assert row["chat_example_loaded_tokens"] == 256
    # The prompt arriving while another decodes, from the disk tier: loaded before its step
    # with async_load "never", in the background with "auto"; all of it but the last token.
    bg = result["background_load"]
    for mode, background in (("never", False), ("auto", True)):
        assert bg[mode]["loaded_async"] is background
        assert bg[mode]["arriving_loaded_tokens"] == 299
        assert bg[mode]["same_first_token"]
        assert bg[mode]["decode_longest_gap_s"] >= bg[mode]["decode_median_gap_s"] > 0
    (pair,) = result["throughput"]["pairs"]
    assert pair["plain_tokens_per_s"] > 0 and pair["tiercache_tokens_per_s"] > 0
    png = (out / "vllm.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_each_family_resumes_its_prompt_from_host_and_disk_as_recompute_does(
    result: dict[str, Any],
) -> None:
    fam = result["families"]
    rows = {r["family"]: r for r in fam["rows"]}
    assert list(rows) == list(FAMILIES)
    assert fam["prefix_tokens"] == QUICK_PREFIX == 641
    for name in ("llama", "mistral", "gemma3", "gpt_oss"):
        r = rows[name]
        assert r["refused"] is None, name
        # Both hits: the prompt's 5 whole blocks, all of it but its last token.
        assert r["prefix_cache_cached_tokens"] == r["tiercache_loaded_tokens"] == 640, name
        assert r["same_first_token"], name
        for key in (
            "recompute_s",
            "prefix_cache_hit_s",
            "tiercache_host_s",
            "tiercache_disk_pushed_s",
            "tiercache_disk_s",
        ):
            assert r[key] > 0, (name, key)
        # Pushed out of the host tier while the daemon ran: each such resume read the
        # prompt's stored blocks from the disk tier (the daemon's disk->host bytes).
        assert r["disk_pushed_bytes"] == [r["bytes_resumed"]], name
        assert r["host_vs_prefix_cache"] == r["tiercache_host_s"] / r["prefix_cache_hit_s"]
        assert r["host_target_met"] == (r["host_vs_prefix_cache"] <= 1.5)
        assert r["disk_target_met"] == (r["disk_vs_prefix_cache"] <= 2.0)
        # Beside them: the floor plus a plain memcpy / cold read of the bytes the resume moved.
        assert r["raw"]["bytes"] == r["bytes_resumed"] > 0, name
        assert r["host_bound_s"] == r["prefix_cache_hit_s"] + r["raw"]["copy_s"]
        assert r["disk_bound_s"] == r["prefix_cache_hit_s"] + r["raw"]["cold_read_s"]
    # The sliding groups stored only the blocks of the window before the prompt's last
    # whole block (blocks 3 and 4 of a 256-token window), the full ones every whole block.
    kinds = {(g["kind"], tuple(g["stored_blocks"])) for g in rows["gemma3"]["groups"]}
    assert kinds == {("sliding", (3, 5)), ("full", (0, 5))}
    # The bytes those blocks hold, the raw bounds' size: per layer and token K and V x 2 KV
    # heads x head dim (32 Llama, 64 Gemma 3) x bf16; Gemma 3's 5 sliding layers hold 2 blocks.
    assert rows["llama"]["bytes_resumed"] == 4 * 640 * 2 * 2 * 32 * 2
    assert rows["gemma3"]["bytes_resumed"] == (5 * 256 + 640) * 2 * 2 * 64 * 2
    assert result["families"]["targets"]["gemma3_bytes_vs_all_full<=0.35"]


def test_an_mla_familys_row_says_why_the_connector_refused_it(result: dict[str, Any]) -> None:
    (row,) = [r for r in result["families"]["rows"] if r["family"] == "deepseek_v3"]
    assert row["refused"].startswith("TierCacheConnector cannot resume MLA on this CPU engine")
    assert row["bytes"]["real_model"] == "deepseek-v3"
