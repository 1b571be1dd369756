"""The decode benchmark (a decode step's slowdown while the daemon prefetches) is a GPU benchmark:
it imports anywhere and says plainly that a machine without CUDA measures nothing (exit 1),
rather than failing somewhere inside; on a GPU scripts/gpu_check.sh runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.runs import measures_nothing_without_cuda
from tiercache.bench import decode as bench_decode
from tiercache.kernels import cuda


@pytest.mark.skipif(cuda.available(), reason="this machine has CUDA: the benchmarks would run")
def test_without_cuda_a_gpu_benchmark_measures_nothing_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    measures_nothing_without_cuda(bench_decode, tmp_path, capsys)
