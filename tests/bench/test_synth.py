"""Synthetic conversation traces in Mooncake's format: chained block ids, one seed one trace."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hours", "nan"], "argument --hours: hours must be a positive finite number"),
        (["--hours", "inf"], "argument --hours: hours must be a positive finite number"),
        (["--hours", "0"], "argument --hours: hours must be a positive finite number"),
        (["--hours", "-1"], "argument --hours: hours must be a positive finite number"),
        (["--out", "."], "is a directory, not the JSONL file to write"),
    ],
)
def test_the_generator_refuses_bad_arguments_in_one_line(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # nan hours never ended (no arrival time is >= nan), 0 or less wrote an empty trace that
    # replays nothing, a directory for --out ended in IsADirectoryError's traceback.
    out = ["--out", str(tmp_path / "t.jsonl")]
    with pytest.raises(SystemExit) as e:
        synth.main(["chat", *out, *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists()
    with pytest.raises(ValueError, match="hours must be a positive finite number"):
        synth.generate("chat", hours=float("nan"))
