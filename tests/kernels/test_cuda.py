"""What CI can check of the CUDA kernels without a GPU: the sources compile, and the addressing
the host launches them with finds exactly the bytes the torch reference moves.

Compiling: every ``kernels/*.cu`` with ``nvcc`` for sm_75 (T4), sm_80 (A100) and sm_90 (H100) in one
invocation, warnings as errors; skipped only where ``nvcc`` is absent (CI has it). At run time
CuPy compiles the same files with NVRTC, which these tests cannot reach without a driver.

Addressing: ``kernels.cuda.addressing`` turns caches into a pointer table and byte strides;
here it is applied to CPU tensors and the kernel's address formula is followed through
process memory (``ctypes.string_at``), row by row, against the reference gather. The flat
kernels' index arithmetic (warp item -> slab, chunk -> block, layer, K/V) is followed the same
way, vector by vector, with the grid ``kernels.cuda.flat_grid`` launches.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.kernels.test_reference import (
    IDS,
    LAYOUTS,
    MLA_LAYOUTS,
    NUM_BLOCKS,
    every_other_block,
    make_caches,
    make_mla_spec,
)
from tests.kernels.test_reference import make_spec as make_reference_spec
from tiercache.kernels import cuda
from tiercache.kernels.cuda import addressing, flat_grid, host_ids
from tiercache.kernels.reference import LayerCache, LayoutError, gather
from tiercache.spec import KVSpec, Layout

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
SOURCES = sorted(KERNELS.glob("*.cu"))
NVCC_FLAGS = [
    "-c", "-O2", "--std=c++17", "-Werror", "all-warnings",
    "-gencode", "arch=compute_75,code=sm_75",
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=sm_90",
]  # fmt: skip


def test_the_kernel_sources_are_there() -> None:
    assert [p.name for p in SOURCES] == ["gather_scatter.cu", "quant.cu"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_source_compiles_for_sm75_sm80_and_sm90_without_warnings(
    source: Path, tmp_path: Path
) -> None:
    result = subprocess.run(
        ["nvcc", *NVCC_FLAGS, str(source), "-o", str(tmp_path / "k.o")],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    assert "warning" not in (result.stdout + result.stderr).lower()


HARNESS = """
#include "quant.cu"
#include <cstdio>
#include <cstring>
int main() {  // stdin: float32 bits; stdout: bf16_bits_rn of each, then nan_max of each pair
  unsigned int u[2];
  while (fread(u, 4, 2, stdin) == 2) {
    const unsigned short b[2] = {bf16_bits_rn(u[0]), bf16_bits_rn(u[1])};
    float f[2];
    memcpy(f, u, 8);
    const float m = nan_max(f[0], f[1]);
    fwrite(b, 2, 2, stdout);
    fwrite(&m, 4, 1, stdout);
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def quant_on_the_host(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """quant.cu's host-and-device helpers, compiled for the host: ``run(float32 bits)`` gives
    (bf16 bits of each, nan_max of each pair)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    where = tmp_path_factory.mktemp("quant_host")
    (where / "h.cu").write_text(HARNESS)
    cmd = ["nvcc", "-O2", "--std=c++17", "-I", str(KERNELS), str(where / "h.cu")]
    build = subprocess.run(
        [*cmd, "-o", str(where / "h")], capture_output=True, text=True, timeout=300
    )
    assert build.returncode == 0, build.stderr

    def run(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        done = subprocess.run(
            [str(where / "h")], input=bits.numpy().tobytes(), capture_output=True, timeout=300
        )
        assert done.returncode == 0
        out = torch.frombuffer(bytearray(done.stdout), dtype=torch.uint8).view(-1, 8)
        return out[:, :4].contiguous().view(torch.int16).flatten(), out[:, 4:].contiguous().view(
            torch.float32
        ).flatten()

    return run


def test_the_pre_sm80_bfloat16_rounding_matches_torch(quant_on_the_host: Any) -> None:
    """GPUs before sm_80 have no cvt to bf16, so quant.cu's dequantizing scatter rounds on the
    bits there (``bf16_bits_rn``): it must give torch's bfloat16 for every rounding case: ties
    both ways, carries into the exponent, overflow to inf, subnormals, infinities and NaNs."""
    tops = torch.arange(1 << 16, dtype=torch.int64) << 16
    lows = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    seeded = torch.randint(0, 1 << 32, (1 << 16,), generator=torch.Generator().manual_seed(0))
    bits = torch.cat([(tops[:, None] | lows[None, :]).flatten(), seeded]).to(torch.uint32)

    got, _ = quant_on_the_host(bits)

    want = bits.view(torch.float32).to(torch.bfloat16).view(torch.int16)
    nan = bits.view(torch.float32).isnan()
    assert got.numel() == bits.numel()
    assert torch.equal(got[~nan], want[~nan])
    assert (got[nan] == 0x7FC0).all()  # the quiet NaN torch writes too (sign aside)


def test_the_quantizing_absmax_keeps_a_nan(quant_on_the_host: Any) -> None:
    """fmaxf drops a NaN: a head holding one would be stored with the NaN quantized to 0, where
    the torch reference's amax gives a NaN scale that the store refuses. ``nan_max`` keeps it
    on either side, and both of the kernel's reductions (per lane, across the warp) use it."""
    nan, inf = float("nan"), float("inf")
    pairs = torch.tensor([[1.0, 2.0], [nan, 1.0], [1.0, nan], [inf, 1.0], [0.0, 3.0], [nan, inf]])

    _, got = quant_on_the_host(pairs.view(torch.uint32).flatten())

    assert got[[0, 3, 4]].tolist() == [2.0, inf, 3.0]
    assert got[[1, 2, 5]].isnan().all()
    source = (KERNELS / "quant.cu").read_text()
    assert re.findall(r"absmax = (\w+)\(absmax,", source) == ["nan_max", "nan_max"]


# --- addressing, followed through memory ----------------------------------------------------


def gather_through_addresses(
    spec: KVSpec, caches: list[LayerCache], ids: list[int], batch: int = 0
) -> torch.Tensor:
    """What the gather kernel reads: row (i, layer, kv, t, h) at the formula's address."""
    a = addressing(spec, caches, batch)
    rows = bytearray()
    for block in ids:
        for layer in range(spec.num_layers):
            for kv in range(a.planes):
                for t in range(spec.block_size):
                    for h in range(spec.num_kv_heads):
                        at = a.ptrs[layer * a.planes + kv] + block * a.s_block + t * a.s_token
                        rows += ctypes.string_at(at + h * a.s_head, a.row_bytes)
    return torch.frombuffer(rows, dtype=torch.uint8).clone()


def reference_bytes(
    spec: KVSpec, caches: list[LayerCache], ids: list[int], batch: int = 0
) -> torch.Tensor:
    return gather(spec, caches, ids, batch=batch).view(torch.uint8).reshape(-1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_addresses_find_the_bytes_the_reference_gathers(layout: Layout, dtype: str) -> None:
    spec = make_reference_spec(layout, dtype)
    caches = make_caches(spec, batch=2)

    for batch in (0, 1) if layout is Layout.HF else (0,):
        got = gather_through_addresses(spec, caches, IDS, batch)
        assert torch.equal(got, reference_bytes(spec, caches, IDS, batch))


@pytest.mark.parametrize("layout", [Layout.VLLM, Layout.FLASHINFER])
def test_addresses_follow_strided_views(layout: Layout) -> None:
    spec = make_reference_spec(layout)
    caches, _ = every_other_block(spec)

    assert torch.equal(
        gather_through_addresses(spec, caches, IDS), reference_bytes(spec, caches, IDS)
    )


def big_spec(layout: Layout, head_dim: int = 128, dtype: str = "bfloat16") -> KVSpec:
    return KVSpec(
        num_layers=2, num_kv_heads=2, head_dim=head_dim, dtype=dtype, block_size=4, layout=layout
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_real_cache_shapes_take_the_16_byte_path(layout: Layout) -> None:
    spec = big_spec(layout)

    assert addressing(spec, make_caches(spec, num_blocks=3)).aligned()


def test_rows_of_an_odd_byte_count_take_the_byte_path() -> None:
    spec = big_spec(Layout.VLLM, head_dim=5)  # 10-byte rows

    assert not addressing(spec, make_caches(spec, num_blocks=3)).aligned()


def test_a_cache_view_off_by_one_element_takes_the_byte_path() -> None:
    spec = big_spec(Layout.FLASHINFER)
    wide = [c.reshape(-1) for c in make_caches(spec, num_blocks=4) if isinstance(c, torch.Tensor)]
    shifted: list[LayerCache] = [w[1 : 1 + 3 * 2 * 4 * 2 * 128].view(3, 2, 4, 2, 128) for w in wide]

    a = addressing(spec, shifted)

    assert not a.aligned()
    assert torch.equal(
        gather_through_addresses(spec, shifted, [2, 0]), reference_bytes(spec, shifted, [2, 0])
    )


def test_an_unaligned_output_takes_the_byte_path() -> None:
    spec = big_spec(Layout.VLLM)

    assert not addressing(spec, make_caches(spec, num_blocks=3)).aligned(8)


def test_layers_with_different_strides_are_refused() -> None:
    spec = big_spec(Layout.VLLM)
    caches = make_caches(spec, num_blocks=3)
    caches[1] = make_caches(spec, num_blocks=6)[1][:, ::2]  # type: ignore[index]

    with pytest.raises(LayoutError, match=r"^layer 1: the CUDA kernels need every layer's cache"):
        addressing(spec, caches)


def test_a_head_dim_that_is_not_contiguous_is_refused() -> None:
    spec = big_spec(Layout.VLLM, head_dim=4)
    caches = [
        c.transpose(3, 4).contiguous().transpose(3, 4) for c in make_caches(spec, num_blocks=3)
    ]  # type: ignore[union-attr]

    with pytest.raises(LayoutError, match=r"^layer 0: the CUDA kernels need head_dim contiguous"):
        addressing(spec, caches)  # type: ignore[arg-type]


def test_hf_batch_out_of_range_is_refused() -> None:
    spec = make_reference_spec(Layout.HF)

    with pytest.raises(LayoutError, match=r"^batch 1 is out of range for a batch of 1$"):
        addressing(spec, make_caches(spec), batch=1)


@pytest.mark.parametrize("bad", [NUM_BLOCKS, -1])
def test_block_ids_outside_the_cache_are_refused_before_any_launch(bad: int) -> None:
    with pytest.raises(
        LayoutError, match=f"^block id {bad} is out of range for a cache of {NUM_BLOCKS} blocks$"
    ):
        host_ids([0, bad], NUM_BLOCKS)


def test_hf_cache_counts_only_whole_blocks() -> None:
    spec = make_reference_spec(Layout.HF)

    assert addressing(spec, make_caches(spec, extra_tokens=3)).num_blocks == NUM_BLOCKS


# --- the flat path --------------------------------------------------------------------------


def gather_through_flat_kernel(
    spec: KVSpec, caches: list[LayerCache], ids: list[int]
) -> torch.Tensor:
    """What tc_gather_flat reads and where it writes it, following its arithmetic; every output
    vector must be written exactly once."""
    a = addressing(spec, caches)
    grid = flat_grid(len(ids), spec.num_layers, a.slab_bytes, a.planes)
    out = bytearray(len(ids) * spec.block_nbytes)
    writes = [0] * (len(out) // 16)
    for item in range(grid.ctas * cuda.WARPS):  # warp w of CTA c is item c * WARPS + w
        if item >= grid.items:
            continue
        slab, chunk = divmod(item, grid.chunks)
        i = slab // (spec.num_layers * a.planes)
        layer_kv = slab - i * spec.num_layers * a.planes
        paged = a.ptrs[layer_kv] + ids[i] * a.s_block
        # lane l, step k < TC_FLAT_UNROLL: vector chunk * TC_CHUNK + k * 32 + l
        for u in range(chunk * cuda.FLAT_CHUNK, (chunk + 1) * cuda.FLAT_CHUNK):
            if u < grid.vectors:
                at = slab * grid.vectors + u
                out[at * 16 : at * 16 + 16] = ctypes.string_at(paged + u * 16, 16)
                writes[at] += 1
    assert writes == [1] * len(writes)
    return torch.frombuffer(out, dtype=torch.uint8).clone()


def test_the_flat_constants_match_the_kernel_source() -> None:
    source = (KERNELS / "gather_scatter.cu").read_text()
    defines = dict(re.findall(r"^#define (TC_\w+) (.+)$", source, flags=re.M))

    assert int(defines["TC_THREADS"]) == cuda.THREADS
    assert defines["TC_WARPS"] == "(TC_THREADS / 32)" and cuda.WARPS == cuda.THREADS // 32
    assert defines["TC_CHUNK"].startswith("(32 * TC_FLAT_UNROLL)")
    assert 32 * int(defines["TC_FLAT_UNROLL"]) == cuda.FLAT_CHUNK


@pytest.mark.parametrize("layout", [Layout.VLLM, Layout.FLASHINFER])
def test_contiguous_paged_caches_take_the_flat_path(layout: Layout) -> None:
    spec = big_spec(layout)

    assert addressing(spec, make_caches(spec, num_blocks=3)).paths() == ("flat", "v16", "b1")


@pytest.mark.parametrize("layout", [Layout.VLLM, Layout.FLASHINFER])
def test_views_of_every_other_block_still_take_the_flat_path(layout: Layout) -> None:
    spec = big_spec(layout)
    wide = make_caches(spec, num_blocks=6)
    index = (
        (slice(None), slice(None, None, 2)) if layout is Layout.VLLM else (slice(None, None, 2),)
    )
    views: list[LayerCache] = [c[index] for c in wide if isinstance(c, torch.Tensor)]

    a = addressing(spec, views)

    assert a.paths()[0] == "flat"
    assert torch.equal(
        gather_through_flat_kernel(spec, views, [2, 0]), reference_bytes(spec, views, [2, 0])
    )


def test_hf_caches_with_several_heads_take_the_row_path() -> None:
    spec = big_spec(Layout.HF)

    assert addressing(spec, make_caches(spec, num_blocks=3)).paths() == ("v16", "b1")


def test_a_view_of_some_heads_takes_the_row_path() -> None:
    spec = big_spec(Layout.VLLM)
    wide = make_caches(big_spec(Layout.VLLM, head_dim=128), num_blocks=3)
    two_of_four = [
        torch.cat([c, c], dim=3)[:, :, :, 1:3] for c in wide if isinstance(c, torch.Tensor)
    ]

    assert addressing(spec, list(two_of_four)).paths() == ("v16", "b1")


def test_unaligned_caches_take_only_the_byte_path() -> None:
    spec = big_spec(Layout.VLLM, head_dim=5)

    assert addressing(spec, make_caches(spec, num_blocks=3)).paths() == ("b1",)
    assert addressing(big_spec(Layout.VLLM), make_caches(big_spec(Layout.VLLM))).paths(8) == ("b1",)


@pytest.mark.parametrize(
    ("heads", "head_dim", "block", "chunks"),
    [(3, 8, 7, 1), (2, 128, 16, 2), (2, 128, 17, 3), (1, 8, 1, 1)],
    ids=["one-partial-chunk", "two-whole-chunks", "partial-last-chunk", "one-vector-slabs"],
)
@pytest.mark.parametrize("layout", [Layout.VLLM, Layout.FLASHINFER])
def test_flat_kernel_arithmetic_finds_the_bytes_the_reference_gathers(
    layout: Layout, heads: int, head_dim: int, block: int, chunks: int
) -> None:
    spec = KVSpec(
        num_layers=3, num_kv_heads=heads, head_dim=head_dim, dtype="float16", block_size=block,
        layout=layout,
    )  # fmt: skip
    caches = make_caches(spec)
    a = addressing(spec, caches)

    assert a.paths()[0] == "flat"
    assert flat_grid(len(IDS), 3, a.slab_bytes).chunks == chunks
    assert torch.equal(
        gather_through_flat_kernel(spec, caches, IDS), reference_bytes(spec, caches, IDS)
    )


def test_flat_grid_of_llama_3_8b_and_qwen_blocks() -> None:
    llama = flat_grid(256, 32, 16 * 8 * 256)  # 32 KiB slabs: 8 warp items each
    qwen = flat_grid(256, 24, 16 * 2 * 128)  # 4 KiB slabs: one item each

    assert (llama.vectors, llama.chunks, llama.items, llama.ctas) == (2048, 8, 131072, 16384)
    assert (qwen.vectors, qwen.chunks, qwen.items, qwen.ctas) == (256, 1, 12288, 1536)


def test_a_flat_launch_past_32_bit_items_is_refused() -> None:
    with pytest.raises(LayoutError, match=r"^4194304 blocks are 2147483648 work items"):
        flat_grid(2**22, 32, 16 * 8 * 256)


# --- CuPy's view of a torch stream ----------------------------------------------------------


class NewCupyStream:
    """CuPy 14's ``Stream.from_external``, as far as _cupy_stream uses it: it reads the
    protocol (CuPy itself cannot run without a device)."""

    @staticmethod
    def from_external(obj: Any) -> tuple[int, int]:
        return obj.__cuda_stream__()  # type: ignore[no-any-return]


class TorchStream:
    cuda_stream = 0x5EED


def test_cupy_14_gets_the_stream_through_the_stream_protocol() -> None:
    cp = SimpleNamespace(cuda=SimpleNamespace(Stream=NewCupyStream))

    assert cuda._cupy_stream(cp, TorchStream(), 0) == (0, 0x5EED)  # type: ignore[arg-type]


def test_older_cupy_gets_an_external_stream() -> None:
    made = []
    old = SimpleNamespace(Stream=object, ExternalStream=lambda ptr, dev: made.append((ptr, dev)))

    cuda._cupy_stream(SimpleNamespace(cuda=old), TorchStream(), 3)  # type: ignore[arg-type]

    assert made == [(0x5EED, 3)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn"])
@pytest.mark.parametrize("layout", MLA_LAYOUTS)
def test_addresses_of_an_mla_latent_find_the_bytes_the_reference_gathers(
    layout: Layout, dtype: str
) -> None:
    # One plane: the table has one pointer per layer, and a slab is a block's latent rows.
    spec = make_mla_spec(layout, dtype)
    caches = make_caches(spec, batch=2)

    for batch in (0, 1) if layout is Layout.HF else (0,):
        a = addressing(spec, caches, batch)
        assert a.planes == 1 and len(a.ptrs) == spec.num_layers
        got = gather_through_addresses(spec, caches, IDS, batch)
        assert torch.equal(got, reference_bytes(spec, caches, IDS, batch))


@pytest.mark.parametrize("layout", MLA_LAYOUTS)
def test_a_deepseek_latent_takes_the_flat_path_and_its_arithmetic_finds_the_reference_bytes(
    layout: Layout,
) -> None:
    # 576 bf16 values (kv_lora_rank 512 + rope 64) per token: 1152-byte rows, one head, so a
    # slab is one contiguous run in both layouts.
    spec = make_mla_spec(layout, latent=576)
    caches = make_caches(spec, num_blocks=5)
    a = addressing(spec, caches)

    assert a.paths() == ("flat", "v16", "b1")
    assert flat_grid(len(IDS), spec.num_layers, a.slab_bytes, 1).items == len(IDS) * 3 * 2
    assert torch.equal(
        gather_through_flat_kernel(spec, caches, IDS), reference_bytes(spec, caches, IDS)
    )
