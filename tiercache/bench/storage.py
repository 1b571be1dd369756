"""Tier throughput against the raw operation it wraps, side by side, at 64 KiB to 4 MiB blocks.

- host put / get: ``TierManager.save`` into the host arena and ``load`` out of
  it (index, policy and bookkeeping included) against a plain ``copy_`` of the
  same bytes between two preallocated tensors;
- disk write / read: the disk tier's ``put_many`` (slot allocation, pwrite into
  zarr shard slabs, xxh3 checksum, journal record) and ``get_many`` (pread,
  checksum verify) against a plain sequential write / read of the same bytes
  to one file with ``os.write`` / ``readinto``. Both sides rewrite files that
  exist (the steady state of a full cache) and go through the page cache (no
  fsync, warm reads): this measures the software overhead tiercache adds, on
  the same device. tiercache's I/O runs in 2 worker threads, the baseline in one.

Targets (issue 2): host >= 70% of memcpy at >= 256 KiB; disk >= 70% of plain
file I/O at >= 1 MiB.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tiercache.bench.common import cli, side_by_side, size_label, timed, write
from tiercache.keys import Namespace
from tiercache.manager import TierManager
from tiercache.spec import KVSpec
from tiercache.tiers.disk import DiskTier

SIZES = [64 * 2**10, 256 * 2**10, 2**20, 4 * 2**20]


def spec_for(block_bytes: int) -> KVSpec:
    """A bf16 spec with 8 KV heads x 128 dims and 16-token blocks: 64 KiB per layer of a block."""
    return KVSpec(
        num_layers=block_bytes // 2**16,
        num_kv_heads=8,
        head_dim=128,
        dtype="bfloat16",
        block_size=16,
    )


def _blocks(n: int, nbytes: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, 256, (n, nbytes), dtype=torch.uint8, generator=g)


def _tokens(n_blocks: int, rep: int, block_size: int) -> list[int]:
    return [rep * 1_000_003 + i for i in range(n_blocks * block_size)]


def bench_host(block_bytes: int, total: int, reps: int) -> dict[str, Any]:
    spec = spec_for(block_bytes)
    ns = Namespace("bench", spec)
    n = max(1, total // block_bytes)
    src = _blocks(n, block_bytes)
    dst = torch.empty_like(src)
    dst.fill_(1)
    loop = asyncio.new_event_loop()
    m = loop.run_until_complete(
        TierManager.open(host_bytes=n * block_bytes, slot_bytes=block_bytes)
    )
    rep = [0]

    def put() -> float:
        rep[0] += 1
        tokens = _tokens(n, rep[0], spec.block_size)
        keys = ns.block_keys(tokens)
        t = timed(lambda: loop.run_until_complete(m.save(ns, tokens, src)))
        loop.run_until_complete(m.evict(keys=keys))
        return t

    def copy() -> float:
        return timed(lambda: dst.copy_(src))

    put_r = side_by_side(put, copy, reps)
    tokens = _tokens(n, 0, spec.block_size)
    loop.run_until_complete(m.save(ns, tokens, src))

    def get() -> float:
        return timed(lambda: loop.run_until_complete(m.load(ns, tokens, out=dst)))

    get_r = side_by_side(get, copy, reps)
    dst.zero_()  # the baseline copies the same bytes into dst: check a load of ours alone
    get()
    assert torch.equal(dst, src), "host tier loaded different bytes"
    loop.run_until_complete(m.close(flush=False))
    loop.close()
    return {"block_bytes": block_bytes, "blocks": n, "put": put_r, "get": get_r}


def bench_disk(block_bytes: int, total: int, reps: int, workdir: Path) -> dict[str, Any]:
    spec = spec_for(block_bytes)
    ns = Namespace("bench", spec)
    n = max(1, total // block_bytes)
    src = _blocks(n, block_bytes)
    dst = torch.empty_like(src)
    loop = asyncio.new_event_loop()
    root = workdir / f"disk-{block_bytes}"
    plain = workdir / f"plain-{block_bytes}.bin"
    tier = loop.run_until_complete(DiskTier.open(str(root), 2 * n * block_bytes))
    array = loop.run_until_complete(tier.register(ns))
    records: list[Any] = []

    def put() -> float:
        for r in records:
            tier.discard(r)
        loop.run_until_complete(tier.sync_journal())
        records.clear()

        async def go() -> None:
            items = [(i.to_bytes(16, "little"), src[i]) for i in range(n)]
            records.extend(await tier.put_many(array, items))

        return timed(lambda: loop.run_until_complete(go()))

    def file_write() -> float:
        # Rewritten in place, like the slab's slots: both sides measure the steady state
        # of a full cache (no block allocation by the filesystem).
        def go() -> None:
            fd = os.open(plain, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                for i in range(n):
                    os.write(fd, src[i].numpy().data)
            finally:
                os.close(fd)

        return timed(go)

    put()
    file_write()  # untimed: create the shard files and the plain file once
    write_r = side_by_side(put, file_write, reps)

    def get() -> float:
        async def go() -> None:
            oks = await tier.get_many(records, [dst[i] for i in range(n)])
            assert all(oks)

        return timed(lambda: loop.run_until_complete(go()))

    def file_read() -> float:
        def go() -> None:
            with open(plain, "rb", buffering=0) as f:
                for i in range(n):
                    f.readinto(dst[i].numpy().data)

        return timed(go)

    read_r = side_by_side(get, file_read, reps)
    dst.zero_()  # the baseline reads the same bytes into dst: check a read of ours alone
    get()
    assert torch.equal(dst, src), "disk tier read back different bytes"
    loop.run_until_complete(tier.close())
    loop.close()
    return {"block_bytes": block_bytes, "blocks": n, "write": write_r, "read": read_r}


def plot(result: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [size_label(r["block_bytes"]) for r in result["host"]]
    x = range(len(labels))
    for ax, tier, ops, base in (
        (ax1, "host", ("put", "get"), "torch copy_"),
        (ax2, "disk", ("write", "read"), "plain file I/O"),
    ):
        for j, op in enumerate(ops):
            ratios = [100 * r[op]["ratio"] for r in result[tier]]
            ax.bar([i + (j - 0.5) * 0.38 for i in x], ratios, width=0.38, label=op)
        ax.axhline(70, color="gray", linestyle="--", linewidth=1, label="target 70%")
        ax.axhline(100, color="black", linewidth=0.8)
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("block size")
        ax.set_ylabel(f"throughput, % of {base}")
        ax.set_title(f"{tier} tier vs {base}")
        ax.legend()
    fig.suptitle("tiercache storage tiers against the raw operation (median of interleaved reps)")
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    total = 4 * 2**20 if quick else 128 * 2**20
    reps = 3 if quick else 9
    sizes = SIZES[:2] if quick else SIZES
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-bench-"))
    try:
        result: dict[str, Any] = {
            "total_bytes_per_size": total,
            "reps": reps,
            "host": [bench_host(s, total, reps) for s in sizes],
            "disk": [bench_disk(s, total, reps, workdir) for s in sizes],
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write(out, "storage", result, plot(result))
    return result


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{'block':>8} {'host put':>9} {'host get':>9} {'disk write':>11} {'disk read':>10}   (% of raw)"
    ]
    for h, d in zip(result["host"], result["disk"], strict=True):
        lines.append(
            f"{size_label(h['block_bytes']):>8} {100 * h['put']['ratio']:>8.0f}% {100 * h['get']['ratio']:>8.0f}% "
            f"{100 * d['write']['ratio']:>10.0f}% {100 * d['read']['ratio']:>9.0f}%"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(__doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
