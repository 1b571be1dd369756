"""``tiercache bench vllm --quick`` runs its engines end to end and writes JSON and PNG.

It asserts what the benchmark measured, never how fast: every variant gave the
recompute's first token, and the cached variants really loaded the prefix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiercache.bench.vllm_resume import QUICK_PREFIXES
from tiercache.daemon.cli import main

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_the_vllm_benchmark_loads_the_prefix_and_writes_json_and_png(tmp_path: Path) -> None:
    assert main(["bench", "vllm", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "vllm.json").read_text())
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
    png = (tmp_path / "vllm.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
