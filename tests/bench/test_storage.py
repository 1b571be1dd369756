"""``tiercache bench storage`` (the tiers against memcpy and plain file I/O) runs end to end, and
the disk layout study behind the disk tier still reproduces its record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.runs import writes_json_and_png


@pytest.mark.parametrize(("name", "keys"), [("storage", {"host", "disk", "machine"})])
def test_benchmark_writes_json_and_png(tmp_path: Path, name: str, keys: set[str]) -> None:
    writes_json_and_png(tmp_path, name, keys)


@pytest.mark.slow
def test_the_disk_layout_study_still_runs_from_scripts(tmp_path: Path) -> None:
    # The finished study lives outside the package; it must keep reproducing its record.
    script = Path(__file__).resolve().parents[2] / "scripts" / "disk_layout_study.py"
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], check=True)
    result = json.loads((tmp_path / "disk_layout.json").read_text())
    assert {"io", "codecs", "meta"} <= set(result)
    assert (tmp_path / "disk_layout.png").read_bytes().startswith(b"\x89PNG")
