"""``tiercache bench resume`` (resume against recompute) runs end to end and reuses every prefix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.bench.runs import writes_json_and_png
from tiercache.bench.resume import bench_prefix
from tiercache.daemon.cli import main
from tiercache.demo_models import tiny_model
from tiercache.integrations.hf import HFChatCache


@pytest.mark.parametrize(("name", "keys"), [("resume", {"prefixes", "model", "machine"})])
def test_benchmark_writes_json_and_png(tmp_path: Path, name: str, keys: set[str]) -> None:
    writes_json_and_png(tmp_path, name, keys)


def test_resume_benchmark_reuses_the_whole_prefix(tmp_path: Path) -> None:
    assert main(["bench", "resume", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "resume.json").read_text())["prefixes"]
    assert all(r["reused_tokens"] == r["prefix_tokens"] for r in rows)


def test_a_resume_that_restores_other_values_fails_the_benchmark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing compared the restored cache with the saved one: a restore of wrong keys and
    # values was timed and reported as a speedup like any other.
    restore = HFChatCache.restore

    def restore_wrong(self: HFChatCache, session: str, tokens: Any) -> tuple[Any, int]:
        past, n = restore(self, session, tokens)
        past.layers[0].values.add_(1)
        return past, n

    monkeypatch.setattr(HFChatCache, "restore", restore_wrong)
    with pytest.raises(RuntimeError, match="the resume from host restored other keys and values"):
        bench_prefix(tiny_model("llama", seed=0), 64, 1, tmp_path)
