"""The GPU benchmark (the CuPy kernels against D2D copies and per-block memcpy) imports anywhere
and says plainly that a machine without CUDA measures nothing (exit 1), rather than failing
somewhere inside; on a GPU scripts/gpu_check.sh runs it (the decode benchmark: test_decode.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.runs import measures_nothing_without_cuda
from tiercache.bench import gpu as bench_gpu
from tiercache.kernels import cuda


@pytest.mark.skipif(cuda.available(), reason="this machine has CUDA: the benchmarks would run")
def test_without_cuda_a_gpu_benchmark_measures_nothing_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    measures_nothing_without_cuda(bench_gpu, tmp_path, capsys)
