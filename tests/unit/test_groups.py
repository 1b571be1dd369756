"""The hit rule of a model with several KV cache groups: which blocks a resume needs of each kind
of group, and the longest prefix every group can resume at (against a brute-force oracle)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import fuzz_examples
from tiercache.groups import needed_blocks, usable_prefix
from tiercache.spec import KVSpec

BS = 16


def spec(kind: str = "full", **fields: Any) -> KVSpec:
    heads = 1 if kind == "mla" else 2
    return KVSpec(num_layers=1, num_kv_heads=heads, head_dim=8, block_size=BS, kind=kind, **fields)


def held(*sets: set[int]) -> Callable[[int, int], int]:
    """``run`` for groups holding exactly the given block indices."""

    def run(g: int, start: int) -> int:
        n = 0
        while start + n in sets[g]:
            n += 1
        return n

    return run


# --- needed blocks --------------------------------------------------------------------------


def test_full_and_mla_groups_need_every_block_below_the_prefix() -> None:
    assert needed_blocks(spec(), 5) == needed_blocks(spec("mla"), 5) == [range(0, 5)]
    assert needed_blocks(spec(), 0) == []


def test_a_sliding_group_needs_the_blocks_of_the_window_before_the_prefix() -> None:
    # 80 tokens, window 32: tokens [48, 80) are blocks 3 and 4
    assert needed_blocks(spec("sliding", window=32), 5) == [range(3, 5)]
    # window 40: tokens [40, 80) start inside block 2
    assert needed_blocks(spec("sliding", window=40), 5) == [range(2, 5)]
    # shorter than the window: every block
    assert needed_blocks(spec("sliding", window=4096), 5) == [range(0, 5)]


def test_sink_tokens_add_their_blocks_at_the_start() -> None:
    assert needed_blocks(spec("sliding", window=32, sinks=4), 5) == [range(0, 1), range(3, 5)]
    assert needed_blocks(spec("sliding", window=32, sinks=20), 5) == [range(0, 2), range(3, 5)]
    assert needed_blocks(spec("sliding", window=32, sinks=40), 5) == [range(0, 5)]


def test_a_chunked_group_needs_the_blocks_of_the_current_chunk_only() -> None:
    # 80 tokens, chunks of 32: the chunk [64, 96) has begun, tokens 64..79 are block 4
    assert needed_blocks(spec("chunked", window=32), 5) == [range(4, 5)]
    # 64 tokens end a chunk: the next token starts a new one and needs nothing before it
    assert needed_blocks(spec("chunked", window=32), 4) == []


# --- the longest usable prefix ----------------------------------------------------------------


def test_the_prefix_is_the_shortest_run_of_the_full_groups() -> None:
    specs = [spec(), spec("mla")]

    assert usable_prefix(specs, held(set(range(10)), set(range(7))), 10) == 7
    assert usable_prefix(specs, held(set(range(10)), set(range(12))), 10) == 10


def test_a_sliding_group_holding_only_its_last_window_resumes_at_its_end() -> None:
    specs = [spec(), spec("sliding", window=32)]

    assert usable_prefix(specs, held(set(range(10)), {8, 9}), 10) == 10
    # with a gap in the window the next candidates need blocks below 8, which are gone
    assert usable_prefix(specs, held(set(range(10)), {9}), 10) == 0


def test_a_gap_in_the_window_gives_a_shorter_prefix_where_older_blocks_are_kept() -> None:
    specs = [spec(), spec("sliding", window=32)]

    # block 8 is missing: prefixes 9 and 10 need it, prefix 8 needs blocks 6 and 7
    assert usable_prefix(specs, held(set(range(10)), {5, 6, 7, 9}), 10) == 8


def test_the_rule_asks_each_group_once_when_every_group_holds_its_blocks() -> None:
    specs = [spec(), spec("sliding", window=32), spec("sliding", window=32)]
    asked: list[tuple[int, int]] = []
    inner = held(set(range(10)), {8, 9}, {8, 9})

    def run(g: int, start: int) -> int:
        asked.append((g, start))
        return inner(g, start)

    assert usable_prefix(specs, run, 10) == 10
    assert asked == [(0, 0), (1, 8), (2, 8)]


def _needed(s: KVSpec, p: int) -> set[int]:
    """The blocks of the tokens a resume after ``p`` blocks attends to, from the definitions."""
    t = p * BS
    if s.kind == "sliding":
        tokens = set(range(max(0, t - s.window), t)) | set(range(min(s.sinks, t)))
    elif s.kind == "chunked":
        tokens = set(range(t // s.window * s.window, t))
    else:
        tokens = set(range(t))
    return {i // BS for i in tokens}


def _brute_force(specs: list[KVSpec], sets: list[set[int]], limit: int) -> int:
    for p in range(limit, 0, -1):
        if all(_needed(s, p) <= h for s, h in zip(specs, sets, strict=True)):
            return p
    return 0


kinds = st.one_of(
    st.just(spec()),
    st.just(spec("mla")),
    st.builds(
        lambda w, k: spec("sliding", window=w, sinks=k), st.integers(1, 70), st.integers(0, 40)
    ),
    st.builds(lambda w: spec("chunked", window=w), st.integers(1, 70)),
)


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(
    st.lists(st.tuples(kinds, st.sets(st.integers(0, 15))), min_size=1, max_size=4),
    st.integers(0, 16),
)
def test_the_prefix_is_the_longest_one_every_group_holds_its_needed_blocks_for(
    groups: list[tuple[KVSpec, set[int]]], limit: int
) -> None:
    specs, sets = [s for s, _ in groups], [h for _, h in groups]

    assert usable_prefix(specs, held(*sets), limit) == _brute_force(specs, sets, limit)


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(kinds, st.integers(0, 20))
def test_needed_blocks_are_the_blocks_of_the_tokens_the_layers_attend_to(s: KVSpec, p: int) -> None:
    ranges = needed_blocks(s, p)

    assert {b for r in ranges for b in r} == _needed(s, p)
    assert all(ranges)  # no empty range
    assert all(a.stop < b.start for a, b in pairwise(ranges))  # in order, apart
