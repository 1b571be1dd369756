"""The vLLM worker's transports (``tiercache.integrations.vllm.transport``) against a real
daemon, on CPU: host copies move an engine's blocks byte for byte, and attached caches that
the daemon cannot attach (CPU tensors here; a daemon without a GPU alike) hand every
transfer to host copies, with the same outcome. (Attached caches on a GPU: tests/gpu.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, SPEC, make_ns, make_tokens
from tiercache.client import Client
from tiercache.daemon.process import DaemonProcess
from tiercache.integrations.vllm.groups import FULL, Group
from tiercache.integrations.vllm.metadata import Transfer
from tiercache.integrations.vllm.transport import AttachedCaches, HostCopies, Transport, pick
from tiercache.keys import KeyChain

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


def test_an_engine_on_cpu_gets_host_copies_even_where_it_may_attach() -> None:
    assert isinstance(pick([GROUP], [engine_caches(1)], 1, attach=True), HostCopies)


@pytest.mark.parametrize("kind", ["host", "attached"])
def test_blocks_saved_from_one_engine_load_into_another_s_blocks_byte_for_byte(
    tmp_path: Path, kind: str
) -> None:
    env = {
        "TIERCACHE_TIERS_HOST__BYTES": str(8 * NBYTES),
        "TIERCACHE_TIERS_HOST__SHARED": "true",
        "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk"),
    }
    src = engine_caches(1)
    dst = [torch.zeros_like(c) for c in src]
    chain = KeyChain(NS.block_keys(make_tokens(2))).to_bytes()
    with DaemonProcess(tmp_path, env=env) as daemon, Client(daemon.socket) as client:
        saved = transport(kind, src).save(client, Transfer("r1", chain, 0, 2, [3, 5]))
        assert saved.stored == 2

        # The engine computed the first block itself (skip=1): only the second is written.
        got = transport(kind, dst).load(client, Transfer("r2", chain, 0, 2, [7, 2], skip=1))

    assert got == 2
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[:, 2], s[:, 5])
        assert not d[:, 7].any()
