"""``tiercache serve``: the daemon that owns the tiers and serves engines, operators and Prometheus.

It composes the pieces, each in its own module: the manager (tiers, index,
policies), the socket data plane (``server``), the operator verbs
(``control``), the Prometheus exporter (``metrics``) and, when configured, the
MQTT control channel (``mqtt``). Background tasks expire session TTLs and turn
counter changes into MQTT events (eviction summaries, disk full, corruption).

Shutdown (SIGTERM or SIGINT) is a drain: stop taking saves, close the socket
(ending connections releases their leases and reservations), flush
write-back blocks to disk, publish ``offline``, exit 0. A second signal during the
drain cuts it short: operator verbs still running (a long ``flush``) are cancelled,
the flush and the shared tier's uploads stop where they are
(blocks not yet written are lost, as in a crash), and the tiers close as they stand;
the disk journal names only blocks whose bytes landed. The data plane never
waits on MQTT: events go through a bounded queue that drops when the broker is
away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from typing import Any

from tiercache.daemon.config import Config, RemoteTierConfig
from tiercache.daemon.control import Control
from tiercache.daemon.metrics import Metrics, MetricsServer
from tiercache.daemon.server import SocketServer
from tiercache.embedded import open_cache
from tiercache.manager import TierManager
from tiercache.tiers.host import reap_stale_arenas
from tiercache.tiers.remote import retention

log = logging.getLogger(__name__)

EVENT_INTERVAL = 5.0  # seconds between event summaries
EXPIRE_INTERVAL = 1.0  # seconds between TTL sweeps


class Daemon:
    def __init__(self, config: Config) -> None:
        # The daemon's host arena is always shared: CPU engines copy through it.
        host = dataclasses.replace(config.tiers.host, shared=True)
        self.config = dataclasses.replace(
            config, tiers=dataclasses.replace(config.tiers, host=host)
        )
        self.metrics = Metrics()
        self.manager: TierManager | None = None
        self.control: Control | None = None
        self.server: SocketServer | None = None
        self.http: MetricsServer | None = None
        self.mqtt: Any = None  # MqttControl when [mqtt] host is set
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self._drain: asyncio.Task[None] | None = None  # the shutdown's flush, once started
        self._hurry = False  # a second stop signal came: no drain from now on

    async def start(self) -> None:
        cfg = self.config
        for name in reap_stale_arenas():
            log.warning("removed %s, the shared arena of a daemon that died", name)
        self.manager = manager = await open_cache(cfg, stats=self.metrics)
        self.control = Control(manager, on_drained=self._drained)
        self.server = SocketServer(
            manager, self.control, cfg.daemon.socket, group=cfg.daemon.socket_group
        )
        await self.server.start()
        server = self.server
        self.metrics.bind(
            manager,
            clients=lambda: server.clients,
            mqtt_connected=(lambda: bool(self.mqtt is not None and self.mqtt.connected))
            if cfg.mqtt.host
            else None,
        )
        self.http = self.metrics.serve(cfg.metrics.listen)
        if cfg.mqtt.host:
            from tiercache.daemon.mqtt import MqttControl

            self.mqtt = MqttControl(cfg.mqtt, self.control)
            self._tasks.append(asyncio.create_task(self.mqtt.run(), name="mqtt"))
        self._tasks.append(asyncio.create_task(self._expire_loop(), name="ttl"))
        self._tasks.append(asyncio.create_task(self._event_loop(), name="events"))
        remote = cfg.tiers.remote
        if remote is not None and remote.retention_interval and manager.remote is not None:
            self._tasks.append(asyncio.create_task(self._retention_loop(remote), name="retention"))
        log.info(
            "tiercache serving: socket %s, metrics %s, mqtt %s, disk %s",
            cfg.daemon.socket,
            f"http://{self.http.host}:{self.http.port}/metrics" if self.http else "off",
            f"{cfg.mqtt.host}:{cfg.mqtt.port}" if cfg.mqtt.host else "off",
            cfg.tiers.disk.url if cfg.tiers.disk else "none",
        )

    def request_stop(self) -> None:
        """Drain and stop; asked again while the drain runs, cut the drain short."""
        if self._stop.is_set():
            self._hurry = True
            if self.control is not None and self.control.cut_short():
                log.warning("stopping now: the operator verbs still running are cut short")
            if self._drain is not None and not self._drain.done():
                log.warning("stopping now: the drain is cut short, write-back blocks not flushed")
                self._drain.cancel()
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then shut down cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:  # a start that fails half-way (metrics port taken) still closes what it opened
            await self.start()
            await self._stop.wait()
            log.info("stopping: draining and flushing (a second signal stops at once)")
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        manager = self.manager
        if manager is not None:
            manager.draining = True
        if self.mqtt is not None:
            with contextlib.suppress(Exception):
                await self.mqtt.set_status("draining")
        if self.server is not None:
            await self.server.close()
        if self.control is not None:  # MQTT stays up for the status, but no verb runs on
            await self.control.close()
        for task in self._tasks:
            if task.get_name() != "mqtt":
                task.cancel()
        if manager is not None:
            await self._close_tiers(manager)
        if self.mqtt is not None:
            await self.mqtt.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.http is not None:
            self.http.close()
        log.info("stopped")

    async def _close_tiers(self, manager: TierManager) -> None:
        """Drain (flush write-back blocks, upload the shared tier's queue), then close the
        tiers. ``request_stop`` again cancels the drain only: a disk write it cancels leaves
        its blocks unrecorded (``DiskTier.put_many``), the journal what a crash there leaves."""
        if self._drain is None and self._hurry:  # the second signal came before the drain
            log.warning("stopping now: no drain, write-back blocks not flushed")
        elif self._drain is None:  # once: a second shutdown finds it done
            self._drain = asyncio.ensure_future(_flush_and_upload(manager))
        if self._drain is None:
            await manager.close(flush=False)
            return
        drain = self._drain
        try:
            await asyncio.wait({drain})
        finally:
            if not drain.done():  # shutdown itself was cancelled: so is its drain
                drain.cancel()
        if not drain.cancelled():
            drain.result()
        await manager.close(flush=False)

    async def _drained(self, flushed: int) -> None:
        if self.mqtt is not None:
            await self.mqtt.set_status("draining")
            await self.mqtt.event("drain_done", {"flushed_bytes": flushed})

    async def _expire_loop(self) -> None:
        assert self.manager is not None
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL)
            try:
                gone = await self.manager.expire()
            except Exception:
                log.exception("TTL sweep failed")
                continue
            if gone and self.mqtt is not None:
                await self.mqtt.event("sessions_expired", {"sessions": len(gone)})

    async def _retention_loop(self, cfg: RemoteTierConfig) -> None:
        """Apply the shared tier's retention policy every ``retention_interval`` seconds.
        Every daemon on a bucket may run it: deletes are idempotent."""
        assert self.manager is not None and self.manager.remote is not None
        while True:
            await asyncio.sleep(cfg.retention_interval)
            try:
                report = await retention(
                    self.manager.remote, max_age=cfg.max_age, max_bytes=cfg.max_bytes
                )
            except Exception as e:  # the store is down: the next round tries again
                log.warning("shared tier retention failed: %s", e)
                continue
            log.info("shared tier retention: %s", report.as_dict())
            if self.mqtt is not None and report.removed:
                await self.mqtt.event("retention", report.as_dict())

    async def _event_loop(self) -> None:
        """Turn counter changes into MQTT events: summaries, never one event per block."""
        stats = self.metrics
        last = (dict(stats.evictions), stats.corrupt_blocks, stats.errors["disk_full"])
        while True:
            await asyncio.sleep(EVENT_INTERVAL)
            if self.mqtt is None:
                continue
            evictions, corrupt, disk_full = (
                dict(stats.evictions),
                stats.corrupt_blocks,
                stats.errors["disk_full"],
            )
            delta = {
                t: n - last[0].get(t, 0) for t, n in evictions.items() if n > last[0].get(t, 0)
            }
            if delta:
                await self.mqtt.event("evictions", {"blocks": delta, "interval_s": EVENT_INTERVAL})
            if corrupt > last[1]:
                await self.mqtt.event("corruption", {"blocks": corrupt - last[1]})
            if disk_full > last[2]:
                await self.mqtt.event("disk_full", {"refused_writes": disk_full - last[2]})
            last = (evictions, corrupt, disk_full)


async def _flush_and_upload(manager: TierManager) -> None:
    """What a shutdown writes before the tiers close: write-back blocks to disk, the shared
    tier's upload queue (``TierManager.close`` with ``flush``)."""
    await manager.flush()
    if manager.shared is not None:
        await manager.shared.upload_queued()
