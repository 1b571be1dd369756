"""``tiercache bench quant``: quantized storage formats against exact, at tiny sizes. No timings
are asserted; what is asserted is what the comparison rests on (more blocks in the same bytes,
never a lower LRU hit ratio for it, a resume served from disk in every format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.services.seaweedfs import options
from tiercache.bench.quant import (
    FORMATS,
    host_throughput,
    report,
    tier_resume,
    trace_at_equal_bytes,
)
from tiercache.bench.seaweedfs import SeaweedFS
from tiercache.manager import TierManager

QUANTIZED = [f for f in FORMATS if f != "exact"]


def test_formats_are_exact_and_the_quantized_ones() -> None:
    assert FORMATS[0] == "exact"
    assert QUANTIZED


def test_at_equal_bytes_a_quantized_format_holds_more_blocks_and_hits_at_least_as_often() -> None:
    got = trace_at_equal_bytes(200, (0.05, 0.2))
    assert got["requests"] == 200 and got["working_set_blocks"] > 0
    small, large = got["points"]
    for point in got["points"]:
        exact = point["exact"]
        for fmt in QUANTIZED:
            assert point[fmt]["host_blocks"] > exact["host_blocks"]
            assert point[fmt]["hit_ratio"] >= exact["hit_ratio"]  # LRU's inclusion property
    for fmt in FORMATS:
        assert large[fmt]["hit_ratio"] >= small[fmt]["hit_ratio"]


def test_host_and_disk_comparisons_cover_every_format(tmp_path: Path) -> None:
    host = host_throughput(2, 1)
    assert host["blocks"] == 2
    for fmt in FORMATS:
        assert set(host[fmt]) == {"save_vs_raw", "load_vs_raw", "save_vs_exact", "load_vs_exact"}
        assert all(r["ratio"] > 0 for r in host[fmt].values())
    disk = tier_resume(64, 1, tmp_path)  # raises unless every resume is served from disk
    assert disk["blocks"] == 4 and disk["tier"] == "disk" and disk["page_cache"] == "warm"
    assert set(disk) >= set(QUANTIZED) and "exact" not in disk
    assert set(disk["vs_raw"]) == set(FORMATS)
    assert all(r[op]["ratio"] > 0 for r in disk["vs_raw"].values() for op in ("save", "resume"))

    text = report(
        {
            "blocks_per_gib": {"tiny": {f: 1000.0 for f in FORMATS}},
            "trace": trace_at_equal_bytes(50, (0.1,)),
            "host": host,
            "disk_resume": disk,
        }
    )
    assert "blocks per GiB:" in text
    assert "trace (50 requests)" in text
    assert all(f"  {fmt}: " in text for fmt in QUANTIZED)
    assert "disk resume of 64 tokens" in text
    assert all(f"    {fmt}: save " in text for fmt in FORMATS)


def test_a_resume_that_restores_nothing_fails_the_benchmark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The raw read fills the engine's buffer with the exact bytes, and nothing compared the
    # buffer with the blocks: a resume that wrote elsewhere was timed and reported.
    load = TierManager.load

    async def load_elsewhere(self: TierManager, ns: Any, tokens: Any, **kw: Any) -> Any:
        return await load(self, ns, tokens, **{**kw, "into": torch.empty_like(kw["into"])})

    monkeypatch.setattr(TierManager, "load", load_elsewhere)
    with pytest.raises(RuntimeError, match="resume from disk restored different values"):
        tier_resume(64, 1, tmp_path)


@pytest.mark.service
def test_a_shared_tier_resume_is_served_from_the_store_in_every_format(
    tmp_path: Path, seaweedfs: SeaweedFS, remote_url: str
) -> None:
    """Each resume is a node that never saw the blocks (raises unless all come from remote)."""
    shared = tier_resume(64, 1, tmp_path, remote=(remote_url, options(seaweedfs)))

    assert shared["blocks"] == 4 and shared["tier"] == "remote" and "page_cache" not in shared
    assert "vs_raw" not in shared
    assert set(shared) >= set(QUANTIZED) and "exact" not in shared
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk"]  # nodes removed
    with pytest.raises(ValueError, match="cold drops the disk tier's page cache"):
        tier_resume(64, 1, tmp_path, cold=True, remote=(remote_url, options(seaweedfs)))
    shared["store"] = "SeaweedFS"
    text = report(
        {
            "blocks_per_gib": {},
            "trace": {"requests": 0, "points": []},
            "host": {"blocks": 0, "block_bytes": 0, **{f: _ratios() for f in FORMATS}},
            "remote_resume": shared,
        }
    )
    assert "remote resume of 64 tokens, SeaweedFS (exact time / quantized time):" in text


def _ratios() -> dict[str, dict[str, float]]:
    names = ("save_vs_raw", "load_vs_raw", "save_vs_exact", "load_vs_exact")
    return {k: {"ratio": 1.0} for k in names}
