"""The Prometheus exporter: the manager's ``Stats`` events as ``tiercache_*`` metrics over HTTP.

``Metrics`` is the ``Stats`` the daemon hands to its ``TierManager``: every
event the manager reports lands in the base counters (so ``stats`` over
MQTT and the socket see the same numbers) and, for timings, in histograms.
At scrape time one collector turns the base counters, the histograms and the
manager's live state (tier usage, pins, clients, MQTT) into metric families
on this object's own ``CollectorRegistry``; several exporters in one process
(tests, embedded daemons) never collide in the global registry.

Why one custom collector and not a ``prometheus_client.Counter`` per metric:
the counts already live in ``Stats`` (one source of truth, nothing to keep in
step), and the library's metric objects add ``*_created`` series that can only
be switched off process-wide. Histograms reuse the library's bucket logic
(unregistered ``Histogram`` objects, ``_created`` samples dropped).

Every label value that can occur is exported from the first scrape with value
0, so ``rate()`` and alert expressions see a series before the first event.
Labels are tiers, paths, results, error kinds and operations: never a block
key or a session id.

Scrapes run in the HTTP server's thread while the event loop changes the
manager; the collector only reads (snapshots of dicts, ints), never locks the
manager, and a failing gauge source is logged and exported as 0 rather than
failing the whole scrape.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, generate_latest, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)

import tiercache
from tiercache.daemon.config import ConfigError
from tiercache.manager import TierManager
from tiercache.stats import Stats

log = logging.getLogger(__name__)

# Every label value the manager and the daemon report, exported (as 0) from the first scrape.
TIERS = ("host", "disk")
LOOKUP_RESULTS = ("host", "disk", "remote", "miss")
TRANSFER_PATHS = (
    ("client", "host"),
    ("host", "client"),
    ("host", "disk"),
    ("disk", "host"),
    ("disk", "client"),
    ("remote", "host"),
    ("host", "remote"),
    ("disk", "remote"),
)
# early/late: a prefetched block was asked for before/after its promotion finished;
# done/partial/noop: how a prefetch call itself ended (all, some or none of its blocks moved).
PREFETCH_RESULTS = ("early", "late", "done", "partial", "noop")
ERROR_KINDS = (
    "host_full",
    "disk_full",
    "disk_write",
    "session_write",
    "remote_read",
    "remote_write",
    "remote_timeout",
)
# Why a block offered to the shared tier did not get there: the write-behind queue was full,
# it left every local tier first, its local copy failed verification, the daemon stopped.
REMOTE_DROP_REASONS = ("queue_full", "evicted", "corrupt", "shutdown")
# With a device tier ([tiers.device]): its hits, its evictions and its two paths (prefetch
# promotions into it, loads served from it). Exported from the first scrape only when
# there is one, so a daemon without a GPU shows no device series.
DEVICE = "device"
DEVICE_PATHS = (("host", DEVICE), (DEVICE, "client"))
OPS = ("save", "load", "acquire", "touch", "prefetch", "lookup", "lookup_tail")

# A host hit is a memcpy of a few KiB (~10 us); a cold object-store read of a
# large batch can take seconds: log-spaced 10 us .. 10 s.
LATENCY_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Lead time is how long a promoted block waited for the engine: up to a user's
# think time between chat turns (minutes).
LEAD_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)
# Lateness is how long the engine waited on a prefetch still in flight.
LATE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)


def _zero() -> int:
    return 0


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running ``/metrics`` endpoint (a daemon thread); ``close()`` stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def host(self) -> str:
        return str(self.server.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join()
        self.server.server_close()


def parse_listen(listen: str) -> tuple[str, int] | None:
    """``"host:port"`` (``"[::1]:9464"`` for IPv6) -> ``(host, port)``; ``""`` -> ``None`` (off).

    An empty host is refused rather than read as "every interface": the
    endpoint is loopback unless an operator says otherwise, explicitly.
    """
    if listen == "":
        return None
    m = re.fullmatch(
        r"(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})", listen
    )
    if m is None:
        raise ConfigError(
            f'metrics.listen: {listen!r} is not host:port (e.g. "127.0.0.1:9464", '
            f'"[::1]:9464", "0.0.0.0:9464" for every interface, "" to disable)'
        )
    port = int(m["port"])
    if port > 65535:
        raise ConfigError(f"metrics.listen: port {port} in {listen!r} is not in 0..65535")
    return (m["v6"] or m["host"]), port


class Metrics(Stats):
    """``Stats`` that also keeps latency histograms and exports everything to Prometheus."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = CollectorRegistry()
        # What the scrape-time gauges read; set by bind().
        self._manager: TierManager | None = None
        self._clients: Callable[[], int] = _zero
        self._mqtt_connected: Callable[[], bool] | None = None

        def hist(
            name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
        ) -> Histogram:
            # registry=None: the collector below exports these, minus their _created samples.
            return Histogram(name, doc, labels, registry=None, buckets=buckets)

        self.transfer_seconds = hist(
            "tiercache_transfer_seconds",
            "Duration of block copies the daemon made, by path (a socket client's own copies "
            "into and out of the shared arena are counted in bytes, not timed).",
            ("src", "dst"),
            LATENCY_BUCKETS,
        )
        self.request_seconds = hist(
            "tiercache_request_seconds",
            "Duration of cache operations in the daemon, by operation (a socket client's load is "
            "an acquire and its copy; its save is a reservation and a commit, not timed here).",
            ("op",),
            LATENCY_BUCKETS,
        )
        self.prefetch_lead_seconds = hist(
            "tiercache_prefetch_lead_seconds",
            "How long a prefetched block was ready before it was asked for.",
            (),
            LEAD_BUCKETS,
        )
        self.prefetch_late_seconds = hist(
            "tiercache_prefetch_late_seconds",
            "How long a request waited for a prefetch still in flight.",
            (),
            LATE_BUCKETS,
        )
        for src, dst in TRANSFER_PATHS:
            self.transfer_seconds.labels(src, dst)
        for op in OPS:
            self.request_seconds.labels(op)
        self.registry.register(_Collector(self))

    def bind(
        self,
        manager: TierManager,
        *,
        clients: Callable[[], int] = _zero,
        mqtt_connected: Callable[[], bool] | None = None,
    ) -> None:
        """Read tier usage and pins from ``manager`` at scrape time.

        ``clients`` counts connected clients. ``mqtt_connected`` is ``None``
        when MQTT is not configured (``tiercache_mqtt_configured`` is then 0,
        which keeps the disconnection alert quiet). Both are called from the
        scrape thread: they must only read.
        """
        self._manager = manager
        self._clients = clients
        self._mqtt_connected = mqtt_connected
        if self._has_device():
            for src, dst in DEVICE_PATHS:
                self.transfer_seconds.labels(src, dst)

    def _has_device(self) -> bool:
        # getattr: a stand-in manager (tests) has no device attribute.
        return getattr(self._manager, "device", None) is not None

    # -- events from the manager (base counters kept by Stats) -------------------

    def transfer(self, src: str, dst: str, nbytes: int, seconds: float | None) -> None:
        super().transfer(src, dst, nbytes, seconds)
        if seconds is not None:  # an untimed copy (a client's) adds bytes, not a latency sample
            self.transfer_seconds.labels(src, dst).observe(seconds)

    def prefetched(self, result: str, lead_seconds: float | None = None) -> None:
        super().prefetched(result, lead_seconds)
        if lead_seconds is None:
            return
        if result == "early":
            self.prefetch_lead_seconds.observe(lead_seconds)
        elif result == "late":
            self.prefetch_late_seconds.observe(lead_seconds)

    def request(self, op: str, seconds: float) -> None:
        super().request(op, seconds)
        self.request_seconds.labels(op).observe(seconds)

    # -- exposition ------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format, as a scrape would get it."""
        return generate_latest(self.registry)

    def serve(self, listen: str) -> MetricsServer | None:
        """Serve ``/metrics`` on ``listen`` (``[metrics] listen``) in a daemon thread.

        ``""`` disables the endpoint (returns ``None``); port 0 picks a free
        port (read it from ``.port``).
        """
        parsed = parse_listen(listen)
        if parsed is None:
            return None
        host, port = parsed
        try:
            server, thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise OSError(
                e.errno,
                f"metrics.listen {listen!r}: cannot listen there ({e.strerror or e}); "
                'set [metrics] listen to a free address, or "" to disable the endpoint',
            ) from e
        return MetricsServer(server, thread)


def _counter(
    name: str, doc: str, label: str, values: Mapping[str, int], known: Iterable[str]
) -> CounterMetricFamily:
    """A counter family with every ``known`` label value (0 until counted) plus any other seen."""
    fam = CounterMetricFamily(name, doc, labels=[label])
    for v in dict.fromkeys([*known, *values]):
        fam.add_metric([v], values.get(v, 0))
    return fam


class _Collector:
    """Builds every ``tiercache_*`` family from a ``Metrics`` at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        # dict(...) copies in one C call: a consistent snapshot while the loop thread counts on.
        lookups, evictions = dict(m.lookups), dict(m.evictions)
        prefetch, errors = dict(m.prefetch), dict(m.errors)
        transfer_bytes: Counter[tuple[str, str]] = Counter(dict(m.transfer_bytes))
        device = m._has_device()
        tiers = (DEVICE, *TIERS) if device else TIERS
        results = (DEVICE, *LOOKUP_RESULTS) if device else LOOKUP_RESULTS
        paths = (*TRANSFER_PATHS, *DEVICE_PATHS) if device else TRANSFER_PATHS

        info = GaugeMetricFamily(
            "tiercache_build_info", "tiercache version (value is always 1).", labels=["version"]
        )
        info.add_metric([tiercache.__version__], 1)
        yield info

        yield from self._tiers()

        yield _counter(
            "tiercache_lookup_blocks",
            "Blocks looked up, by where the hit was (device, host, disk, remote) or miss.",
            "result",
            lookups,
            results,
        )
        fam = CounterMetricFamily(
            "tiercache_transfer_bytes",
            "Bytes moved between tiers and clients, by path.",
            labels=["src", "dst"],
        )
        for path in dict.fromkeys([*paths, *transfer_bytes]):
            fam.add_metric(list(path), transfer_bytes[path])
        yield fam
        yield _counter(
            "tiercache_evictions",
            "Blocks evicted from a tier to make room.",
            "tier",
            evictions,
            tiers,
        )
        yield _counter(
            "tiercache_prefetch",
            "Prefetches by result: early/late (timing of the request that used them), "
            "done/partial/noop (how much a prefetch call promoted).",
            "result",
            prefetch,
            PREFETCH_RESULTS,
        )
        yield _counter(
            "tiercache_errors",
            "Operations that failed or were cut short, by kind.",
            "kind",
            errors,
            ERROR_KINDS,
        )
        yield CounterMetricFamily(
            "tiercache_corrupt_blocks",
            "Stored block copies that failed their checksum (dropped and served as misses).",
            value=m.corrupt_blocks,
        )
        yield CounterMetricFamily(
            "tiercache_dropped_blocks",
            "Blocks evicted from the last tier holding them (no longer cached anywhere).",
            value=m.dropped_blocks,
        )
        for h in (
            m.transfer_seconds,
            m.request_seconds,
            m.prefetch_lead_seconds,
            m.prefetch_late_seconds,
        ):
            for fam_ in h.collect():
                fam_.samples = [s for s in fam_.samples if not s.name.endswith("_created")]
                yield fam_

        mqtt = m._mqtt_connected
        yield _gauge("tiercache_clients", "Clients connected to the daemon's socket.", m._clients)
        yield _gauge(
            "tiercache_mqtt_configured",
            "1 when an MQTT broker is configured ([mqtt] host), else 0.",
            lambda: mqtt is not None,
        )
        yield _gauge(
            "tiercache_mqtt_connected",
            "1 while connected to the MQTT broker, else 0.",
            mqtt if mqtt is not None else (lambda: False),
        )
        yield from self._remote()
        yield _gauge(
            "tiercache_pinned_blocks",
            "Stored blocks protected by a pinned session.",
            self._pinned_blocks,
        )

    def _tiers(self) -> Iterator[Metric]:
        usage: dict[str, dict[str, int]] = {}
        if self.m._manager is not None:
            try:
                usage = self.m._manager.usage()
            except Exception:  # a closed manager, a tier mid-format: export zeros, keep serving
                log.warning("metrics: reading tier usage failed", exc_info=True)
        tiers = dict.fromkeys([*TIERS, *usage])
        for field_, name, doc in (
            (
                "capacity_bytes",
                "tiercache_tier_capacity_bytes",
                "Byte budget of a tier (0: absent).",
            ),
            (
                "used_bytes",
                "tiercache_tier_used_bytes",
                "Bytes a tier's blocks take (host and device: whole slots).",
            ),
            ("blocks", "tiercache_tier_blocks", "Blocks stored in a tier."),
            (
                "kv_bytes",
                "tiercache_tier_kv_bytes",
                "Bytes of KV the blocks in a tier hold (host, disk): under used_bytes where "
                "blocks are smaller than the host's slots, which each takes whole.",
            ),
        ):
            fam = GaugeMetricFamily(name, doc, labels=["tier"])
            for tier in tiers:
                if field_ != "kv_bytes" or tier in TIERS:  # not counted on the device tier
                    fam.add_metric([tier], usage.get(tier, {}).get(field_, 0))
            yield fam

    def _remote(self) -> Iterator[Metric]:
        # getattr: a stand-in manager (tests) or one mid-construction has no shared-tier state.
        manager = self.m._manager
        remote = getattr(manager, "remote", None)
        shared = getattr(manager, "shared", None)
        uploads = shared.uploads if shared is not None else None
        yield _gauge(
            "tiercache_remote_configured",
            "1 when a shared tier is configured ([tiers.remote] url), else 0.",
            lambda: remote is not None,
        )
        yield _gauge(
            "tiercache_remote_up",
            "1 while the shared tier's store answers, else 0 (the daemon retries by itself).",
            lambda: remote is not None and remote.up,
        )
        yield _gauge(
            "tiercache_remote_queue_blocks",
            "Blocks in the write-behind queue to the shared tier, waiting or being uploaded "
            "(what [tiers.remote] queue_blocks bounds).",
            lambda: len(uploads) + uploads.in_flight if uploads is not None else 0,
        )
        yield CounterMetricFamily(
            "tiercache_remote_uploaded_blocks",
            "Blocks written to the shared tier.",
            value=uploads.uploaded if uploads is not None else 0,
        )
        yield _counter(
            "tiercache_remote_dropped_blocks",
            "Offers of blocks to the shared tier that were dropped, by reason (a block refused "
            "by a full queue is offered again on its next sighting).",
            "reason",
            dict(uploads.dropped) if uploads is not None else {},
            REMOTE_DROP_REASONS,
        )

    def _pinned_blocks(self) -> int:
        manager = self.m._manager
        if manager is None:
            return 0
        # Walks the pin counts (keys of pinned sessions), not every entry: a scrape
        # stays cheap with millions of blocks and a few pinned sessions.
        return manager.sessions.pinned_blocks()


def _gauge(name: str, doc: str, read: Callable[[], float | int | bool]) -> GaugeMetricFamily:
    try:
        value = float(read())
    except Exception:  # a gauge source must not take the whole scrape down
        log.warning("metrics: reading %s failed", name, exc_info=True)
        value = 0.0
    return GaugeMetricFamily(name, doc, value=value)
