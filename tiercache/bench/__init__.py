"""Benchmarks for tiercache: each module runs side-by-side measurements and writes JSON plus a PNG.

``tiercache bench NAME --out DIR`` (or ``python -m tiercache.bench.NAME``) runs one:
``storage`` (tiers vs memcpy and plain file I/O), ``resume`` (resume vs
recompute TTFT), ``disk-layout`` (the study behind the disk tier's layout),
``remote`` (the shared tier against s3fs on a real SeaweedFS, and resume from it).
"""

from __future__ import annotations

import importlib

MODULES = {
    "storage": "storage",
    "resume": "resume",
    "disk-layout": "disk_layout",
    "control": "control",
    "reliability": "reliability",
    "remote": "remote",
}


def run(name: str, out: str, quick: bool = False) -> int:
    module = importlib.import_module(f"tiercache.bench.{MODULES[name]}")
    code: int = module.main(["--out", out, *(["--quick"] if quick else [])])
    return code
