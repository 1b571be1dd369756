"""Embedded mode: the cache in this process, no daemon.

``await open_cache(config)`` gives the same ``TierManager`` the daemon serves;
``SyncCache`` runs it on a private event-loop thread for synchronous callers
(notebooks, a transformers ``generate`` loop), with the same methods, blocking.
"""

from __future__ import annotations

import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import torch

from tiercache.daemon.config import Config, RemoteTierConfig, load_config
from tiercache.errors import CacheError
from tiercache.keys import BlockKey, Namespace, Tokens
from tiercache.loop import LoopThread
from tiercache.manager import TierManager
from tiercache.results import LoadResult, LookupResult, SaveResult
from tiercache.sharing import Sharing
from tiercache.stats import Stats
from tiercache.tiers.remote import RemoteOptions, RemoteTier, RetentionReport, retention

T = TypeVar("T")


async def open_cache(config: Config | None = None, *, stats: Stats | None = None) -> TierManager:
    """A cache with the tiers ``config`` describes (default: ``load_config()``)."""
    cfg = config or load_config()
    host = cfg.tiers.host
    disk = cfg.tiers.disk
    remote = cfg.tiers.remote
    device = cfg.tiers.device
    return await TierManager.open(
        host_bytes=host.bytes,
        device_bytes=device.bytes if device else 0,
        device_name=device.devices[0] if device else "cuda:0",
        slot_bytes=host.slot_bytes or None,
        shared_host=host.shared,
        disk_url=disk.url if disk else None,
        disk_bytes=disk.bytes if disk else 0,
        eviction=cfg.policy.eviction,
        write=cfg.policy.write,
        admission=cfg.policy.admission,
        stats=stats,
        remote_url=remote.url if remote else None,
        remote_options=remote_options(remote) if remote else None,
        sharing=Sharing(
            queue_blocks=remote.queue_blocks,
            admission=remote.admission,
            pinned=remote.share_pinned,
        )
        if remote
        else None,
    )


def remote_options(cfg: RemoteTierConfig) -> RemoteOptions:
    return RemoteOptions(
        endpoint=cfg.endpoint,
        region=cfg.region,
        key_id=cfg.key_id,
        secret_file=cfg.secret_file,
        timeout=cfg.timeout,
    )


async def run_retention(
    cfg: RemoteTierConfig,
    *,
    max_age: int | None = None,
    max_bytes: int | None = None,
    namespace: str | None = None,
    dry_run: bool = False,
) -> RetentionReport:
    """Apply ``[tiers.remote]``'s retention policy (or the given limits) to the shared tier."""
    tier = await RemoteTier.open(cfg.url, remote_options(cfg))
    return await retention(
        tier,
        max_age=cfg.max_age if max_age is None else max_age,
        max_bytes=cfg.max_bytes if max_bytes is None else max_bytes,
        namespace=namespace,
        dry_run=dry_run,
    )


class SyncCache:
    """Blocking facade over a ``TierManager`` running on its own event-loop thread.

    Safe to share between threads. ``close`` waits for the calls other threads have in
    flight before it closes the cache and stops the loop (stopped under them, they would
    wait for ever); closing again does nothing, and a call after it is a ``CacheError``."""

    def __init__(self, config: Config | None = None) -> None:
        self._thread = LoopThread("tiercache-loop")
        self._calls = 0  # calls running on the loop now (``_run``): close() waits for them
        self._idle = threading.Condition()  # guards _calls and _closed
        self._closed = False
        try:
            self.manager: TierManager = self._thread.run(open_cache(config))
        except BaseException:
            self._thread.stop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro`` on the cache's loop; a ``CacheError`` once the cache is closed."""
        with self._idle:
            if self._closed:
                coro.close()
                raise CacheError("this SyncCache is closed")
            self._calls += 1
        try:
            return self._thread.run(coro)
        finally:
            with self._idle:
                self._calls -= 1
                self._idle.notify_all()

    def save(
        self,
        ns: Namespace,
        tokens: Tokens,
        blocks: torch.Tensor,
        *,
        first_block: int = 0,
        session: str | None = None,
    ) -> SaveResult:
        return self._run(
            self.manager.save(ns, tokens, blocks, first_block=first_block, session=session)
        )

    def lookup(self, ns: Namespace, tokens: Tokens, *, first_block: int = 0) -> LookupResult:
        return self._run(self.manager.lookup(ns, tokens, first_block=first_block))

    def load(
        self,
        ns: Namespace,
        tokens: Tokens,
        *,
        first_block: int = 0,
        max_blocks: int | None = None,
        into: torch.Tensor | None = None,
    ) -> LoadResult:
        return self._run(
            self.manager.load(ns, tokens, first_block=first_block, max_blocks=max_blocks, into=into)
        )

    def prefetch(
        self,
        ns: Namespace | None = None,
        tokens: Tokens | None = None,
        *,
        session: str | None = None,
    ) -> int:
        return self._run(self.manager.prefetch(ns, tokens, session=session))

    def pin(self, session: str) -> int:
        return self._run(self.manager.pin(session))

    def unpin(self, session: str) -> int:
        return self._run(self.manager.unpin(session))

    def set_ttl(self, session: str, seconds: float | None) -> None:
        self._run(self.manager.set_ttl(session, seconds))

    def evict(self, *, session: str | None = None, keys: Sequence[BlockKey] | None = None) -> int:
        return self._run(self.manager.evict(session=session, keys=keys))

    def flush(self) -> int:
        return self._run(self.manager.flush())

    def close(self) -> None:
        """Flush write-back blocks and close the cache (once: closing again does nothing)."""
        with self._idle:
            if self._closed:
                return
            self._closed = True
            self._idle.wait_for(lambda: self._calls == 0)
        try:
            self._thread.run(self.manager.close())
        finally:
            self._thread.stop()

    def __enter__(self) -> SyncCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
