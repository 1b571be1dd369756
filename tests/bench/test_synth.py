"""Synthetic conversation traces in Mooncake's format: chained block ids, one seed one trace."""

from __future__ import annotations

import pytest

from tiercache.bench import synth
from tiercache.bench.trace import ceiling


@pytest.mark.parametrize("kind", ["chat", "documents", "agents", "mixed"])
def test_synthetic_traces_are_chained_as_mooncake_traces_are(kind: str) -> None:
    rows = synth.generate(kind, seed=3, hours=0.1)
    prompts = [tuple(r["hash_ids"]) for r in rows]  # type: ignore[call-overload]

    assert synth.generate(kind, seed=3, hours=0.1) == rows  # a seed is a trace
    parent: dict[int, int] = {}
    for ids in prompts:
        for before, block in zip((-1, *ids), ids, strict=False):
            assert parent.setdefault(block, before) == before  # an id is one prefix
    lasts = [ids[-1] for ids in prompts]
    assert len(set(lasts)) == len(lasts)  # a partial last block is never met again
    assert 0 < sum(ceiling(prompts)) < sum(map(len, prompts))
