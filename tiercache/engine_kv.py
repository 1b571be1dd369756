"""An engine's paged KV cache, attached to the daemon: saved from and loaded into by the
daemon's own copies, with no bytes passing through the engine's process.

On a GPU the caches are the engine's tensors mapped by CUDA IPC (``tiercache.ipc``), and
the copies are the gather/scatter kernels (``kernels/cuda.py``) on the daemon's two copy
streams for that GPU:

- save: the ``store`` stream waits on the engine's interprocess event (recorded behind the
  forward pass that wrote the blocks), gathers the blocks into a staging buffer, and copies
  it into the reserved host-arena slots (registered with CUDA: DMA). The reservation is
  committed once the copy is done, so a save's reply means the engine may reuse its blocks.
- load: the leased blocks go into a staging buffer on the ``load`` stream, from the device
  tier where it holds them (a prefetch put them there: device to device) and from the host
  arena otherwise, then the scatter kernel writes them into the engine's blocks and the
  daemon records its interprocess event. The reply goes out as soon as that is queued: the
  engine's stream waits on the event, so attention reads the blocks only after the scatter,
  and neither process's host thread waits for the copy. The lease (and the device slots) is
  held until the copy completes.

With CPU tensors (the CPU twin that CI runs, and an embedded cache in the engine's own
process) the same steps run with the torch reference in a worker thread and complete before
the call returns.

Every block is still checked where the tiers check it (disk and remote reads verify
checksums before a block reaches the host arena); the copies here move verified bytes only.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tiercache import ipc
from tiercache.kernels import cuda, reference
from tiercache.kernels.reference import LayerCache, LayoutError
from tiercache.keys import KeyChain, Namespace
from tiercache.manager import TierManager
from tiercache.results import Lease, Reservation, SaveResult
from tiercache.spec import KVSpec, Layout
from tiercache.tiers.device import DeviceTier
from tiercache.tiers.host import HostArena
from tiercache.transaction import lease_rounds, save_rounds
from tiercache.transfer import CopyStreams, Direction, completion


class EngineKV:
    """The daemon's handle on one engine's KV cache (one namespace's spec)."""

    def __init__(
        self,
        spec: KVSpec,
        caches: Sequence[LayerCache],
        *,
        opened: Sequence[ipc.OpenedTensor] = (),
        engine_event: torch.cuda.Event | None = None,
    ) -> None:
        reference._check(spec, caches)
        devices = {t.device for t in reference.tensors(caches)}
        if len(devices) != 1:
            raise LayoutError(
                f"an engine's caches must be on one device, got {sorted(map(str, devices))}"
            )
        self.spec = spec
        self.caches = list(caches)
        self.device = devices.pop()
        self.cuda = self.device.type == "cuda"
        # The kernels' layout checks and pointer table, once: the caches never move.
        self._prepared = cuda.prepare(spec, self.caches) if self.cuda else None
        self.num_blocks = reference.num_blocks(spec, self.caches)
        self._opened = list(opened)
        self.streams = CopyStreams(self.device)
        self.engine_event = engine_event
        # Recorded behind every scatter; the engine's stream waits on it before attention.
        self.done_event = ipc.interprocess_event(self.device) if self.cuda else None
        self._inflight: set[asyncio.Task[None]] = set()  # loads whose copies run on

    @classmethod
    def attach(cls, spec: KVSpec, layers: Any, event: Any) -> EngineKV:
        """Map an engine's caches from the handles it sent (``layers``: one list per layer of
        one tensor handle, or for the hf layout one a plane: K and V, or an MLA latent;
        ``event``: the engine's interprocess event)."""
        hf = spec.layout is Layout.HF
        per_layer = spec.planes if hf else 1
        if spec.layout is Layout.VLLM_CPU:
            raise ipc.IpcError("the vllm-cpu layout is a CPU cache: it maps the host arena instead")
        if not isinstance(layers, list) or len(layers) != spec.num_layers:
            raise ipc.IpcError(
                f"'layers' must list the {spec.num_layers} layers of the namespace's spec, got "
                f"{len(layers) if isinstance(layers, list) else type(layers).__name__}"
            )
        handles: list[list[ipc.TensorHandle]] = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, list) or len(layer) != per_layer:
                raise ipc.IpcError(
                    f"layer {i}: the {spec.layout} layout of a {spec.kind} spec sends "
                    f"{per_layer} tensor handle(s) a layer"
                )
            handles.append([ipc.TensorHandle.from_wire(h, f"layer {i}") for h in layer])
        opened: list[ipc.OpenedTensor] = []
        try:
            for layer_handles in handles:
                opened += [ipc.OpenedTensor(h) for h in layer_handles]
            tensors = [o.tensor for o in opened if o.tensor is not None]
            caches: list[LayerCache] = (
                [
                    tuple(tensors[per_layer * i : per_layer * (i + 1)])
                    for i in range(spec.num_layers)
                ]
                if hf
                else list(tensors)
            )
            device = reference.tensors(caches)[0].device
            return cls(spec, caches, opened=opened, engine_event=ipc.open_event(event, device))
        except BaseException:
            for o in opened:
                o.close()
            raise

    @property
    def done_handle(self) -> bytes | None:
        return ipc.event_handle(self.done_event) if self.done_event is not None else None

    def _check_ids(self, block_ids: Sequence[int]) -> list[int]:
        """``block_ids`` as a list, every id checked to be inside the cache (the kernels' own
        check, made before anything is reserved or leased)."""
        ids = list(block_ids)
        if not all(isinstance(b, int) and not isinstance(b, bool) for b in ids):
            raise LayoutError("'block_ids' must be integers (the engine's block numbers)")
        cuda.host_ids(ids, self.num_blocks)
        return ids

    async def _run(self, direction: Direction, copy: Callable[[], None]) -> torch.cuda.Event | None:
        """Queue ``copy`` on the ``direction`` stream (a save first waits for the engine's
        writes; a load then records ``done_event``) and return an event behind it; on the CPU
        run it in a worker thread and return None once it is done."""
        stream = self.streams.stream(direction)
        if stream is None:
            await asyncio.to_thread(copy)
            return None
        if direction == "store" and self.engine_event is not None:
            stream.wait_event(self.engine_event)
        with torch.cuda.stream(stream):
            copy()
            if direction == "load" and self.done_event is not None:
                self.done_event.record(stream)
            finished = torch.cuda.Event()  # type: ignore[no-untyped-call]
            finished.record(stream)
        return finished

    def _gather(self, ids: list[int], stream: torch.cuda.Stream | None) -> torch.Tensor:
        if self.cuda:
            return cuda.gather(self.spec, self.caches, ids, stream=stream, prepared=self._prepared)
        return reference.gather(self.spec, self.caches, ids)

    def _scatter(
        self, blocks: torch.Tensor, ids: list[int], stream: torch.cuda.Stream | None
    ) -> None:
        if self.cuda:
            cuda.scatter(
                self.spec, blocks, self.caches, ids, stream=stream, prepared=self._prepared
            )
        else:
            reference.scatter(self.spec, blocks, self.caches, ids)

    async def save(
        self,
        manager: TierManager,
        ns: Namespace,
        keys: KeyChain,
        block_ids: Sequence[int],
        *,
        first_block: int = 0,
        session: str | None = None,
    ) -> SaveResult:
        """Store blocks ``first_block ..`` of ``keys`` from the engine's blocks ``block_ids``."""
        ids = self._check_ids(block_ids)
        self._check_ns(ns)
        host = manager.host
        nbytes = self.spec.block_nbytes
        stream = self.streams.stream("store")

        async def reserve(done: int, left: int) -> Reservation:
            return await manager.reserve(
                ns, keys, first_block=first_block + done, count=left, session=session
            )

        async def fill(r: Reservation, done: int) -> None:
            if not r.entries:
                return
            todo, slots = [ids[done + row] for row in r.rows], r.slots

            def copy() -> None:
                rows = self._gather(todo, stream).view(torch.uint8).view(len(todo), nbytes)
                host.write(slots, rows, non_blocking=True)

            t0 = time.perf_counter()
            finished = await self._run("store", copy)
            if finished is not None:
                await completion(finished)
            r.fill_seconds = time.perf_counter() - t0  # the commit's transfer sample

        return await save_rounds(len(ids), reserve, fill, manager.commit, manager.abort)

    async def load(
        self,
        manager: TierManager,
        ns: Namespace,
        keys: KeyChain,
        block_ids: Sequence[int],
        *,
        first_block: int = 0,
    ) -> list[str]:
        """Scatter the cached run of blocks ``first_block ..`` of ``keys`` into the engine's
        blocks ``block_ids`` (at most ``len(block_ids)`` blocks); returns the tiers they came
        from (a miss ends the run). On a GPU the scatter is queued, not done, when this
        returns: the engine's stream waits on ``done_event``; each round's lease is given
        back once its copy has completed."""
        ids = self._check_ids(block_ids)
        if len(set(ids)) != len(ids):
            # Two blocks scattered into one engine block: one of them would be lost unseen.
            twice = sorted(b for b, n in Counter(ids).items() if n > 1)
            raise LayoutError(f"a load's 'block_ids' must differ; given more than once: {twice}")
        self._check_ns(ns)
        dev = manager.device
        if dev is None or dev.device != self.device or not dev.formatted:
            dev = None
        rounds: dict[int, tuple[list[int], torch.cuda.Event | None]] = {}  # id(lease) -> copy

        async def acquire(done: int, left: int | None) -> Lease:
            return await manager.acquire(ns, keys, first_block=first_block + done, max_blocks=left)

        async def use(lease: Lease, done: int) -> list[str]:
            on_dev = [i for i, e in enumerate(lease.entries) if dev is not None and e.key in dev]
            held = dev.hold([lease.entries[i].key for i in on_dev]) if dev is not None else []
            rounds[id(lease)] = (held, None)
            copy = self._load_copy(manager.host, lease, dev, on_dev, held, ids[done:])
            finished = await self._run("load", copy)
            rounds[id(lease)] = (held, finished)
            # Where each block was read from: the device tier for those it held (the lease
            # names the tier the blocks were leased in, host memory).
            from_dev = set(on_dev)
            return ["device" if i in from_dev else t for i, t in enumerate(lease.tiers)]

        async def release(lease: Lease) -> None:
            held, finished = rounds.pop(id(lease), ([], None))
            if finished is None:
                await self._give_back(manager, lease, dev, held, None)
            else:
                task = asyncio.create_task(self._give_back(manager, lease, dev, held, finished))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

        return await lease_rounds(len(ids), acquire, use, release)

    def _load_copy(
        self,
        host: HostArena,
        lease: Lease,
        dev: DeviceTier | None,
        on_dev: list[int],
        held: list[int],
        targets: list[int],
    ) -> Callable[[], None]:
        """The copy of one load round: the leased blocks (from the device tier's ``held`` slots
        for the rows ``on_dev``, from the host arena for the rest) into a staging buffer,
        scattered into the engine's blocks ``targets``."""
        n = len(lease.entries)
        from_dev = set(on_dev)
        on_host = [i for i in range(n) if i not in from_dev]
        host_slots = [s for i in on_host if (s := lease.entries[i].host_slot) is not None]
        nbytes, spec = self.spec.block_nbytes, self.spec
        stream = self.streams.stream("load")

        def copy() -> None:
            staging = torch.empty((n, nbytes), dtype=torch.uint8, device=self.device)
            if dev is not None and on_dev:
                # One gather kernel for the device tier's rows, wherever its slots lie (a copy
                # per run of adjacent slots cost ~10 us each: 1.3 ms for 128).
                rows = dev.buffer.index_select(0, self._ids_on_device(held))[:, :nbytes]
                if len(on_dev) == n:
                    staging = rows.contiguous()
                else:
                    staging.index_copy_(0, self._ids_on_device(on_dev), rows)
            host.read(host_slots, staging, on_host, non_blocking=True)
            blocks = staging.view(spec.torch_dtype).view(n, *spec.block_shape)
            self._scatter(blocks, targets[:n], stream)

        return copy

    @staticmethod
    async def _give_back(
        manager: TierManager,
        lease: Any,
        dev: Any,
        held: list[int],
        finished: torch.cuda.Event | None,
    ) -> None:
        """Release a load's lease and device slots, once its copy has completed."""
        try:
            if finished is not None:
                await completion(finished)
        finally:
            if held:
                dev.unhold(held)
            await manager.release(lease)

    def _ids_on_device(self, ids: list[int]) -> torch.Tensor:
        """``ids`` as an int64 tensor on the engine's device, copied without blocking the host
        (from pinned memory: a pageable copy would wait for the stream's queued work)."""
        host_ids = torch.tensor(ids, dtype=torch.long)
        if not self.cuda:
            return host_ids
        return host_ids.pin_memory().to(self.device, non_blocking=True)

    def _check_ns(self, ns: Namespace) -> None:
        if ns.spec != self.spec:
            raise LayoutError(
                "this engine's caches were attached for another KV spec than the namespace's"
            )
        if ns.store_dtype != "exact":
            # The copies move the engine's bytes as they are, not the namespace's records.
            raise LayoutError(
                f"an attached engine's blocks are stored exact, but the namespace's "
                f"store_dtype is {ns.store_dtype!r}: save and load it through host memory"
            )

    @property
    def loads_in_flight(self) -> int:
        return len(self._inflight)

    async def close(self) -> None:
        """Wait for the loads still copying, then unmap the engine's memory (once)."""
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self.cuda:
            self.streams.synchronize()
        for o in self._opened:
            o.close()
        self._opened = []
        self.caches = []
        self.engine_event = self.done_event = None
