"""``tiercache bench resume`` (resume against recompute) runs end to end and reuses every prefix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.runs import writes_json_and_png
from tiercache.daemon.cli import main


@pytest.mark.parametrize(("name", "keys"), [("resume", {"prefixes", "model", "machine"})])
def test_benchmark_writes_json_and_png(tmp_path: Path, name: str, keys: set[str]) -> None:
    writes_json_and_png(tmp_path, name, keys)


def test_resume_benchmark_reuses_the_whole_prefix(tmp_path: Path) -> None:
    assert main(["bench", "resume", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "resume.json").read_text())["prefixes"]
    assert all(r["reused_tokens"] == r["prefix_tokens"] for r in rows)
