"""scripts/trace_study.py: what a trace lets a policy know, counted exactly on a tiny trace."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "trace_study.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trace_study", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_turns_and_waits_are_counted_from_shared_second_blocks(tmp_path: Path) -> None:
    # Conversation A: turns at requests 0, 2, 3; B at 1 (never continued); C at 4, 5.
    prompts = [[0, 1, 2], [0, 10, 11], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 20], [0, 20, 21]]
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"timestamp": i, "input_length": 512 * len(p), "hash_ids": p}) + "\n"
            for i, p in enumerate(prompts)
        )
    )
    out = tmp_path / "report.txt"
    assert _load().main([str(trace), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[1] == "requests 6, extended by a later request 3 (50.0%)"
    assert lines[2].startswith("extended, by turn: >=1: 67% of 3; >=2: 50% of 2; >=3: 0% of 1")
    assert lines[5].endswith("p10/p25/p50/p75/p90: 1/1/1/1/1")  # waits 2, 1, 1
    # 3 of 6 are extended, after 4/3 requests on average: 0.5 / (4/3) per request.
    assert lines[7].strip().startswith("0: 50.0% / 3750.00")
    assert lines[8].startswith("all of these together")


def test_auc_counts_ordered_pairs_and_ties_half() -> None:
    study = _load()
    y = np.array([0, 0, 1, 1], dtype=np.float64)
    assert study.auc(np.array([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert study.auc(np.array([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert study.auc(np.zeros(4), y) == 0.5
    # Pairs (positive, negative): two ordered, one tied, one misordered: (2 + 0.5) / 4.
    assert study.auc(np.array([0.1, 0.3, 0.3, 0.2]), y) == 0.625


def test_a_signal_that_decides_the_label_fits_to_an_auc_of_one() -> None:
    study = _load()
    rng = np.random.default_rng(0)
    signal = rng.normal(size=200)
    noise = rng.normal(size=200)
    y = (signal > 0).astype(np.float64)
    x = np.column_stack([np.ones(200), noise, signal])
    assert study.auc(x @ study.fit_logistic(x, y), y) == 1.0
    x_noise = np.column_stack([np.ones(200), noise])
    assert abs(study.auc(x_noise @ study.fit_logistic(x_noise, y), y) - 0.5) < 0.1
