"""Quantized storage formats (``store_dtype``) against exact storage, side by side.

- blocks per GiB of each format for a Llama-3-8B-shaped cache (32 layers, 8 KV heads x 128,
  bf16, 16-token blocks) and the tiny demo model's (fp32);
- the conversation trace (``bench trace``'s replay, LRU, host tier only) at equal bytes:
  a host of B bytes holds ``B / stored_nbytes`` blocks of each format;
- host save / load through a real ``TierManager`` of an 8B-layer-shaped block (quantize
  on save, dequantize in ``LoadResult.kv``) against the same calls on an exact namespace
  and against the raw operation (``copy_`` of the exact bytes);
- disk resume: blocks of a conversation saved, the manager closed and reopened on the same
  zarr disk tier, then loaded into a preallocated engine-shaped buffer (``load(into=)``:
  exact blocks read straight into it, quantized ones dequantized into it); quantized
  against exact. Once through the page cache (warm: bytes moved and decode cost) and once
  with the disk tier's files evicted from the page cache before each load (cold: the reads
  come from the device). Each format's
  save to disk and resume also against a plain file write / read of the exact bytes;
- the same resume from the shared tier (a real SeaweedFS), each load a node that never saw
  the blocks (``bench remote`` compares the shared tier with plain s3fs).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tiercache.bench import trace
from tiercache.bench.common import (
    cli,
    drop_page_cache,
    in_memory_fs,
    side_by_side,
    timed,
    write,
)
from tiercache.keys import Namespace
from tiercache.manager import TierManager
from tiercache.spec import KVSpec
from tiercache.storage_format import FORMATS, blocks_per_gib, decode, encode, stored_nbytes
from tiercache.tiers.disk import DiskTier
from tiercache.tiers.remote import RemoteOptions, RemoteTier

LLAMA8B = KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)
TINY = KVSpec(num_layers=2, num_kv_heads=2, head_dim=32, dtype="float32", block_size=16)
# One block of 4 layers of the 8B shape: 256 KiB exact.
BENCH_SPEC = KVSpec(num_layers=4, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)


def _blocks(n: int, spec: KVSpec) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randn((n, *spec.block_shape), generator=g).to(spec.torch_dtype)


def _tokens(n_blocks: int, rep: int, block_size: int) -> list[int]:
    return [rep * 1_000_003 + i for i in range(n_blocks * block_size)]


def trace_at_equal_bytes(requests: int | None, fractions: Sequence[float]) -> dict[str, Any]:
    """``requests``: the first that many of the trace; None: all of it."""
    prompts = trace.load_trace(limit=requests)
    ws = trace.working_set(prompts)
    out: dict[str, Any] = {"requests": len(prompts), "working_set_blocks": ws, "points": []}
    for f in fractions:
        budget = f * ws * LLAMA8B.block_nbytes  # bytes: f of the working set stored exact
        point: dict[str, Any] = {"fraction_of_exact_working_set": f}
        for fmt in FORMATS:
            blocks = max(1, int(budget // stored_nbytes(LLAMA8B, fmt)))
            r = asyncio.run(trace.replay(prompts, blocks, eviction="lru"))
            point[fmt] = {"host_blocks": blocks, "hit_ratio": r.ratio}
        out["points"].append(point)
    return out


def host_throughput(n: int, reps: int) -> dict[str, Any]:
    spec = BENCH_SPEC
    src = _blocks(n, spec)
    raw_dst = torch.empty_like(src)
    loop = asyncio.new_event_loop()
    m = loop.run_until_complete(
        TierManager.open(host_bytes=4 * n * spec.block_nbytes, slot_bytes=spec.block_nbytes)
    )
    rep = [0]
    out: dict[str, Any] = {"block_bytes": spec.block_nbytes, "blocks": n}

    def saver(ns: Namespace) -> Any:
        def go() -> float:
            rep[0] += 1
            tokens = _tokens(n, rep[0], spec.block_size)
            t = timed(lambda: loop.run_until_complete(m.save(ns, tokens, src)))
            loop.run_until_complete(m.evict(keys=ns.block_keys(tokens)))
            return t

        return go

    def loader(ns: Namespace) -> Any:
        tokens = _tokens(n, 0, spec.block_size)
        loop.run_until_complete(m.save(ns, tokens, src))

        def go() -> float:
            return timed(lambda: loop.run_until_complete(m.load(ns, tokens)).kv())

        return go

    def raw() -> float:
        return timed(lambda: raw_dst.copy_(src))

    exact = Namespace("bench-quant", spec)
    for fmt in FORMATS:
        ns = Namespace("bench-quant", spec, store_dtype=fmt)
        out[fmt] = {
            "save_vs_raw": side_by_side(saver(ns), raw, reps),
            "load_vs_raw": side_by_side(loader(ns), raw, reps),
            "save_vs_exact": side_by_side(saver(ns), saver(exact), reps),
            "load_vs_exact": side_by_side(loader(ns), loader(exact), reps),
        }
    loop.run_until_complete(m.close(flush=False))
    loop.close()
    return out


def tier_resume(
    tokens: int,
    reps: int,
    workdir: Path,
    cold: bool = False,
    remote: tuple[str, RemoteOptions] | None = None,
) -> dict[str, Any]:
    """Blocks of ``tokens`` saved, then loaded by a manager that has none of them in host
    memory and restored into a preallocated engine-shaped buffer (an engine's KV cache exists
    before a resume): ``load(into=)``, so exact blocks are read straight into it and quantized
    ones dequantized into it.

    Without ``remote``: from the disk tier, the manager reopened on it (a restart); ``cold``
    evicts the work dir's files from the page cache before each load. Also
    each format (exact too) against the raw operation on the exact bytes (``vs_raw``): its
    resume against a plain file's read into the same buffer, and its save to disk (a manager
    opened on an empty disk tier, the blocks saved, flushed on close) against a plain write.
    With ``remote`` (a shared tier's url and options): the saving node uploads every block,
    and each load is a node that never saw them (empty host and disk), so every block comes
    from the shared tier."""
    if cold and remote is not None:
        raise ValueError("cold drops the disk tier's page cache: a shared-tier resume reads none")
    spec = BENCH_SPEC
    n = tokens // spec.block_size
    src = _blocks(n, spec)
    ids = _tokens(n, 7, spec.block_size)
    capacity = 4 * n * spec.block_nbytes
    engine = torch.zeros_like(src)  # touched once here, as an engine's cache is
    loop = asyncio.new_event_loop()
    tier = "disk" if remote is None else "remote"
    nodes = itertools.count()

    async def open_manager(node: Path) -> TierManager:
        disk = await DiskTier.open(f"file://{node}", capacity)
        shared = await RemoteTier.open(*remote) if remote is not None else None
        return TierManager(
            host_bytes=capacity, disk=disk, slot_bytes=spec.block_nbytes, remote=shared
        )

    async def fill(ns: Namespace, node: Path) -> None:
        m = await open_manager(node)
        await m.save(ns, ids, src)
        if m.shared is not None and await m.shared.drain(120):
            raise RuntimeError("the shared tier did not take every block of the benchmark")
        await m.close()

    namespaces = {fmt: Namespace("bench-quant", spec, store_dtype=fmt) for fmt in FORMATS}
    for ns in namespaces.values():
        loop.run_until_complete(fill(ns, workdir / "disk"))

    def resume(ns: Namespace) -> Any:
        def go() -> float:
            # A restart on the saving node's disk, or a node of its own (removed after).
            node = workdir / "disk" if remote is None else workdir / f"node{next(nodes)}"
            m = loop.run_until_complete(open_manager(node))
            if cold:
                drop_page_cache(workdir)
            try:

                async def load() -> None:
                    got = await m.load(ns, ids, into=engine)
                    if got.tiers != [tier] * n:
                        raise RuntimeError(f"the resume was not served from {tier}: {got.tiers}")

                return timed(lambda: loop.run_until_complete(load()))
            finally:
                loop.run_until_complete(m.close(flush=False))
                if remote is not None:
                    shutil.rmtree(node, ignore_errors=True)

        return go

    # The raw operation of the disk tier: the exact bytes written to one plain file, and read
    # from it into the engine's buffer (the page cache treated as for the resumes).
    raw_file, flat = workdir / "raw.bin", src.view(torch.uint8).reshape(-1).numpy()

    def raw_write() -> float:
        def go() -> None:
            fd = os.open(raw_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                view, done = flat.data, 0
                while done < len(view):
                    done += os.write(fd, view[done:])
            finally:
                os.close(fd)

        return timed(go)

    def raw_read() -> float:
        if cold:
            drop_page_cache(workdir)
        into = engine.view(torch.uint8).reshape(-1).numpy().data
        with open(raw_file, "rb", buffering=0) as f:
            return timed(lambda: f.readinto(into))

    def save(ns: Namespace) -> Any:
        def go() -> float:  # a node of its own each time: every block is written
            node = workdir / f"save{next(nodes)}"
            try:
                return timed(lambda: loop.run_until_complete(fill(ns, node)))
            finally:
                shutil.rmtree(node, ignore_errors=True)

        return go

    out: dict[str, Any] = {"tokens": tokens, "blocks": n, "block_bytes": spec.block_nbytes}
    for fmt, ns in namespaces.items():
        if fmt != "exact":
            out[fmt] = side_by_side(resume(ns), resume(namespaces["exact"]), reps)
    if remote is None:
        raw_write()  # the file the reads read
        out["vs_raw"] = {
            fmt: {
                "save": side_by_side(save(ns), raw_write, reps),
                "resume": side_by_side(resume(ns), raw_read, reps),
            }
            for fmt, ns in namespaces.items()
        }
    for fmt, ns in namespaces.items():
        # The raw read fills the engine's buffer with the exact bytes too: check a resume alone.
        engine.zero_()
        resume(ns)()
        if not torch.equal(engine, decode(spec, encode(spec, src, fmt), fmt)):
            raise RuntimeError(f"the {fmt} resume from {tier} restored different values")
    out["tier"] = tier
    if remote is None:
        memory_fs = in_memory_fs(workdir)
        out["page_cache"] = (
            "warm"
            if not cold
            else f"not dropped: {memory_fs} keeps files in memory"
            if memory_fs
            else "dropped before each load"
        )
    loop.close()
    return out


def remote_resume(tokens: int, reps: int, workdir: Path) -> dict[str, Any] | None:
    """``tier_resume`` from a real SeaweedFS started for it (None where weed is not installed)."""
    from tiercache.bench.seaweedfs import serving, weed_binary

    if weed_binary() is None:
        return None
    with serving(workdir / "seaweedfs", "bench-quant") as weed:
        opts = weed.options()
        result = tier_resume(tokens, reps, workdir, remote=("s3://bench-quant/resume", opts))
    result["store"] = "SeaweedFS (weed server -s3) on loopback, same machine"
    return result


def plot(result: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    pts = result["trace"]["points"]
    for fmt in FORMATS:
        a.plot(
            [p["fraction_of_exact_working_set"] for p in pts],
            [p[fmt]["hit_ratio"] for p in pts],
            marker="o",
            label=fmt,
        )
    a.set_xlabel("host bytes (fraction of the working set stored exact)")
    a.set_ylabel("block hit ratio (LRU)")
    a.set_title("trace at equal bytes")
    a.legend()
    host = result["host"]
    names = ["save_vs_raw", "load_vs_raw", "save_vs_exact", "load_vs_exact"]
    width = 0.25
    for i, fmt in enumerate(FORMATS):
        b.bar(
            [j + i * width for j in range(len(names))],
            [host[fmt][k]["ratio"] for k in names],
            width,
            label=fmt,
        )
    b.set_xticks([j + width for j in range(len(names))], names, rotation=15)
    b.set_ylabel("throughput ratio (1: as fast as the baseline)")
    b.set_title(f"host tier, {host['block_bytes'] // 1024} KiB blocks")
    b.legend()
    # Resume time per format from each lower tier (exact: the base of every comparison), and
    # a plain file read of the exact bytes where the benchmark timed one.
    kinds = [
        (key, label)
        for key, label in (
            ("disk_resume", "disk, warm"),
            ("disk_resume_cold", "disk, cold"),
            ("remote_resume", "shared tier"),
        )
        if key in result
    ]
    for i, fmt in enumerate(FORMATS):
        ms = []
        for key, _ in kinds:
            r = result[key]
            quantized = next(r[f] for f in FORMATS if f != "exact" and f in r)
            ms.append(1e3 * (quantized["base_s"] if fmt == "exact" else r[fmt]["ours_s"]))
        c.bar([j + i * width for j in range(len(kinds))], ms, width, label=fmt)
    for j, (key, _) in enumerate(kinds):
        raw = result[key].get("vs_raw")
        if raw is not None:
            read = 1e3 * raw["exact"]["resume"]["base_s"]
            c.plot([j - width / 2, j + 2.5 * width], [read, read], "k--", lw=1)
    c.set_xticks([j + width for j in range(len(kinds))], [lbl for _, lbl in kinds])
    c.set_ylabel("ms (dashed: a plain file read of the exact bytes)")
    tokens = result[kinds[0][0]]["tokens"] if kinds else 0
    c.set_title(f"resume of {tokens} tokens into an engine buffer")
    c.legend()
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {
        "blocks_per_gib": {
            name: {fmt: blocks_per_gib(spec, fmt) for fmt in FORMATS}
            for name, spec in (("llama3-8b-bf16", LLAMA8B), ("tiny-fp32", TINY))
        },
        "trace": trace_at_equal_bytes(300 if quick else None, (0.02, 0.05, 0.1)),
        "host": host_throughput(16 if quick else 64, 3 if quick else 7),
    }
    tokens, reps = (2048, 3) if quick else (8192, 5)
    with tempfile.TemporaryDirectory() as d:
        result["disk_resume"] = tier_resume(tokens, reps, Path(d))
    if not quick:  # from the device, where the halved bytes should show
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as d:
            result["disk_resume_cold"] = tier_resume(tokens, reps, Path(d), cold=True)
    with tempfile.TemporaryDirectory() as d:
        shared = remote_resume(tokens, reps, Path(d))
    if shared is not None:
        result["remote_resume"] = shared
    write(out, "quant", result, plot(result))
    return result


def report(result: dict[str, Any]) -> str:
    lines = ["blocks per GiB:"]
    for name, per in result["blocks_per_gib"].items():
        lines.append(f"  {name}: " + ", ".join(f"{f} {v:,.0f}" for f, v in per.items()))
    lines.append(f"trace ({result['trace']['requests']} requests), LRU hit ratio at equal bytes:")
    for p in result["trace"]["points"]:
        cells = ", ".join(f"{f} {p[f]['hit_ratio']:.3f}" for f in FORMATS)
        lines.append(f"  {p['fraction_of_exact_working_set']:.0%} of exact: {cells}")
    host = result["host"]
    lines.append(f"host tier, {host['blocks']} blocks of {host['block_bytes']:,} B (ratios):")
    for fmt in FORMATS:
        r = host[fmt]
        lines.append(
            f"  {fmt}: save/raw {r['save_vs_raw']['ratio']:.3f}, load/raw "
            f"{r['load_vs_raw']['ratio']:.3f}, save/exact {r['save_vs_exact']['ratio']:.2f}, "
            f"load/exact {r['load_vs_exact']['ratio']:.2f}"
        )
    for key in ("disk_resume", "disk_resume_cold", "remote_resume"):
        dr = result.get(key)
        if dr is None:
            continue
        where = f"page cache {dr['page_cache']}" if "page_cache" in dr else dr["store"]
        lines.append(
            f"{dr['tier']} resume of {dr['tokens']} tokens, {where} (exact time / quantized time):"
        )
        for fmt in FORMATS:
            if fmt in dr:
                lines.append(
                    f"  {fmt}: {dr[fmt]['ratio']:.2f}x "
                    f"({dr[fmt]['ours_s'] * 1e3:.1f} ms vs exact {dr[fmt]['base_s'] * 1e3:.1f} ms)"
                )
        if "vs_raw" in dr:
            lines.append("  against a plain file of the exact bytes (throughput, % of raw):")
            for fmt, r in dr["vs_raw"].items():
                lines.append(
                    f"    {fmt}: save {r['save']['ratio']:.0%} (write {r['save']['base_s'] * 1e3:.1f}"
                    f" ms), resume {r['resume']['ratio']:.0%} (read "
                    f"{r['resume']['base_s'] * 1e3:.1f} ms)"
                )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(__doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
