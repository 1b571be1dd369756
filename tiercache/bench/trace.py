"""Trace replay: block hit ratio against tier capacity, per eviction policy, against the ceiling.

The trace is Mooncake's conversation trace (``data/``, Apache-2.0): 12,031
requests in arrival order, each prompt a chain of 512-token block ids. Every
request goes through the real cache (``open_cache``, the manager the daemon
serves) as an engine would drive it: ``lookup`` the prompt, ``load`` the cached
prefix, ``save`` the whole prompt after prefill. A hit is a block of the cached
prefix that lookup reports, so the hit ratio (hit blocks / prompt blocks) is
the share of prefill the cache saves.

Each block id becomes one block of a one-token-per-block KVSpec whose token
*is* the id: tiercache's own chained keys then reproduce the trace's prefix
structure exactly (equal id prefixes <=> equal keys). A block is 4 bytes (the
id itself, checked on every load), so a replay of the whole trace takes
seconds, and capacities are counted in blocks: fractions of the working set
(the trace's unique blocks).

The ceiling is computed from the trace alone, with a set of the ids seen so
far and no tiercache: per request, how many leading blocks appeared in earlier
requests. The replay with room for the whole working set must equal it,
request by request, or the run fails. A simulator of the policies beside the
product was rejected: it would measure the simulator, not tiercache.
"""

from __future__ import annotations

import asyncio
import json
import lzma
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiercache.bench.common import cli, write
from tiercache.daemon.config import (
    Config,
    DiskTierConfig,
    HostTierConfig,
    PolicyConfig,
    TiersConfig,
)
from tiercache.embedded import open_cache
from tiercache.keys import KeyChain, Namespace
from tiercache.spec import KVSpec

TRACE = Path(__file__).parent / "data" / "mooncake_conversation_trace.jsonl.xz"
TRACE_BLOCK_TOKENS = 512  # tokens behind one of the trace's block ids

# One token per block (the trace's block id); 2 x 1 layer x 1 head x 2 dims x 1 byte = 4 bytes,
# exactly the id as little-endian uint32.
SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=2, dtype="int8", block_size=1)
NS = Namespace("mooncake-conversation-trace", SPEC)

HOST_WITH_DISK = 0.01  # the host tier of a host+disk replay, as a fraction of the working set

Prompt = tuple[int, ...]  # a request's block ids


def load_trace(path: Path = TRACE, limit: int | None = None) -> list[Prompt]:
    """The prompts of the trace, in arrival order (the first ``limit`` of them)."""
    prompts: list[Prompt] = []
    with lzma.open(path, "rt") as f:
        for line in f:
            if limit is not None and len(prompts) == limit:
                break
            prompts.append(tuple(json.loads(line)["hash_ids"]))
    return prompts


def ceiling(prompts: Sequence[Prompt]) -> list[int]:
    """Per request, the leading blocks an unbounded cache holds: those seen in earlier requests."""
    seen: set[int] = set()
    hits: list[int] = []
    for ids in prompts:
        n = 0
        while n < len(ids) and ids[n] in seen:
            n += 1
        hits.append(n)
        seen.update(ids)
    return hits


def working_set(prompts: Sequence[Prompt]) -> int:
    return len({b for ids in prompts for b in ids})


@dataclass(frozen=True, slots=True)
class Variant:
    """One line of the plot: an eviction policy, an admission threshold, host or host+disk."""

    eviction: str
    admission: int = 1
    disk: bool = False

    @property
    def label(self) -> str:
        tiers = "host+disk" if self.disk else "host"
        admit = f", admission {self.admission}" if self.admission > 1 else ""
        return f"{self.eviction.upper()}, {tiers}{admit}"


LRU, ARC = Variant("lru"), Variant("arc")
ALL_VARIANTS = (
    LRU,
    ARC,
    Variant("lru", admission=2),
    Variant("arc", admission=2),
    Variant("lru", disk=True),
    Variant("arc", disk=True),
)


@dataclass(frozen=True, slots=True)
class Sweep:
    """Variants x capacities over the first ``requests`` requests (None: all of them)."""

    requests: int | None
    variants: tuple[Variant, ...]
    capacities: tuple[float, ...]  # fractions of the working set


# The whole trace for the two policies; the first 1,000 requests (330 s of arrivals) for
# admission and host+disk too. Replay cost grows with capacity x requests on the whole
# trace (picking an eviction victim copies the policy's order, O(blocks held)), and
# several times faster again with a disk tier, beyond this machine's budget.
SWEEPS = (
    Sweep(None, (LRU, ARC), (0.01, 0.02, 0.05, 0.1, 0.2, 1.0)),
    Sweep(1000, ALL_VARIANTS, (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)),
)
QUICK_SWEEPS = (Sweep(300, ALL_VARIANTS, (0.05, 0.2, 1.0)),)


@dataclass(slots=True)
class Replay:
    hits: list[int] = field(default_factory=list)  # per request: blocks of the cached prefix
    blocks: int = 0  # prompt blocks replayed
    per_tier: dict[str, int] = field(default_factory=dict)  # hit blocks by the tier lookup named

    @property
    def hit_blocks(self) -> int:
        return sum(self.hits)

    @property
    def ratio(self) -> float:
        return self.hit_blocks / self.blocks if self.blocks else 0.0


def _config(
    host_blocks: int, disk_blocks: int, disk_dir: Path | None, eviction: str, admission: int
) -> Config:
    disk = None
    if disk_blocks:
        if disk_dir is None:
            raise ValueError("a replay with a disk tier needs disk_dir")
        disk = DiskTierConfig(url=f"file://{disk_dir}", bytes=disk_blocks * SPEC.block_nbytes)
    return Config(
        tiers=TiersConfig(
            host=HostTierConfig(
                bytes=host_blocks * SPEC.block_nbytes, slot_bytes=SPEC.block_nbytes
            ),
            disk=disk,
        ),
        policy=PolicyConfig(eviction=eviction, write="write-back", admission=admission),
    )


async def replay(
    prompts: Sequence[Prompt],
    host_blocks: int,
    *,
    eviction: str = "lru",
    admission: int = 1,
    disk_blocks: int = 0,
    disk_dir: Path | None = None,
) -> Replay:
    """Drive the cache with ``prompts`` as an engine would; count each request's prefix hits."""
    cache = await open_cache(_config(host_blocks, disk_blocks, disk_dir, eviction, admission))
    result = Replay()
    try:
        for ids in prompts:
            raw = np.asarray(ids, dtype="<u4")
            keys = KeyChain(NS.block_keys(raw))  # hashed once, as a connector does
            hit = await cache.lookup(NS, keys)
            if hit.blocks:
                loaded = await cache.load(NS, keys, max_blocks=hit.blocks)
                expected = torch.from_numpy(raw[: hit.blocks].view(np.uint8).reshape(-1, 4))
                if loaded.blocks != hit.blocks or not torch.equal(loaded.data, expected):
                    raise RuntimeError(
                        f"load served {loaded.blocks} blocks, not the {hit.blocks} blocks "
                        "lookup reported (or not their bytes)"
                    )
            await cache.save(NS, keys, torch.from_numpy(raw.view(np.uint8).reshape(-1, 4)))
            result.hits.append(hit.blocks)
            result.blocks += len(ids)
            for tier in hit.tiers:
                result.per_tier[tier] = result.per_tier.get(tier, 0) + 1
    finally:
        await cache.close(flush=False)
    return result


async def sweep(sw: Sweep, workdir: Path) -> dict[str, Any]:
    """Replay ``sw``'s slice of the trace at each capacity for each variant."""
    prompts = load_trace(limit=sw.requests)
    ws = working_set(prompts)
    ceil = ceiling(prompts)
    blocks = sum(len(p) for p in prompts)
    unbounded = await replay(prompts, ws)
    if unbounded.hits != ceil:
        first = next(i for i, (a, b) in enumerate(zip(unbounded.hits, ceil, strict=True)) if a != b)
        raise RuntimeError(
            f"the unbounded replay differs from the trace's ceiling at request {first}: "
            f"{unbounded.hits[first]} hit blocks, not {ceil[first]}"
        )
    host_with_disk = max(1, round(HOST_WITH_DISK * ws))
    series: list[dict[str, Any]] = []
    for v in sw.variants:
        points: list[dict[str, Any]] = []
        for frac in sw.capacities:
            capacity = max(1, round(frac * ws))
            host, disk = (host_with_disk, capacity - host_with_disk) if v.disk else (capacity, 0)
            if v.disk and disk <= 0:
                continue
            disk_dir = workdir / f"disk-{v.eviction}-{capacity}"
            r = await replay(
                prompts,
                host,
                eviction=v.eviction,
                admission=v.admission,
                disk_blocks=disk,
                disk_dir=disk_dir,
            )
            shutil.rmtree(disk_dir, ignore_errors=True)
            points.append(
                {
                    "capacity_fraction": frac,
                    "capacity_blocks": capacity,
                    "host_blocks": host,
                    "disk_blocks": disk,
                    "hit_blocks": r.hit_blocks,
                    "per_tier": r.per_tier,
                    "ratio": r.ratio,
                    "of_ceiling": r.hit_blocks / sum(ceil) if sum(ceil) else 0.0,
                }
            )
        series.append(
            {
                "label": v.label,
                "eviction": v.eviction,
                "admission": v.admission,
                "tiers": "host+disk" if v.disk else "host",
                "points": points,
            }
        )
    return {
        "trace": {
            "source": "kvcache-ai/Mooncake FAST25-release/traces/conversation_trace.jsonl (Apache-2.0)",
            "requests": len(prompts),
            "sample": "all requests" if sw.requests is None else f"first {sw.requests} requests",
            "prompt_blocks": blocks,
            "working_set_blocks": ws,
            "block_tokens": TRACE_BLOCK_TOKENS,
        },
        "ceiling": {"hit_blocks": sum(ceil), "ratio": sum(ceil) / blocks},
        "unbounded_replay": {"hit_blocks": unbounded.hit_blocks, "ratio": unbounded.ratio},
        "host_with_disk_blocks": host_with_disk,
        "series": series,
    }


def plot(result: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = result["sweeps"]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(7.5 * len(sweeps), 5), squeeze=False)
    for ax, sw in zip(axes[0], sweeps, strict=True):
        for s in sw["series"]:
            xs = [100 * p["capacity_fraction"] for p in s["points"]]
            ys = [100 * p["ratio"] for p in s["points"]]
            style = "--" if s["admission"] > 1 else (":" if s["tiers"] == "host+disk" else "-")
            ax.plot(xs, ys, style, marker="o", markersize=3, label=s["label"])
        ceil = 100 * sw["ceiling"]["ratio"]
        ax.axhline(ceil, color="black", linewidth=1)
        ax.annotate(f"unbounded ceiling {ceil:.1f}%", (xs[0], ceil), xytext=(0, 4),
                    textcoords="offset points", fontsize=8)  # fmt: skip
        ax.set_xscale("log")
        fracs = sorted({p["capacity_fraction"] for s in sw["series"] for p in s["points"]})
        ax.set_xticks([100 * f for f in fracs], [f"{100 * f:g}%" for f in fracs])
        ax.minorticks_off()
        trace = sw["trace"]
        label = f"capacity, % of the working set ({trace['working_set_blocks']:,} blocks)"
        if any(s["tiers"] == "host+disk" for s in sw["series"]):
            label += f"\nhost+disk: host {sw['host_with_disk_blocks']:,} blocks, disk the rest"
        ax.set_xlabel(label)
        ax.set_ylabel("prefix hit ratio, % of prompt blocks")
        ax.set_ylim(0, ceil * 1.15)
        ax.set_title(f"{trace['sample']} ({trace['requests']:,})", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Mooncake conversation trace replayed through tiercache: hit ratio vs capacity")
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-trace-"))

    async def go() -> list[dict[str, Any]]:
        return [await sweep(sw, workdir) for sw in (QUICK_SWEEPS if quick else SWEEPS)]

    try:
        result = {"sweeps": asyncio.run(go())}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write(out, "trace", result, plot(result))
    return result


def report(result: dict[str, Any]) -> str:
    lines: list[str] = []
    for sw in result["sweeps"]:
        t = sw["trace"]
        lines += [
            f"{t['sample']}: {t['requests']:,} requests, {t['prompt_blocks']:,} prompt blocks, "
            f"working set {t['working_set_blocks']:,} blocks; ceiling "
            f"{100 * sw['ceiling']['ratio']:.1f}%, unbounded replay "
            f"{100 * sw['unbounded_replay']['ratio']:.1f}%",
            f"{'capacity':>9} " + " ".join(f"{s['label']:>24}" for s in sw["series"]),
        ]
        fracs = sorted({p["capacity_fraction"] for s in sw["series"] for p in s["points"]})
        for f in fracs:
            cells = []
            for s in sw["series"]:
                p = next((p for p in s["points"] if p["capacity_fraction"] == f), None)
                cell = "-" if p is None else f"{100 * p['ratio']:.1f}%"
                cells.append(f"{cell:>24}")
            lines.append(f"{100 * f:>8.0f}% " + " ".join(cells))
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv: Sequence[str] | None = None) -> int:
    return cli(__doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
