"""The shared tier against plain s3fs, and resume from it against recompute, on a real SeaweedFS.

Starts its own SeaweedFS (``weed server -s3``, loopback, a temporary
directory), then measures in one run:

- throughput: the same random blocks written and read (16 in flight, as the
  uploader and a fill do) three ways, interleaved per repetition:
  tiercache's shared tier (``RemoteTier.put``/``get``: zarr's ``ObjectStore``
  over obstore, plus the trailer and its xxh3 check), zarr's ``FsspecStore``
  over s3fs (the store layer the tier did not pick), and plain s3fs
  ``pipe_file``/``cat_file`` (the baseline). Ratios are baseline time / ours.
- resume: time to first token of the demo model on node B for a
  1024-token conversation node A saved: restored from the shared tier (B's
  local tiers empty) against full recompute.

SeaweedFS and the client share this machine's cores, so the absolute numbers
are a loopback floor, not a network measurement; the ratios are the point.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tiercache.bench.common import cli, size_label, timed, write
from tiercache.bench.seaweedfs import KEY_ID, SECRET, SeaweedFS, serving
from tiercache.tiers.remote import RemoteTier

BUCKET = "tiercache-bench"
IN_FLIGHT = 16
MESSAGE = 32


async def _bounded(fns: Sequence[Callable[[], Awaitable[Any]]]) -> float:
    sem = asyncio.Semaphore(IN_FLIGHT)

    async def one(fn: Callable[[], Awaitable[Any]]) -> None:
        async with sem:
            await fn()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(f) for f in fns))
    return time.perf_counter() - t0


async def throughput(
    weed: SeaweedFS, sizes: list[int], total: int, reps: int
) -> list[dict[str, Any]]:
    import s3fs
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.buffer.cpu import Buffer
    from zarr.storage import FsspecStore

    tier = await RemoteTier.open(f"s3://{BUCKET}/tier", weed.options())
    fs = s3fs.S3FileSystem(key=KEY_ID, secret=SECRET, endpoint_url=weed.endpoint, asynchronous=True)
    s3 = await fs.set_session()
    zstore = FsspecStore(fs, path=f"{BUCKET}/zarr-s3fs")
    proto = default_buffer_prototype()
    rows = []

    async def measure(nbytes: int) -> dict[str, Any]:
        n = max(8, total // nbytes)
        blocks = torch.randint(0, 256, (n, nbytes), dtype=torch.uint8)
        keys = [os.urandom(16) for _ in range(n)]
        raw = [blocks[i].numpy().tobytes() for i in range(n)]
        array = f"ns/{nbytes}"
        plain = f"{BUCKET}/plain/{nbytes}"

        def ours_w(i: int) -> Awaitable[Any]:
            return tier.put(array, keys[i], blocks[i])

        def ours_r(i: int) -> Awaitable[Any]:
            return _must(tier.get(array, keys[i], nbytes))

        def zarr_w(i: int) -> Awaitable[Any]:
            return zstore.set(f"{nbytes}/{i}", Buffer.from_bytes(raw[i]))

        def zarr_r(i: int) -> Awaitable[Any]:
            return zstore.get(f"{nbytes}/{i}", prototype=proto)

        def s3fs_w(i: int) -> Awaitable[Any]:
            return fs._pipe_file(f"{plain}/{i}", raw[i])  # type: ignore[no-any-return]

        def s3fs_r(i: int) -> Awaitable[Any]:
            return fs._cat_file(f"{plain}/{i}")  # type: ignore[no-any-return]

        ways = {
            "tiercache": (ours_w, ours_r),
            "zarr_s3fs": (zarr_w, zarr_r),
            "s3fs": (s3fs_w, s3fs_r),
        }
        times: dict[str, dict[str, list[float]]] = {w: {"write": [], "read": []} for w in ways}
        for rep in range(reps):
            order = list(ways) if rep % 2 == 0 else list(reversed(ways))
            for op in ("write", "read"):
                for w in order:
                    fn = ways[w][0 if op == "write" else 1]
                    times[w][op].append(await _bounded([partial(fn, i) for i in range(n)]))
        mib = n * nbytes / 2**20
        row: dict[str, Any] = {"block_bytes": nbytes, "blocks": n, "mib": mib}
        for w, ops in times.items():
            for op, ts in ops.items():
                row[f"{w}_{op}_mib_s"] = mib / statistics.median(ts)
        for op in ("write", "read"):
            base = times["s3fs"][op]
            row[f"{op}_vs_s3fs"] = statistics.median(
                b / o for o, b in zip(times["tiercache"][op], base, strict=True)
            )
        return row

    for nbytes in sizes:
        rows.append(await measure(nbytes))
    await tier.close()
    await s3.close()
    return rows


async def _must(got: Awaitable[Any]) -> None:
    if await got is None:
        raise RuntimeError("a block the benchmark wrote was not read back")


def resume(weed: SeaweedFS, workdir: Path, prefix: int, reps: int) -> dict[str, Any]:
    from transformers import DynamicCache

    from tiercache.bench.resume import _first_token, check_restored
    from tiercache.daemon.config import load_config
    from tiercache.demo_models import tiny_model
    from tiercache.embedded import SyncCache
    from tiercache.integrations.hf import HFChatCache

    model = tiny_model("llama", seed=0)
    g = torch.Generator().manual_seed(prefix)
    ids = torch.randint(1, model.config.vocab_size, (prefix + MESSAGE,), generator=g)

    def node(name: str) -> SyncCache:
        return SyncCache(
            load_config(
                env={
                    "TIERCACHE_TIERS_DISK__URL": str(workdir / name),
                    "TIERCACHE_TIERS_HOST__BYTES": "256MiB",
                    "TIERCACHE_TIERS_REMOTE__URL": f"s3://{BUCKET}/resume",
                    "TIERCACHE_TIERS_REMOTE__ENDPOINT": weed.endpoint,
                    "TIERCACHE_TIERS_REMOTE__KEY_ID": KEY_ID,
                    "TIERCACHE_TIERS_REMOTE__SECRET_FILE": str(weed.secret_file),
                    "TIERCACHE_TIERS_REMOTE__TIMEOUT": "5",
                }
            )
        )

    a = node("a")
    with torch.no_grad():
        past = DynamicCache(config=model.config)
        model(ids[None, :prefix], past_key_values=past)
    HFChatCache(a, model, model_id="bench-llama").save("chat", ids[:prefix], past)
    a._run(a.manager.shared.drain(60))  # type: ignore[union-attr]
    a.close()

    recompute: list[float] = []
    remote: list[float] = []
    reused = 0
    restored: Any = None
    for rep in range(reps):
        # Which goes first alternates: a run that follows another finds the weights in cache.
        if rep % 2 == 0:
            recompute.append(
                timed(lambda: _first_token(model, ids, DynamicCache(config=model.config)))
            )
        b = node(f"b{rep}")  # a node that never saw the chat: empty host and disk
        chat = HFChatCache(b, model, model_id="bench-llama")

        def go(chat: HFChatCache = chat) -> None:
            nonlocal reused, restored
            restored, reused = chat.restore("chat", ids)
            _first_token(model, ids, restored)

        remote.append(timed(go))
        assert chat.last_load is not None and set(chat.last_load.per_tier) == {"remote"}
        check_restored(past, restored, reused, "the shared tier")
        b.close()
        if rep % 2:
            recompute.append(
                timed(lambda: _first_token(model, ids, DynamicCache(config=model.config)))
            )
    return {
        "prefix_tokens": prefix,
        "reused_tokens": reused,
        "recompute_s": statistics.median(recompute),
        "resume_remote_s": statistics.median(remote),
        "speedup": statistics.median(r / x for r, x in zip(recompute, remote, strict=True)),
    }


def plot(result: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["throughput"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    x = range(len(rows))
    for ax, op in ((ax1, "write"), (ax2, "read")):
        for j, (way, label) in enumerate(
            (
                ("tiercache", "shared tier (obstore)"),
                ("zarr_s3fs", "zarr FsspecStore + s3fs"),
                ("s3fs", "plain s3fs"),
            )
        ):
            ax.bar(
                [i + (j - 1) * 0.27 for i in x],
                [r[f"{way}_{op}_mib_s"] for r in rows],
                width=0.27,
                label=label,
            )
        ax.set_xticks(list(x), [size_label(r["block_bytes"]) for r in rows])
        ax.set_ylabel("MiB/s")
        ax.set_title(f"{op}, {IN_FLIGHT} in flight (SeaweedFS, loopback)")
        ax.legend(fontsize=7)
    r = result["resume"]
    ax3.bar(
        ["recompute", "resume from\nshared tier"],
        [r["recompute_s"] * 1000, r["resume_remote_s"] * 1000],
    )
    ax3.set_ylabel("time to first token (ms)")
    ax3.set_title(f"{r['prefix_tokens']} + {MESSAGE} tokens: {r['speedup']:.1f}x")
    fig.tight_layout()
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-remote-"))
    sizes = [256 * 2**10] if quick else [256 * 2**10, 2**20, 4 * 2**20]
    total = 2 * 2**20 if quick else 32 * 2**20
    reps = 2 if quick else 5
    try:
        with serving(workdir / "seaweedfs", BUCKET) as weed:
            result = {
                "store": "SeaweedFS (weed server -s3) on loopback, same machine",
                "in_flight": IN_FLIGHT,
                "reps": reps,
                "throughput": asyncio.run(throughput(weed, sizes, total, reps)),
                "resume": resume(weed, workdir, 256 if quick else 1024, 2 if quick else 3),
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write(out, "remote", result, plot(result))
    return result


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{'block':>8} {'write MiB/s (tc / zarr+s3fs / s3fs)':>38} {'read MiB/s (tc / zarr+s3fs / s3fs)':>38}"
    ]
    for r in result["throughput"]:
        cells = [
            " / ".join(f"{r[f'{w}_{op}_mib_s']:.0f}" for w in ("tiercache", "zarr_s3fs", "s3fs"))
            + f" ({r[f'{op}_vs_s3fs']:.2f}x)"
            for op in ("write", "read")
        ]
        lines.append(f"{size_label(r['block_bytes']):>8} {cells[0]:>38} {cells[1]:>38}")
    r = result["resume"]
    lines.append(
        f"resume {r['prefix_tokens']}+{MESSAGE} tokens: recompute {r['recompute_s'] * 1000:.1f} ms, "
        f"from the shared tier {r['resume_remote_s'] * 1000:.1f} ms ({r['speedup']:.1f}x)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(__doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
