"""The trace replay: the real cache driven by Mooncake's conversation trace.

The ceiling comes from the trace alone (a set of seen block ids); the replays
go through ``open_cache``. Exact hit counts, no timings.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import pytest

from tests.bench.runs import writes_json_and_png
from tiercache.bench.trace import Prompt, ceiling, load_trace, main, replay, working_set
from tiercache.daemon import cli

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


@pytest.mark.parametrize(
    ("eviction", "disk"),
    [("lru", False), ("arc", False), ("prefix", False), ("lru", True), ("prefix", True)],
)
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
        # The prefix policy has no history yet after five requests: it evicts as LRU does.
        ("prefix", 1, [0, 2, 0, 0, 0]),
    ],
)
async def test_a_scan_evicts_the_reused_prefix_under_lru_only(
    eviction: str, admission: int, hits: list[int]
) -> None:
    r = await replay(SCAN, 4, eviction=eviction, admission=admission)
    assert r.hits == hits


# The engine holds 2 blocks, tiercache 3: block 1 is used, then served by the engine (request
# 2), then pushed out of the engine by 6 and 7 while tiercache makes room for 7.
ENGINE: list[Prompt] = [(1,), (5,), (1,), (6,), (7,), (1,)]


@pytest.mark.parametrize("eviction", ["lru", "arc", "prefix"])
@pytest.mark.parametrize(("touch", "hits"), [(True, [0, 0, 0, 0, 0, 1]), (False, [0] * 6)])
async def test_blocks_the_engine_served_stay_in_tiercache_only_if_touched(
    eviction: str, touch: bool, hits: list[int]
) -> None:
    r = await replay(ENGINE, 3, eviction=eviction, engine_blocks=2, touch=touch)

    assert r.engine_hits == [0, 0, 1, 0, 0, 0]
    # Untouched, block 1 is tiercache's least recent when 7 needs room; touched, 5 is.
    assert r.hits == hits


def write_trace(path: Path, prompts: list[Prompt]) -> None:
    path.write_text(
        "".join(
            json.dumps({"timestamp": i, "input_length": 512 * len(p) - 100, "output_length": 10,
                        "hash_ids": list(p)}) + "\n"
            for i, p in enumerate(prompts)
        )
    )  # fmt: skip


def test_bench_trace_replays_any_mooncake_format_trace(tmp_path: Path) -> None:
    write_trace(tmp_path / "scan.jsonl", SCAN)
    args = ["--trace", str(tmp_path / "scan.jsonl"), "--capacities", "0.67", "--out", str(tmp_path)]

    assert main([*args, "--policies", "lru,arc,prefix"]) == 0

    result = json.loads((tmp_path / "trace.json").read_text())
    assert result["ceiling"] == 4 / 10
    assert [(r["policy"], r["capacity"], r["hit_ratio"]) for r in result["results"]] == [
        ("lru", 0.67, 2 / 10),
        ("arc", 0.67, 4 / 10),
        ("prefix", 0.67, 2 / 10),
    ]
    # Each hit block saves 512 tokens, the last block of a prompt what is left of it.
    assert [r["tokens_saved"] for r in result["results"]] == [924, 1848, 924]
    assert (tmp_path / "trace.png").read_bytes().startswith(b"\x89PNG")
    assert [sw["name"] for sw in result["sweeps"]] == [
        "policies",
        "admission and disk",
        "engine prefix cache in front",
    ]


def test_bench_trace_main_only_replays_the_host_sweep_alone(tmp_path: Path) -> None:
    write_trace(tmp_path / "scan.jsonl", SCAN)
    args = ["--trace", str(tmp_path / "scan.jsonl"), "--capacities", "0.67", "--out", str(tmp_path)]

    assert cli.main(["bench", "trace", *args, "--policies", "lru,prefix", "--main-only"]) == 0

    result = json.loads((tmp_path / "trace.json").read_text())
    assert [sw["name"] for sw in result["sweeps"]] == ["policies"]
    assert [(r["policy"], r["hit_ratio"]) for r in result["results"]] == [
        ("lru", 2 / 10),
        ("prefix", 2 / 10),
    ]


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("t.jsonl", b"\xbd\xff not text\n"),
        ("t.jsonl.xz", b"not xz at all\n"),
        ("t.jsonl.xz", lzma.compress(b'{"hash_ids": [1], "input_length": 9}\n' * 50)[:40]),
    ],
)
def test_bench_trace_refuses_a_file_that_is_not_jsonl_text_in_one_line(
    tmp_path: Path, name: str, data: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    # A binary file or a broken .xz ended in UnicodeDecodeError, LZMAError or EOFError.
    (tmp_path / name).write_bytes(data)
    with pytest.raises(SystemExit) as e:
        main(["--trace", str(tmp_path / name), "--main-only", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert f"{name}: not a JSONL text file (or .xz of one)" in capsys.readouterr().err


def test_bench_trace_quick_keeps_the_capacities_asked_for(tmp_path: Path) -> None:
    # --quick replaced any --capacities with its own two (0.05 and 0.2), silently.
    write_trace(tmp_path / "scan.jsonl", SCAN)
    args = ["--trace", str(tmp_path / "scan.jsonl"), "--out", str(tmp_path), "--main-only"]

    assert main([*args, "--quick", "--capacities", "0.67", "--policies", "lru"]) == 0
    result = json.loads((tmp_path / "trace.json").read_text())
    assert [(r["capacity"], r["hit_ratio"]) for r in result["results"]] == [(0.67, 2 / 10)]
    assert main([*args, "--quick", "--policies", "lru"]) == 0
    result = json.loads((tmp_path / "trace.json").read_text())
    assert [r["capacity"] for r in result["results"]] == [0.05, 0.2]


def test_main_only_is_refused_for_another_benchmark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", "storage", "--main-only", "--out", str(tmp_path)]) == 2
    assert "--main-only are for `bench trace`, not storage" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--capacities=0,0.5", "capacities are fractions of the working set in (0, 1]"),
        ("--policies=lru,fifo", "unknown eviction policy 'fifo'; choose from lru, arc, prefix"),
    ],
)
def test_bench_trace_rejects_bad_flags_by_name(
    flag: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([flag])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"hash_ids": [1], "input_length": 9}\nnot json\n',
            "t.jsonl:2: not a Mooncake trace line",
        ),
        ("", "t.jsonl: no request with a block id, nothing to replay"),
        ('{"hash_ids": [], "input_length": 0}\n', "no request with a block id"),
        ('{"hash_ids": [4294967296], "input_length": 9}\n', "t.jsonl:1: block ids must be in"),
        ('{"hash_ids": [-1], "input_length": 9}\n', "t.jsonl:1: block ids must be in"),
    ],
)
def test_bench_trace_refuses_a_trace_it_cannot_replay_in_one_line(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # These ended in a traceback: a ValueError from the reader, the host tier's "budget must
    # be positive" for a trace with no blocks, numpy's OverflowError for an id past uint32.
    (tmp_path / "t.jsonl").write_text(text)
    args = ["bench", "trace", "--trace", str(tmp_path / "t.jsonl"), "--main-only"]
    with pytest.raises(SystemExit) as e:
        cli.main([*args, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "keys"), [("trace", {"sweeps", "machine"})])
def test_benchmark_writes_json_and_png(tmp_path: Path, name: str, keys: set[str]) -> None:
    writes_json_and_png(tmp_path, name, keys)
