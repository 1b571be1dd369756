"""CUDA gather/scatter: CuPy launches of ``gather_scatter.cu`` and ``quant.cu`` on torch tensors.

The same functions, signatures and results as the torch reference
(``reference.gather`` / ``reference.scatter`` and ``reference_quant``'s
quantized pair), plus ``stream``: every layer of every block moves in one
kernel launch instead of one ``index_select`` per layer, K and V, which is what
makes a prefix of a few hundred blocks cheap to move. The tests on a GPU
(``tests/kernels/test_cuda_gpu.py``) hold them to the reference byte for byte.

Launching: the layout is resolved here into a table of per-(layer, K/V) base
addresses and three byte strides (``addressing``: see ``gather_scatter.cu``
for the arithmetic), copied to the device with the block ids, and the kernel
is launched on ``stream`` (default: torch's current stream). Every allocation
is made while ``stream`` is current, so torch's caching allocator does not
hand the table, the ids or the output to other work before the kernel is done.
Three kernel paths, the fastest that fits chosen per launch (``Addressing.paths``):
``flat`` when each (block, layer, K/V) slab is one contiguous run on the engine side
(vLLM and FlashInfer caches with contiguous rows, also views of every other block) and
everything is 16-byte aligned; ``v16`` (row by row, 16-byte vectors) when every base
address, stride and row is a multiple of 16 bytes (HF caches, strided views); ``b1``
(bytes) otherwise. ``path=`` forces one of those that fit (tests and the benchmark compare
them on the same data).

Rejected: building the kernels as a torch C++ extension. It ties the wheel to
one torch and CUDA build and needs a compiler where the daemon runs; CuPy's
NVRTC compiles the sources once per process (``_function`` is cached) against
whatever driver is there. CuPy is imported lazily: without it (or without a
device) ``available()`` is false and callers use the torch reference.

Pointers go to the kernels as integers (``tensor.data_ptr()``), never as CuPy
arrays: CuPy has no bfloat16 or float8, and only the bytes matter here.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from tiercache.kernels.reference import (
    LayerCache,
    LayoutError,
    _check,
    check_blocks,
    layer_tensors,
    num_blocks,
    tensors,
)
from tiercache.kernels.reference_quant import (
    QDTYPE,
    Format,
    QuantBlocks,
    _fmt,
    check_engine_dtype,
    check_quantized,
)
from tiercache.spec import KVSpec, Layout

HERE = Path(__file__).resolve().parent
THREADS = 256  # TC_THREADS in both .cu files
WARPS = THREADS // 32  # TC_WARPS
FLAT_CHUNK = 256  # TC_CHUNK: 16-byte vectors per warp item of the flat kernels
MAX_ITEMS = 2**31 - 1  # the flat kernels index items and a slab's vectors in 32 bits

KernelPath = Literal["flat", "v16", "b1"]
NVRTC_OPTIONS = ("--std=c++17",)
FP8_CAPABILITY = (8, 9)  # cvt.rn.satfinite.e4m3x2.f32


class KernelUnavailable(RuntimeError):
    """A CUDA kernel that cannot run here (no CuPy, no device, or fp8 on a GPU before sm_89)."""


def _cupy() -> Any:
    """The ``cupy`` module (untyped: ``Any`` stays inside this file)."""
    return importlib.import_module("cupy")


def available() -> bool:
    """True when CuPy imports and a CUDA device is visible to both CuPy and torch."""
    try:
        cp = _cupy()
        return torch.cuda.is_available() and int(cp.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # ImportError, or CuPy's own CUDARuntimeError without a driver
        return False


@functools.cache
def _function(source: str, name: str, device: int) -> Any:
    """Kernel ``name`` of ``source`` (a file next to this one), compiled once per device."""
    cp = _cupy()
    with cp.cuda.Device(device):
        module = cp.RawModule(code=(HERE / source).read_text(), options=NVRTC_OPTIONS)
        return module.get_function(name)


# --- addressing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Addressing:
    """Where a block's rows are: row (layer, kv, block, token, head) starts at byte
    ``ptrs[layer * planes + kv] + block * s_block + token * s_token + head * s_head`` (``planes``
    2, K and V, or 1, an MLA latent)."""

    ptrs: list[int]
    s_block: int
    s_token: int
    s_head: int
    row_bytes: int
    num_blocks: int
    block_size: int
    heads: int
    planes: int = 2

    def aligned(self, *others: int) -> bool:
        """Whether every address, stride and row (and ``others``) is a multiple of 16 bytes."""
        values = [*self.ptrs, self.s_block, self.s_token, self.s_head, self.row_bytes, *others]
        return all(v % 16 == 0 for v in values)

    @property
    def slab_bytes(self) -> int:
        """Bytes of one (block, layer, K/V) slab: block_size x heads rows."""
        return self.block_size * self.heads * self.row_bytes

    def flat(self) -> bool:
        """Whether each slab is one contiguous run: heads follow each other, then tokens (a
        stride that is never stepped, of one head or a one-token block, does not count)."""
        heads_packed = self.heads == 1 or self.s_head == self.row_bytes
        tokens_packed = self.block_size == 1 or self.s_token == self.heads * self.row_bytes
        return heads_packed and tokens_packed

    def paths(self, *others: int) -> tuple[KernelPath, ...]:
        """The kernel paths that can move these rows (and buffers at ``others``), fastest first."""
        if not self.aligned(*others):
            return ("b1",)
        return ("flat", "v16", "b1") if self.flat() else ("v16", "b1")


def addressing(spec: KVSpec, caches: Sequence[LayerCache], batch: int = 0) -> Addressing:
    """Resolve ``caches`` (already checked against ``spec``) into a pointer table and strides.

    Works on any torch tensors (the CPU tests read memory through it). Needs what the kernels
    assume: each row of ``head_dim`` elements contiguous, and every layer (and K and V) with
    the same strides.
    """
    if spec.layout is Layout.VLLM_CPU:
        raise LayoutError(
            "the vllm-cpu layout belongs to vLLM's CPU backend: use the torch reference "
            "(tiercache.kernels.reference), not the CUDA kernels"
        )
    es, bs = spec.element_bytes, spec.block_size
    ptrs: list[int] = []
    strides: set[tuple[int, int, int]] = set()
    for layer, c in enumerate(caches):
        for t in layer_tensors(c):
            if t.stride(-1) != 1 and spec.head_dim > 1:
                raise LayoutError(
                    f"layer {layer}: the CUDA kernels need head_dim contiguous (stride 1), "
                    f"got strides {list(t.stride())}; pass .contiguous() caches"
                )
        if spec.layout is Layout.HF:
            assert isinstance(c, tuple)
            if not 0 <= batch < c[0].shape[0]:
                raise LayoutError(f"batch {batch} is out of range for a batch of {c[0].shape[0]}")
            for t in c:  # K and V, or the latent
                ptrs.append(t.data_ptr() + batch * t.stride(0) * es)
                strides.add((bs * t.stride(2) * es, t.stride(2) * es, t.stride(1) * es))
        elif spec.planes == 1:  # vLLM's MLA latent [num_blocks, block_size, latent]: one head
            assert isinstance(c, torch.Tensor)
            ptrs.append(c.data_ptr())
            strides.add((c.stride(0) * es, c.stride(1) * es, spec.head_dim * es))
        else:
            assert isinstance(c, torch.Tensor)
            kv_dim, block_dim = (0, 1) if spec.layout is Layout.VLLM else (1, 0)
            for kv in range(2):
                ptrs.append(c.data_ptr() + kv * c.stride(kv_dim) * es)
            strides.add((c.stride(block_dim) * es, c.stride(2) * es, c.stride(3) * es))
        if len(strides) > 1:
            raise LayoutError(
                f"layer {layer}: the CUDA kernels need every layer's cache (and K and V) with "
                "the same strides; this one differs from layer 0's"
            )
    ((s_block, s_token, s_head),) = strides
    # The fewest blocks of any layer: an id must be inside all of them.
    blocks = num_blocks(spec, caches)
    return Addressing(
        ptrs,
        s_block,
        s_token,
        s_head,
        spec.head_dim * es,
        blocks,
        bs,
        spec.num_kv_heads,
        spec.planes,
    )


def host_ids(block_ids: torch.Tensor | Sequence[int], num_blocks: int) -> torch.Tensor:
    """``block_ids`` as a CPU int64 tensor, every id checked to be inside the cache.

    A kernel does not bounds-check, so an id past the end would be a wild read or write;
    ids on the device are copied back for the check (one small sync: pass a list).
    """
    ids = torch.as_tensor(block_ids, dtype=torch.long).cpu()
    if ids.dim() != 1:
        raise LayoutError(f"block ids must be 1-D, got shape {list(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        bad = ids[(ids < 0) | (ids >= num_blocks)][0]
        raise LayoutError(f"block id {int(bad)} is out of range for a cache of {num_blocks} blocks")
    return ids


# --- launching ------------------------------------------------------------------------------


def _device(caches: Sequence[LayerCache]) -> torch.device:
    devices = {t.device for t in tensors(caches)}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise LayoutError(
            f"the CUDA kernels need every layer on one CUDA device, got {sorted(map(str, devices))}"
        )
    return next(iter(devices))


def _launch(
    source: str,
    name: str,
    device: torch.device,
    ctas: int,
    addr: Addressing,
    ids: torch.Tensor,
    buffers: Sequence[torch.Tensor],
    scalars: Sequence[np.integer[Any]],
    stream: torch.cuda.Stream,
) -> None:
    """Launch ``name`` with (ptr table, ids, *buffers, *scalars); call with ``stream`` current.

    ``scalars`` carry their C type (``np.int64`` for ``long long``, ``np.uint32`` for
    ``unsigned int``): CuPy packs each argument by its NumPy type."""
    cp = _cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    fn = _function(source, name, index)
    # The table and the ids in one pinned buffer and one copy. From pinned memory: a copy from
    # pageable memory would first wait for everything queued on `stream` (the host would
    # block). The copy runs on a side stream the kernel waits for, not on `stream` itself:
    # queued there it would start only once the work ahead of it is done, and then hold the
    # SMs idle for a PCIe round trip (measured on an H100: 4 KiB slabs moved at 0.79x a D2D
    # copy with the upload in line, 0.95x with the table already there). On the side stream it
    # overlaps whatever `stream` is still running. `record_stream` keeps torch's allocator
    # from handing the device copy to other work before the kernel on `stream` is done.
    packed = torch.cat([torch.tensor(addr.ptrs, dtype=torch.int64), ids])
    side = _upload_stream(index)
    with torch.cuda.stream(side):
        on_device = packed.pin_memory().to(device, non_blocking=True)
        uploaded = torch.cuda.Event()  # type: ignore[no-untyped-call]
        uploaded.record(side)
    stream.wait_event(uploaded)
    on_device.record_stream(stream)
    args = (
        np.uint64(on_device.data_ptr()),
        np.uint64(on_device.data_ptr() + len(addr.ptrs) * 8),
        *(np.uint64(b.data_ptr()) for b in buffers),
        *scalars,
    )
    # RawKernel launches on CuPy's current stream (it takes no stream argument): make it ours.
    with cp.cuda.Device(index), _cupy_stream(cp, stream, index):
        fn((ctas,), (THREADS,), args)


@functools.cache
def _upload_stream(device: int) -> torch.cuda.Stream:
    """The stream that uploads launch tables to ``device`` (one per device, made once)."""
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


class _StreamHandle:
    """A raw stream handle behind the CUDA stream protocol (any torch has ``cuda_stream``; only
    newer ones implement ``__cuda_stream__`` themselves)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


def _cupy_stream(cp: Any, stream: torch.cuda.Stream, index: int) -> Any:
    """CuPy's view of torch's ``stream``: ``Stream.from_external`` where CuPy has it (14 and
    later deprecate ``ExternalStream``), ``ExternalStream`` before."""
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_StreamHandle(stream.cuda_stream))
    return cp.cuda.ExternalStream(stream.cuda_stream, index)


def _pick(addr: Addressing, path: KernelPath | None, *others: int) -> KernelPath:
    """``path`` if these rows allow it, else the fastest path they allow."""
    fits = addr.paths(*others)
    if path is None:
        return fits[0]
    if path not in ("flat", "v16", "b1"):
        raise LayoutError(f"path must be 'flat', 'v16', 'b1' or None, got {path!r}")
    if path not in fits:
        why = (
            "the rows or buffers are not all 16-byte aligned"
            if not addr.aligned(*others)
            else "a slab is not one contiguous run (s_head must equal the row's bytes and "
            "s_token the heads' bytes)"
        )
        raise LayoutError(
            f"the {path} kernel cannot move these caches: {why}; paths that fit: {fits}"
        )
    return path


def _copy(
    op: Literal["gather", "scatter"],
    spec: KVSpec,
    device: torch.device,
    addr: Addressing,
    ids: torch.Tensor,
    buffer: torch.Tensor,
    path: KernelPath,
    stream: torch.cuda.Stream,
) -> None:
    """Launch the ``path`` kernel of ``op`` for ``ids`` (at least one) and ``buffer``."""
    n = ids.numel()
    slabs = n * spec.num_layers * spec.planes
    if path != "flat":
        _launch(
            "gather_scatter.cu", f"tc_{op}_{path}", device, slabs, addr, ids, [buffer],
            [np.int64(v) for v in _copy_scalars(spec, addr)], stream,
        )  # fmt: skip
        return
    grid = flat_grid(n, spec.num_layers, addr.slab_bytes, spec.planes)
    scalars: list[np.integer[Any]] = [
        np.uint32(grid.items), np.uint32(spec.num_layers), np.uint32(spec.planes),
        np.uint32(grid.vectors), np.uint32(grid.chunks), np.int64(addr.s_block),
    ]  # fmt: skip
    _launch(
        "gather_scatter.cu", f"tc_{op}_flat", device, grid.ctas, addr, ids, [buffer], scalars,
        stream,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class FlatGrid:
    """A flat launch: ``items`` warp items of (slab, chunk), ``chunks`` per slab of ``vectors``
    16-byte vectors, ``ctas`` CTAs of ``WARPS`` items each."""

    items: int
    chunks: int
    vectors: int
    ctas: int


def flat_grid(n: int, layers: int, slab_bytes: int, planes: int = 2) -> FlatGrid:
    """The flat kernels' grid for ``n`` blocks of ``layers`` layers (``planes`` slabs each: K
    and V, or an MLA latent)."""
    vectors = slab_bytes // 16
    chunks = -(-vectors // FLAT_CHUNK)
    items = n * layers * planes * chunks
    if items > MAX_ITEMS:
        raise LayoutError(
            f"{n} blocks are {items} work items for the flat kernel, more than {MAX_ITEMS}: "
            "move them in several calls"
        )
    return FlatGrid(items, chunks, vectors, -(-items // WARPS))


@dataclass(frozen=True, slots=True)
class Prepared:
    """Caches checked and resolved once (``prepare``): an attached engine's caches never move,
    so its copies skip the per-call layout checks and the walk over every layer's tensors
    (0.25 ms of host time for 32 layers, measured on an H100 machine)."""

    spec: KVSpec
    batch: int
    device: torch.device
    addr: Addressing


def prepare(spec: KVSpec, caches: Sequence[LayerCache], batch: int = 0) -> Prepared:
    _check(spec, caches)
    return Prepared(spec, batch, _device(caches), addressing(spec, caches, batch))


def _resolve(
    spec: KVSpec, caches: Sequence[LayerCache], batch: int, prepared: Prepared | None
) -> tuple[torch.device, Addressing]:
    if prepared is None:
        p = prepare(spec, caches, batch)
        return p.device, p.addr
    if prepared.spec != spec or prepared.batch != batch:
        raise LayoutError("prepared= was made for another spec or batch than this call's")
    return prepared.device, prepared.addr


def gather(
    spec: KVSpec,
    caches: Sequence[LayerCache],
    block_ids: torch.Tensor | Sequence[int],
    *,
    batch: int = 0,
    out: torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
    path: KernelPath | None = None,
    prepared: Prepared | None = None,
) -> torch.Tensor:
    """Copy blocks ``block_ids`` out of ``caches`` into ``[n, *spec.block_shape]`` (on ``stream``;
    with the kernel ``path``, default the fastest that fits; ``prepared``: ``prepare``'s result
    for these caches)."""
    device, addr = _resolve(spec, caches, batch, prepared)
    ids = host_ids(block_ids, addr.num_blocks)
    n = ids.numel()
    stream = stream if stream is not None else torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        if out is None:
            out = torch.empty((n, *spec.block_shape), dtype=spec.torch_dtype, device=device)
        else:
            check_blocks(spec, out, n, "out")
            if out.device != device or not out.is_contiguous():
                raise LayoutError(f"out must be contiguous on {device}, got {out.device}")
        kernel = _pick(addr, path, out.data_ptr())
        if n:
            _copy("gather", spec, device, addr, ids, out, kernel, stream)
    return out


def scatter(
    spec: KVSpec,
    blocks: torch.Tensor,
    caches: Sequence[LayerCache],
    block_ids: torch.Tensor | Sequence[int],
    *,
    batch: int = 0,
    stream: torch.cuda.Stream | None = None,
    path: KernelPath | None = None,
    prepared: Prepared | None = None,
) -> None:
    """Copy ``blocks`` (``[n, *spec.block_shape]``) into ``caches`` at ``block_ids`` (on ``stream``;
    with the kernel ``path``, default the fastest that fits; ``prepared``: ``prepare``'s result
    for these caches)."""
    device, addr = _resolve(spec, caches, batch, prepared)
    ids = host_ids(block_ids, addr.num_blocks)
    n = ids.numel()
    check_blocks(spec, blocks, n)
    stream = stream if stream is not None else torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        src = blocks.to(device, non_blocking=True).contiguous()
        kernel = _pick(addr, path, src.data_ptr())
        if n:
            _copy("scatter", spec, device, addr, ids, src, kernel, stream)


def _copy_scalars(spec: KVSpec, addr: Addressing) -> list[int]:
    return [
        spec.num_layers, spec.planes, spec.block_size, spec.num_kv_heads, addr.row_bytes,
        addr.s_block, addr.s_token, addr.s_head,
    ]  # fmt: skip


def _quant_scalars(spec: KVSpec, addr: Addressing) -> list[int]:
    return [
        spec.num_layers, spec.planes, spec.block_size, spec.num_kv_heads, spec.head_dim,
        addr.s_block, addr.s_token, addr.s_head,
    ]  # fmt: skip


def _check_fp8(fmt: Format, device: torch.device) -> None:
    if fmt == "fp8" and torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
        raise KernelUnavailable(
            f"fp8 storage needs compute capability 8.9 or later (Ada, Hopper); {device} is "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}: use fmt='int8'"
        )


def gather_quantized(
    spec: KVSpec,
    caches: Sequence[LayerCache],
    block_ids: torch.Tensor | Sequence[int],
    *,
    fmt: Format = "int8",
    batch: int = 0,
    stream: torch.cuda.Stream | None = None,
) -> QuantBlocks:
    """``reference_quant.gather_quantized`` in one fused launch (on ``stream``)."""
    fmt = _fmt(fmt)
    check_engine_dtype(spec)
    _check(spec, caches)
    device = _device(caches)
    _check_fp8(fmt, device)
    addr = addressing(spec, caches, batch)
    ids = host_ids(block_ids, addr.num_blocks)
    n = ids.numel()
    stream = stream if stream is not None else torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        data = torch.empty((n, *spec.block_shape), dtype=QDTYPE[fmt], device=device)
        scales = torch.empty(
            (n, spec.num_layers, spec.planes, spec.num_kv_heads), dtype=torch.float32, device=device
        )
        if n:
            _launch(
                "quant.cu", f"tc_quant_gather_{fmt}_{spec.dtype}", device,
                n * spec.num_layers * spec.planes, addr, ids, [data, scales],
                [np.int64(v) for v in _quant_scalars(spec, addr)], stream,
            )  # fmt: skip
    return QuantBlocks(data, scales)


def scatter_quantized(
    spec: KVSpec,
    q: QuantBlocks,
    caches: Sequence[LayerCache],
    block_ids: torch.Tensor | Sequence[int],
    *,
    batch: int = 0,
    stream: torch.cuda.Stream | None = None,
) -> None:
    """``reference_quant.scatter_quantized`` in one fused launch (on ``stream``)."""
    check_engine_dtype(spec)
    _check(spec, caches)
    device = _device(caches)
    _check_fp8(q.fmt, device)
    addr = addressing(spec, caches, batch)
    ids = host_ids(block_ids, addr.num_blocks)
    n = ids.numel()
    check_quantized(spec, q, n)
    stream = stream if stream is not None else torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        data = q.data.to(device, non_blocking=True).contiguous()
        scales = q.scales.to(device, non_blocking=True).contiguous()
        if n:
            _launch(
                "quant.cu", f"tc_dequant_scatter_{q.fmt}_{spec.dtype}", device,
                n * spec.num_layers * spec.planes, addr, ids, [data, scales],
                [np.int64(v) for v in _quant_scalars(spec, addr)], stream,
            )  # fmt: skip
