"""The class vLLM instantiates: ``TierCacheConnector``, one per role, with the side that role
needs (``Scheduler`` or ``Worker``) and the setup both share (options, groups, the daemon
link). The package docstring (``tiercache.integrations.vllm``) says how it works."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from tiercache.integrations.vllm.groups import build_groups
from tiercache.integrations.vllm.link import Link
from tiercache.integrations.vllm.metadata import TierCacheMetadata
from tiercache.integrations.vllm.options import ConnectorConfigError, Options
from tiercache.integrations.vllm.scheduler import Scheduler
from tiercache.integrations.vllm.worker import Worker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.tiercache")


def media_hashed(vllm_config: VllmConfig) -> bool:
    """Whether vLLM identifies a request's media items by their content. It hashes them for
    its own caches only: with its prefix cache off and ``mm_processor_cache_gb=0`` an item's
    identifier is the engine's count of requests with media ("renderer0-mm-7-image-0"), the
    same for another image in another engine, so keys seeded by it would serve one image's
    KV for another (items the client names with ``multi_modal_uuids`` keep their names, but
    cannot be told apart from the counted ones)."""
    mm = vllm_config.model_config.multimodal_config
    return (
        mm is None
        or mm.mm_processor_cache_gb != 0
        or bool(vllm_config.cache_config.enable_prefix_caching)
    )


class TierCacheConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM KV connector (v1 API) backed by a tiercache daemon. See the package docstring."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        tc = self._kv_transfer_config
        self.options = Options.parse(dict(tc.kv_connector_extra_config or {}))
        self.groups, self.vllm_block = build_groups(vllm_config, kv_cache_config, self.options)
        self.block = self.groups[0].ns.spec.block_size
        self.per_block = self.block // self.vllm_block
        # A failed load (evicted, corrupt, daemon gone) is recomputed, never fatal.
        if tc.kv_load_failure_policy != "recompute":
            tc.kv_load_failure_policy = "recompute"
        tail = self.options.min_tail_tokens
        min_tail = max(1, self.block // 8) if tail is None else tail
        if min_tail >= self.block:
            raise ConnectorConfigError(
                f"kv_connector_extra_config.min_tail_tokens={tail} must be below the block "
                f"({self.block} tokens); 0 turns tails off"
            )
        who = "scheduler" if role == KVConnectorRole.SCHEDULER else "worker"
        self._link = Link(
            self.options.socket,
            f"vllm-{who}-{os.getpid()}",
            self.options.retry_seconds,
            self.options.timeout_seconds,
        )
        # Each role builds its own side only: vLLM makes one connector per role.
        self._scheduler: Scheduler | None = None
        self._worker: Worker | None = None
        if role == KVConnectorRole.SCHEDULER:
            hashed = media_hashed(vllm_config)
            if not hashed:
                logger.warning(
                    "vLLM does not hash the content of images, video or audio with its prefix "
                    "cache off and mm_processor_cache_gb=0 (it numbers them by request): the "
                    "blocks from a request's first media item on are not cached. Enable "
                    "prefix caching or set mm_processor_cache_gb above 0 to cache them."
                )
            self._scheduler = Scheduler(
                self.options, self.groups, self.vllm_block, min_tail, self._link, hashed
            )
        else:
            self._worker = Worker(
                self.groups, self.per_block, self._link, self.options.attach == "auto"
            )
        logger.info(
            "TierCacheConnector %s: %s (%s, %d tokens per block, %d engine blocks each)",
            who,
            ", ".join(
                f"group {g.index} {g.kind}{g.window or ''} x{len(g.layer_names)} {g.ns.hex[:12]}"
                for g in self.groups
            ),
            self.groups[0].ns.spec.layout,
            self.block,
            self.per_block,
        )

    @property
    def scheduler(self) -> Scheduler:
        assert self._scheduler is not None, "a scheduler-side call on a worker's connector"
        return self._scheduler

    @property
    def worker(self) -> Worker:
        assert self._worker is not None, "a worker-side call on the scheduler's connector"
        return self._worker

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a future miss, never an error

    # -- scheduler side --------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        return self.scheduler.get_external_cache_hit_sources(request, num_external_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler.update_connector_output(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished_all_groups(request, block_ids)

    # -- worker side -----------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        # vLLM steps with no forward while a request waits for its load; get_finished then
        # waits for it a little instead of letting the engine spin through empty steps.
        forward = getattr(forward_context, "attn_metadata", None) is not None
        if isinstance(meta, TierCacheMetadata):
            self.worker.start_load(meta, forward)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # A load for this step's forward completes in start_load_kv, before it; a background
        # load is for a request vLLM does not schedule until get_finished reports it.
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # every layer is saved at once in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if isinstance(meta, TierCacheMetadata) and meta.saves:
            self.worker.save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sent, loaded, _ = self.worker.finished(finished_req_ids)
        return sent or None, loaded or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        sent, loaded, failed = self.worker.finished(finished_req_ids)
        return KVConnectorTransferResults(sent, loaded, failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        self._link.close()
