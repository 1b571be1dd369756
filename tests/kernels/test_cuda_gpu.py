"""The CUDA kernels (``kernels/cuda.py``) against the torch reference, byte for byte, on a GPU.

Skipped without CuPy and a device; run on a GPU machine with ``scripts/gpu_check.sh``. Data is
random and never zero (``make_caches``); every output is poisoned first (all 0xFF, then all
0x00), so a byte the kernel did not write differs from the reference under one of the two.
All three kernel paths are covered and asserted to be the one taken: flat (each slab one
contiguous run: vLLM and FlashInfer caches, also views of every other block), 16-byte vectors
row by row (HF caches, views of some heads; and every flat case again with the path forced),
and bytes (odd rows, or views shifted off alignment by one element).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import pytest
import torch

from tests.kernels.test_reference import (
    IDS,
    LAYOUTS,
    MLA_LAYOUTS,
    NUM_BLOCKS,
    every_other_block,
    make_blocks,
    make_caches,
    make_mla_spec,
    raw,
)
from tiercache.kernels import cuda, reference, reference_quant
from tiercache.kernels.reference import LayerCache, LayoutError
from tiercache.spec import KVSpec, Layout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda.available(), reason="needs CuPy and a CUDA device"),
]

DEV = torch.device("cuda", 0)
DTYPES = ["float32", "float16", "bfloat16", "float8_e4m3fn"]
QUANT_DTYPES = ["float32", "float16", "bfloat16"]
POISONS = [0xFF, 0x00]


def spec_of(layout: Layout, dtype: str, heads: int, head_dim: int, block: int = 7) -> KVSpec:
    return KVSpec(
        num_layers=3, num_kv_heads=heads, head_dim=head_dim, dtype=dtype, block_size=block,
        layout=layout,
    )  # fmt: skip


# (heads, head_dim): odd everything, byte rows (10 B in bf16); odd heads with 16-byte rows in
# fp16; a real model's rows (256 B in bf16).
SHAPES = {"odd": (3, 5), "odd-aligned": (3, 8), "real": (2, 128)}


def on(device: torch.device, caches: Sequence[LayerCache]) -> list[LayerCache]:
    return [
        tuple(t.to(device) for t in c) if isinstance(c, tuple) else c.to(device) for c in caches
    ]


def shifted(caches: Sequence[LayerCache]) -> list[LayerCache]:
    """Equal copies whose data starts one element past a 16-byte boundary (values unchanged)."""

    def shift(t: torch.Tensor) -> torch.Tensor:
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view

    return [tuple(map(shift, c)) if isinstance(c, tuple) else shift(c) for c in caches]


def cache_bytes(caches: Sequence[LayerCache]) -> list[torch.Tensor]:
    return [raw(t).cpu() for c in caches for t in (c if isinstance(c, tuple) else (c,))]


def poisoned(shape: Sequence[int], dtype: torch.dtype, poison: int) -> torch.Tensor:
    out = torch.empty(tuple(shape), dtype=dtype, device=DEV)
    out.view(torch.uint8).fill_(poison)
    return out


def expect_path(
    spec: KVSpec, caches: Sequence[LayerCache], path: cuda.KernelPath, *others: int
) -> None:
    assert cuda.addressing(spec, caches).paths(*others)[0] == path


def path_of(spec: KVSpec) -> cuda.KernelPath:
    """The path contiguous caches of ``spec`` (from ``make_caches``) take at aligned buffers."""
    if spec.head_dim * spec.element_bytes % 16:
        return "b1"
    return "v16" if spec.layout is Layout.HF else "flat"


# --- plain gather / scatter -----------------------------------------------------------------


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_equals_the_reference(layout: Layout, dtype: str, shape: str, poison: int) -> None:
    spec = spec_of(layout, dtype, *SHAPES[shape])
    host = make_caches(spec)
    caches = on(DEV, host)
    out = poisoned((len(IDS), *spec.block_shape), spec.torch_dtype, poison)
    expect_path(spec, caches, path_of(spec), out.data_ptr())

    result = cuda.gather(spec, caches, IDS, out=out)
    torch.cuda.synchronize()

    assert result is out
    assert torch.equal(raw(out).cpu(), raw(reference.gather(spec, host, IDS)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_equals_the_reference(layout: Layout, dtype: str) -> None:
    for shape in SHAPES.values():
        spec = spec_of(layout, dtype, *shape)
        host = make_caches(spec)
        caches = on(DEV, host)
        blocks = make_blocks(spec, len(IDS))

        cuda.scatter(spec, blocks.to(DEV), caches, IDS)
        reference.scatter(spec, blocks, host, IDS)
        torch.cuda.synchronize()

        assert all(map(torch.equal, cache_bytes(caches), cache_bytes(host)))


def check_every_path(
    spec: KVSpec,
    host: Sequence[LayerCache],
    device_caches: Callable[[], list[LayerCache]],
    ids: list[int],
) -> list[cuda.KernelPath]:
    """Gather and scatter ``ids`` by every path that fits, each against the reference: gathers
    into poisoned outputs, scatters of random blocks. ``device_caches()`` makes fresh device
    caches equal to ``host`` (the same kind of view), one for the gathers and one per scatter.
    Returns the paths tried."""
    want = raw(reference.gather(spec, host, ids))
    blocks = make_blocks(spec, len(ids), seed=21)
    host_after = [tuple(t.clone() for t in c) if isinstance(c, tuple) else c.clone() for c in host]
    reference.scatter(spec, blocks, host_after, ids)
    caches = device_caches()
    probe = poisoned((len(ids), *spec.block_shape), spec.torch_dtype, 0xFF)
    paths = list(cuda.addressing(spec, caches).paths(probe.data_ptr()))
    for path in paths:
        for poison in POISONS:
            out = poisoned((len(ids), *spec.block_shape), spec.torch_dtype, poison)
            cuda.gather(spec, caches, ids, out=out, path=path)
            torch.cuda.synchronize()
            assert torch.equal(raw(out).cpu(), want), f"gather by {path}, poison {poison:#x}"
        target = device_caches()
        cuda.scatter(spec, blocks.to(DEV), target, ids, path=path)
        torch.cuda.synchronize()
        assert all(map(torch.equal, cache_bytes(target), cache_bytes(host_after))), path
    return paths


# (heads, head_dim, block_size) of flat slabs: one partial warp chunk (21 vectors of fp16);
# two whole chunks (512 vectors); a partial last chunk (544); Llama-3-8B's 32 KiB slab.
FLAT_SLABS = {"partial": (3, 8, 7), "two-chunks": (2, 128, 16), "tail": (2, 128, 17),
              "llama": (8, 128, 16)}  # fmt: skip


@pytest.mark.parametrize("slab", FLAT_SLABS)
@pytest.mark.parametrize("layout", [Layout.VLLM, Layout.FLASHINFER])
def test_flat_and_row_paths_both_equal_the_reference(layout: Layout, slab: str) -> None:
    heads, head_dim, block = FLAT_SLABS[slab]
    spec = spec_of(layout, "float16", heads, head_dim, block)
    host = make_caches(spec)

    assert check_every_path(spec, host, lambda: on(DEV, host), IDS) == ["flat", "v16", "b1"]


@pytest.mark.parametrize("layout", [Layout.VLLM, Layout.FLASHINFER])
def test_views_of_every_other_block_take_the_flat_path_and_equal_the_reference(
    layout: Layout,
) -> None:
    spec = spec_of(layout, "bfloat16", 2, 128, 16)
    _, full = every_other_block(spec)
    index = (
        (slice(None), slice(None, None, 2)) if layout is Layout.VLLM else (slice(None, None, 2),)
    )
    host: list[LayerCache] = [c[index] for c in full]

    def views() -> list[LayerCache]:
        return [c.to(DEV, copy=True)[index] for c in full]

    assert check_every_path(spec, host, views, IDS) == ["flat", "v16", "b1"]


def test_a_view_of_some_heads_takes_the_row_path_and_equals_the_reference() -> None:
    spec = spec_of(Layout.VLLM, "bfloat16", 2, 128, 16)
    wide = make_caches(spec_of(Layout.VLLM, "bfloat16", 4, 128, 16))
    host: list[LayerCache] = [c[:, :, :, 1:3] for c in wide if isinstance(c, torch.Tensor)]

    def views() -> list[LayerCache]:
        return [c.to(DEV, copy=True)[:, :, :, 1:3] for c in wide if isinstance(c, torch.Tensor)]

    assert check_every_path(spec, host, views, IDS) == ["v16", "b1"]


def test_hf_caches_take_the_row_path_and_equal_the_reference() -> None:
    spec = spec_of(Layout.HF, "bfloat16", 2, 128, 16)
    host = make_caches(spec)

    assert check_every_path(spec, host, lambda: on(DEV, host), IDS) == ["v16", "b1"]


# An MLA latent (one plane, one head): an odd latent of byte rows, and DeepSeek-V3's 576.
MLA_LATENTS = {"odd": 11, "deepseek": 576}


@pytest.mark.parametrize("latent", MLA_LATENTS)
@pytest.mark.parametrize("layout", MLA_LAYOUTS)
def test_an_mla_latent_by_every_path_equals_the_reference(layout: Layout, latent: str) -> None:
    spec = make_mla_spec(layout, "bfloat16", MLA_LATENTS[latent])
    host = make_caches(spec)
    want = ["flat", "v16", "b1"] if latent == "deepseek" else ["b1"]

    assert check_every_path(spec, host, lambda: on(DEV, host), IDS) == want


def test_forcing_the_flat_path_where_it_does_not_fit_is_refused() -> None:
    spec = spec_of(Layout.HF, "bfloat16", *SHAPES["real"])
    caches = on(DEV, make_caches(spec))

    with pytest.raises(LayoutError, match=r"^the flat kernel cannot move these caches: a slab"):
        cuda.gather(spec, caches, IDS, path="flat")
    shifted_caches = shifted(on(DEV, make_caches(spec_of(Layout.VLLM, "bfloat16", 2, 128))))
    with pytest.raises(LayoutError, match=r"^the v16 kernel cannot move these caches: the rows"):
        cuda.gather(spec_of(Layout.VLLM, "bfloat16", 2, 128), shifted_caches, IDS, path="v16")


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_unaligned_views_take_the_byte_path_and_equal_the_reference(
    layout: Layout, poison: int
) -> None:
    spec = spec_of(layout, "bfloat16", *SHAPES["real"])
    host = make_caches(spec)
    caches = shifted(on(DEV, host))
    out = poisoned((len(IDS), *spec.block_shape), spec.torch_dtype, poison)
    expect_path(spec, caches, "b1", out.data_ptr())

    cuda.gather(spec, caches, IDS, out=out)
    blocks = make_blocks(spec, len(IDS))
    cuda.scatter(spec, blocks.to(DEV), caches, [5, 1, 3])
    reference.scatter(spec, blocks, host, [5, 1, 3])
    torch.cuda.synchronize()

    assert torch.equal(raw(out).cpu(), raw(reference.gather(spec, make_caches(spec), IDS)))
    assert all(map(torch.equal, cache_bytes(caches), cache_bytes(host)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unaligned_output_takes_the_byte_path(layout: Layout) -> None:
    spec = spec_of(layout, "bfloat16", *SHAPES["real"])
    host = make_caches(spec)
    flat = poisoned((len(IDS) * spec.block_nbytes // 2 + 1,), spec.torch_dtype, 0xFF)
    out = flat[1:].view(len(IDS), *spec.block_shape)

    cuda.gather(spec, on(DEV, host), IDS, out=out)
    torch.cuda.synchronize()

    assert torch.equal(raw(out).cpu(), raw(reference.gather(spec, host, IDS)))


@pytest.mark.parametrize("layout", [Layout.VLLM, Layout.FLASHINFER])
def test_strided_caches_equal_the_reference(layout: Layout) -> None:
    spec = spec_of(layout, "float16", *SHAPES["odd-aligned"])
    host, _ = every_other_block(spec)  # views of every other block of wider caches
    want = reference.gather(spec, host, IDS)
    _, full = every_other_block(spec)  # the same values (seeded), for the device
    index = (
        (slice(None), slice(None, None, 2)) if layout is Layout.VLLM else (slice(None, None, 2),)
    )
    views: list[LayerCache] = [c.to(DEV)[index] for c in full]
    blocks = make_blocks(spec, len(IDS))

    gathered = cuda.gather(spec, views, IDS)
    cuda.scatter(spec, blocks.to(DEV), views, [1, 2, 5])
    reference.scatter(spec, blocks, host, [1, 2, 5])
    torch.cuda.synchronize()

    assert torch.equal(raw(gathered).cpu(), raw(want))
    assert all(map(torch.equal, cache_bytes(views), cache_bytes(host)))


def test_hf_kernels_use_the_chosen_batch_row() -> None:
    spec = spec_of(Layout.HF, "bfloat16", *SHAPES["real"])
    host = make_caches(spec, batch=3, extra_tokens=5)
    caches = on(DEV, host)
    blocks = make_blocks(spec, len(IDS))

    gathered = cuda.gather(spec, caches, IDS, batch=2)
    cuda.scatter(spec, blocks.to(DEV), caches, IDS, batch=1)
    reference.scatter(spec, blocks, host, IDS, batch=1)
    torch.cuda.synchronize()

    assert torch.equal(
        raw(gathered).cpu(),
        raw(reference.gather(spec, make_caches(spec, batch=3, extra_tokens=5), IDS, batch=2)),
    )
    assert all(map(torch.equal, cache_bytes(caches), cache_bytes(host)))


def test_llama_3_8b_block_shape_equals_the_reference() -> None:
    spec = KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)
    caches = make_caches(spec, num_blocks=64)
    dev = on(DEV, caches)
    ids = [63, 0, 17, 18, 5, 40, 41, 2]

    gathered = cuda.gather(spec, dev, ids)
    back = on(DEV, make_caches(spec, num_blocks=64, seed=3))
    cuda.scatter(spec, gathered, back, ids)
    torch.cuda.synchronize()

    assert torch.equal(raw(gathered), raw(reference.gather(spec, dev, ids)))
    assert torch.equal(raw(reference.gather(spec, back, ids)), raw(gathered))


def test_prepared_caches_move_the_same_bytes_and_refuse_another_spec() -> None:
    spec = KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)
    dev = on(DEV, make_caches(spec, num_blocks=64))
    prepared = cuda.prepare(spec, dev)
    ids = [9, 1, 33]

    got = cuda.gather(spec, dev, ids, prepared=prepared)
    back = on(DEV, make_caches(spec, num_blocks=64, seed=3))
    cuda.scatter(spec, got, back, ids, prepared=cuda.prepare(spec, back))
    torch.cuda.synchronize()

    assert torch.equal(raw(got), raw(reference.gather(spec, dev, ids)))
    assert torch.equal(raw(reference.gather(spec, back, ids)), raw(got))
    other = KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16", block_size=16)
    with pytest.raises(LayoutError, match="prepared= was made for another spec"):
        cuda.gather(other, dev, ids, prepared=prepared)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_blocks_is_no_launch_and_an_empty_result(layout: Layout) -> None:
    spec = spec_of(layout, "bfloat16", *SHAPES["real"])
    caches = on(DEV, make_caches(spec))

    assert tuple(cuda.gather(spec, caches, []).shape) == (0, *spec.block_shape)
    cuda.scatter(
        spec, torch.empty((0, *spec.block_shape), dtype=torch.bfloat16, device=DEV), caches, []
    )


def test_a_block_id_past_the_end_is_refused_on_the_host() -> None:
    spec = spec_of(Layout.VLLM, "bfloat16", *SHAPES["real"])

    with pytest.raises(LayoutError, match=f"^block id {NUM_BLOCKS} is out of range"):
        cuda.gather(spec, on(DEV, make_caches(spec)), [0, NUM_BLOCKS])


def test_cpu_caches_are_refused() -> None:
    spec = spec_of(Layout.VLLM, "bfloat16", *SHAPES["real"])

    with pytest.raises(LayoutError, match=r"^the CUDA kernels need every layer on one CUDA device"):
        cuda.gather(spec, make_caches(spec), IDS)


# --- quantized ------------------------------------------------------------------------------


def fp8_capable() -> bool:
    return torch.cuda.get_device_capability(DEV) >= cuda.FP8_CAPABILITY


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", QUANT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantized_gather_and_scatter_equal_the_reference(
    layout: Layout, dtype: str, shape: str, fmt: str
) -> None:
    if fmt == "fp8" and not fp8_capable():
        pytest.skip("fp8 needs sm_89+ (test_fp8_before_sm89_is_refused covers this GPU)")
    spec = spec_of(layout, dtype, *SHAPES[shape])
    host = make_caches(spec)
    caches = on(DEV, host)

    q = cuda.gather_quantized(spec, caches, IDS, fmt=fmt)  # type: ignore[arg-type]
    want = reference_quant.gather_quantized(spec, host, IDS, fmt=fmt)  # type: ignore[arg-type]
    torch.cuda.synchronize()
    assert torch.equal(raw(q.data).cpu(), raw(want.data))
    assert torch.equal(q.scales.cpu(), want.scales)

    target_host = make_caches(spec, seed=9)
    target = on(DEV, target_host)
    cuda.scatter_quantized(spec, q, target, [5, 1, 3])
    reference_quant.scatter_quantized(spec, want, target_host, [5, 1, 3])
    torch.cuda.synchronize()
    assert all(map(torch.equal, cache_bytes(target), cache_bytes(target_host)))

    restored = reference.gather(spec, target_host, [5, 1, 3]).float()
    original = reference.gather(spec, host, IDS).float()
    bound = reference_quant.error_bound(want, spec.torch_dtype)
    assert bool(((restored - original).abs() <= bound).all())


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("layout", MLA_LAYOUTS)
def test_a_quantized_mla_latent_equals_the_reference(layout: Layout, fmt: str) -> None:
    if fmt == "fp8" and not fp8_capable():
        pytest.skip("fp8 needs sm_89+ (test_fp8_before_sm89_is_refused covers this GPU)")
    spec = make_mla_spec(layout, "bfloat16", 576)
    host = make_caches(spec)

    q = cuda.gather_quantized(spec, on(DEV, host), IDS, fmt=fmt)  # type: ignore[arg-type]
    want = reference_quant.gather_quantized(spec, host, IDS, fmt=fmt)  # type: ignore[arg-type]
    target_host = make_caches(spec, seed=9)
    target = on(DEV, target_host)
    cuda.scatter_quantized(spec, q, target, [5, 1, 3])
    reference_quant.scatter_quantized(spec, want, target_host, [5, 1, 3])
    torch.cuda.synchronize()

    assert tuple(q.scales.shape) == (len(IDS), spec.num_layers, 1, 1)
    assert torch.equal(raw(q.data).cpu(), raw(want.data))
    assert torch.equal(q.scales.cpu(), want.scales)
    assert all(map(torch.equal, cache_bytes(target), cache_bytes(target_host)))


def test_quantized_gather_writes_every_byte_of_data_and_scales() -> None:
    """The outputs are allocated inside: poisoned blocks of their sizes are freed just before,
    so that torch's caching allocator hands exactly those to the kernel."""
    spec = spec_of(Layout.VLLM, "bfloat16", *SHAPES["real"])
    host = make_caches(spec)
    caches = on(DEV, host)
    want = reference_quant.gather_quantized(spec, host, IDS)

    for poison in POISONS:
        junk = [
            poisoned(want.data.shape, torch.int8, poison),
            poisoned(want.scales.shape, torch.float32, poison),
        ]
        del junk
        q = cuda.gather_quantized(spec, caches, IDS)
        torch.cuda.synchronize()

        assert torch.equal(raw(q.data).cpu(), raw(want.data))
        assert torch.equal(q.scales.cpu(), want.scales)


def test_fp8_before_sm89_is_refused() -> None:
    if fp8_capable():
        pytest.skip("this GPU has fp8")
    spec = spec_of(Layout.VLLM, "bfloat16", *SHAPES["real"])

    with pytest.raises(cuda.KernelUnavailable, match=r"fp8 storage needs compute capability 8\.9"):
        cuda.gather_quantized(spec, on(DEV, make_caches(spec)), IDS, fmt="fp8")


# --- streams --------------------------------------------------------------------------------


def big_spec() -> KVSpec:
    return KVSpec(num_layers=8, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)


def versions(spec: KVSpec, n: int) -> list[torch.Tensor]:
    return [make_blocks(spec, n, seed=s).to(DEV) for s in (11, 12)]


def test_loads_and_stores_on_two_streams_never_tear_a_block() -> None:
    """A load stream scatters version k % 2 into the same blocks; a store stream, ordered after
    each load by an event, gathers them: every gather sees one whole version, never a mix."""
    spec = big_spec()
    caches = on(DEV, make_caches(spec, num_blocks=32))
    ids = [3, 30, 7, 8]
    v = versions(spec, len(ids))
    loads, stores = torch.cuda.Stream(DEV), torch.cuda.Stream(DEV)
    rounds = 40
    outs = [
        torch.empty((len(ids), *spec.block_shape), dtype=torch.bfloat16, device=DEV)
        for _ in range(rounds)
    ]
    done = []
    torch.cuda.synchronize()  # the setup, queued on the default stream, is done

    for k in range(rounds):
        if done:
            loads.wait_event(done[-1])  # the previous gather has read the blocks
        cuda.scatter(spec, v[k % 2], caches, ids, stream=loads)
        loaded = torch.cuda.Event()
        loaded.record(loads)
        stores.wait_event(loaded)
        cuda.gather(spec, caches, ids, out=outs[k], stream=stores)
        gathered = torch.cuda.Event()
        gathered.record(stores)
        done.append(gathered)
    torch.cuda.synchronize()

    for k, out in enumerate(outs):
        assert torch.equal(raw(out), raw(v[k % 2])), f"round {k}"


def test_concurrent_loads_and_stores_of_different_blocks_do_not_interfere() -> None:
    spec = big_spec()
    host = make_caches(spec, num_blocks=64)
    caches = on(DEV, host)
    read_ids, write_ids = list(range(0, 32, 2)), list(range(1, 32, 2))
    blocks = make_blocks(spec, len(write_ids), seed=5).to(DEV)
    loads, stores = torch.cuda.Stream(DEV), torch.cuda.Stream(DEV)
    want = reference.gather(spec, host, read_ids).to(DEV)
    outs = []
    torch.cuda.synchronize()  # the setup, queued on the default stream, is done

    for _ in range(20):
        cuda.scatter(spec, blocks, caches, write_ids, stream=loads)
        outs.append(cuda.gather(spec, caches, read_ids, stream=stores))
    torch.cuda.synchronize()

    assert all(torch.equal(raw(o), raw(want)) for o in outs)
    assert torch.equal(raw(reference.gather(spec, caches, write_ids)), raw(blocks))


def test_a_kernel_runs_on_the_stream_it_is_given() -> None:
    """Work queued behind a long sleep on a side stream: the default stream sees no result yet."""
    spec = big_spec()
    caches = on(DEV, make_caches(spec, num_blocks=8))
    side = torch.cuda.Stream(DEV)
    out = poisoned((2, *spec.block_shape), torch.bfloat16, 0xFF)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles
    cuda.gather(spec, caches, [1, 2], out=out, stream=side)

    early = raw(out).clone()  # on the default stream: runs before the side stream is done
    side.synchronize()

    assert int((early != 0xFF).sum()) == 0
    assert torch.equal(raw(out), raw(reference.gather(spec, caches, [1, 2])))


def test_launches_use_cupys_stream_protocol_not_the_deprecated_external_stream() -> None:
    """CuPy 14 warns on ``ExternalStream``; the same torch stream serves many launches (a wrapper
    that destroyed it on release would break the second)."""
    spec = big_spec()
    host = make_caches(spec, num_blocks=8)
    caches = on(DEV, host)
    side = torch.cuda.Stream(DEV)
    torch.cuda.synchronize()

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ExternalStream.*")
        outs = [cuda.gather(spec, caches, [k, 7 - k], stream=side) for k in range(4)]
    side.synchronize()

    for k, out in enumerate(outs):
        assert torch.equal(raw(out).cpu(), raw(reference.gather(spec, host, [k, 7 - k])))
