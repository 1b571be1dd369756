"""CUDA IPC between processes on a GPU: an engine's KV cache mapped by another process, copies
ordered across the two by interprocess events, and a real daemon saving from and loading into
an attached cache (gather/scatter kernels on the imported memory) with its mappings released
when the engine goes away, killed or not. Skipped without CUDA; the CPU twin of the daemon's
side is tests/test_engine_kv.py, the wire checks tests/test_ipc.py."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
import torch

from tiercache.client import AttachedCache, Client, RemoteError
from tiercache.daemon.process import DaemonProcess
from tiercache.kernels import reference
from tiercache.keys import Namespace
from tiercache.spec import KVSpec, Layout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SPEC = KVSpec(num_layers=4, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_size=16)
NUM_BLOCKS = 64
SLOW_CYCLES = 200_000_000  # ~0.1 s of GPU sleep queued before a write: a missing wait shows
ROOT = Path(__file__).resolve().parents[1]


def random_caches(spec: KVSpec, seed: int, layout: Layout = Layout.VLLM) -> list[Any]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (
        (2, NUM_BLOCKS, spec.block_size, spec.num_kv_heads, spec.head_dim)
        if layout is Layout.VLLM
        else (NUM_BLOCKS, 2, spec.block_size, spec.num_kv_heads, spec.head_dim)
    )
    return [
        (torch.rand(shape, generator=g, device="cuda") + 0.5).to(spec.torch_dtype)
        for _ in range(spec.num_layers)
    ]


def slow_fill(caches: list[Any], value: float) -> None:
    """Queue, behind a long GPU sleep, a write of ``value`` everywhere (no sync)."""
    torch.cuda._sleep(SLOW_CYCLES)  # type: ignore[no-untyped-call]
    for c in caches:
        c.fill_(value)


def tokens(n_blocks: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (n_blocks * SPEC.block_size,), generator=g).tolist()


# --- two processes, no daemon: the IPC layer alone -----------------------------------------


def _engine(conn: Connection) -> None:
    """The exporting side: a cache written behind a slow kernel, shared before the write is
    done; then it reads back what the other side wrote, ordered by the other side's event."""
    from tiercache import ipc

    torch.cuda.set_device(0)
    # Both under 1 MiB: torch's caching allocator carves them out of one 2 MiB segment, so the
    # cache does not start at its allocation's base.
    pad = torch.empty(4096, dtype=torch.uint8, device="cuda")
    cache = torch.empty((2, 16, 16, 2, 64), dtype=torch.bfloat16, device="cuda")
    cache.fill_(1.0)
    torch.cuda.synchronize()
    written = ipc.interprocess_event(cache.device)
    slow_fill([cache], 3.0)
    written.record()  # no sync: the reader must wait on this event
    conn.send({"cache": ipc.export_tensor(cache).to_wire(), "event": ipc.event_handle(written)})
    theirs = ipc.open_event(conn.recv(), cache.device)
    torch.cuda.current_stream().wait_event(theirs)
    conn.send(bool(torch.all(cache == 6.0)))
    conn.recv()
    del pad


def test_a_cache_shared_between_processes_orders_reads_and_writes_by_events() -> None:
    from tiercache import ipc

    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_engine, args=(theirs,))
    child.start()
    try:
        msg = ours.recv()
        h = ipc.TensorHandle.from_wire(msg["cache"])
        assert h.offset > 0  # a sub-allocation of torch's caching allocator
        opened = ipc.OpenedTensor(h)
        assert opened.tensor is not None
        cache = opened.tensor
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_event(ipc.open_event(msg["event"], cache.device))
        with torch.cuda.stream(stream):
            seen = cache.clone()
            slow_fill([cache], 6.0)
            done = ipc.interprocess_event(cache.device)
            done.record(stream)
        ours.send(ipc.event_handle(done))
        stream.synchronize()

        assert bool(torch.all(seen == 3.0))  # the engine's slow write, not the 1.0 before it
        assert ours.recv() is True  # the engine saw our slow write
        with pytest.raises(ipc.IpcError, match=r"needs .* B, but its allocation has"):
            ipc.OpenedTensor(ipc.TensorHandle.from_wire({**msg["cache"], "offset": 1 << 40}))
        opened.close()
        assert len(ipc.MAPPINGS) == 0
    finally:
        ours.send("bye")
        child.join(60)
    assert child.exitcode == 0


# --- a real daemon -------------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    block = SPEC.block_nbytes
    d = DaemonProcess(
        tmp_path,
        env={
            "TIERCACHE_TIERS_HOST__BYTES": str(8 * block),
            "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk"),
            "TIERCACHE_TIERS_DISK__BYTES": str(256 * block),
            "TIERCACHE_TIERS_DEVICE__BYTES": str(4 * block),
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        },
    )
    d.start()
    yield d
    d.stop()


def attach(
    client: Client, layout: Layout, seed: int | None
) -> tuple[Namespace, AttachedCache, list[Any]]:
    spec = KVSpec(**{**SPEC.to_dict(), "layout": layout.value})
    ns = Namespace("ipc-test", spec)
    caches = random_caches(spec, seed if seed is not None else 0, layout)
    if seed is None:
        for c in caches:
            c.zero_()
    return ns, client.attach(ns, caches), caches


@pytest.mark.parametrize("layout", [Layout.VLLM, Layout.FLASHINFER])
def test_the_daemon_saves_from_and_loads_into_an_attached_cache(
    daemon: DaemonProcess, layout: Layout
) -> None:
    with Client(daemon.socket) as client:
        ns, src, src_caches = attach(client, layout, seed=1)
        _, dst, dst_caches = attach(client, layout, seed=None)
        prompt = tokens(6, seed=2)
        slow_fill(src_caches[:1], 2.0)  # queued, not done: the save must wait for it

        saved = client.save_kv(src, prompt, [9, 3, 40, 7, 8, 63], session="chat")
        tiers = client.load_kv(dst, prompt, [0, 1, 2, 10, 11, 12])
        got = reference.gather(ns.spec, dst_caches, [0, 1, 2, 10, 11, 12])  # after the scatter

        assert saved.stored == 6
        assert len(tiers) == 6 and set(tiers) <= {"host", "disk"}  # 8 host slots: some on disk
        want = reference.gather(ns.spec, src_caches, [9, 3, 40, 7, 8, 63])
        assert bool(torch.all(want[:, 0] == 2.0))
        assert torch.equal(got, want)
        assert not reference.gather(ns.spec, dst_caches, [3, 4, 5]).any()

        changed = list(prompt)
        changed[3 * SPEC.block_size] += 1  # the 4th block differs: a 3-block run
        assert len(client.load_kv(dst, changed, [20, 21, 22, 23, 24, 25])) == 3
        assert not reference.gather(ns.spec, dst_caches, [23, 24, 25]).any()

        assert client.prefetch(session="chat") > 0
        tiers = client.load_kv(dst, prompt, [30, 31, 32, 33])
        assert "device" in tiers  # the device tier's copies are scattered device to device
        assert torch.equal(reference.gather(ns.spec, dst_caches, [30, 31, 32, 33]), want[:4])


def test_an_attached_mla_latent_saves_and_loads_byte_for_byte(daemon: DaemonProcess) -> None:
    # vLLM's MLA cache: [num_blocks, block_size, latent] per layer (DeepSeek-V3's 576), one
    # plane; the daemon's kernels move it as they move K and V.
    spec = KVSpec(
        num_layers=4, num_kv_heads=1, head_dim=576, dtype="bfloat16", block_size=16, kind="mla"
    )
    ns = Namespace("ipc-test-mla", spec)
    g = torch.Generator(device="cuda").manual_seed(5)
    src = [
        (torch.rand((NUM_BLOCKS, 16, 576), generator=g, device="cuda") + 0.5).to(torch.bfloat16)
        for _ in range(spec.num_layers)
    ]
    dst = [torch.zeros_like(c) for c in src]
    with Client(daemon.socket) as client:
        a, b = client.attach(ns, src), client.attach(ns, dst)
        prompt = tokens(4, seed=6)
        assert client.save_kv(a, prompt, [9, 3, 40, 7]).stored == 4
        assert len(client.load_kv(b, prompt, [0, 1, 2, 10])) == 4
        torch.cuda.synchronize()

    want = reference.gather(spec, src, [9, 3, 40, 7])
    assert torch.equal(reference.gather(spec, dst, [0, 1, 2, 10]), want)
    assert not reference.gather(spec, dst, [3, 4, 5]).any()


def test_concurrent_saves_and_loads_on_attached_caches_never_tear_a_block(
    daemon: DaemonProcess,
) -> None:
    """One engine saves prompt after prompt (evicting through an 8-block host tier) while
    another loads whatever is cached: every block loaded equals the block saved."""
    prompts = [tokens(3, seed=100 + i) for i in range(12)]
    with Client(daemon.socket) as writer, Client(daemon.socket) as reader:
        ns, src, src_caches = attach(writer, Layout.VLLM, seed=5)
        _, dst, dst_caches = attach(reader, Layout.VLLM, seed=None)
        saved: list[int] = []
        failures: list[BaseException] = []

        def save_all() -> None:
            try:
                for i, p in enumerate(prompts):
                    writer.save_kv(src, p, [3 * i, 3 * i + 1, 3 * i + 2])
                    saved.append(i)
            except BaseException as e:  # surfaced below
                failures.append(e)

        t = threading.Thread(target=save_all)
        t.start()
        checked = 0
        while t.is_alive() or checked < 20:
            for i in list(saved):
                n = len(reader.load_kv(dst, prompts[i], [60, 61, 62]))
                got = reference.gather(ns.spec, dst_caches, [60, 61, 62][:n])
                want = reference.gather(ns.spec, src_caches, [3 * i, 3 * i + 1, 3 * i + 2][:n])
                assert n and torch.equal(got, want), f"prompt {i}: {n} blocks differ"
                checked += 1
        t.join()
        assert not failures and checked >= 20


ENGINE = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from tests.test_ipc_gpu import Layout, attach, tokens
    from tiercache.client import Client
    client = Client({socket!r})
    ns, cache, caches = attach(client, Layout.VLLM, seed=3)
    client.save_kv(cache, tokens(2, seed=9), [0, 1])
    print("attached", flush=True)
    time.sleep(600)
    """
)


def test_a_killed_engine_s_mappings_are_released_and_the_daemon_serves_on(
    daemon: DaemonProcess,
) -> None:
    engine = subprocess.Popen(
        [sys.executable, "-c", ENGINE.format(root=str(ROOT), socket=str(daemon.socket))],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert engine.stdout is not None and engine.stdout.readline().strip() == "attached"
        engine.send_signal(signal.SIGKILL)
        engine.wait(30)
        deadline = time.monotonic() + 30
        while "attached engines: unmapped" not in daemon.log.read_text():
            assert time.monotonic() < deadline, daemon.log.read_text()[-2000:]
            time.sleep(0.05)
    finally:
        engine.kill()

    with Client(daemon.socket) as client:
        ns, cache, caches = attach(client, Layout.VLLM, seed=None)
        assert client.load_kv(cache, tokens(2, seed=9), [5, 6]) == ["host", "host"]
        want = random_caches(ns.spec, 3)
        assert torch.equal(
            reference.gather(ns.spec, caches, [5, 6]), reference.gather(ns.spec, want, [0, 1])
        )
        with pytest.raises(RemoteError) as err:
            client.load_kv(cache, tokens(2, seed=9), [NUM_BLOCKS])
        assert err.value.code == "bad_request" and "out of range" in err.value.message


def test_the_connector_s_attachment_follows_a_daemon_restart(daemon: DaemonProcess) -> None:
    """``AttachedKV`` (how TierCacheConnector moves blocks on GPU engines): a save ordered
    behind the engine's queued writes, a load whose scatter is complete when it returns
    (``wait``, as for a background load), and a daemon restart: the new connection attaches
    the caches again and serves the blocks from disk."""
    from tiercache.integrations.attached import AttachedKV
    from tiercache.keys import KeyChain

    ns = Namespace("ipc-test", SPEC)
    src = random_caches(SPEC, 7)
    dst = random_caches(SPEC, 8)
    for c in dst:
        c.zero_()
    a_src, a_dst = AttachedKV(ns, src), AttachedKV(ns, dst)
    prompt = KeyChain(ns.block_keys(tokens(4, seed=11)))

    with Client(daemon.socket) as client:
        slow_fill(src[:1], 5.0)
        saved = a_src.save(client, prompt, [4, 5, 6, 7], 0, "s")
        assert saved is not None and saved.stored == 4
        assert a_dst.load(client, prompt, [10, 11], 2, wait=True) == ["host", "host"]
    daemon.stop()
    daemon.start()
    with Client(daemon.socket) as client:
        tiers = a_dst.load(client, prompt, [20, 21, 22, 23], 0, wait=True)

    assert a_dst.enabled and tiers is not None and len(tiers) == 4
    want = reference.gather(SPEC, src, [4, 5, 6, 7])
    assert bool(torch.all(want[:, 0] == 5.0))
    assert torch.equal(reference.gather(SPEC, dst, [20, 21, 22, 23]), want)
    assert torch.equal(reference.gather(SPEC, dst, [10, 11]), want[2:])
