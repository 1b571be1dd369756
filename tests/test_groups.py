"""The hit rule of a model with several KV cache groups: which blocks a resume needs of each kind
of group, and the longest prefix every group can resume at (against a brute-force oracle)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.core.buffer.cpu import Buffer

from tests.conftest import embedded_config, flip_byte, fuzz_examples
from tiercache import SyncCache
from tiercache.client import Client
from tiercache.daemon.config import Config, load_config
from tiercache.daemon.process import DaemonProcess
from tiercache.groups import GroupedCache, needed_blocks, usable_prefix
from tiercache.keys import Namespace
from tiercache.modelkv import KVGroup, ModelKV
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


# ------------------------------------------------------------------------------------------------
# A model of several KV cache groups on a real embedded cache (host and disk tiers): reads from
# a first block, groups of one shape kept apart, the hit rule, the sliding window's retention,
# corruption in one group, and sessions that reach every group.
# ------------------------------------------------------------------------------------------------


CACHE_BS = 4
WINDOW = 10  # tokens: a resume after block p needs the sliding blocks from (4p - 10) // 4 on


def layer_spec(layers: int, **kind: object) -> KVSpec:
    return KVSpec(
        num_layers=layers, num_kv_heads=2, head_dim=4, dtype="float32", block_size=CACHE_BS, **kind
    )  # type: ignore[arg-type]


SLIDING = layer_spec(2, kind="sliding", window=WINDOW)
# Two sliding groups of one shape (as vLLM groups Gemma 3's layers) and a full group.
KV = ModelKV(
    (
        KVGroup("sliding-0", (0, 1), SLIDING),
        KVGroup("full", (2,), layer_spec(1)),
        KVGroup("sliding-1", (3, 4), SLIDING),
    )
)
TOKENS = list(range(1000, 1000 + 20 * CACHE_BS))  # 20 blocks


def value(group: KVGroup, block: int) -> float:
    """A block's fill: different in every group and block, so a mix-up shows."""
    return 1000.0 * group.layers[0] + block


def gather(group: KVGroup, ids: list[int]) -> torch.Tensor:
    return torch.stack([torch.full(group.spec.block_shape, value(group, i)) for i in ids])


def config(tmp_path: Path, write: str = "write-back") -> Config:
    return embedded_config(tmp_path, write, host="1MiB")


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[SyncCache]:
    with SyncCache(config(tmp_path)) as c:
        yield c


def stored(cache: SyncCache, ns: Namespace) -> list[int]:
    """Which blocks of TOKENS the cache holds in ``ns``."""
    keys = ns.block_keys(TOKENS)
    return [i for i, k in enumerate(keys) if k in cache.manager.index]


def loaded_values(got: object) -> dict[str, list[tuple[int, list[float]]]]:
    out: dict[str, list[tuple[int, list[float]]]] = {}
    for name, parts in got.groups.items():  # type: ignore[attr-defined]
        for r in parts:
            out.setdefault(name, []).append((r.first_block, r.kv()[:, 0, 0, 0, 0, 0].tolist()))
    return out


# --- reads from a first block ----------------------------------------------------------------


def test_lookup_and_load_start_at_first_block_and_stop_at_a_gap(cache: SyncCache) -> None:
    ns = Namespace("m", layer_spec(1))
    group = KVGroup("full", (0,), layer_spec(1))
    cache.save(ns, TOKENS[: 6 * CACHE_BS], gather(group, list(range(6))))
    cache.evict(keys=[ns.block_keys(TOKENS)[2]])

    assert cache.lookup(ns, TOKENS[: 6 * CACHE_BS]).blocks == 2
    hit = cache.lookup(ns, TOKENS[: 6 * CACHE_BS], first_block=3)
    assert (hit.blocks, hit.first_block, hit.tiers) == (3, 3, ["host"] * 3)
    got = cache.load(ns, TOKENS[: 6 * CACHE_BS], first_block=3, max_blocks=2)
    assert (got.first_block, got.kv()[:, 0, 0, 0, 0, 0].tolist()) == (3, [3.0, 4.0])
    with pytest.raises(ValueError, match=r"^first_block must be >= 0, got -1$"):
        cache.lookup(ns, TOKENS, first_block=-1)


# --- groups ----------------------------------------------------------------------------------


def test_groups_of_one_shape_have_namespaces_of_their_own_and_load_their_own_blocks(
    cache: SyncCache,
) -> None:
    gc = GroupedCache(cache, "model@1", KV)
    a, b = gc.namespaces["sliding-0"], gc.namespaces["sliding-1"]
    assert a.spec == b.spec and a.id != b.id
    gc.save(TOKENS[: 10 * CACHE_BS], gather)

    got = gc.load([*TOKENS[: 10 * CACHE_BS], 7, 7])

    assert got.blocks == 10
    assert loaded_values(got) == {
        "sliding-0": [(7, [7.0, 8.0, 9.0])],
        "full": [(0, [2000.0 + i for i in range(10)])],
        "sliding-1": [(7, [3007.0, 3008.0, 3009.0])],
    }


def test_a_one_group_model_keeps_the_namespace_it_had_without_groups(cache: SyncCache) -> None:
    gc = GroupedCache(cache, "model@1", ModelKV((KVGroup("full", (0,), layer_spec(1)),)), salt="t")

    assert gc.namespaces["full"] == Namespace("model@1", layer_spec(1), "t")


def test_the_group_with_the_largest_blocks_sizes_the_host_slots_whatever_comes_first(
    cache: SyncCache,
) -> None:
    # The full group (one layer) is listed first, but the first namespace the cache meets,
    # here in a load, must be the sliding one (two layers): else its blocks would not fit.
    small_first = ModelKV(
        (KVGroup("full", (0,), layer_spec(1)), KVGroup("sliding", (1, 2), SLIDING))
    )
    gc = GroupedCache(cache, "model@1", small_first)

    assert gc.load([*TOKENS, 5]).blocks == 0
    gc.save(TOKENS, gather)

    assert cache.manager.host.slot_bytes == SLIDING.block_nbytes == 2 * layer_spec(1).block_nbytes
    assert gc.lookup([*TOKENS, 5]) == 20


SINKS = ModelKV(
    (
        KVGroup("full", (0,), layer_spec(1)),
        KVGroup("sliding", (1, 2), layer_spec(2, kind="sliding", window=8, sinks=4)),
    )
)


def test_a_sliding_group_with_sink_tokens_loads_its_sinks_and_its_window(
    cache: SyncCache,
) -> None:
    gc = GroupedCache(cache, "model@1", SINKS)
    gc.save(TOKENS[: 6 * CACHE_BS], gather)

    got = gc.load([*TOKENS[: 6 * CACHE_BS], 5])

    # the sink block is read whole: it does not cut the prefix at its end
    assert got.blocks == gc.lookup([*TOKENS[: 6 * CACHE_BS], 5]) == 6
    assert loaded_values(got) == {
        "sliding": [(0, [1000.0]), (4, [1004.0, 1005.0])],
        "full": [(0, [float(i) for i in range(6)])],
    }


def test_a_sink_range_read_whole_does_not_cut_a_shorter_candidate_at_the_sinks(
    cache: SyncCache,
) -> None:
    gc = GroupedCache(cache, "model@1", SINKS)
    gc.save(TOKENS[: 3 * CACHE_BS], gather)  # sinks and window merge: sliding blocks 0-2
    gc.save(TOKENS[: 4 * CACHE_BS], gather)  # sliding blocks 0 and 2-3
    cache.evict(keys=[gc.namespaces["full"].block_keys(TOKENS)[3]])
    ids = [*TOKENS[: 4 * CACHE_BS], 5]

    got = gc.load(ids)

    # tried at 4 (the sink block 0 read alone), then at 3, which needs sliding blocks 0-2
    assert got.blocks == gc.lookup(ids) == 3
    assert loaded_values(got)["sliding"] == [(0, [1000.0, 1001.0, 1002.0])]


def test_a_session_keeps_the_full_groups_whole_and_the_sliding_groups_last_window(
    cache: SyncCache,
) -> None:
    gc = GroupedCache(cache, "model@1", KV)
    gc.save(TOKENS[: 10 * CACHE_BS], gather, session="chat")
    assert stored(cache, gc.namespaces["sliding-0"]) == [7, 8, 9]

    gc.save(TOKENS, gather, session="chat")

    assert needed_blocks(SLIDING, 20) == [range(17, 20)]
    for name in ("sliding-0", "sliding-1"):
        assert stored(cache, gc.namespaces[name]) == [17, 18, 19]  # 7-9 evicted
    assert stored(cache, gc.namespaces["full"]) == list(range(20))
    assert gc.lookup([*TOKENS, 1, 2, 3, 4, 5]) == 20
    # A resume at the first turn's end needs sliding blocks 7-9, which are gone: a miss,
    # recomputed, never the wrong window.
    assert gc.lookup([*TOKENS[: 10 * CACHE_BS], 5]) == 0
    assert gc.load([*TOKENS[: 10 * CACHE_BS], 5]).blocks == 0


def test_without_a_session_every_saved_window_stays(cache: SyncCache) -> None:
    gc = GroupedCache(cache, "model@1", KV)
    gc.save(TOKENS[: 10 * CACHE_BS], gather)
    gc.save(TOKENS, gather)

    assert stored(cache, gc.namespaces["sliding-1"]) == [7, 8, 9, 17, 18, 19]
    assert gc.lookup([*TOKENS[: 10 * CACHE_BS], 5]) == 10


def test_a_window_another_session_kept_stays_until_no_session_keeps_it(cache: SyncCache) -> None:
    # A chat forked after its first turn: both sessions' saves keep sliding blocks 7-9. The
    # first one to move on evicted them, and a resume of the fork there was a miss.
    gc = GroupedCache(cache, "model@1", KV)
    gc.save(TOKENS[: 10 * CACHE_BS], gather, session="chat")
    gc.save(TOKENS[: 10 * CACHE_BS], gather, session="fork")

    gc.save(TOKENS, gather, session="chat")

    assert stored(cache, gc.namespaces["sliding-0"]) == [7, 8, 9, 17, 18, 19]
    assert gc.lookup([*TOKENS[: 10 * CACHE_BS], 5]) == 10
    gc.save(TOKENS, gather, session="fork")  # the fork moves on: no session keeps 7-9
    for name in ("sliding-0", "sliding-1"):
        assert stored(cache, gc.namespaces[name]) == [17, 18, 19]


def test_blocks_already_stored_are_not_gathered_again(cache: SyncCache) -> None:
    gc = GroupedCache(cache, "model@1", KV)
    gc.save(TOKENS[: 10 * CACHE_BS], gather)
    asked: dict[str, list[int]] = {}

    def spy(group: KVGroup, ids: list[int]) -> torch.Tensor:
        asked[group.name] = ids
        return gather(group, ids)

    results = gc.save(TOKENS[: 12 * CACHE_BS], spy)

    assert asked == {"full": [10, 11], "sliding-0": [10, 11], "sliding-1": [10, 11]}
    assert (results["full"].stored, results["full"].present) == (2, 10)
    assert (results["sliding-0"].stored, results["sliding-0"].present) == (2, 1)  # 9 was there


def test_what_the_caller_cannot_gather_is_not_saved_and_the_hit_is_shorter(
    cache: SyncCache,
) -> None:
    gc = GroupedCache(cache, "model@1", KV)
    # An engine whose sliding layers dropped block 7's first tokens holds only blocks 8-9.
    held = {"sliding-0": range(8, 10), "sliding-1": range(8, 10)}
    gc.save(TOKENS[: 10 * CACHE_BS], gather, held=held)

    assert stored(cache, gc.namespaces["sliding-0"]) == [8, 9]
    assert gc.lookup([*TOKENS[: 10 * CACHE_BS], 5]) == 0  # block 7 is needed at 10, 7-8 at 9...


class Spy:
    """A BlockCache that counts the round trips a GroupedCache makes, by operation and group."""

    def __init__(self, cache: SyncCache, gc: GroupedCache) -> None:
        self.cache = cache
        self.group = {ns.hex: name for name, ns in gc.namespaces.items()}
        self.calls: list[tuple[str, str, int]] = []

    def lookup(self, ns: Namespace, tokens: Any, *, first_block: int = 0) -> Any:
        self.calls.append(("lookup", self.group[ns.hex], first_block))
        return self.cache.lookup(ns, tokens, first_block=first_block)

    def load(self, ns: Namespace, tokens: Any, **kw: Any) -> Any:
        self.calls.append(("load", self.group[ns.hex], kw["first_block"]))
        return self.cache.load(ns, tokens, **kw)

    def save(self, *args: Any, **kw: Any) -> Any:
        return self.cache.save(*args, **kw)

    def evict(self, **kw: Any) -> int:
        return self.cache.evict(**kw)


class FailingSave(Spy):
    """A BlockCache whose saves in one namespace fail (the daemon went away)."""

    def __init__(self, cache: SyncCache, gc: GroupedCache, group: str) -> None:
        super().__init__(cache, gc)
        self.failing = gc.namespaces[group]

    def save(self, ns: Namespace, *args: Any, **kw: Any) -> Any:
        if ns == self.failing:
            raise OSError("the daemon went away")
        return self.cache.save(ns, *args, **kw)


def test_a_session_save_that_fails_in_one_group_keeps_the_previous_window(
    cache: SyncCache,
) -> None:
    gc = GroupedCache(cache, "model@1", KV)
    gc.save(TOKENS[: 10 * CACHE_BS], gather, session="chat")
    gc.cache = FailingSave(cache, gc, "full")  # saved after both sliding groups

    with pytest.raises(OSError, match="the daemon went away"):
        gc.save(TOKENS, gather, session="chat")

    gc.cache = cache
    for name in ("sliding-0", "sliding-1"):
        assert stored(cache, gc.namespaces[name]) == [7, 8, 9, 17, 18, 19]
    assert gc.lookup([*TOKENS[: 10 * CACHE_BS], 5]) == 10  # the first turn's end still resumes
    gc.save(TOKENS, gather, session="chat")  # a whole save evicts both older windows
    assert stored(cache, gc.namespaces["sliding-0"]) == [17, 18, 19]


def test_a_session_save_not_admitted_keeps_the_previous_window() -> None:
    env = {"TIERCACHE_TIERS_DISK__URL": "none", "TIERCACHE_POLICY__ADMISSION": "2"}
    with SyncCache(load_config(env=env)) as cache:
        gc = GroupedCache(cache, "model@1", KV)
        for _ in range(2):  # stored on its second offer
            gc.save(TOKENS[: 10 * CACHE_BS], gather, session="chat")

        results = gc.save(TOKENS, gather, session="chat")

        assert results["sliding-0"].rejected == 3
        assert gc.lookup([*TOKENS[: 10 * CACHE_BS], 5]) == 10


def test_a_session_save_short_of_its_new_window_keeps_the_previous_window(
    cache: SyncCache,
) -> None:
    gc = GroupedCache(cache, "model@1", KV)
    gc.save(TOKENS[: 10 * CACHE_BS], gather, session="chat")
    # The window at 20 needs blocks 17-19; the caller holds 18-19 only.
    short = {"sliding-0": range(18, 20), "sliding-1": range(18, 20)}

    gc.save(TOKENS, gather, session="chat", held=short)

    assert gc.lookup([*TOKENS, 5]) == 10  # the new end cannot be resumed...
    assert stored(cache, gc.namespaces["sliding-0"]) == [7, 8, 9, 18, 19]  # ...the old one can


def test_a_resume_whose_blocks_are_all_there_is_one_load_per_group_and_no_lookup(
    cache: SyncCache,
) -> None:
    gc = GroupedCache(cache, "model@1", KV)
    gc.save(TOKENS, gather)
    gc.cache = spy = Spy(cache, gc)

    assert gc.load([*TOKENS, 5]).blocks == 20

    # largest blocks first (the first namespace a cache sees sizes its host slots)
    assert spy.calls == [("load", "sliding-0", 17), ("load", "sliding-1", 17), ("load", "full", 0)]


def test_a_prompt_longer_than_what_is_stored_reads_the_full_groups_once(cache: SyncCache) -> None:
    gc = GroupedCache(cache, "model@1", KV)
    gc.save(TOKENS[: 10 * CACHE_BS], gather)
    gc.cache = spy = Spy(cache, gc)

    got = gc.load([*TOKENS, 5])

    assert got.blocks == 10
    assert loaded_values(got)["full"] == [(0, [2000.0 + i for i in range(10)])]
    # tried at 20, the full group's run (10 blocks) is kept; the sliding windows at 10 are read
    assert [c for c in spy.calls if c[1] == "full"] == [("load", "full", 0)]
    assert ("lookup", "sliding-0", 7) in spy.calls and ("load", "sliding-0", 7) in spy.calls


# --- corruption ---------------------------------------------------------------------------


def corrupt(cache: SyncCache, ns: Namespace, block: int) -> None:
    """Flip a byte of a block's disk copy (the block is on disk only)."""
    m = cache.manager
    e = m.index.get(ns.block_keys(TOKENS)[block])
    assert e is not None and e.disk is not None and m.disk is not None and "host" not in e.at
    path, offset = m.disk.location(e.disk)
    flip_byte(path, offset + 10)


@pytest.mark.parametrize(
    ("group", "block", "prompt", "expected"),
    [
        # full block 15 rules out 16..20; 12..15 need sliding blocks 10..14, never saved
        ("full", 15, 20, 10),
        # sliding block 18 rules out 19 and 20; 18 needs 16, never saved; 10 needs 7..9
        ("sliding-1", 18, 20, 10),
        # the first window's block 7 guards the prefix of 10 blocks (and 8, 9: they need
        # blocks below 7, never saved), not the window of 20
        ("sliding-0", 7, 10, 0),
    ],
)
def test_a_corrupt_block_of_one_group_is_a_miss_for_every_prefix_it_guards(
    tmp_path: Path, group: str, block: int, prompt: int, expected: int
) -> None:
    with SyncCache(config(tmp_path, "write-through")) as first:
        gc = GroupedCache(first, "model@1", KV)
        gc.save(TOKENS[: 10 * CACHE_BS], gather)
        gc.save(TOKENS, gather)
    with SyncCache(config(tmp_path)) as cache:  # reopened: every block is on disk only
        gc = GroupedCache(cache, "model@1", KV)
        corrupt(cache, gc.namespaces[group], block)
        ids = [*TOKENS[: prompt * CACHE_BS], 5]
        assert gc.lookup(ids) == prompt  # the index does not know yet

        got = gc.load(ids)

        assert got.blocks == expected
        assert cache.manager.stats.corrupt_blocks == 1
        if expected:
            assert loaded_values(got) == {
                "sliding-0": [(7, [7.0, 8.0, 9.0])],
                "full": [(0, [2000.0 + i for i in range(expected)])],
                "sliding-1": [(7, [3007.0, 3008.0, 3009.0])],
            }
        assert gc.lookup(ids) == expected  # the bad copy is forgotten
        assert gc.load([*TOKENS, 5]).blocks == (20 if prompt == 10 else 10)


# --- sessions -------------------------------------------------------------------------------


def test_a_session_pins_evicts_and_prefetches_every_group_also_after_a_restart(
    tmp_path: Path,
) -> None:
    with SyncCache(config(tmp_path, "write-through")) as cache:
        gc = GroupedCache(cache, "model@1", KV)
        gc.save(TOKENS, gather, session="chat")
        assert cache.pin("chat") == 20 + 3 + 3
    with SyncCache(config(tmp_path)) as cache:
        gc = GroupedCache(cache, "model@1", KV)
        chains = cache.manager.sessions["chat"].chains
        assert set(chains) == {ns.hex for ns in gc.namespaces.values()}
        assert cache.manager.sessions.pinned_blocks() == 26
        assert cache.prefetch(session="chat") == 26  # the sliding groups' windows too
        assert cache.unpin("chat") == 26
        assert cache.evict(session="chat") == 26
        assert len(cache.manager.index) == 0


def test_a_pinned_chat_keeps_its_sliding_groups_last_window_only(cache: SyncCache) -> None:
    gc = GroupedCache(cache, "model@1", KV)
    gc.save(TOKENS[: 10 * CACHE_BS], gather, session="chat")
    assert cache.pin("chat") == 10 + 3 + 3

    gc.save(TOKENS, gather, session="chat")

    # the pin moved with the window: blocks 7-9 were let go of, and evicted
    for name in ("sliding-0", "sliding-1"):
        assert stored(cache, gc.namespaces[name]) == [17, 18, 19]
    assert cache.manager.sessions.pinned_blocks() == 20 + 3 + 3
    assert cache.evict(keys=gc.namespaces["sliding-0"].block_keys(TOKENS)[17:]) == 0


def test_a_window_that_moved_less_than_its_length_is_no_orphan_of_the_one_it_retired() -> None:
    # Under the prefix-aware policy a block whose parent leaves goes before anything else.
    env = {
        "TIERCACHE_TIERS_HOST__BYTES": str(40 * SLIDING.block_nbytes),
        "TIERCACHE_TIERS_DISK__URL": "none",
        "TIERCACHE_POLICY__EVICTION": "prefix",
    }
    with SyncCache(load_config(env=env)) as cache:
        other = KVGroup("other", (0, 1), layer_spec(2))
        older = list(range(22 * CACHE_BS))
        cache.save(Namespace("other", other.spec), older, gather(other, list(range(22))))
        gc = GroupedCache(cache, "model@1", KV)
        gc.save(TOKENS[: 10 * CACHE_BS], gather, session="chat")  # sliding 7-9
        gc.save(TOKENS[: 11 * CACHE_BS], gather, session="chat")  # sliding 8-10: 7 evicted

        newer = list(range(5000, 5000 + 4 * CACHE_BS))  # 4 more blocks: older ones must go
        cache.save(Namespace("more", other.spec), newer, gather(other, list(range(4))))

        assert stored(cache, gc.namespaces["sliding-0"]) == [8, 9, 10]
        assert gc.lookup([*TOKENS[: 11 * CACHE_BS], 5]) == 11


def test_after_a_restart_a_pin_still_protects_a_sliding_groups_window_only(
    tmp_path: Path,
) -> None:
    with SyncCache(config(tmp_path, "write-through")) as cache:
        GroupedCache(cache, "model@1", KV).save(TOKENS[: 10 * CACHE_BS], gather, session="chat")
        gc = GroupedCache(cache, "model@1", KV)  # another process: no previous save known
        gc.save(TOKENS, gather, session="chat")  # sliding blocks 7-9 are left over
        assert stored(cache, gc.namespaces["sliding-0"]) == [7, 8, 9, 17, 18, 19]
        assert cache.pin("chat") == 20 + 3 + 3
    with SyncCache(config(tmp_path)) as cache:
        gc = GroupedCache(cache, "model@1", KV)
        assert cache.manager.sessions.pinned_blocks() == 20 + 3 + 3
        for name in ("sliding-0", "sliding-1"):  # the leftovers are not pinned: they can go
            assert cache.evict(keys=gc.namespaces[name].block_keys(TOKENS)[7:10]) == 3
            assert cache.evict(keys=gc.namespaces[name].block_keys(TOKENS)[17:]) == 0


@pytest.mark.parametrize("model", ["leftover window", "sinks"])
def test_a_session_prefetch_reads_the_window_a_resume_needs(tmp_path: Path, model: str) -> None:
    kv = KV if model != "sinks" else SINKS
    with SyncCache(config(tmp_path, "write-through")) as cache:
        GroupedCache(cache, "model@1", kv).save(TOKENS[: 10 * CACHE_BS], gather, session="chat")
        # Another process (that remembers no previous save) saves the chat on: with a
        # window of 3 blocks, blocks 7-9 are left over and 17-19 are the window at 20.
        GroupedCache(cache, "model@1", kv).save(TOKENS, gather, session="chat")
    with SyncCache(config(tmp_path)) as cache:  # reopened: every block on disk only
        gc = GroupedCache(cache, "model@1", kv)
        cache.prefetch(session="chat")

        got = gc.load([*TOKENS, 5])

        needed = sum(len(r) for g in kv.groups for r in needed_blocks(g.spec, 20))
        assert got.blocks == 20 and got.per_tier == {"host": needed}


def test_a_daemon_serves_every_group_and_its_retention_across_a_restart(tmp_path: Path) -> None:
    env = {
        "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk"),
        "TIERCACHE_TIERS_HOST__BYTES": "1MiB",
    }
    with DaemonProcess(tmp_path, env) as daemon:
        with Client(daemon.socket) as client:
            gc = GroupedCache(client, "model@1", KV)
            gc.save(TOKENS[: 10 * CACHE_BS], gather, session="chat")
            gc.save(TOKENS, gather, session="chat")  # evicts blocks 7-9 of the sliding groups
            sliding = gc.namespaces["sliding-1"]
            assert client.lookup(sliding, TOKENS, first_block=7).blocks == 0
            assert client.lookup(sliding, TOKENS, first_block=17).blocks == 3
        daemon.stop()  # SIGTERM flushes: the next load comes from disk
        daemon.start()
        with Client(daemon.socket) as client:
            got = GroupedCache(client, "model@1", KV).load([*TOKENS, 5])
            assert got.blocks == 20 and got.per_tier == {"disk": 20 + 3 + 3}
            assert loaded_values(got)["sliding-1"] == [(17, [3017.0, 3018.0, 3019.0])]
            assert loaded_values(got)["full"] == [(0, [2000.0 + i for i in range(20)])]


def test_a_session_record_from_before_groups_is_read_as_one_chain(tmp_path: Path) -> None:
    ns = Namespace("m", layer_spec(1))
    keys = ns.block_keys(TOKENS[: 3 * CACHE_BS])
    with SyncCache(config(tmp_path)) as cache:
        cache.save(
            ns, TOKENS[: 3 * CACHE_BS], gather(KVGroup("full", (0,), layer_spec(1)), [0, 1, 2])
        )
        disk = cache.manager.disk
        assert disk is not None
        body = msgpack.packb({"id": "old", "keys": keys, "pinned": True, "expires": None})
        record = Buffer.from_bytes(body + xxhash.xxh64_digest(body))
        cache._run(disk.store.set(disk._session_key("old"), record))
    with SyncCache(config(tmp_path)) as cache:
        assert cache.manager.sessions["old"].chains == {"": keys}
        assert cache.manager.sessions.pinned_blocks() == 3
