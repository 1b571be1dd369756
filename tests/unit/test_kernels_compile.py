"""What CI can check of the CUDA kernels without a GPU: the sources compile, and the addressing
the host launches them with finds exactly the bytes the torch reference moves.

Compiling: every ``kernels/*.cu`` with ``nvcc`` for sm_80 (A100) and sm_90 (H100) in one
invocation, warnings as errors; skipped only where ``nvcc`` is absent (CI has it). At run time
CuPy compiles the same files with NVRTC, which these tests cannot reach without a driver.

Addressing: ``kernels.cuda.addressing`` turns caches into a pointer table and byte strides;
here it is applied to CPU tensors and the kernel's address formula is followed through
process memory (``ctypes.string_at``), row by row, against the reference gather.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.unit.test_reference import IDS, LAYOUTS, NUM_BLOCKS, every_other_block, make_caches
from tests.unit.test_reference import make_spec as make_reference_spec
from tiercache.kernels.cuda import addressing, host_ids
from tiercache.kernels.reference import LayerCache, LayoutError, gather
from tiercache.spec import KVSpec, Layout

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
SOURCES = sorted(KERNELS.glob("*.cu"))
NVCC_FLAGS = [
    "-c", "-O2", "--std=c++17", "-Werror", "all-warnings",
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=sm_90",
]  # fmt: skip


def test_the_kernel_sources_are_there() -> None:
    assert [p.name for p in SOURCES] == ["gather_scatter.cu", "quant.cu"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_source_compiles_for_sm80_and_sm90_without_warnings(source: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        ["nvcc", *NVCC_FLAGS, str(source), "-o", str(tmp_path / "k.o")],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    assert "warning" not in (result.stdout + result.stderr).lower()


# --- addressing, followed through memory ----------------------------------------------------


def gather_through_addresses(
    spec: KVSpec, caches: list[LayerCache], ids: list[int], batch: int = 0
) -> torch.Tensor:
    """What the gather kernel reads: row (i, layer, kv, t, h) at the formula's address."""
    a = addressing(spec, caches, batch)
    rows = bytearray()
    for block in ids:
        for layer in range(spec.num_layers):
            for kv in range(2):
                for t in range(spec.block_size):
                    for h in range(spec.num_kv_heads):
                        at = a.ptrs[layer * 2 + kv] + block * a.s_block + t * a.s_token
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
