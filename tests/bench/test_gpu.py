"""The GPU benchmark (the CuPy kernels against D2D copies and per-block memcpy) imports anywhere
and says plainly that a machine without CUDA measures nothing (exit 1), rather than failing
somewhere inside; on a GPU scripts/gpu_check.sh runs it (the decode benchmark: test_decode.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiercache.bench import gpu as bench_gpu
from tiercache.kernels import cuda


@pytest.mark.skipif(cuda.available(), reason="this machine has CUDA: the benchmarks would run")
@pytest.mark.parametrize("bench", [bench_gpu], ids=["gpu"])
def test_without_cuda_a_gpu_benchmark_measures_nothing_and_says_so(
    bench: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 1  # type: ignore[attr-defined]

    assert "no CUDA device visible to CuPy and torch; nothing measured" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())
