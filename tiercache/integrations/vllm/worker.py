"""The vLLM connector's worker side: copies between the engine's paged KV cache and the daemon.

The scheduler side (``scheduler.py``) decides, once per step, which tiercache blocks
each request loads and saves, one ``Transfer`` per KV cache group; this side carries them
out through a ``Transport`` (``transport.py``), chosen once when the engine registers its
caches: copies through the daemon's shared host arena, or, on a GPU engine with one
full-attention or MLA group, the daemon's kernels on the engine's attached caches.

A load that fails (a block evicted, a checksum that does not verify, the daemon gone) is
reported so that vLLM recomputes it: as engine blocks (``load_errors``) for a model with
one full-attention or MLA group, or as the whole request (``failed``) otherwise: vLLM maps
block-level failures to requests only with one group, and a sliding group's blocks before
a failed one are already freed, so its tokens could not resume from there.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from tiercache.client import Client
from tiercache.integrations.vllm.groups import Group, by_request
from tiercache.integrations.vllm.link import Link
from tiercache.integrations.vllm.metadata import TierCacheMetadata, Transfer
from tiercache.integrations.vllm.options import ConnectorConfigError
from tiercache.integrations.vllm.transport import Transport, pick
from tiercache.kernels.reference import gather
from tiercache.keys import KeyChain

logger = logging.getLogger("vllm.tiercache")

# In a step with no forward, how long get_finished waits for a background load to finish
# (instead of the engine spinning through empty steps): short, as new requests wait too.
_IDLE_WAIT_S = 0.02


class Worker:
    """The loads and saves of each step, through the engine's transport, and their reports."""

    def __init__(self, groups: Sequence[Group], per_block: int, link: Link, attach: bool) -> None:
        self.groups = list(groups)
        self.per_block = per_block
        self.by_request = by_request(groups)
        self._link = link
        self._attach = attach
        self._transport: Transport | None = None  # chosen when the engine registers its caches
        # requests whose load failed: the token it failed at (vLLM recomputes from there)
        self._failed_at: dict[str, int] = {}
        # background loads (one request at a time, in order) and what they have finished;
        # _done guards the sets below and _loading
        self._loader: ThreadPoolExecutor | None = None
        self._loading = 0
        self._loaded: set[str] = set()
        self._failed: set[str] = set()  # requests whose background load failed
        self._load_errors: set[int] = set()
        self._done = threading.Condition()
        self._forward = True  # whether this step runs a forward (vLLM has idle steps)
        self._sent: set[str] = set()  # finished requests whose tail save is done

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        caches = []  # per group, in its layer order
        for g in self.groups:
            missing = [name for name in g.layer_names if name not in kv_caches]
            if missing:
                raise ConnectorConfigError(f"the engine registered no KV cache for {missing[0]}")
            caches.append([kv_caches[name] for name in g.layer_names])
            # Checks every layer's shape against the spec now, with a message naming the
            # layer, rather than at the first transfer.
            gather(g.engine, caches[-1], [])
        self._transport = pick(self.groups, caches, self.per_block, self._attach)

    @property
    def transport(self) -> Transport:
        assert self._transport is not None, "vLLM registers the KV caches before any transfer"
        return self._transport

    # -- loads -----------------------------------------------------------------

    def start_load(self, meta: TierCacheMetadata, forward: bool) -> None:
        self._forward = forward
        reqs: dict[str, list[Transfer]] = {}
        for t in meta.loads:
            reqs.setdefault(t.req_id, []).append(t)
        for req_id, ts in reqs.items():
            if not ts[0].background:
                failed = []
                for t in ts:
                    missing = self._load_one(t)
                    if missing:
                        # Its first token not loaded (engine blocks from the transfer's first).
                        at = t.first * self.per_block + len(t.block_ids) - len(missing)
                        at *= self.groups[t.group].engine.block_size
                        self._failed_at[req_id] = min(self._failed_at.get(req_id, at), at)
                    failed += missing
                with self._done:
                    self._load_errors.update(failed)
                continue
            if self._loader is None:
                self._loader = ThreadPoolExecutor(1, thread_name_prefix="tiercache-load")
            with self._done:
                self._loading += 1
            self._loader.submit(self._load_in_background, req_id, ts)

    def _load_in_background(self, req_id: str, ts: list[Transfer]) -> None:
        failed: list[int] = []
        done = False
        try:
            for t in ts:
                failed += self._load_one(t)
                if failed and self.by_request:
                    break  # the whole request is recomputed
            done = True
        except Exception:  # never lose the report: vLLM would wait for this request forever
            logger.exception("tiercache load of request %s failed; vLLM recomputes it", req_id)
        finally:
            if not done:
                failed = [b for t in ts for b in t.block_ids[t.skip :]]
            with self._done:
                # The failure is reported no later than the request (vLLM's contract).
                if self.by_request and (failed or not done):
                    self._failed.add(req_id)
                else:
                    self._load_errors.update(failed)
                self._loaded.add(req_id)
                self._loading -= 1
                self._done.notify_all()

    def _load_one(self, t: Transfer) -> list[int]:
        """Load ``t`` into the engine's blocks; returns the engine blocks not loaded."""
        transport = self.transport
        got = self._link.call("load", functools.partial(transport.load, t=t))
        return self._report_load(t, got or 0)

    def _report_load(self, t: Transfer, got: int) -> list[int]:
        """The engine blocks of ``t`` not loaded when ``got`` blocks from ``t.first`` were."""
        failed = t.block_ids[max(got * self.per_block, t.skip) :]
        if failed:
            logger.warning(
                "tiercache load of request %s (group %d): %d of %d blocks missing; vLLM "
                "recomputes %s",
                t.req_id,
                t.group,
                t.count - got,
                t.count,
                "the request" if self.by_request else "them",
            )
        return failed

    # -- saves -----------------------------------------------------------------

    def save(self, meta: TierCacheMetadata) -> None:
        transport = self.transport
        reachable = True
        stored: dict[str, bool] = {}  # finished requests: whether each finish save was stored
        for t in meta.saves:
            res = None
            if t.req_id in self._failed_at and t.after <= self._failed_at[t.req_id]:
                del self._failed_at[t.req_id]  # scheduled after vLLM rolled it back
            # This step and those scheduled before vLLM saw the failed load (async
            # scheduling) compute the request's tokens over the blocks that failed: their
            # saves are skipped (vLLM recomputes them, saves them then).
            if reachable and t.req_id not in self._failed_at:
                # An unreachable daemon: no point trying the other saves this step. A save
                # it refused (an error reply, logged by the link) is that save's alone.
                res = self._link.call("save", functools.partial(transport.save, t=t))
                reachable = res is not None or self._link.connected
            if t.finish:
                ok = stored.get(t.req_id, True) and res is not None and not res.rejected
                stored[t.req_id] = ok
                if t.evict and ok:
                    # Its new window is stored: the old one it replaces may go.
                    old = KeyChain.from_bytes(t.evict)
                    self._link.call("evict", functools.partial(Client.evict, keys=old))
                self._sent.add(t.req_id)  # saved or not, vLLM may free its blocks now

    # -- reports ---------------------------------------------------------------

    def finished(self, ended: Collection[str] = ()) -> tuple[set[str], set[str], set[str]]:
        """Requests whose tail save is done, whose background load is done, and of those,
        whose load failed (recomputed whole). ``ended``: requests vLLM has finished."""
        for req_id in ended:
            self._failed_at.pop(req_id, None)
        sent, self._sent = self._sent, set()
        with self._done:
            if not self._forward and self._loading and not self._loaded:
                self._done.wait(timeout=_IDLE_WAIT_S)
            loaded, self._loaded = self._loaded, set()
            failed, self._failed = self._failed, set()
        return sent, loaded, failed

    def load_errors(self) -> set[int]:
        with self._done:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=True)
