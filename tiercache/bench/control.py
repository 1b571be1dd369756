"""Control-plane latency of a real daemon, against the same operations in-process.

A ``tiercache serve`` child process holds a 32k-token session (2,048 blocks of
16 tokens). Clients, each on its own socket connection (1, 4 and 16 at once),
repeat two operations:

- ``lookup``: the cached prefix of the 32k-token conversation (the question a
  connector asks before every prefill; 128 KiB of packed token ids per request);
- ``save+load``: one new block saved (reserve, copy into the shared arena,
  commit) and loaded back (acquire, copy out, release): four round trips.

Reported: p50 and p99 per operation and concurrency; the daemon's CPU seconds
(user + system, from /proc) per 1,000 operations; and the single-client p50
against the same operations on an embedded ``TierManager`` in this process,
as a ratio (how much the socket costs).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tiercache.bench.common import cli, write
from tiercache.client import AsyncClient
from tiercache.keys import Namespace
from tiercache.manager import TierManager
from tiercache.spec import KVSpec

SPEC = KVSpec(
    num_layers=4, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_size=16
)  # 32 KiB blocks
PREFIX_TOKENS = 32_768
CONCURRENCY = (1, 4, 16)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Ops:
    """The two operations, on a client or an embedded manager (same signatures)."""

    def __init__(
        self, cache: AsyncClient | TierManager, ns: Namespace, prefix: list[int], worker: int
    ) -> None:
        self.cache, self.ns, self.prefix, self.worker = cache, ns, prefix, worker
        self.block = torch.randint(0, 256, (1, SPEC.block_nbytes), dtype=torch.uint8)
        self.n = 0
        self.stored = 0  # new blocks its saves stored

    async def lookup(self) -> None:
        hit = await self.cache.lookup(self.ns, self.prefix)
        assert hit.blocks == PREFIX_TOKENS // SPEC.block_size

    async def save_load(self) -> None:
        self.n += 1
        tokens = [2**31 + self.worker * 10**6 + self.n] * SPEC.block_size
        saved = await self.cache.save(self.ns, tokens, self.block)
        got = await self.cache.load(self.ns, tokens)
        self.stored += saved.stored  # a save of a block already held copies nothing
        assert got.blocks == 1


async def _measure(
    ops: list[Ops], op: Callable[[Ops], Awaitable[None]], per_client: int
) -> list[float]:
    lat: list[float] = []

    async def one(o: Ops) -> None:
        for _ in range(per_client):
            t0 = time.perf_counter()
            await op(o)
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(o) for o in ops))
    return lat


async def _run(workdir: Path, quick: bool) -> dict[str, Any]:
    ns = Namespace("bench-control", SPEC)
    prefix = list(range(PREFIX_TOKENS))
    blocks = torch.randint(
        0, 256, (PREFIX_TOKENS // SPEC.block_size, SPEC.block_nbytes), dtype=torch.uint8
    )
    per_client = 20 if quick else 200
    env = {
        **os.environ,
        "TIERCACHE_DAEMON__SOCKET": str(workdir / "tc.sock"),
        "TIERCACHE_TIERS_DISK__URL": str(workdir / "disk"),
        "TIERCACHE_TIERS_HOST__BYTES": "512MiB",
        "TIERCACHE_METRICS__LISTEN": "",
        "TIERCACHE_MQTT__HOST": "",
    }
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tiercache.daemon.cli", "serve", env=env, stderr=subprocess.DEVNULL
    )
    try:
        while not (workdir / "tc.sock").exists():
            if daemon.returncode is not None:
                raise RuntimeError("the daemon did not start")
            await asyncio.sleep(0.05)
        seed = await AsyncClient.connect(workdir / "tc.sock")
        await seed.save(ns, prefix, blocks, session="bench")
        rows: list[dict[str, Any]] = []
        workers = 0  # numbered across concurrencies: no two workers save the same blocks
        for c in CONCURRENCY:
            clients = [await AsyncClient.connect(workdir / "tc.sock") for _ in range(c)]
            ops = [Ops(cl, ns, prefix, w) for w, cl in enumerate(clients, workers)]
            workers += c
            for name, fn in (("lookup", Ops.lookup), ("save+load", Ops.save_load)):
                await _measure(ops, fn, 2)  # warm-up
                cpu0, stored0 = _cpu_seconds(daemon.pid), sum(o.stored for o in ops)
                lat = await _measure(ops, fn, per_client)
                cpu = _cpu_seconds(daemon.pid) - cpu0
                rows.append(
                    {
                        "op": name,
                        "clients": c,
                        "n": len(lat),
                        "blocks_stored": sum(o.stored for o in ops) - stored0,
                        "p50_s": _pct(lat, 0.5),
                        "p99_s": _pct(lat, 0.99),
                        "daemon_cpu_s_per_1k": 1000 * cpu / len(lat),
                    }
                )
            for cl in clients:
                await cl.close()
        await seed.close()
    finally:
        daemon.terminate()
        await asyncio.wait_for(daemon.wait(), 60)

    manager = await TierManager.open(
        host_bytes=512 * 2**20, disk_url=str(workdir / "embedded"), disk_bytes=2**30
    )
    await manager.save(ns, prefix, blocks, session="bench")
    embedded: dict[str, float] = {}
    ops = [Ops(manager, ns, prefix, 0)]
    for name, fn in (("lookup", Ops.lookup), ("save+load", Ops.save_load)):
        await _measure(ops, fn, 2)
        embedded[name] = statistics.median(await _measure(ops, fn, per_client))
    await manager.close()
    for r in rows:
        if r["clients"] == 1:
            r["socket_vs_embedded_p50"] = r["p50_s"] / embedded[r["op"]]
    return {
        "spec": SPEC.to_dict(),
        "prefix_tokens": PREFIX_TOKENS,
        "per_client": per_client,
        "rows": rows,
        "embedded_p50_s": embedded,
    }


def plot(result: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, op in zip(axes, ("lookup", "save+load"), strict=True):
        rows = [r for r in result["rows"] if r["op"] == op]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["p50_s"] * 1e3 for r in rows], width=0.4, label="p50")
        ax.bar([i + 0.2 for i in x], [r["p99_s"] * 1e3 for r in rows], width=0.4, label="p99")
        ax.axhline(
            result["embedded_p50_s"][op] * 1e3, color="black", linestyle="--", label="embedded p50"
        )
        ax.set_xticks(
            list(x), [f"{r['clients']} client{'s' if r['clients'] > 1 else ''}" for r in rows]
        )
        ax.set_ylabel("latency (ms)")
        title = "lookup of a 32k-token prefix" if op == "lookup" else "save + load of one block"
        ax.set_title(title)
        ax.legend()
    fig.suptitle("tiercache control plane over the Unix socket")
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-control-"))
    try:
        result = asyncio.run(_run(workdir, quick))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write(out, "control", result, plot(result))
    return result


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{'op':<10} {'clients':>7} {'p50':>9} {'p99':>9} {'daemon CPU/1k ops':>18} {'vs embedded':>12}"
    ]
    for r in result["rows"]:
        ratio = f"{r['socket_vs_embedded_p50']:.1f}x" if "socket_vs_embedded_p50" in r else ""
        lines.append(
            f"{r['op']:<10} {r['clients']:>7} {r['p50_s'] * 1e3:>7.2f}ms {r['p99_s'] * 1e3:>7.2f}ms "
            f"{r['daemon_cpu_s_per_1k']:>16.2f}s {ratio:>12}"
        )
    lines.append(
        "embedded p50: "
        + ", ".join(f"{k} {v * 1e3:.2f}ms" for k, v in result["embedded_p50_s"].items())
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(__doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
