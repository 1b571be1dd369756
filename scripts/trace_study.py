"""What a Mooncake-format trace lets an eviction policy know: a study, not a benchmark.

A policy can beat LRU only by telling the blocks that come back from those that do not,
from what it sees when it must choose. This prints, for a trace in Mooncake's JSONL format
(default: the shipped conversation trace), how well the signals a cache sees predict
that a request's prompt is extended by a later request (a conversation's next turn):

- the share of requests whose prompt a later request extends, by turn (how many
  earlier requests the prompt extends: what a block's use count approximates);
- the same by prompt length, and for second turns by the gap since the first;
- how far ahead the next turn comes (in requests), and the odds that a request not yet
  extended after ``a`` requests ever is, with the odds divided by the expected wait
  (hit density): if that falls with age, evicting the stalest first is right and only a
  better predictor of "comes back at all" can beat recency;
- how well all of these together rank the requests that are extended: a logistic model
  over them, fitted on the whole trace (in-sample, so the best these signals can do),
  as an AUC (0.5 is a coin toss, 1 knows every next turn).

    python scripts/trace_study.py [TRACE] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tiercache.bench.trace import TRACE, read_trace

AGES = (0, 50, 100, 200, 300, 400, 600, 800, 1200, 1600)


def study(prompts: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[str]:
    n = len(prompts)
    # Block ids are chained (an id stands for its whole prefix), so two prompts share more
    # than a first block (a system prompt) exactly when they share the second block's id.
    # A request's previous turn is the last earlier prompt with its second block, its next
    # turn the first later one; its turn counts the requests its prompt extends.
    second = [ids[1] if len(ids) > 1 else -1 - i for i, ids in enumerate(prompts)]
    turn, prev, nxt = [1] * n, [-1] * n, [-1] * n
    last: dict[int, int] = {}
    for i, b in enumerate(second):
        if b in last:
            prev[i] = last[b]
            turn[i] = turn[prev[i]] + 1
            nxt[prev[i]] = i
        last[b] = i
    extended = [x >= 0 for x in nxt]
    out = [
        f"requests {n}, extended by a later request {sum(extended)} "
        f"({100 * sum(extended) / n:.1f}%)"
    ]

    def table(name: str, key: Callable[[int], int], edges: Sequence[int], where: list[int]) -> None:
        rows: dict[int, list[int]] = {}
        for i in where:
            k = key(i)
            b = max((e for e in edges if k >= e), default=edges[0])
            rows.setdefault(b, [0, 0])
            rows[b][0] += 1
            rows[b][1] += extended[i]
        cells = [f">={b}: {100 * x / c:.0f}% of {c}" for b, (c, x) in sorted(rows.items())]
        out.append(f"extended, by {name}: " + "; ".join(cells))

    every = list(range(n))
    table("turn", lambda i: min(turn[i], 6), (1, 2, 3, 4, 5, 6), every)
    first = [i for i in every if turn[i] == 1 and len(prompts[i]) > 2]
    table(
        "prompt tokens (first turns)",
        lambda i: lengths[i],
        (0, 2000, 4000, 8000, 16000, 32000),
        first,
    )
    second = [i for i in every if turn[i] == 2]
    table(
        "requests since turn 1 (second turns)", lambda i: i - prev[i], (0, 100, 300, 1000), second
    )
    waits = sorted(nxt[i] - i for i in every if extended[i])
    if waits:
        q = [waits[int(p * (len(waits) - 1))] for p in (0.1, 0.25, 0.5, 0.75, 0.9)]
        out.append("requests until the next turn, p10/p25/p50/p75/p90: " + "/".join(map(str, q)))
        cells = []
        for a in AGES:
            alive = [i for i in every if not extended[i] or nxt[i] - i > a]
            later = [nxt[i] - i - a for i in alive if extended[i]]
            if not alive or not later:
                break
            odds = len(later) / len(alive)
            cells.append(f"{a}: {100 * odds:.1f}% / {odds / (sum(later) / len(later)) * 1e4:.2f}")
        out.append("odds of a next turn / hit density (per 10k requests), by requests waited: ")
        out.append("  " + "; ".join(cells))
    new = [len(prompts[i]) - (len(prompts[prev[i]]) if prev[i] >= 0 else 0) for i in every]
    signals = np.log1p(
        np.array(
            [
                [turn[i], lengths[i], max(0, new[i]), i - prev[i] if prev[i] >= 0 else 0]
                for i in every
            ],
            dtype=np.float64,
        )
    )
    first_turn = np.array([turn[i] == 1 for i in every], dtype=np.float64)
    x = np.column_stack([np.ones(n), signals, first_turn])
    y = np.array(extended, dtype=np.float64)
    out.append(
        "all of these together (turn, prompt tokens, new blocks, wait since the last turn; "
        f"logistic, fitted on the whole trace): AUC {auc(fit_logistic(x, y) @ x.T, y):.3f}"
    )
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 50) -> np.ndarray:
    """Weights of a logistic regression of ``y`` on ``x`` (Newton's method, a touch of ridge
    so that a signal that separates the classes perfectly stays finite)."""
    w = np.zeros(x.shape[1])
    ridge = 1e-6 * np.eye(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) / len(y) + ridge @ w
        hess = (x.T * (p * (1 - p))) @ x / len(y) + ridge
        w -= np.linalg.solve(hess, grad)
    return w


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """The chance that a random positive scores above a random negative, ties counting half
    (Mann-Whitney); 0.5 when either class is empty."""
    pos = int(y.sum())
    neg = len(y) - pos
    if not pos or not neg:
        return 0.5
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    s = score[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", nargs="?", type=Path, default=TRACE)
    p.add_argument("--out", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    t = read_trace(args.trace)
    lines = [f"trace: {Path(t.source).name}", *study(t.prompts, t.tokens)]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
