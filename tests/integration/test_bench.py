"""The benchmark scripts run end to end (``--quick``) and write their JSON and PNG.

These check that the measuring code works and says what it measured; they
assert no timings (benchmarks report numbers, tests assert behaviour).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiercache.daemon.cli import main


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("storage", {"host", "disk", "machine"}),
        ("resume", {"prefixes", "model", "machine"}),
        ("control", {"rows", "embedded_p50_s", "machine"}),
        ("trace", {"sweeps", "machine"}),
        ("remote", {"throughput", "resume", "machine"}),
    ],
)
def test_benchmark_writes_json_and_png(tmp_path: Path, name: str, keys: set[str]) -> None:
    assert main(["bench", name, "--quick", "--out", str(tmp_path)]) == 0
    stem = name.replace("-", "_")
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert keys <= set(result)
    png = (tmp_path / f"{stem}.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_resume_benchmark_reuses_the_whole_prefix(tmp_path: Path) -> None:
    assert main(["bench", "resume", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "resume.json").read_text())["prefixes"]
    assert all(r["reused_tokens"] == r["prefix_tokens"] for r in rows)


def test_the_disk_layout_study_still_runs_from_scripts(tmp_path: Path) -> None:
    # The finished study lives outside the package; it must keep reproducing its record.
    script = Path(__file__).resolve().parents[2] / "scripts" / "disk_layout_study.py"
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], check=True)
    result = json.loads((tmp_path / "disk_layout.json").read_text())
    assert {"io", "codecs", "meta"} <= set(result)
    assert (tmp_path / "disk_layout.png").read_bytes().startswith(b"\x89PNG")
