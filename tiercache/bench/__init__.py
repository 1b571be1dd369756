"""Benchmarks for tiercache: each module runs side-by-side measurements and writes JSON plus a PNG.

``tiercache bench NAME --out DIR`` (or ``python -m tiercache.bench.NAME``) runs one:
``storage`` (tiers vs memcpy and plain file I/O), ``resume`` (resume vs
recompute TTFT), ``control`` (control-plane latency), ``reliability`` (fault and load campaigns),
``trace`` (a conversation trace, Mooncake's or any in its format, replayed: hit ratio against
capacity per eviction policy),
``remote`` (the shared tier against s3fs on a real SeaweedFS, and resume from it),
``vllm`` (a resumed vLLM turn: TierCacheConnector vs recompute vs ExampleConnector, and per
attention family vs vLLM's own prefix-cache hit),
``quant`` (quantized storage formats against exact: blocks per GiB, trace hit ratio at equal
bytes, host throughput, disk resume), and on a GPU machine (``scripts/gpu_check.sh`` runs
both) ``gpu`` (the CuPy kernels against D2D copies and per-block memcpy) and ``decode`` (a
decode step's slowdown while the daemon prefetches).

The finished study behind the disk tier's layout is not part of the package:
``scripts/disk_layout_study.py`` (``docs/disk-layout.md`` is its record).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

MODULES = {
    "storage": "storage",
    "resume": "resume",
    "control": "control",
    "reliability": "reliability",
    "trace": "trace",
    "remote": "remote",
    "vllm": "vllm_resume",
    "quant": "quant",
    "gpu": "gpu",
    "decode": "decode",
}


def run(name: str, out: str, quick: bool = False, options: Sequence[str] = ()) -> int:
    """Run benchmark ``name``; ``options`` are its own flags (``trace``: ``--trace``,
    ``--capacities``, ``--policies``)."""
    module = importlib.import_module(f"tiercache.bench.{MODULES[name]}")
    code: int = module.main(["--out", out, *(["--quick"] if quick else []), *options])
    return code
