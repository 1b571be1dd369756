"""Resume vs recompute: time to first token of a chat turn whose prefix is cached.

The demo model (``tiercache.demo_models.tiny_model("llama")``) gets a prefix of
1k or 4k tokens plus a 32-token new message. Three ways to the first token,
timed side by side in one run:

- recompute: ``generate`` over the whole prompt with an empty cache;
- resume from host: ``HFChatCache.restore`` (a host-tier hit) + ``generate``
  over the new message only;
- resume from disk: the same after the cache was closed and reopened, so every
  block comes from the zarr disk tier.

The reported ratio is recompute TTFT / resume TTFT (how many times faster).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tiercache.bench.common import cli, timed, write
from tiercache.daemon.config import load_config
from tiercache.embedded import SyncCache
from tiercache.integrations.hf import HFChatCache

MESSAGE = 32


def _first_token(model: Any, ids: torch.Tensor, past: Any) -> None:
    with torch.no_grad():
        model.generate(
            ids[None], past_key_values=past, max_new_tokens=1, do_sample=False, pad_token_id=0
        )


def check_restored(saved: Any, restored: Any, tokens: int, where: str) -> None:
    """``restored`` (a resumed turn's cache, the new message appended) must hold the first
    ``tokens`` of the keys and values of ``saved``, the cache they were saved from."""
    for a, b in zip(saved.layers, restored.layers, strict=True):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            if not torch.equal(x[..., :tokens, :], y[..., :tokens, :]):
                raise RuntimeError(f"the resume from {where} restored other keys and values")


def bench_prefix(model: Any, prefix: int, reps: int, workdir: Path) -> dict[str, Any]:
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(prefix)
    ids = torch.randint(1, model.config.vocab_size, (prefix + MESSAGE,), generator=g)
    env = {
        "TIERCACHE_TIERS_DISK__URL": str(workdir / f"disk-{prefix}"),
        "TIERCACHE_TIERS_HOST__BYTES": "256MiB",
        "TIERCACHE_POLICY__WRITE": "write-through",
    }
    cfg = load_config(env=env)
    cache = SyncCache(cfg)
    chat = HFChatCache(cache, model, model_id="bench-llama")
    with torch.no_grad():
        past = DynamicCache(config=model.config)
        model(ids[None, :prefix], past_key_values=past)
    chat.save("bench", ids[:prefix], past)

    recompute: list[float] = []
    host: list[float] = []
    disk: list[float] = []
    reused = 0
    restored: Any = None
    for rep in range(reps):
        # Which goes first alternates: a run that follows another finds the weights in cache.
        if rep % 2 == 0:
            recompute.append(
                timed(lambda: _first_token(model, ids, DynamicCache(config=model.config)))
            )

        def resume() -> None:
            nonlocal reused, restored
            restored, reused = chat.restore("bench", ids)
            _first_token(model, ids, restored)

        host.append(timed(resume))
        check_restored(past, restored, reused, "host")
        cache.close()
        cache = SyncCache(cfg)  # a restart: host is empty, every block is on disk
        chat.cache = cache
        disk.append(timed(resume))
        assert chat.last_load is not None and chat.last_load.per_tier == {"disk": reused // 16}
        check_restored(past, restored, reused, "disk")
        if rep % 2:
            recompute.append(
                timed(lambda: _first_token(model, ids, DynamicCache(config=model.config)))
            )
    cache.close()
    rec = statistics.median(recompute)
    return {
        "prefix_tokens": prefix,
        "reused_tokens": reused,
        "recompute_s": rec,
        "resume_host_s": statistics.median(host),
        "resume_disk_s": statistics.median(disk),
        "speedup_host": statistics.median(r / h for r, h in zip(recompute, host, strict=True)),
        "speedup_disk": statistics.median(r / d for r, d in zip(recompute, disk, strict=True)),
    }


def plot(result: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["prefixes"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(rows))
    for j, (key, label) in enumerate(
        (
            ("recompute_s", "recompute"),
            ("resume_host_s", "resume, host hit"),
            ("resume_disk_s", "resume, disk hit"),
        )
    ):
        ax.bar(
            [i + (j - 1) * 0.27 for i in x], [r[key] * 1000 for r in rows], width=0.27, label=label
        )
    for i, r in enumerate(rows):
        ax.annotate(
            f"{r['speedup_host']:.1f}x / {r['speedup_disk']:.1f}x",
            (i, r["recompute_s"] * 1000),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x), [f"{r['prefix_tokens']} + {MESSAGE} tokens" for r in rows])
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"resume vs recompute, {result['model']} (speedup host / disk)")
    ax.legend()
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    from tiercache.demo_models import tiny_model

    model = tiny_model("llama", seed=0)
    prefixes = [256] if quick else [1024, 4096]
    reps = 2 if quick else 5
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-resume-"))
    try:
        result = {
            "model": f"{type(model).__name__} {model.config.num_hidden_layers}L/{model.config.hidden_size}h "
            f"random weights, fp32",
            "reps": reps,
            "prefixes": [bench_prefix(model, p, reps, workdir) for p in prefixes],
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write(out, "resume", result, plot(result))
    return result


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{'prefix':>7} {'reused':>7} {'recompute':>10} {'host':>9} {'disk':>9} {'x host':>7} {'x disk':>7}"
    ]
    for r in result["prefixes"]:
        lines.append(
            f"{r['prefix_tokens']:>7} {r['reused_tokens']:>7} {r['recompute_s'] * 1000:>8.1f}ms "
            f"{r['resume_host_s'] * 1000:>7.1f}ms {r['resume_disk_s'] * 1000:>7.1f}ms "
            f"{r['speedup_host']:>6.1f}x {r['speedup_disk']:>6.1f}x"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(__doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
