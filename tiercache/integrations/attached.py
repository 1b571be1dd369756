"""A GPU engine's KV caches attached to the daemon (CUDA IPC), kept attached across
reconnects: how ``TierCacheConnector`` moves blocks on GPU engines.

The daemon's kernels gather and scatter the engine's own blocks (``tiercache.engine_kv``), so
a save or a load copies nothing in the engine's process. A connection that ends (a daemon
restart) takes its mappings with it; the next call on a new connection attaches again.
Where the daemon cannot attach (no GPU, another GPU, an older daemon) this turns itself off
once, with a warning, and the connector copies through host memory as it does for CPU
engines.

No vLLM import here, so that the GPU tests run it against a real daemon on a machine
without vLLM (``tests/test_ipc_gpu.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import torch

from tiercache.client import AttachedCache, Client, RemoteError
from tiercache.ipc import IpcError
from tiercache.keys import KeyChain, Namespace
from tiercache.results import SaveResult

logger = logging.getLogger("vllm.tiercache")

# Daemon answers that mean it cannot attach this engine at all: copy through host memory.
_CANNOT_ATTACH = frozenset({"no_cuda", "ipc_failed", "unknown_op", "bad_layout"})


class AttachedKV:
    """The engine's caches (CUDA tensors in ``ns.spec``'s layout; a tiercache block is one
    engine block) as seen by one daemon connection at a time."""

    def __init__(self, ns: Namespace, caches: Sequence[torch.Tensor]) -> None:
        self.ns = ns
        self.caches = list(caches)
        self.enabled = True
        self._attached: tuple[Client, AttachedCache] | None = None
        self._lock = threading.Lock()  # the step's thread and the background loader

    def _cache(self, client: Client) -> AttachedCache | None:
        with self._lock:
            if self._attached is not None and self._attached[0] is client:
                return self._attached[1]
            if not self.enabled:
                return None
            try:
                cache = client.attach(self.ns, self.caches)
            except (RemoteError, IpcError) as e:
                if isinstance(e, RemoteError) and e.code not in _CANNOT_ATTACH:
                    raise
                logger.warning(
                    "tiercache cannot attach the engine's GPU caches (%s): blocks are copied "
                    "through host memory instead",
                    e,
                )
                self.enabled = False
                return None
            self._attached = (client, cache)
            return cache

    def load(
        self,
        client: Client,
        keys: KeyChain,
        block_ids: Sequence[int],
        first_block: int,
        *,
        wait: bool,
    ) -> list[str] | None:
        """Scatter the cached run of blocks ``first_block ..`` into ``block_ids``; returns their
        tiers, or None when the caches cannot be attached. The current stream waits for the
        scatter; with ``wait`` (a load on a thread of its own, whose request runs later on
        another thread's stream) the scatter is complete when this returns."""
        cache = self._cache(client)
        if cache is None:
            return None
        tiers = client.load_kv(cache, keys, block_ids, first_block=first_block)
        if wait and tiers:
            torch.cuda.current_stream(cache.device).synchronize()
        return tiers

    def save(
        self,
        client: Client,
        keys: KeyChain,
        block_ids: Sequence[int],
        first_block: int,
        session: str | None,
    ) -> SaveResult | None:
        """Store blocks ``first_block ..`` from ``block_ids`` once the work queued on the
        current stream is done; None when the caches cannot be attached."""
        cache = self._cache(client)
        if cache is None:
            return None
        return client.save_kv(cache, keys, block_ids, first_block=first_block, session=session)
