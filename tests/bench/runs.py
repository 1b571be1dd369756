"""A benchmark run end to end (``--quick``): it writes its JSON and PNG. These check that the
measuring code works and says what it measured; they assert no timings (benchmarks report
numbers, tests assert behaviour)."""

from __future__ import annotations

import json
from pathlib import Path

from tiercache.daemon.cli import main


def writes_json_and_png(tmp_path: Path, name: str, keys: set[str]) -> None:
    assert main(["bench", name, "--quick", "--out", str(tmp_path)]) == 0
    stem = name.replace("-", "_")
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert keys <= set(result)
    png = (tmp_path / f"{stem}.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
