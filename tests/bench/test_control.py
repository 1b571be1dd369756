"""``tiercache bench control`` (control-plane latency) runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.runs import writes_json_and_png


@pytest.mark.slow
@pytest.mark.parametrize(("name", "keys"), [("control", {"rows", "embedded_p50_s", "machine"})])
def test_benchmark_writes_json_and_png(tmp_path: Path, name: str, keys: set[str]) -> None:
    writes_json_and_png(tmp_path, name, keys)
