"""A benchmark run end to end (``--quick``): it writes its JSON and PNG. These check that the
measuring code works and says what it measured; they assert no timings (benchmarks report
numbers, tests assert behaviour)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tiercache.daemon.cli import main


def writes_json_and_png(tmp_path: Path, name: str, keys: set[str]) -> None:
    assert main(["bench", name, "--quick", "--out", str(tmp_path)]) == 0
    stem = name.replace("-", "_")
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert keys <= set(result)
    png = (tmp_path / f"{stem}.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def measures_nothing_without_cuda(
    bench: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GPU benchmark on a machine without CUDA exits 1, says so and writes nothing."""
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 1
    assert "no CUDA device visible to CuPy and torch; nothing measured" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())
