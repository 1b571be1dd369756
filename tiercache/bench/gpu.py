"""GPU benchmark of the data path: gather/scatter kernels against the copies they replace.

What it measures, side by side in one run (``tiercache.bench.common.side_by_side``: each
repetition times ours and the baseline back to back, alternating which goes first; the
result is the median per-rep ratio), in bytes read + written per second:

- ``gather`` / ``scatter`` (one launch for all layers) against a device-to-device copy of the
  same bytes (the ceiling), a loop of one ``cudaMemcpyAsync`` per (block, layer, K/V) fragment
  (what a connector without a kernel does), and torch ``index_select`` / ``index_copy_`` (the
  reference: one call per layer);
- each kernel path on its own (``gather_flat_kernel_vs_d2d``, ``gather_v16_kernel_vs_d2d``,
  the same for scatter): the path forced on the same caches, and timed with the host's work
  hidden (a GPU sleep is queued first, so the events see only the GPU's time; the launch
  table's upload runs on its own stream meanwhile, as in use it overlaps the copy stream's
  earlier work). The plain
  ``gather_vs_d2d`` times the whole call the way a caller sees it, with the Python before the
  launch (checks, the pointer table, one pinned copy of it and the ids): for small moves that
  overhead, not the kernel, sets the ratio. The 0.8x target is judged on the kernel time of
  the path the host picks (``flat`` for these vLLM caches);
- the quantized int8 and fp8 gather (narrow bytes written) against the plain gather;
- host <-> device of a block set: torch's copy from a pinned buffer against a raw
  ``cudaMemcpyAsync`` of the same pinned bytes, and against a pageable source.

Shapes: Llama-3-8B's vLLM block (32 layers, 8 KV heads x 128, 16 tokens, bf16: 2 MiB a block),
a small-head model's (Qwen2.5-0.5B: 24 layers, 2 KV heads x 64: 96 KiB a block) and
DeepSeek-V3's MLA latent (61 layers, one 576-value plane: 1.07 MiB a block, vLLM's
``[num_blocks, block_size, 576]`` per layer), 256 blocks moved out of a cache of 1024, ids
shuffled. Targets (issue 4): gather/scatter >= 0.8 of
the D2D copy and >= 2x the per-fragment loop; H2D/D2H >= 0.9 of pinned memcpy.

Run on a GPU machine with ``scripts/gpu_check.sh`` (or ``python -m tiercache.bench.gpu
--out DIR``); on a machine without CUDA it says so and exits 1. Importable anywhere.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tiercache.bench.common import out_dir, side_by_side
from tiercache.kernels import cuda, reference
from tiercache.kernels.reference_quant import Format
from tiercache.spec import AttentionKind, KVSpec

SHAPES = {
    "llama-3-8b": KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16"),
    "qwen2.5-0.5b": KVSpec(num_layers=24, num_kv_heads=2, head_dim=64, dtype="bfloat16"),
    # One latent plane of kv_lora_rank 512 + rope 64 per token, [num_blocks, block, 576].
    "deepseek-v3-mla": KVSpec(
        num_layers=61, num_kv_heads=1, head_dim=576, dtype="bfloat16", kind=AttentionKind.MLA
    ),
}
TARGETS = {"vs_d2d": 0.8, "vs_memcpy_loop": 2.0, "vs_pinned_memcpy": 0.9}
D2D, H2D, D2H = 3, 1, 2  # cudaMemcpyKind
# GPU cycles of sleep queued before a kernel-only timing: ~2.5 ms at H100 clocks, far longer
# than the host needs to queue one gather (well under 1 ms), so the GPU never waits for it.
HIDE_HOST_CYCLES = 5_000_000


def timed_cuda(fn: Callable[[], object], hide_host: bool = False) -> float:
    """Seconds ``fn``'s GPU work takes on the current stream, by CUDA events; with
    ``hide_host``, the host's time to queue it is hidden behind a GPU sleep."""
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    if hide_host:
        torch.cuda._sleep(HIDE_HOST_CYCLES)  # type: ignore[no-untyped-call]
    start.record()
    fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / 1e3


def compare(
    ours: Callable[[], object],
    base: Callable[[], object],
    nbytes: int,
    reps: int,
    hide_host: bool = False,
) -> dict[str, float]:
    for f in (ours, base):  # warm-up: compile, allocate
        f()
    torch.cuda.synchronize()
    r = side_by_side(lambda: timed_cuda(ours, hide_host), lambda: timed_cuda(base, hide_host), reps)
    return {**r, "ours_GBps": nbytes / r["ours_s"] / 1e9, "base_GBps": nbytes / r["base_s"] / 1e9}


def memcpy_loop(pairs: Sequence[tuple[int, int]], size: int, kind: int) -> Callable[[], None]:
    """One cudaMemcpyAsync per (dst, src) pair on torch's current stream."""
    cp = cuda._cupy()
    memcpy = cp.cuda.runtime.memcpyAsync

    def run() -> None:
        stream = torch.cuda.current_stream().cuda_stream
        for dst, src in pairs:
            memcpy(dst, src, size, kind, stream)

    return run


def quantized_gather(
    spec: KVSpec, caches: Sequence[reference.LayerCache], ids: list[int], fmt: Format
) -> Callable[[], object]:
    return lambda: cuda.gather_quantized(spec, caches, ids, fmt=fmt)


def bench_shape(spec: KVSpec, n: int, num_blocks: int, reps: int) -> dict[str, Any]:
    dev = torch.device("cuda", 0)
    g = torch.Generator(device=dev).manual_seed(0)
    planes = spec.planes
    shape = (
        (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        if planes == 2
        else (num_blocks, spec.block_size, spec.head_dim)  # vLLM's MLA latent
    )
    caches: list[reference.LayerCache] = [
        torch.randn(shape, generator=g, device=dev).to(spec.torch_dtype)
        for _ in range(spec.num_layers)
    ]
    ids = torch.randperm(num_blocks, generator=g, device=dev)[:n].tolist()
    out = torch.empty((n, *spec.block_shape), dtype=spec.torch_dtype, device=dev)
    flat_src = torch.empty(n * spec.block_nbytes, dtype=torch.uint8, device=dev)
    flat_dst = torch.empty_like(flat_src)
    moved = 2 * n * spec.block_nbytes  # read + written
    frag = spec.block_size * spec.num_kv_heads * spec.head_dim * spec.element_bytes
    # A (layer, K/V, block) fragment of a vLLM cache is contiguous: one memcpy each.
    pairs = [
        (out.data_ptr() + ((i * spec.num_layers + layer) * planes + kv) * frag,
         c.data_ptr() + (kv * num_blocks + block) * frag)
        for i, block in enumerate(ids)
        for layer, c in enumerate(caches) if isinstance(c, torch.Tensor)
        for kv in range(planes)
    ]  # fmt: skip
    back = [(src, dst) for dst, src in pairs]

    def gather() -> None:
        cuda.gather(spec, caches, ids, out=out)

    def scatter() -> None:
        cuda.scatter(spec, out, caches, ids)

    result: dict[str, Any] = {"spec": spec.to_dict(), "blocks": n, "bytes_moved": moved}
    result["gather_vs_d2d"] = compare(gather, lambda: flat_dst.copy_(flat_src), moved, reps)
    result["gather_vs_memcpy_loop"] = compare(gather, memcpy_loop(pairs, frag, D2D), moved, reps)
    result["gather_vs_index_select"] = compare(
        gather, lambda: reference.gather(spec, caches, ids, out=out), moved, reps
    )
    result["scatter_vs_d2d"] = compare(scatter, lambda: flat_dst.copy_(flat_src), moved, reps)
    result["scatter_vs_memcpy_loop"] = compare(scatter, memcpy_loop(back, frag, D2D), moved, reps)
    result["scatter_vs_index_copy"] = compare(
        scatter, lambda: reference.scatter(spec, out, caches, ids), moved, reps
    )

    def d2d() -> None:
        flat_dst.copy_(flat_src)

    def forced(op: str, path: cuda.KernelPath) -> Callable[[], object]:
        if op == "gather":
            return lambda: cuda.gather(spec, caches, ids, out=out, path=path)
        return lambda: cuda.scatter(spec, out, caches, ids, path=path)

    paths: tuple[cuda.KernelPath, ...] = ("flat", "v16")
    for op in ("gather", "scatter"):
        for path in paths:
            result[f"{op}_{path}_kernel_vs_d2d"] = compare(
                forced(op, path), d2d, moved, reps, hide_host=True
            )
    fp8 = torch.cuda.get_device_capability(dev) >= cuda.FP8_CAPABILITY
    formats: tuple[Format, ...] = ("int8", "fp8") if fp8 else ("int8",)
    for fmt in formats:
        # Read wide, written narrow (the scales are noise at these shapes).
        narrow = n * spec.block_nbytes + n * spec.block_nbytes // spec.element_bytes
        result[f"quant_gather_{fmt}_vs_gather"] = compare(
            quantized_gather(spec, caches, ids, fmt), gather, narrow, reps
        )

    nbytes = n * spec.block_nbytes
    pinned = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    dst = flat_dst
    cp = cuda._cupy()

    def raw_copy(to: int, frm: int, kind: int) -> Callable[[], None]:
        def run() -> None:
            stream = torch.cuda.current_stream().cuda_stream
            cp.cuda.runtime.memcpyAsync(to, frm, nbytes, kind, stream)

        return run

    result["h2d_vs_pinned_memcpy"] = compare(
        lambda: dst.copy_(pinned, non_blocking=True),
        raw_copy(dst.data_ptr(), pinned.data_ptr(), H2D), nbytes, reps,
    )  # fmt: skip
    result["d2h_vs_pinned_memcpy"] = compare(
        lambda: pinned.copy_(dst, non_blocking=True),
        raw_copy(pinned.data_ptr(), dst.data_ptr(), D2H), nbytes, reps,
    )  # fmt: skip
    result["h2d_pageable_vs_pinned"] = compare(
        lambda: dst.copy_(pageable), lambda: dst.copy_(pinned, non_blocking=True), nbytes, reps
    )
    return result


def machine() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "sms": props.multi_processor_count,
        "gpu_memory_GiB": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cupy": cuda._cupy().__version__,
        "python": platform.python_version(),
    }


def verdicts(shape: dict[str, Any]) -> dict[str, bool]:
    """Each target of issue 4 that this shape's numbers meet."""
    ratio = {k: v["ratio"] for k, v in shape.items() if isinstance(v, dict) and "ratio" in v}
    return {
        "gather kernel >= 0.8 x d2d": ratio["gather_flat_kernel_vs_d2d"] >= TARGETS["vs_d2d"],
        "scatter kernel >= 0.8 x d2d": ratio["scatter_flat_kernel_vs_d2d"] >= TARGETS["vs_d2d"],
        "gather >= 2 x memcpy loop": ratio["gather_vs_memcpy_loop"] >= TARGETS["vs_memcpy_loop"],
        "scatter >= 2 x memcpy loop": ratio["scatter_vs_memcpy_loop"] >= TARGETS["vs_memcpy_loop"],
        "h2d >= 0.9 x pinned memcpy": ratio["h2d_vs_pinned_memcpy"] >= TARGETS["vs_pinned_memcpy"],
        "d2h >= 0.9 x pinned memcpy": ratio["d2h_vs_pinned_memcpy"] >= TARGETS["vs_pinned_memcpy"],
    }


def run(out: Path, quick: bool) -> dict[str, Any]:
    n, num_blocks, reps = (16, 64, 3) if quick else (256, 1024, 21)
    result: dict[str, Any] = {"benchmark": "gpu", "machine": machine(), "shapes": {}}
    for name, spec in SHAPES.items():
        shape = bench_shape(spec, n, num_blocks, reps)
        shape["targets_met"] = verdicts(shape)
        result["shapes"][name] = shape
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "gpu.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["shapes"])
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = {
            k: v for k, v in result["shapes"][name].items() if isinstance(v, dict) and "ratio" in v
        }
        labels = list(rows)
        ax.barh(labels, [rows[k]["ours_GBps"] for k in labels], height=0.4, label="ours")
        ax.barh([i + 0.4 for i in range(len(labels))], [rows[k]["base_GBps"] for k in labels],
                height=0.4, label="baseline")  # fmt: skip
        ax.set_xlabel("GB/s (bytes read + written)")
        ax.set_title(name)
        ax.legend()
    fig.suptitle(f"tiercache GPU data path on {result['machine']['gpu']}")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def report(result: dict[str, Any]) -> str:
    lines = [f"GPU benchmark on {result['machine']['gpu']} ({json.dumps(result['machine'])})"]
    for name, shape in result["shapes"].items():
        lines.append(
            f"\n{name}: {shape['blocks']} blocks, {shape['bytes_moved'] / 2**20:.0f} MiB moved"
        )
        for key, v in shape.items():
            if isinstance(v, dict) and "ratio" in v:
                lines.append(
                    f"  {key:28s} ours {v['ours_GBps']:8.1f} GB/s  base {v['base_GBps']:8.1f} GB/s"
                    f"  ratio {v['ratio']:.2f}"
                )
        met = shape["targets_met"]
        lines.append(
            "  targets: " + ", ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in met.items())
        )
    return "\n".join(lines)


def cli(
    argv: Sequence[str] | None,
    doc: str | None,
    files: str,
    run: Callable[[Path, bool], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
) -> int:
    """The command line of a GPU benchmark: ``--out DIR`` (where ``files`` go), ``--quick``;
    on a machine without CUDA it says so and exits 1."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    p.add_argument("--out", type=out_dir, default=Path("bench-out"), help=f"where {files} go")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = p.parse_args(argv)
    if not cuda.available():
        print(f"{p.prog}: no CUDA device visible to CuPy and torch; nothing measured")
        return 1
    print(report(run(args.out, args.quick)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(argv, __doc__, "gpu.json/png", run, report)


if __name__ == "__main__":
    raise SystemExit(main())
