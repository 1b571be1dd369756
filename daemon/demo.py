"""``tiercache demo``: a multi-turn chat that resumes from a tiercache daemon instead of recomputing.

The demo starts a real daemon (``tiercache serve``, a separate process, on a
socket of its own) and a small Llama-style model with seeded random weights (no
model hub) chats for a few turns through it. Before each turn the
conversation's KV is restored by session id over the socket and the shared
arena, so only the new message is prefilled; after each turn its KV is saved.
Every turn is also recomputed from scratch, and the two replies are compared
token for token. Halfway through, the daemon is stopped (SIGTERM: it flushes
to disk) and started again, so the next turn resumes from the disk tier.

The model's text is noise (random weights); the point is the numbers and the
equality. Tokens are bytes of the message text.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from tiercache.client import Client
from tiercache.daemon.config import Config
from tiercache.daemon.process import DaemonProcess
from tiercache.integrations.hf import HFChatCache, generate_cache_kwarg
from tiercache.spec import format_size

MESSAGES = [
    "You are a careful assistant. Summarise the attached design review of the storage layer, "
    "list the open risks, and propose the next three experiments. ",
    "Now compare the write-back and write-through policies for a cache that must survive a "
    "crash, and say which one you would ship first and why. ",
    "Good. Draft the runbook entry an operator follows when the disk tier fills up at night. ",
    "Finally, write the release note for this version in five sentences. ",
]


@dataclass
class TurnReport:
    turn: int
    prompt_tokens: int
    reused_tokens: int
    tier: str
    load_ms: float
    resume_ttft_ms: float
    recompute_ttft_ms: float
    identical: bool


def _tokens(text: str, vocab: int) -> torch.Tensor:
    return torch.tensor([b % vocab for b in text.encode()], dtype=torch.long)


def _ttft(model: Any, ids: torch.Tensor, past: Any) -> float:
    """Time to the first token: one forward over the uncached part of ``ids``."""
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids[None],
            **{generate_cache_kwarg(): past},
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=0,
        )
    return (time.perf_counter() - t0) * 1000


def run_demo(
    config: Config,
    *,
    config_path: str | None = None,
    turns: int = 4,
    context_tokens: int = 1024,
    reply_tokens: int = 16,
    restart_after: int = 2,
    out: TextIO = sys.stdout,
) -> list[TurnReport]:
    from transformers import DynamicCache

    from tiercache.demo_models import tiny_model

    model = tiny_model("llama", seed=0)
    vocab = model.config.vocab_size
    _ttft(model, _tokens(MESSAGES[1], vocab), DynamicCache(config=model.config))  # warm-up, untimed
    # The first message carries a long context (a pasted document), as resumed chats do.
    document = (MESSAGES[0] * (1 + context_tokens // len(MESSAGES[0])))[:context_tokens]
    convo = torch.empty(0, dtype=torch.long)
    reports: list[TurnReport] = []
    session = "demo-chat"
    with tempfile.TemporaryDirectory(prefix="tiercache-demo-") as tmp:
        daemon = DaemonProcess(Path(tmp), config_path=config_path)
        daemon.start()
        client = Client(daemon.socket, name="tiercache-demo")
        try:
            # A fresh salt per run: the first turn starts cold even when the disk
            # tier still holds an earlier run's blocks (the session is evicted at the end).
            chat = HFChatCache(client, model, block_size=16, salt=f"demo-{secrets.token_hex(4)}")
            disk = config.tiers.disk.url if config.tiers.disk else "(none)"
            print(
                f"tiercache demo: {type(model).__name__} with random weights, "
                f"{format_size(chat.kv.bytes_per_token)} of KV per token",
                file=out,
            )
            print(
                f"daemon: pid {daemon.proc.pid if daemon.proc else '?'}, socket {daemon.socket}, disk tier {disk}",
                file=out,
            )
            print(
                f"{'turn':>4} {'prompt':>7} {'reused':>7} {'tier':>5} {'load':>9} "
                f"{'resume TTFT':>12} {'recompute TTFT':>15} {'speedup':>8}  same reply",
                file=out,
            )
            for turn in range(turns):
                message = document if turn == 0 else MESSAGES[turn % len(MESSAGES)]
                convo = torch.cat([convo, _tokens(message, vocab)])
                if turn == restart_after:
                    client.close()
                    daemon.stop()
                    daemon.start()
                    client = Client(daemon.socket, name="tiercache-demo")
                    chat.cache = client
                    print(
                        "     -- daemon stopped (SIGTERM flushes) and started again: "
                        "the next turn resumes from disk --",
                        file=out,
                    )
                past, reused = chat.restore(session, convo)
                load = chat.last_load
                load_ms = load.seconds * 1000 if load else 0.0
                tier = "+".join(sorted(load.per_tier)) if load and load.per_tier else "-"
                resume_ttft = load_ms + _ttft(model, convo, past)
                recompute_ttft = _ttft(model, convo, DynamicCache(config=model.config))
                # The reply, generated on the resumed cache and by full recompute.
                past, _ = chat.restore(session, convo)
                with torch.no_grad():
                    resumed = model.generate(
                        convo[None],
                        **{generate_cache_kwarg(): past},
                        max_new_tokens=reply_tokens,
                        do_sample=False,
                        pad_token_id=0,
                    )[0]
                    recomputed = model.generate(
                        convo[None],
                        **{generate_cache_kwarg(): DynamicCache(config=model.config)},
                        max_new_tokens=reply_tokens,
                        do_sample=False,
                        pad_token_id=0,
                    )[0]
                identical = torch.equal(resumed, recomputed)
                chat.save(session, resumed[:-1], past)
                convo = resumed
                r = TurnReport(
                    turn + 1,
                    int(convo.numel() - reply_tokens),
                    reused,
                    tier,
                    load_ms,
                    resume_ttft,
                    recompute_ttft,
                    identical,
                )
                reports.append(r)
                speedup = r.recompute_ttft_ms / r.resume_ttft_ms if reused else 1.0
                print(
                    f"{r.turn:>4} {r.prompt_tokens:>7} {r.reused_tokens:>7} {r.tier:>5} {r.load_ms:>7.1f}ms "
                    f"{r.resume_ttft_ms:>10.1f}ms {r.recompute_ttft_ms:>13.1f}ms {speedup:>7.1f}x  "
                    f"{'yes' if identical else 'NO'}",
                    file=out,
                )
            stats = client.stats()
            print(
                "tiers: "
                + ", ".join(
                    f"{t} {format_size(u['used_bytes'])} of {format_size(u['capacity_bytes'])} ({u['blocks']} blocks)"
                    for t, u in stats["tiers"].items()
                ),
                file=out,
            )
            client.evict(session=session)
        finally:
            client.close()
            daemon.stop()
    return reports
