"""The trace replay: the real cache driven by Mooncake's conversation trace.

The ceiling comes from the trace alone (a set of seen block ids); the replays
go through ``open_cache``. Exact hit counts, no timings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiercache.bench.trace import Prompt, ceiling, load_trace, replay, working_set

SLICE = 500


@pytest.fixture(scope="module")
def whole() -> list[Prompt]:
    return load_trace()


@pytest.fixture(scope="module")
def prompts(whole: list[Prompt]) -> list[Prompt]:
    return whole[:SLICE]


def test_the_shipped_trace_has_the_published_ceiling(whole: list[Prompt]) -> None:
    assert len(whole) == 12_031
    assert sum(len(p) for p in whole) == 288_500
    assert sum(ceiling(whole)) == 105_710  # 36.6% of the prompt blocks


async def test_an_unbounded_replay_of_the_whole_trace_hits_exactly_the_ceiling(
    whole: list[Prompt],
) -> None:
    r = await replay(whole, working_set(whole))
    assert r.hits == ceiling(whole)  # request by request
    assert (r.hit_blocks, r.blocks) == (105_710, 288_500)
    assert r.per_tier == {"host": 105_710}


@pytest.mark.parametrize(("eviction", "disk"), [("lru", False), ("arc", False), ("lru", True)])
async def test_a_bounded_replay_never_hits_more_than_the_ceiling(
    prompts: list[Prompt], eviction: str, disk: bool, tmp_path: Path
) -> None:
    ws = working_set(prompts)
    host = ws // 100 if disk else ws // 20
    r = await replay(
        prompts[:200] if disk else prompts,
        host,
        eviction=eviction,
        disk_blocks=ws // 20 - host if disk else 0,
        disk_dir=tmp_path,
    )
    ceil = ceiling(prompts[: len(r.hits)])
    assert all(0 <= h <= c for h, c in zip(r.hits, ceil, strict=True))
    assert 0 < r.hit_blocks < sum(ceil)


# A prefix used twice, then two one-off prompts that together fill the 4-block cache.
SCAN: list[Prompt] = [(1, 2), (1, 2), (10, 11), (20, 21), (1, 2)]


def test_the_scan_trace_has_two_reuses() -> None:
    assert ceiling(SCAN) == [0, 2, 0, 0, 2]


@pytest.mark.parametrize(
    ("eviction", "admission", "hits"),
    [
        # LRU evicts the reused prefix, the oldest, to make room for the second one-off prompt.
        ("lru", 1, [0, 2, 0, 0, 0]),
        # ARC evicts the first one-off prompt (seen once) and keeps the prefix (seen twice).
        ("arc", 1, [0, 2, 0, 0, 2]),
        # Admission on the second offer keeps the one-off prompts out; the prefix is stored
        # on its second request, so its first reuse is lost.
        ("lru", 2, [0, 0, 0, 0, 2]),
    ],
)
async def test_a_scan_evicts_the_reused_prefix_under_lru_only(
    eviction: str, admission: int, hits: list[int]
) -> None:
    r = await replay(SCAN, 4, eviction=eviction, admission=admission)
    assert r.hits == hits
