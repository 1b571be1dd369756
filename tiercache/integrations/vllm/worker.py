"""The vLLM connector's worker side: copies between the engine's paged KV cache and the daemon.

The scheduler side (``scheduler.py``) decides, once per step, which tiercache blocks
each request loads and saves, one ``Transfer`` per KV cache group; this side carries them
out with the torch reference gather/scatter (``tiercache.kernels.reference``) through the
daemon's shared host arena, or, on a GPU engine with one full-attention group, lets the
daemon's kernels move them (``AttachedKV``).

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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from tiercache.client import Client
from tiercache.integrations.attached import AttachedKV
from tiercache.integrations.vllm.groups import (
    FULL,
    NULL_BLOCK,
    Group,
    by_request,
    to_engine_blocks,
    to_store_blocks,
)
from tiercache.integrations.vllm.link import Link
from tiercache.integrations.vllm.metadata import TierCacheMetadata, Transfer
from tiercache.integrations.vllm.options import ConnectorConfigError
from tiercache.kernels.reference import gather, scatter
from tiercache.keys import KeyChain
from tiercache.results import SaveResult

logger = logging.getLogger("vllm.tiercache")

# In a step with no forward, how long get_finished waits for a background load to finish
# (instead of the engine spinning through empty steps): short, as new requests wait too.
_IDLE_WAIT_S = 0.02


class Worker:
    """The engine's caches per group, and the loads and saves of each step."""

    def __init__(self, groups: Sequence[Group], per_block: int, link: Link, attach: bool) -> None:
        self.groups = list(groups)
        self.per_block = per_block
        self.by_request = by_request(groups)
        self._link = link
        self._attach = attach
        self._caches: list[list[torch.Tensor]] = []  # per group, in its layer order
        self._attached: AttachedKV | None = None  # GPU engines: the daemon moves the blocks
        self._failed_reqs: set[str] = set()  # this step's requests whose load failed
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
        self._caches = []
        for g in self.groups:
            missing = [name for name in g.layer_names if name not in kv_caches]
            if missing:
                raise ConnectorConfigError(f"the engine registered no KV cache for {missing[0]}")
            self._caches.append([kv_caches[name] for name in g.layer_names])
            # Checks every layer's shape against the spec now, with a message naming the
            # layer, rather than at the first transfer.
            gather(g.engine, self._caches[-1], [])
        first = self._caches[0][0]
        one_full = len(self.groups) == 1 and self.groups[0].kind == FULL
        if self._attach and first.is_cuda and self.per_block == 1 and one_full:
            self._attached = AttachedKV(self.groups[0].ns, self._caches[0])

    # -- loads -----------------------------------------------------------------

    def start_load(self, meta: TierCacheMetadata, forward: bool) -> None:
        self._failed_reqs.clear()
        self._forward = forward
        reqs: dict[str, list[Transfer]] = {}
        for t in meta.loads:
            reqs.setdefault(t.req_id, []).append(t)
        for req_id, ts in reqs.items():
            if not ts[0].background:
                failed = [b for t in ts for b in self._load_one(t)]
                with self._done:
                    self._load_errors.update(failed)
                if failed:
                    # This step computes the request's next tokens over the blocks that
                    # failed: its saves are skipped (vLLM recomputes them, saves them then).
                    self._failed_reqs.add(req_id)
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
        g, caches = self.groups[t.group], self._caches[t.group]
        keys = KeyChain.from_bytes(t.keys)
        spec, per, device = g.ns.spec, self.per_block, caches[0].device

        attached = self._attached
        if attached is not None and attached.enabled:
            # The daemon scatters straight into the engine's blocks (a tiercache block is one
            # engine block here); those computed locally (the first t.skip) are left alone.
            # A background load completes before it is reported: its request runs later,
            # on the step thread's stream, which did not wait for it.
            ids, first = t.block_ids[t.skip :], t.first + t.skip
            tiers = self._link.call(
                "load", lambda c: attached.load(c, keys, ids, first, wait=t.background)
            )
            if tiers is not None or attached.enabled:
                return self._report_load(t, 0 if tiers is None else t.skip + len(tiers))

        def into_engine(i: int, rows: torch.Tensor) -> None:
            # Blocks i .. i + len(rows) of this transfer, straight from the daemon's arena into
            # their engine blocks (those not computed locally, not past the transfer's, and
            # not vLLM's null block: a sliding group's freed slot).
            typed = rows.view(spec.torch_dtype).view(rows.shape[0], *spec.block_shape)
            lo, hi = max(t.skip, i * per), min(len(t.block_ids), (i + rows.shape[0]) * per)
            if lo < hi:
                eng = to_engine_blocks(typed, spec, per)[lo - i * per : hi - i * per]
                keep = [j for j, b in enumerate(t.block_ids[lo:hi]) if b != NULL_BLOCK]
                ids = [t.block_ids[lo + j] for j in keep]
                scatter(g.engine, eng[keep].to(device), caches, ids)

        tiers = self._link.call(
            "load",
            lambda c: c.load_into(g.ns, keys, into_engine, first_block=t.first, max_blocks=t.count),
        )
        return self._report_load(t, 0 if tiers is None else len(tiers))

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
        reachable = True
        for t in meta.saves:
            if reachable and t.req_id not in self._failed_reqs:
                # An unreachable daemon: no point trying the other saves this step.
                reachable = self._link.call("save", functools.partial(self._save_to, t)) is not None
            if t.finish:
                self._sent.add(t.req_id)  # saved or not, vLLM may free its blocks now

    def _save_to(self, t: Transfer, client: Client) -> SaveResult:
        g = self.groups[t.group]
        keys = KeyChain.from_bytes(t.keys)
        short = t.count * self.per_block - len(t.block_ids)
        if self._attached is not None and not short:
            # The daemon gathers from the engine's blocks once this step's forward is done.
            saved = self._attached.save(client, keys, t.block_ids, t.first, t.session)
            if saved is not None:
                return saved
        rows = gather(g.engine, self._caches[t.group], t.block_ids).cpu()
        if short:  # a tail whose last engine blocks do not exist: they are stored as zeros
            rows = torch.cat([rows, rows.new_zeros((short, *rows.shape[1:]))])
        blocks = to_store_blocks(rows, g.ns.spec, self.per_block)
        return client.save(g.ns, keys, blocks, first_block=t.first, session=t.session)

    # -- reports ---------------------------------------------------------------

    def finished(self) -> tuple[set[str], set[str], set[str]]:
        """Requests whose tail save is done, whose background load is done, and of those,
        whose load failed (recomputed whole)."""
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
