"""Synthetic traces in Mooncake's JSONL format, to judge eviction policies beyond the one real trace.

``python -m tiercache.bench.synth {chat,documents,agents,mixed} --out FILE [--seed N]`` writes
one request a line (``timestamp`` in ms, ``input_length``, ``output_length``,
``hash_ids``), which ``tiercache bench trace --trace FILE`` replays. Each model
is a few lines of a generative story, its constants round numbers rather than
fits to anything:

- ``chat``: chats arrive at random; each opens with one of 200 system prompts,
  Zipf-popular, and goes on turn after turn with a chance that rises with its
  length (people who stay, stay); a user's think time is lognormal (median a
  minute, a long tail).
- ``documents``: long one-off documents (20 to 120 blocks) under a few shared
  instructions; a quarter of them get follow-up questions minutes later.
- ``agents``: agent loops: a Zipf-popular tool prompt (10 to 30 blocks) and a
  task, then steps seconds apart, each appending tool output, 5 to 40 steps.
- ``mixed``: the three at once.

Block ids are chained as Mooncake's are (an equal id means an equal prefix up to
and including that block): a prompt is a list of block contents and ids come
from a trie over them. Each prompt's last block is partial, as in Mooncake's
traces: an id of its own that the next turn, which fills it up, never repeats.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK_TOKENS = 512
MINUTES = 60.0


class Ids:
    """Chained block ids: the same contents after the same prefix get the same id."""

    def __init__(self) -> None:
        self._trie: dict[tuple[int, object], int] = {}

    def chain(self, contents: Sequence[object]) -> list[int]:
        ids: list[int] = []
        parent = -1
        for c in contents:
            parent = self._trie.setdefault((parent, c), len(self._trie))
            ids.append(parent)
        return ids


@dataclass(order=True, slots=True)
class Turn:
    """The next request of a conversation, due at ``at`` seconds."""

    at: float
    seq: int
    contents: tuple[object, ...] = field(compare=False)  # full blocks so far
    turns: int = field(compare=False, default=0)
    kind: str = field(compare=False, default="chat")


def _zipf(rng: random.Random, n: int, s: float = 1.1) -> int:
    weights = [1.0 / (i + 1) ** s for i in range(n)]
    return rng.choices(range(n), weights)[0]


def _arrivals(rng: random.Random, rate: float, until: float) -> Iterator[float]:
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= until:
            return
        yield t


def _start(kind: str, rng: random.Random, t: float, seq: int) -> Turn:
    if kind == "chat":
        system = [("system", _zipf(rng, 200), i) for i in range(rng.randint(1, 6))]
        user = (("user", seq, i) for i in range(rng.randint(1, 8)))
        return Turn(t, seq, (*system, *user), 0, kind)
    if kind == "documents":
        head = [("instructions", _zipf(rng, 5), i) for i in range(2)]
        doc = (("doc", seq, i) for i in range(rng.randint(20, 120)))
        return Turn(t, seq, (*head, *doc), 0, kind)
    tools = [("tools", _zipf(rng, 20), i) for i in range(rng.randint(10, 30))]
    task = (("task", seq, i) for i in range(rng.randint(1, 3)))
    return Turn(t, seq, (*tools, *task), 0, kind)


def _next(turn: Turn, rng: random.Random) -> Turn | None:
    """The conversation's next request, or None if it ends here."""
    k = turn.turns + 1
    if turn.kind == "chat":
        if rng.random() > 1 - 0.5 / k:  # goes on with chance 0.5, 0.75, 0.83, ... after turn k
            return None
        gap = rng.lognormvariate(math.log(MINUTES), 1.0)
        new = rng.randint(1, 4)
    elif turn.kind == "documents":
        if rng.random() > (0.25 if k == 1 else 0.5):
            return None
        gap = rng.uniform(1, 10) * MINUTES
        new = 1
    else:
        if k >= rng.randint(5, 40):
            return None
        gap = rng.uniform(2, 20)
        new = rng.randint(1, 3)
    grown = (*turn.contents, *(("turn", turn.seq, k, i) for i in range(new)))
    return Turn(turn.at + gap, turn.seq, grown, k, turn.kind)


def generate(kind: str, seed: int = 0, hours: float = 1.0) -> list[dict[str, Any]]:
    """The requests of ``hours`` of traffic of model ``kind``, in arrival order."""
    if not 0 < hours < math.inf:  # nan never ends the arrivals, inf never ends at all
        raise ValueError(f"hours must be a positive finite number, got {hours}")
    rng = random.Random(seed)
    kinds = ("chat", "documents", "agents") if kind == "mixed" else (kind,)
    # New conversations per second: about 300k prompt blocks an hour each, as in Mooncake's.
    rate = {"chat": 0.6, "documents": 0.8, "agents": 0.2}
    until = hours * 3600.0
    pending: list[Turn] = []
    seq = 0
    for k in kinds:
        for t in _arrivals(rng, rate[k] / len(kinds), until):
            heapq.heappush(pending, _start(k, rng, t, seq))
            seq += 1
    ids = Ids()
    out: list[dict[str, Any]] = []
    while pending:
        turn = heapq.heappop(pending)
        if turn.at >= until:
            continue
        partial = rng.randint(1, BLOCK_TOKENS - 1)  # the last block, partly filled
        chain = ids.chain([*turn.contents, ("partial", turn.seq, turn.turns)])
        out.append(
            {
                "timestamp": int(turn.at * 1000),
                "input_length": len(turn.contents) * BLOCK_TOKENS + partial,
                "output_length": rng.randint(50, 800),
                "hash_ids": chain,
            }
        )
        nxt = _next(turn, rng)
        if nxt is not None:
            heapq.heappush(pending, nxt)
    return out


def _hours(text: str) -> float:
    try:
        hours = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < hours < math.inf:
        raise argparse.ArgumentTypeError(f"hours must be a positive finite number, got {text!r}")
    return hours


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("kind", choices=["chat", "documents", "agents", "mixed"])
    p.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hours", type=_hours, default=1.0)
    args = p.parse_args(argv)
    if args.out.is_dir():
        p.error(f"--out {args.out} is a directory, not the JSONL file to write")
    rows = generate(args.kind, args.seed, args.hours)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    except OSError as e:
        p.error(f"--out {args.out}: {e.strerror}: {e.filename}")
    blocks = sum(len(r["hash_ids"]) for r in rows)
    print(f"{args.out}: {len(rows):,} requests, {blocks:,} prompt blocks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
