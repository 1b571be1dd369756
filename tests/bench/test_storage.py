"""``tiercache bench storage`` (the tiers against memcpy and plain file I/O) runs end to end, and
the disk layout study behind the disk tier still reproduces its record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.bench.runs import writes_json_and_png
from tiercache.bench import storage
from tiercache.manager import TierManager
from tiercache.tiers.disk import DiskTier


@pytest.mark.parametrize(("name", "keys"), [("storage", {"host", "disk", "machine"})])
def test_benchmark_writes_json_and_png(tmp_path: Path, name: str, keys: set[str]) -> None:
    writes_json_and_png(tmp_path, name, keys)


@pytest.mark.slow
def test_the_disk_layout_study_still_runs_from_scripts(tmp_path: Path) -> None:
    # The finished study lives outside the package; it must keep reproducing its record.
    script = Path(__file__).resolve().parents[2] / "scripts" / "disk_layout_study.py"
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], check=True)
    result = json.loads((tmp_path / "disk_layout.json").read_text())
    assert {"io", "codecs", "meta"} <= set(result)
    assert (tmp_path / "disk_layout.png").read_bytes().startswith(b"\x89PNG")


def test_the_read_checks_catch_a_tier_that_reads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The baselines copy the same bytes into the same tensor, so a check made after the last
    # rep passed even when tiercache's read never wrote it. Here the tiers read into a
    # scratch tensor instead of the caller's: each benchmark must fail, not report a ratio.
    load, get_many = TierManager.load, DiskTier.get_many

    async def load_elsewhere(self: TierManager, ns: Any, tokens: Any, **kw: Any) -> Any:
        return await load(self, ns, tokens, **{**kw, "out": torch.empty_like(kw["out"])})

    async def read_elsewhere(self: DiskTier, records: Any, outs: Any) -> Any:
        return await get_many(self, records, [torch.empty_like(o) for o in outs])

    monkeypatch.setattr(TierManager, "load", load_elsewhere)
    monkeypatch.setattr(DiskTier, "get_many", read_elsewhere)
    with pytest.raises(AssertionError, match="host tier loaded different bytes"):
        storage.bench_host(2**16, 2**18, reps=3)
    with pytest.raises(AssertionError, match="disk tier read back different bytes"):
        storage.bench_disk(2**16, 2**18, reps=3, workdir=tmp_path)
