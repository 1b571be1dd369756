"""Trace replay: prefix hit ratio against tier capacity, per eviction policy, against the ceiling.

``tiercache bench trace [--trace FILE] [--capacities 0.01,0.02,0.05,0.1]
[--policies lru,arc,prefix] [--main-only] --out DIR`` replays a trace in Mooncake's JSONL
format (one request a line: ``timestamp``, ``input_length``, ``output_length``,
``hash_ids``, the prompt as a chain of 512-token block ids) and writes
``DIR/trace.json`` (``"ceiling"``: the unbounded hit ratio; ``"results"``: one
``{"policy", "capacity", "hit_ratio", ...}`` per policy and capacity, capacity a
fraction of the trace's distinct blocks, hit ratio a fraction of its prompt
blocks, with the prefill tokens saved) and ``DIR/trace.png``. The default trace
is Mooncake's conversation trace (``data/``, Apache-2.0, 12,031 requests).

Every request goes through the real cache (``open_cache``, the manager the
daemon serves) as an engine would drive it: ``lookup`` the prompt, ``load`` the
cached prefix, ``save`` the whole prompt after prefill. A hit is a block of the
cached prefix that lookup reports, so the hit ratio (hit blocks / prompt
blocks) is the share of prefill the cache saves; tokens saved count each hit
block as 512 tokens, the last one as what is left of the prompt.

Each block id becomes one block of a one-token-per-block KVSpec whose token
*is* the id: tiercache's own chained keys then reproduce the trace's prefix
structure exactly (equal id prefixes <=> equal keys). A block is 4 bytes (the
id itself, checked on every load), so a replay of a whole trace takes seconds,
and capacities are counted in blocks: fractions of the working set (the
trace's unique blocks). Positions reach the policies in tokens of that spec,
i.e. block indices; no policy ranks by position (the prefix policy's docstring
says why), so that is no difference from a real engine's 512-token blocks.

Beside the main sweep (host tier only), three more: admission on the second
offer, a host+disk cache (host 1% of the working set, disk the rest), and an
engine with its own prefix cache in front of tiercache (an LRU of
``ENGINE_SHARE`` of the working set, freed leaf-first as vLLM frees a request's
blocks): the engine serves the prefix it holds, tiercache is asked only for the
blocks after it and stores only those, and the saving is both together. There
it is replayed twice: with the connector's ``touch`` of the blocks the engine
served, and without (what tiercache did before: its hottest prefixes, always
served by the engine, aged out of it). ``--main-only`` skips those three (three
quarters of the time), to compare policies on many traces.

The ceiling is computed from the trace alone, with a set of the ids seen so
far and no tiercache: per request, how many leading blocks appeared in earlier
requests. The replay with room for the whole working set must equal it,
request by request, or the run fails. A simulator of the policies beside the
product was rejected: it would measure the simulator, not tiercache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import lzma
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from tiercache.bench.common import out_dir, write
from tiercache.daemon.config import (
    Config,
    DiskTierConfig,
    HostTierConfig,
    PolicyConfig,
    TiersConfig,
)
from tiercache.embedded import open_cache
from tiercache.keys import KeyChain, Namespace
from tiercache.policy.base import POLICIES
from tiercache.spec import KVSpec

TRACE = Path(__file__).parent / "data" / "mooncake_conversation_trace.jsonl.xz"
TRACE_BLOCK_TOKENS = 512  # tokens behind one block id in Mooncake's format

# One token per block (the trace's block id); 2 x 1 layer x 1 head x 2 dims x 1 byte = 4 bytes,
# exactly the id as little-endian uint32.
SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=2, dtype="int8", block_size=1)
NS = Namespace("mooncake-conversation-trace", SPEC)

HOST_WITH_DISK = 0.01  # the host tier of a host+disk replay, as a fraction of the working set
ENGINE_SHARE = 0.01  # the engine's own prefix cache, as a fraction of the working set
CAPACITIES = (0.01, 0.02, 0.05, 0.1, 0.2)
QUICK_CAPACITIES = (0.05, 0.2)
DEFAULT_POLICIES = POLICIES

Prompt = tuple[int, ...]  # a request's block ids


@dataclass(frozen=True, slots=True)
class Trace:
    prompts: list[Prompt]
    tokens: list[int]  # input_length of each request
    source: str


def _open(path: Path) -> TextIO:
    return lzma.open(path, "rt") if path.suffix == ".xz" else path.open()


class TraceError(ValueError):
    """A trace file this replay cannot read: a line not in Mooncake's format, or no blocks."""


def read_trace(path: Path = TRACE, limit: int | None = None) -> Trace:
    """The requests of a Mooncake-format trace, in arrival order (the first ``limit``)."""
    prompts: list[Prompt] = []
    tokens: list[int] = []
    try:
        with _open(path) as f:
            for n, line in enumerate(f, 1):
                if limit is not None and len(prompts) == limit:
                    break
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    ids = tuple(int(i) for i in rec["hash_ids"])
                    length = int(rec.get("input_length", len(ids) * TRACE_BLOCK_TOKENS))
                except (ValueError, KeyError, TypeError) as e:
                    raise TraceError(
                        f"{path}:{n}: not a Mooncake trace line (needs hash_ids, a list of "
                        f"block ids, and input_length): {e}"
                    ) from e
                if not all(0 <= i < 2**32 for i in ids) or length < 0:
                    # A block of the replay is its id as a uint32 (SPEC).
                    raise TraceError(
                        f"{path}:{n}: block ids must be in [0, 2**32) and input_length at least 0"
                    )
                prompts.append(ids)
                tokens.append(length)
    except (UnicodeDecodeError, lzma.LZMAError, EOFError) as e:  # not text, a broken .xz
        raise TraceError(f"{path}: not a JSONL text file (or .xz of one): {e}") from e
    if not any(prompts):
        raise TraceError(f"{path}: no request with a block id, nothing to replay")
    return Trace(prompts, tokens, str(path))


def load_trace(path: Path = TRACE, limit: int | None = None) -> list[Prompt]:
    """The prompts of the trace, in arrival order (the first ``limit`` of them)."""
    return read_trace(path, limit).prompts


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


def tokens_saved(hits: Sequence[int], tokens: Sequence[int]) -> int:
    """Prefill tokens not computed: 512 per hit block, at most the prompt's own length."""
    return sum(min(h * TRACE_BLOCK_TOKENS, t) for h, t in zip(hits, tokens, strict=True))


@dataclass(frozen=True, slots=True)
class Variant:
    """One line of a plot: a policy, an admission threshold, host or host+disk, an engine."""

    eviction: str
    admission: int = 1
    disk: bool = False
    engine: bool = False
    touch: bool = True  # with an engine: the connector touches the blocks the engine served

    @property
    def label(self) -> str:
        parts = [self.eviction, "host+disk" if self.disk else "host"]
        if self.admission > 1:
            parts.append(f"admission {self.admission}")
        if self.engine:
            parts.append("engine, touch" if self.touch else "engine, no touch")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Sweep:
    name: str
    variants: tuple[Variant, ...]
    capacities: tuple[float, ...]  # fractions of the working set


def sweeps(
    policies: Sequence[str], capacities: Sequence[float], main_only: bool = False
) -> list[Sweep]:
    main = Sweep("policies", tuple(Variant(p) for p in policies), tuple(capacities))
    if main_only:
        return [main]
    extra = tuple(c for c in capacities if c > HOST_WITH_DISK) or tuple(capacities)
    return [
        main,
        Sweep(
            "admission and disk",
            tuple(Variant(p, admission=2) for p in policies)
            + tuple(Variant(p, disk=True) for p in policies),
            extra,
        ),
        Sweep(
            "engine prefix cache in front",
            tuple(Variant(p, engine=True, touch=t) for p in policies for t in (True, False)),
            extra,
        ),
    ]


@dataclass(slots=True)
class Replay:
    hits: list[int] = field(default_factory=list)  # per request: blocks tiercache served
    engine_hits: list[int] = field(default_factory=list)  # per request: blocks the engine held
    blocks: int = 0  # prompt blocks replayed
    per_tier: dict[str, int] = field(default_factory=dict)  # hit blocks by the tier lookup named

    @property
    def hit_blocks(self) -> int:
        return sum(self.hits)

    @property
    def ratio(self) -> float:
        return self.hit_blocks / self.blocks if self.blocks else 0.0

    @property
    def saved(self) -> list[int]:
        """Per request: blocks not recomputed (the engine's and tiercache's together)."""
        return [e + h for e, h in zip(self.engine_hits, self.hits, strict=True)]


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


class EngineCache:
    """An engine's own prefix cache: LRU over block ids, a request's blocks freed leaf-first."""

    def __init__(self, blocks: int) -> None:
        self.capacity = blocks
        self._order: OrderedDict[int, None] = OrderedDict()

    def prefix(self, ids: Prompt) -> int:
        n = 0
        while n < len(ids) and ids[n] in self._order:
            n += 1
        return n

    def use(self, ids: Prompt) -> None:
        for b in reversed(ids):  # the root ends most recent: leaves go first
            self._order[b] = None
            self._order.move_to_end(b)
        while len(self._order) > self.capacity:
            self._order.popitem(last=False)


async def replay(
    prompts: Sequence[Prompt],
    host_blocks: int,
    *,
    eviction: str = "lru",
    admission: int = 1,
    disk_blocks: int = 0,
    disk_dir: Path | None = None,
    engine_blocks: int = 0,
    touch: bool = True,
) -> Replay:
    """Drive the cache with ``prompts`` as an engine would; count each request's prefix hits.

    With ``engine_blocks``, an engine prefix cache of that many blocks serves what it holds
    first (and, with ``touch``, tells tiercache so); tiercache sees only the rest."""
    cache = await open_cache(_config(host_blocks, disk_blocks, disk_dir, eviction, admission))
    engine = EngineCache(engine_blocks) if engine_blocks else None
    result = Replay()
    try:
        for ids in prompts:
            raw = np.asarray(ids, dtype="<u4")
            keys = KeyChain(NS.block_keys(raw))  # hashed once, as a connector does
            held = engine.prefix(ids) if engine is not None else 0
            if held and touch:
                await cache.touch(NS, KeyChain(keys[:held]))
            rest = KeyChain(keys[held:])
            hit = await cache.lookup(NS, rest)
            if hit.blocks:
                loaded = await cache.load(NS, rest, max_blocks=hit.blocks)
                want = raw[held : held + hit.blocks].view(np.uint8).reshape(-1, 4)
                if loaded.blocks != hit.blocks or not torch.equal(
                    loaded.data, torch.from_numpy(want)
                ):
                    raise RuntimeError(
                        f"load served {loaded.blocks} blocks, not the {hit.blocks} blocks "
                        "lookup reported (or not their bytes)"
                    )
            if held < len(ids):
                rows = torch.from_numpy(raw[held:].view(np.uint8).reshape(-1, 4))
                await cache.save(NS, keys, rows, first_block=held)
            if engine is not None:
                engine.use(ids)
            result.hits.append(hit.blocks)
            result.engine_hits.append(held)
            result.blocks += len(ids)
            for tier in hit.tiers:
                result.per_tier[tier] = result.per_tier.get(tier, 0) + 1
    finally:
        await cache.close(flush=False)
    return result


async def sweep(sw: Sweep, trace: Trace, workdir: Path) -> dict[str, Any]:
    """Replay ``trace`` at each capacity for each of ``sw``'s variants."""
    prompts = trace.prompts
    ws = working_set(prompts)
    blocks = sum(len(p) for p in prompts)
    tokens = sum(trace.tokens)
    host_with_disk = max(1, round(HOST_WITH_DISK * ws))
    engine_blocks = max(1, round(ENGINE_SHARE * ws))
    series: list[dict[str, Any]] = []
    for v in sw.variants:
        points: list[dict[str, Any]] = []
        for frac in sw.capacities:
            capacity = max(1, round(frac * ws))
            host, disk = (host_with_disk, capacity - host_with_disk) if v.disk else (capacity, 0)
            if v.disk and disk <= 0:
                continue
            disk_dir = workdir / f"disk-{v.eviction}-{capacity}"
            t0 = time.perf_counter()
            r = await replay(
                prompts,
                host,
                eviction=v.eviction,
                admission=v.admission,
                disk_blocks=disk,
                disk_dir=disk_dir,
                engine_blocks=engine_blocks if v.engine else 0,
                touch=v.touch,
            )
            seconds = time.perf_counter() - t0
            shutil.rmtree(disk_dir, ignore_errors=True)
            saved = r.saved
            points.append(
                {
                    "capacity_fraction": frac,
                    "capacity_blocks": capacity,
                    "host_blocks": host,
                    "disk_blocks": disk,
                    "hit_blocks": r.hit_blocks,
                    "per_tier": r.per_tier,
                    "ratio": r.ratio,
                    "engine_blocks": sum(r.engine_hits),
                    "saved_ratio": sum(saved) / blocks,
                    "tokens_saved": tokens_saved(saved, trace.tokens),
                    "tokens_saved_ratio": tokens_saved(saved, trace.tokens) / tokens,
                    "seconds": round(seconds, 2),
                }
            )
        series.append({"label": v.label, "variant": _variant_dict(v), "points": points})
    return {
        "name": sw.name,
        "host_with_disk_blocks": host_with_disk,
        "engine_blocks": engine_blocks,
        "series": series,
    }


def _variant_dict(v: Variant) -> dict[str, Any]:
    return {
        "eviction": v.eviction,
        "admission": v.admission,
        "tiers": "host+disk" if v.disk else "host",
        "engine": v.engine,
        "touch": v.touch,
    }


def results(main: dict[str, Any]) -> list[dict[str, Any]]:
    """The main sweep as the flat list the issue's consumers read."""
    return [
        {
            "policy": s["variant"]["eviction"],
            "capacity": p["capacity_fraction"],
            "hit_ratio": p["ratio"],
            "hit_blocks": p["hit_blocks"],
            "capacity_blocks": p["capacity_blocks"],
            "tokens_saved": p["tokens_saved"],
            "tokens_saved_ratio": p["tokens_saved_ratio"],
        }
        for s in main["series"]
        for p in s["points"]
    ]


async def measure(
    trace: Trace,
    policies: Sequence[str],
    capacities: Sequence[float],
    workdir: Path,
    main_only: bool = False,
) -> dict[str, Any]:
    prompts = trace.prompts
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
    done = [await sweep(sw, trace, workdir) for sw in sweeps(policies, capacities, main_only)]
    return {
        "trace": {
            "source": trace.source,
            "requests": len(prompts),
            "prompt_blocks": blocks,
            "prompt_tokens": sum(trace.tokens),
            "working_set_blocks": ws,
            "block_tokens": TRACE_BLOCK_TOKENS,
        },
        "ceiling": sum(ceil) / blocks,
        "ceiling_blocks": sum(ceil),
        "ceiling_tokens_saved_ratio": tokens_saved(ceil, trace.tokens) / sum(trace.tokens),
        "unbounded_replay": {"hit_blocks": unbounded.hit_blocks, "ratio": unbounded.ratio},
        "results": results(done[0]),
        "sweeps": done,
    }


def plot(result: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps_ = result["sweeps"]
    fig, axes = plt.subplots(1, len(sweeps_), figsize=(6.5 * len(sweeps_), 5), squeeze=False)
    ceil = 100 * result["ceiling"]
    colors = {p: f"C{i}" for i, p in enumerate(POLICIES)}
    for ax, sw in zip(axes[0], sweeps_, strict=True):
        engine = any(s["variant"]["engine"] for s in sw["series"])
        for s in sw["series"]:
            v = s["variant"]
            xs = [100 * p["capacity_fraction"] for p in s["points"]]
            ys = [100 * p["saved_ratio" if engine else "ratio"] for p in s["points"]]
            style = (
                ":"
                if v["tiers"] == "host+disk"
                else "--"
                if v["admission"] > 1 or not v["touch"]
                else "-"
            )
            ax.plot(xs, ys, style, marker="o", markersize=3, label=s["label"],
                    color=colors.get(v["eviction"]))  # fmt: skip
        ax.axhline(ceil, color="black", linewidth=1)
        fracs = sorted({p["capacity_fraction"] for s in sw["series"] for p in s["points"]})
        ax.annotate(f"unbounded ceiling {ceil:.1f}%", (100 * fracs[0], ceil), xytext=(0, 4),
                    textcoords="offset points", fontsize=8)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in fracs], [f"{100 * f:g}%" for f in fracs])
        ax.minorticks_off()
        label = f"capacity, % of the working set ({result['trace']['working_set_blocks']:,} blocks)"
        if sw["name"] == "admission and disk":
            label += f"\nhost+disk: host {sw['host_with_disk_blocks']:,} blocks, disk the rest"
        if engine:
            label += f"\nengine prefix cache: {sw['engine_blocks']:,} blocks in front"
        ax.set_xlabel(label)
        ax.set_ylabel(
            "prefill saved (engine + tiercache), % of prompt blocks"
            if engine
            else "prefix hit ratio, % of prompt blocks"
        )
        ax.set_ylim(0, ceil * 1.15)
        ax.set_title(sw["name"], fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    t = result["trace"]
    fig.suptitle(
        f"{Path(t['source']).name} ({t['requests']:,} requests) replayed through tiercache"
    )
    return fig


def run(
    out: Path,
    quick: bool = False,
    trace: Path = TRACE,
    policies: Sequence[str] = DEFAULT_POLICIES,
    capacities: Sequence[float] | None = None,
    main_only: bool = False,
) -> dict[str, Any]:
    """``capacities``: None, the default ones (two with ``quick``)."""
    loaded = read_trace(trace, limit=300 if quick else None)
    if capacities is None:
        capacities = QUICK_CAPACITIES if quick else CAPACITIES
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-trace-"))
    t0 = time.perf_counter()
    try:
        result = asyncio.run(measure(loaded, policies, capacities, workdir, main_only))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write(out, "trace", result, plot(result))
    return result


def report(result: dict[str, Any]) -> str:
    t = result["trace"]
    lines = [
        f"{t['source']}: {t['requests']:,} requests, {t['prompt_blocks']:,} prompt blocks, "
        f"working set {t['working_set_blocks']:,} blocks; ceiling {100 * result['ceiling']:.1f}% "
        f"of blocks, {100 * result['ceiling_tokens_saved_ratio']:.1f}% of prompt tokens; "
        f"{result['seconds']:.0f} s",
    ]
    for sw in result["sweeps"]:
        engine = any(s["variant"]["engine"] for s in sw["series"])
        what = "prefill saved, engine + tiercache" if engine else "hit ratio (tokens saved)"
        lines += ["", f"{sw['name']}: {what}"]
        lines.append(f"{'capacity':>9} " + " ".join(f"{s['label']:>26}" for s in sw["series"]))
        fracs = sorted({p["capacity_fraction"] for s in sw["series"] for p in s["points"]})
        for f in fracs:
            cells = []
            for s in sw["series"]:
                p = next((p for p in s["points"] if p["capacity_fraction"] == f), None)
                if p is None:
                    cell = "-"
                elif engine:
                    cell = f"{100 * p['saved_ratio']:.1f}%"
                else:
                    cell = f"{100 * p['ratio']:.1f}% ({100 * p['tokens_saved_ratio']:.1f}%)"
                cells.append(f"{cell:>26}")
            lines.append(f"{100 * f:>8g}% " + " ".join(cells))
    return "\n".join(lines)


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"capacities are fractions of the working set in (0, 1], got {text!r}"
        )
    return values


def _policies(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    bad = [n for n in names if n not in POLICIES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown eviction policy {', '.join(map(repr, bad))}; choose from {', '.join(POLICIES)}"
        )
    return names


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument(
        "--out", type=out_dir, default=Path("bench-out"), help="where the JSON and PNG go"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the first 300 requests, and two capacities unless --capacities names others",
    )
    p.add_argument("--trace", type=Path, default=TRACE, help="a trace in Mooncake's JSONL format")
    p.add_argument(
        "--capacities",
        type=_fractions,
        default=None,
        help=f"fractions of the working set, comma-separated (default: {CAPACITIES})",
    )
    p.add_argument("--policies", type=_policies, default=DEFAULT_POLICIES, help="comma-separated")
    p.add_argument(
        "--main-only",
        action="store_true",
        help="only the host-tier sweep of every policy and capacity (no admission, disk or "
        "engine sweeps)",
    )
    args = p.parse_args(argv)
    if not args.trace.is_file():
        p.error(f"--trace {args.trace}: no such file")
    try:
        result = run(
            args.out, args.quick, args.trace, args.policies, args.capacities, args.main_only
        )
    except TraceError as e:
        p.error(f"--trace {e}")
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
