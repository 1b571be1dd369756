"""What every benchmark shares: side-by-side interleaved timing, machine facts, JSON + PNG output.

These machines are noisy (2 shared cores), so a benchmark never reports an
absolute number alone: each repetition times tiercache and its baseline back
to back, in alternating order, and the result is the median of the per-rep
ratios, next to the medians of each side.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    import zarr

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def side_by_side(
    ours: Callable[[], float], base: Callable[[], float], reps: int
) -> dict[str, float]:
    """Run ``ours`` and ``base`` (each returns the seconds it measured) ``reps`` times, alternating
    which goes first. ``ratio`` is the median per-rep base/ours time ratio: our throughput as a
    fraction of the baseline's (1.0: as fast; above 1: faster)."""
    a: list[float] = []
    b: list[float] = []
    for i in range(reps):
        if i % 2:
            b.append(base())
            a.append(ours())
        else:
            a.append(ours())
            b.append(base())
    return {
        "ours_s": statistics.median(a),
        "base_s": statistics.median(b),
        "ratio": statistics.median(y / x for x, y in zip(a, b, strict=True)),
    }


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def write(out: Path, name: str, result: dict[str, Any], fig: Any) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "machine": machine(), **result}
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    fig.savefig(png_path, dpi=110, bbox_inches="tight")
    return json_path, png_path


def out_dir(text: str) -> Path:
    """``--out``: a directory, or a path where one can be made. Checked before anything is
    measured: a file there was found only when the results were written, after the run."""
    path = Path(text)
    for where in (path, *path.parents):
        if where.exists():
            if not where.is_dir():
                raise argparse.ArgumentTypeError(f"{where} is a file, not a directory")
            break
    return path


def cli(
    doc: str | None,
    run: Callable[[Path, bool], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
    argv: Sequence[str] | None,
) -> int:
    """The command line every benchmark module shares: ``--out DIR`` and ``--quick``."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    p.add_argument(
        "--out", type=out_dir, default=Path("bench-out"), help="where the JSON and PNG go"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement"
    )
    args = p.parse_args(argv)
    print(report(run(args.out, args.quick)))
    return 0


def size_label(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 2**10} KiB"


def in_memory_fs(path: Path) -> str | None:
    """The type of ``path``'s file system where its files live in memory (tmpfs, ramfs), so
    ``drop_page_cache`` cannot make a read cold; None for a file system on a device."""
    path = path.resolve()
    best, fstype = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if (
                    len(fields) > 2
                    and path.is_relative_to(fields[1])
                    and len(fields[1]) > len(best)
                ):
                    best, fstype = fields[1], fields[2]
    except OSError:
        return None
    return fstype if fstype in ("tmpfs", "ramfs") else None


def drop_page_cache(root: Path) -> int:
    """Evict ``root``'s files from the page cache (no root needed); returns the files touched.
    On tmpfs or ramfs (``in_memory_fs``) the files stay in memory: the benchmarks say so."""
    n = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n
