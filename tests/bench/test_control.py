"""``tiercache bench control`` (control-plane latency) runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.runs import writes_json_and_png
from tiercache.daemon.cli import main


@pytest.mark.slow
@pytest.mark.parametrize(("name", "keys"), [("control", {"rows", "embedded_p50_s", "machine"})])
def test_benchmark_writes_json_and_png(tmp_path: Path, name: str, keys: set[str]) -> None:
    writes_json_and_png(tmp_path, name, keys)


@pytest.mark.slow
def test_every_measured_save_stores_a_new_block(tmp_path: Path) -> None:
    # Workers of a later concurrency once reused an earlier one's tokens: a quarter of the
    # saves at 4 and 16 clients found their block held and stored nothing.
    assert main(["bench", "control", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "control.json").read_text())["rows"]
    saves = [r for r in rows if r["op"] == "save+load"]
    assert [r["blocks_stored"] for r in saves] == [r["n"] for r in saves]
