"""``tiercache bench remote`` (the shared tier against s3fs on its own SeaweedFS) runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.runs import writes_json_and_png

pytestmark = pytest.mark.service


@pytest.mark.slow
@pytest.mark.parametrize(("name", "keys"), [("remote", {"throughput", "resume", "machine"})])
def test_benchmark_writes_json_and_png(tmp_path: Path, name: str, keys: set[str]) -> None:
    writes_json_and_png(tmp_path, name, keys)
