"""The vLLM connector's worker side (``tiercache.integrations.vllm.worker``) against a real
daemon, with CPU caches of vLLM's layout: the caches it registers are checked, a step's saves
and loads move an engine's blocks byte for byte, and what fails is reported the way vLLM
recomputes it: engine blocks for one full-attention group, the whole request for several
groups, a daemon that is down as every block of the load."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.conftest import SPEC, make_ns, make_tokens
from tiercache.client import Client
from tiercache.daemon.process import DaemonProcess
from tiercache.integrations.vllm.groups import FULL, Group
from tiercache.integrations.vllm.link import Link
from tiercache.integrations.vllm.metadata import TierCacheMetadata, Transfer
from tiercache.integrations.vllm.options import ConnectorConfigError
from tiercache.integrations.vllm.worker import Worker
from tiercache.kernels.reference import LayoutError
from tiercache.keys import KeyChain, Namespace
from tiercache.spec import KVSpec

NS = make_ns("vllm-worker")
GROUP = Group(0, FULL, None, ("l0", "l1"), NS, SPEC)
# Two groups of one layer each (as vLLM's hybrid manager makes them): a failed load is
# recomputed by the whole request.
ONE_LAYER = KVSpec(1, SPEC.num_kv_heads, SPEC.head_dim, SPEC.dtype, SPEC.block_size)
TWO = [
    Group(i, FULL, None, (f"l{i}",), Namespace("vllm-worker", ONE_LAYER, group=f"g{i}"), ONE_LAYER)
    for i in range(2)
]


def caches(seed: int | None, layers: tuple[str, ...] = ("l0", "l1")) -> dict[str, torch.Tensor]:
    """vLLM-layout caches by layer name, ``[2, 8 blocks, block_size, heads, dim]``: random and
    never zero, or (``seed`` None) zeros."""
    shape = (2, 8, SPEC.block_size, SPEC.num_kv_heads, SPEC.head_dim)
    g = torch.Generator().manual_seed(seed or 0)
    return {
        name: torch.zeros(shape, dtype=SPEC.torch_dtype)
        if seed is None
        else (torch.rand(shape, generator=g) + 0.5).to(SPEC.torch_dtype)
        for name in layers
    }


def worker(
    socket: str | Path, kv: dict[str, torch.Tensor], groups: list[Group] | None = None
) -> Worker:
    w = Worker(groups or [GROUP], 1, Link(str(socket), "vllm-worker-test", retry=60), attach=True)
    w.register(kv)
    return w


def chain(n: int, seed: int, ns: Namespace = NS) -> bytes:
    return KeyChain(ns.block_keys(make_tokens(n, seed=seed))).to_bytes()


def background_done(w: Worker) -> tuple[set[str], set[str]]:
    """What ``finished`` reports once a background load is done: (loaded, failed)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, loaded, failed = w.finished()
        if loaded:
            return loaded, failed
    raise TimeoutError("the background load was never reported")


def test_caches_are_checked_when_the_engine_registers_them(daemon: DaemonProcess) -> None:
    with pytest.raises(ConnectorConfigError, match="registered no KV cache for l1"):
        worker(daemon.socket, caches(1, ("l0",)))
    wrong = caches(1)
    wrong["l1"] = wrong["l1"][:, :, :2]  # 2-token blocks, the spec says 4
    with pytest.raises(LayoutError):
        worker(daemon.socket, wrong)


def test_a_steps_saves_load_into_another_engine_byte_for_byte(daemon: DaemonProcess) -> None:
    src, dst = caches(1), caches(None)
    keys = chain(2, seed=1)
    a = worker(daemon.socket, src)
    a.save(TierCacheMetadata(saves=[Transfer("r1", keys, 0, 2, [3, 5], finish=True)]))
    sent, loaded, failed = a.finished()
    assert (sent, loaded, failed) == ({"r1"}, set(), set())  # vLLM may free r1's blocks

    b = worker(daemon.socket, dst)
    b.start_load(TierCacheMetadata(loads=[Transfer("r2", keys, 0, 2, [7, 2])]), forward=True)
    assert b.load_errors() == set()
    for name in ("l0", "l1"):
        assert torch.equal(dst[name][:, 7], src[name][:, 3])
        assert torch.equal(dst[name][:, 2], src[name][:, 5])
        assert not dst[name][:, [0, 1, 3, 4, 5, 6]].any()
    a.shutdown()
    b.shutdown()


def test_a_missing_block_is_reported_and_its_request_saves_nothing_until_vllm_recomputes_it(
    daemon: DaemonProcess,
) -> None:
    src, dst = caches(2), caches(None)
    keys = chain(3, seed=2)
    a = worker(daemon.socket, src)
    a.save(
        TierCacheMetadata(
            saves=[Transfer("r1", KeyChain(KeyChain.from_bytes(keys)[:1]).to_bytes(), 0, 1, [1])]
        )
    )

    b = worker(daemon.socket, dst)
    load = Transfer("r2", keys, 0, 3, [4, 5, 6])
    b.start_load(TierCacheMetadata(loads=[load]), forward=True)
    assert b.load_errors() == {5, 6}  # block 0 loaded; vLLM recomputes the others
    assert b.load_errors() == set()  # reported once
    assert torch.equal(dst["l0"][:, 4], src["l0"][:, 1])
    # This step computes r2 over the blocks that failed: its saves are skipped (vLLM saves
    # them in a later step, once recomputed).
    b.save(TierCacheMetadata(saves=[Transfer("r2", keys, 1, 2, [5, 6], after=12)]))
    with Client(daemon.socket) as c:
        assert c.lookup(NS, KeyChain.from_bytes(keys)).blocks == 1
    # So are those of the next step, scheduled before vLLM saw the failure (async
    # scheduling): it computes r2's next tokens over them too.
    b.save(TierCacheMetadata(saves=[Transfer("r2", keys, 2, 1, [6], after=13)]))
    with Client(daemon.socket) as c:
        assert c.lookup(NS, KeyChain.from_bytes(keys), first_block=2).blocks == 0
    # Once vLLM has rolled r2 back to its first block that failed (token 4), its saves go.
    b.save(TierCacheMetadata(saves=[Transfer("r2", keys, 1, 2, [5, 6], after=4)]))
    with Client(daemon.socket) as c:
        assert c.lookup(NS, KeyChain.from_bytes(keys)).blocks == 3
    a.shutdown()
    b.shutdown()


def test_a_save_the_daemon_refuses_does_not_skip_the_steps_other_saves(
    daemon: DaemonProcess, caplog: pytest.LogCaptureFixture
) -> None:
    # An error reply was taken for an unreachable daemon: the step's later saves were
    # skipped, r2's blocks never stored.
    keys = chain(2, seed=7)
    w = worker(daemon.socket, caches(7))
    bad = Transfer("r1", keys, 1, 2, [1, 2], finish=True)  # blocks 1..3 of a 2-block chain
    good = Transfer("r2", keys, 0, 2, [3, 4], finish=True)
    w.save(TierCacheMetadata(saves=[bad, good]))
    assert "tiercache save failed: bad_shape" in caplog.text  # the refused one is logged
    assert w.finished()[0] == {"r1", "r2"}
    with Client(daemon.socket) as c:
        assert c.lookup(NS, KeyChain.from_bytes(keys)).blocks == 2
    w.shutdown()


def test_a_background_load_is_reported_by_finished_and_its_misses_as_blocks(
    daemon: DaemonProcess,
) -> None:
    src, dst = caches(3), caches(None)
    keys = chain(2, seed=3)
    a = worker(daemon.socket, src)
    a.save(TierCacheMetadata(saves=[Transfer("r1", keys, 0, 2, [0, 1])]))
    b = worker(daemon.socket, dst)
    # Turn 1's 2 blocks, and a third the daemon never had.
    longer = KeyChain([*KeyChain.from_bytes(keys), *KeyChain.from_bytes(chain(3, seed=4))[2:]])
    load = Transfer("r2", longer.to_bytes(), 0, 3, [5, 6, 7], background=True)
    b.start_load(TierCacheMetadata(loads=[load]), forward=False)
    assert background_done(b) == ({"r2"}, set())
    assert b.load_errors() == {7}
    assert torch.equal(dst["l1"][:, 6], src["l1"][:, 1])
    a.shutdown()
    b.shutdown()


def test_with_several_groups_a_failed_background_load_fails_the_whole_request(
    daemon: DaemonProcess,
) -> None:
    src, dst = caches(4), caches(None)
    keys = [chain(2, seed=5, ns=g.ns) for g in TWO]
    a = worker(daemon.socket, src, TWO)
    a.save(TierCacheMetadata(saves=[Transfer("r1", keys[0], 0, 2, [0, 1], group=0)]))
    b = worker(daemon.socket, dst, TWO)
    assert b.by_request
    # Group 0 finds its blocks, group 1 none: vLLM recomputes the request, not blocks.
    loads = [Transfer("r2", keys[g], 0, 2, [3, 4], background=True, group=g) for g in (0, 1)]
    b.start_load(TierCacheMetadata(loads=loads), forward=False)
    assert background_done(b) == ({"r2"}, {"r2"})
    assert b.load_errors() == set()
    a.shutdown()
    b.shutdown()


def test_a_daemon_that_is_down_skips_saves_and_fails_every_load(tmp_path: Path) -> None:
    w = worker(tmp_path / "nobody.sock", caches(5))
    keys = chain(2, seed=6)
    w.save(TierCacheMetadata(saves=[Transfer("r1", keys, 0, 2, [1, 2], finish=True)]))
    assert w.finished()[0] == {"r1"}  # saved or not, vLLM may free its blocks
    w.start_load(TierCacheMetadata(loads=[Transfer("r2", keys, 0, 2, [3, 4])]), forward=True)
    assert w.load_errors() == {3, 4}
    w.shutdown()
