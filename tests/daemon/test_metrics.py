"""The Prometheus exporter and the ops files (Prometheus, Grafana, systemd, example config).

From small to large: exact values of ``Metrics`` against a real ``TierManager``;
the exposition from the first scrape (names, types, label sets at zero); the
HTTP endpoint; promtool on the exposition, the scrape config and the rules;
the dashboard's and unit's structure; and at the end a real Prometheus
scraping a cache under load, evaluating every expression of the dashboard and
the rules file through its HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import tiercache
from tests.conftest import (
    NBYTES,
    OpenCache,
    flip_byte,
    make_blocks,
    make_ns,
    make_tokens,
    open_with_a_dead_store,
)
from tests.services.mosquitto import Mosquitto, mqtt_env
from tests.services.prometheus import PrometheusServer, promtool, running_prometheus
from tiercache import TierManager
from tiercache.client import AsyncClient
from tiercache.daemon.config import SECTIONS, ConfigError, MqttConfig, load_config
from tiercache.daemon.metrics import Metrics, MetricsServer, parse_listen

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
PROM_CONFIG = OPS / "prometheus" / "prometheus.yml"
RULES = OPS / "prometheus" / "tiercache-rules.yml"
RULES_TESTS = OPS / "prometheus" / "tiercache-rules.test.yml"
DASHBOARD = OPS / "grafana" / "dashboards" / "tiercache.json"
UNIT = OPS / "systemd" / "tiercache.service"
EXAMPLE = OPS / "tiercache.example.toml"

NS = make_ns()
B = NBYTES  # 512 bytes per block


# -- reading the exposition ------------------------------------------------------------


def scrape(text: bytes | str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition: (sample name, labels) -> value."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(m: Metrics, name: str, **labels: str) -> float:
    return scrape(m.render())[(name, frozenset(labels.items()))]


def types(text: bytes) -> dict[str, str]:
    """``# TYPE`` lines: exposed family name -> type, as Prometheus reads them."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text.decode(), flags=re.M))


def label_sets(text: bytes, name: str) -> set[frozenset[tuple[str, str]]]:
    return {labels for (n, labels) in scrape(text) if n == name}


def L(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


# -- the exposition from the first scrape ----------------------------------------------

# DESIGN.md "Prometheus", plus the extras this exporter adds (dropped blocks, prefetch
# lateness, whether MQTT is configured at all).
EXPECTED_TYPES = {
    "tiercache_build_info": "gauge",
    "tiercache_tier_capacity_bytes": "gauge",
    "tiercache_tier_used_bytes": "gauge",
    "tiercache_tier_blocks": "gauge",
    "tiercache_tier_kv_bytes": "gauge",
    "tiercache_lookup_blocks_total": "counter",
    "tiercache_transfer_bytes_total": "counter",
    "tiercache_transfer_seconds": "histogram",
    "tiercache_evictions_total": "counter",
    "tiercache_prefetch_total": "counter",
    "tiercache_prefetch_lead_seconds": "histogram",
    "tiercache_prefetch_late_seconds": "histogram",
    "tiercache_corrupt_blocks_total": "counter",
    "tiercache_dropped_blocks_total": "counter",
    "tiercache_errors_total": "counter",
    "tiercache_request_seconds": "histogram",
    "tiercache_clients": "gauge",
    "tiercache_pinned_blocks": "gauge",
    "tiercache_mqtt_connected": "gauge",
    "tiercache_mqtt_configured": "gauge",
    "tiercache_remote_configured": "gauge",
    "tiercache_remote_up": "gauge",
    "tiercache_remote_queue_blocks": "gauge",
    "tiercache_remote_uploaded_blocks_total": "counter",
    "tiercache_remote_dropped_blocks_total": "counter",
}

PATHS = [
    ("client", "host"),
    ("host", "client"),
    ("host", "disk"),
    ("disk", "host"),
    ("disk", "client"),
    ("remote", "host"),
    ("host", "remote"),
    ("disk", "remote"),
]


def test_the_first_scrape_has_every_metric_with_its_type_and_nothing_else() -> None:
    assert types(Metrics().render()) == EXPECTED_TYPES


def test_the_first_scrape_has_every_label_combination_at_zero() -> None:
    text = Metrics().render()
    tiers = {L(tier="host"), L(tier="disk")}
    assert label_sets(text, "tiercache_tier_capacity_bytes") == tiers
    assert label_sets(text, "tiercache_tier_used_bytes") == tiers
    assert label_sets(text, "tiercache_tier_blocks") == tiers
    assert label_sets(text, "tiercache_tier_kv_bytes") == tiers
    assert label_sets(text, "tiercache_evictions_total") == tiers
    assert label_sets(text, "tiercache_lookup_blocks_total") == {
        L(result=r) for r in ("host", "disk", "remote", "miss")
    }
    assert label_sets(text, "tiercache_transfer_bytes_total") == {L(src=s, dst=d) for s, d in PATHS}
    assert label_sets(text, "tiercache_transfer_seconds_count") == {
        L(src=s, dst=d) for s, d in PATHS
    }
    assert label_sets(text, "tiercache_prefetch_total") == {
        L(result=r) for r in ("early", "late", "done", "partial", "noop")
    }
    assert label_sets(text, "tiercache_errors_total") == {
        L(kind=k)
        for k in (
            "host_full",
            "disk_full",
            "disk_write",
            "session_write",
            "remote_read",
            "remote_write",
            "remote_timeout",
        )
    }
    assert label_sets(text, "tiercache_remote_dropped_blocks_total") == {
        L(reason=r) for r in ("queue_full", "evicted", "corrupt", "shutdown")
    }
    assert label_sets(text, "tiercache_request_seconds_count") == {
        L(op=o) for o in ("save", "load", "acquire", "touch", "prefetch", "lookup", "lookup_tail")
    }
    samples = scrape(text)
    assert samples[("tiercache_build_info", L(version=tiercache.__version__))] == 1
    assert all(v == 0 for (name, _), v in samples.items() if name != "tiercache_build_info")


def test_histograms_have_buckets_from_10us_to_10s_and_no_created_series() -> None:
    text = Metrics().render()
    buckets = sorted(
        float(dict(labels)["le"])
        for labels in label_sets(text, "tiercache_transfer_seconds_bucket")
        if dict(labels)["src"] == "client" and dict(labels)["dst"] == "host"
    )
    assert buckets[0] == 1e-5
    assert buckets[-2:] == [10.0, float("inf")]
    assert b"_created" not in text


def test_two_exporters_in_one_process_keep_their_own_counts() -> None:
    a, b = Metrics(), Metrics()
    a.lookup("host", 5)
    assert value(a, "tiercache_lookup_blocks_total", result="host") == 5
    assert value(b, "tiercache_lookup_blocks_total", result="host") == 0


# -- exact values against a real TierManager ---------------------------------------------


async def test_saves_lookups_and_loads_from_host_count_blocks_bytes_and_requests(
    open_cache: OpenCache,
) -> None:
    m = Metrics()
    cache = await open_cache(host_blocks=4, disk_blocks=64, stats=m)
    m.bind(cache)
    tokens = make_tokens(4)
    await cache.save(NS, tokens[: 3 * 4], make_blocks(3))
    assert (await cache.lookup(NS, tokens)).blocks == 3
    assert (await cache.load(NS, tokens)).blocks == 3

    assert value(m, "tiercache_transfer_bytes_total", src="client", dst="host") == 3 * B
    assert value(m, "tiercache_transfer_seconds_count", src="client", dst="host") == 1
    assert value(m, "tiercache_lookup_blocks_total", result="host") == 3
    assert value(m, "tiercache_lookup_blocks_total", result="miss") == 1
    assert value(m, "tiercache_lookup_blocks_total", result="disk") == 0
    assert value(m, "tiercache_transfer_bytes_total", src="host", dst="client") == 3 * B
    assert value(m, "tiercache_request_seconds_count", op="save") == 1
    assert value(m, "tiercache_request_seconds_count", op="load") == 1
    assert value(m, "tiercache_request_seconds_sum", op="load") > 0


async def test_a_save_is_timed_by_its_copy_and_only_where_this_process_made_it(
    open_cache: OpenCache,
) -> None:
    m = Metrics()
    cache = await open_cache(host_blocks=8, disk_blocks=64, stats=m)
    tokens, blocks = make_tokens(3), make_blocks(3)
    await cache.save(NS, tokens, blocks)  # embedded: the cache copies, and times that copy
    await cache.save(NS, tokens, blocks)  # every block held already: nothing copied or timed
    assert value(m, "tiercache_transfer_seconds_count", src="client", dst="host") == 1

    # A socket client's save: it copies into the reserved slots in its own process and the
    # cache only commits them, so the bytes count but the commit's bookkeeping is no sample.
    r = await cache.reserve(NS, make_tokens(2, seed=1))
    await cache.commit(r)
    assert value(m, "tiercache_transfer_bytes_total", src="client", dst="host") == 5 * B
    assert value(m, "tiercache_transfer_seconds_count", src="client", dst="host") == 1

    # Where the copy was made here (an attached engine's gather), the sample is its duration.
    before = value(m, "tiercache_transfer_seconds_sum", src="client", dst="host")
    r = await cache.reserve(NS, make_tokens(2, seed=2))
    r.fill_seconds = 0.25
    await cache.commit(r)
    assert value(m, "tiercache_transfer_seconds_count", src="client", dst="host") == 2
    assert value(m, "tiercache_transfer_seconds_sum", src="client", dst="host") - before == (
        pytest.approx(0.25)
    )


async def test_tier_gauges_are_read_from_the_manager_at_scrape_time(
    open_cache: OpenCache,
) -> None:
    m = Metrics()
    cache = await open_cache(host_blocks=4, disk_blocks=64, stats=m)
    m.bind(cache)
    await cache.save(NS, make_tokens(3), make_blocks(3))
    assert value(m, "tiercache_tier_capacity_bytes", tier="host") == 4 * B
    assert value(m, "tiercache_tier_used_bytes", tier="host") == 3 * B
    assert value(m, "tiercache_tier_blocks", tier="host") == 3
    assert value(m, "tiercache_tier_capacity_bytes", tier="disk") == 64 * B
    assert value(m, "tiercache_tier_used_bytes", tier="disk") == 0  # write-back: not yet

    await cache.flush()
    assert value(m, "tiercache_tier_used_bytes", tier="disk") == 3 * B
    assert value(m, "tiercache_tier_blocks", tier="disk") == 3
    assert value(m, "tiercache_tier_kv_bytes", tier="host") == 3 * B
    assert value(m, "tiercache_tier_kv_bytes", tier="disk") == 3 * B
    assert value(m, "tiercache_transfer_bytes_total", src="host", dst="disk") == 3 * B


async def test_a_host_eviction_writes_back_and_a_disk_read_promotes(
    open_cache: OpenCache,
) -> None:
    m = Metrics()
    cache = await open_cache(host_blocks=2, disk_blocks=64, stats=m)
    tokens = make_tokens(3)
    await cache.save(NS, tokens, make_blocks(3))  # block 0 makes room for block 2
    assert value(m, "tiercache_evictions_total", tier="host") == 1
    assert value(m, "tiercache_transfer_bytes_total", src="host", dst="disk") == 1 * B

    got = await cache.load(NS, tokens)
    assert got.tiers == ["disk", "host", "host"]
    assert value(m, "tiercache_transfer_bytes_total", src="disk", dst="client") == 1 * B
    assert value(m, "tiercache_transfer_bytes_total", src="host", dst="client") == 2 * B
    # Block 0 comes back to host memory, evicting (and writing back) block 1.
    assert value(m, "tiercache_transfer_bytes_total", src="disk", dst="host") == 1 * B
    assert value(m, "tiercache_evictions_total", tier="host") == 2
    assert value(m, "tiercache_transfer_bytes_total", src="host", dst="disk") == 2 * B
    assert value(m, "tiercache_evictions_total", tier="disk") == 0
    assert value(m, "tiercache_dropped_blocks_total") == 0


async def reopened_on_disk(
    open_cache: OpenCache, m: Metrics, n: int
) -> tuple[TierManager, list[int]]:
    """A cache (reporting to ``m``) whose ``n`` blocks of session "s" are on disk only."""
    first = await open_cache(write="write-through", host_blocks=8)
    tokens = make_tokens(n)
    await first.save(NS, tokens, make_blocks(n), session="s")
    await first.close()
    cache = await open_cache(host_blocks=8, stats=m)
    m.bind(cache)
    return cache, tokens


async def test_prefetch_counts_done_then_noop_and_the_promoted_bytes(
    open_cache: OpenCache,
) -> None:
    m = Metrics()
    cache, _ = await reopened_on_disk(open_cache, m, 3)
    assert await cache.prefetch(session="s") == 3
    assert await cache.prefetch(session="s") == 0
    assert value(m, "tiercache_prefetch_total", result="done") == 1
    assert value(m, "tiercache_prefetch_total", result="noop") == 1
    assert value(m, "tiercache_prefetch_total", result="partial") == 0
    assert value(m, "tiercache_transfer_bytes_total", src="disk", dst="host") == 3 * B
    assert (
        value(m, "tiercache_request_seconds_count", op="prefetch") == 2
    )  # the no-op is a request too


async def test_a_device_tier_s_series_are_exported_from_the_first_scrape(
    open_cache: OpenCache,
) -> None:
    # A series born at its first event loses that event to rate() and increase(): the
    # device tier's hits, evictions and paths are there at 0 before it is used, and its
    # use adds no series the first scrape did not have.
    m = Metrics()
    cache = await open_cache(host_blocks=8, device_bytes=2 * B, device_name="cpu", stats=m)
    m.bind(cache)
    first = m.render()
    assert label_sets(first, "tiercache_lookup_blocks_total") >= {L(result="device")}
    assert label_sets(first, "tiercache_evictions_total") >= {L(tier="device")}
    for name in ("tiercache_transfer_bytes_total", "tiercache_transfer_seconds_count"):
        assert label_sets(first, name) >= {
            L(src="host", dst="device"),
            L(src="device", dst="client"),
        }

    tokens = make_tokens(3)
    await cache.save(NS, tokens, make_blocks(3), session="s")
    await cache.prefetch(session="s")  # host -> device: the 2 blocks it has room for
    await cache.lookup(NS, tokens)
    await cache.load(NS, tokens)  # from the device, and from host
    await cache.save(NS, make_tokens(2, seed=9), make_blocks(2), session="t")
    await cache.prefetch(session="t")  # evicts the device's blocks of "s"
    used = m.render()
    assert value(m, "tiercache_transfer_bytes_total", src="host", dst="device") > 0
    assert value(m, "tiercache_transfer_bytes_total", src="device", dst="client") > 0
    assert value(m, "tiercache_lookup_blocks_total", result="device") > 0
    assert value(m, "tiercache_evictions_total", tier="device") > 0
    assert set(scrape(used)) == set(scrape(first))


def test_without_a_device_tier_no_device_series_are_exported() -> None:
    assert not [k for k in scrape(Metrics().render()) if "device" in dict(k[1]).values()]


def test_prefetch_timing_fills_the_lead_and_lateness_histograms() -> None:
    m = Metrics()
    m.prefetched("early", 0.2)
    m.prefetched("early", 3.0)
    m.prefetched("late", 0.002)
    m.prefetched("done")
    assert value(m, "tiercache_prefetch_total", result="early") == 2
    assert value(m, "tiercache_prefetch_total", result="late") == 1
    assert value(m, "tiercache_prefetch_lead_seconds_count") == 2
    assert value(m, "tiercache_prefetch_lead_seconds_sum") == pytest.approx(3.2)
    assert value(m, "tiercache_prefetch_lead_seconds_bucket", le="0.1") == 0
    assert value(m, "tiercache_prefetch_lead_seconds_bucket", le="0.5") == 1
    assert value(m, "tiercache_prefetch_lead_seconds_bucket", le="5.0") == 2
    assert value(m, "tiercache_prefetch_late_seconds_count") == 1
    assert value(m, "tiercache_prefetch_late_seconds_bucket", le="0.001") == 0
    assert value(m, "tiercache_prefetch_late_seconds_bucket", le="0.005") == 1


async def test_a_corrupt_disk_block_is_counted_and_dropped(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    m = Metrics()
    cache, tokens = await reopened_on_disk(open_cache, m, 3)
    e = cache.index.get(NS.block_keys(tokens)[1])
    assert e is not None and e.disk is not None and cache.disk is not None
    path, offset = cache.disk.location(e.disk)
    flip_byte(path, offset + 100)
    assert (await cache.load(NS, tokens)).blocks == 1
    assert value(m, "tiercache_corrupt_blocks_total") == 1
    # Its only copy was on disk: the block is no longer cached anywhere.
    assert value(m, "tiercache_dropped_blocks_total") == 1
    assert value(m, "tiercache_tier_blocks", tier="disk") == 2


async def test_a_model_of_blocks_smaller_than_the_host_slots_shows_its_kv_bytes(
    open_cache: OpenCache,
) -> None:
    m = Metrics()
    cache = await open_cache(host_blocks=8, disk_blocks=64, stats=m)
    m.bind(cache)
    await cache.register(make_ns(model="big", spec=replace(NS.spec, num_layers=4)))  # 2 x B slots
    await cache.save(NS, make_tokens(3), make_blocks(3))
    await cache.flush()

    assert value(m, "tiercache_tier_used_bytes", tier="host") == 3 * 2 * B  # whole slots
    assert value(m, "tiercache_tier_kv_bytes", tier="host") == 3 * B
    assert value(m, "tiercache_tier_used_bytes", tier="disk") == 3 * B
    assert value(m, "tiercache_tier_kv_bytes", tier="disk") == 3 * B


async def test_the_shared_tier_queue_gauge_counts_the_batch_in_flight_as_stats_does(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    # The queue's bound counts the blocks taken for upload until their batch is done; the
    # gauge counted only those still waiting, so it read 0 with a full queue dropping offers
    # behind a batch stuck on a hung store.
    m = Metrics()
    cache = await open_with_a_dead_store(open_cache, tmp_path, stats=m)
    m.bind(cache)
    assert cache.shared is not None
    uploads = cache.shared.uploads
    for k in make_ns().block_keys(make_tokens(3)):
        assert uploads.offer(k, "array")
    uploads.take(2)  # a batch in flight
    assert value(m, "tiercache_remote_queue_blocks") == 3
    assert cache.shared.state()["queue_blocks"] == 3


async def test_a_host_tier_full_of_pinned_blocks_counts_a_host_full_error(
    open_cache: OpenCache,
) -> None:
    m = Metrics()
    cache = await open_cache(host_blocks=2, stats=m)
    m.bind(cache)
    await cache.save(NS, make_tokens(2, seed=1), make_blocks(2), session="pinned")
    await cache.pin("pinned")
    result = await cache.save(NS, make_tokens(1, seed=2), make_blocks(1))
    assert result.rejected == 1
    assert value(m, "tiercache_errors_total", kind="host_full") == 1
    assert value(m, "tiercache_errors_total", kind="disk_full") == 0


async def test_pinned_blocks_counts_stored_blocks_of_pinned_sessions_only(
    open_cache: OpenCache,
) -> None:
    m = Metrics()
    cache = await open_cache(host_blocks=8, stats=m)
    m.bind(cache)
    tokens = make_tokens(5)
    # The session's chain has 5 keys, 3 of them stored: 3 pinned blocks.
    await cache.save(NS, tokens, make_blocks(3), session="s")
    await cache.save(NS, make_tokens(2, seed=9), make_blocks(2), session="other")
    assert value(m, "tiercache_pinned_blocks") == 0
    await cache.pin("s")
    assert value(m, "tiercache_pinned_blocks") == 3
    await cache.unpin("s")
    assert value(m, "tiercache_pinned_blocks") == 0


async def test_the_base_stats_are_kept_for_the_stats_verb(open_cache: OpenCache) -> None:
    m = Metrics()
    cache = await open_cache(host_blocks=4, stats=m)
    tokens = make_tokens(2)
    await cache.save(NS, tokens, make_blocks(2))
    await cache.lookup(NS, tokens)
    assert m.as_dict() == {
        "lookup_blocks": {"host": 2},
        "transfer_bytes": {"client->host": 2 * B},
        "evictions": {},
        "prefetch": {},
        "errors": {},
        "corrupt_blocks": 0,
        "dropped_blocks": 0,
    }


def test_clients_and_mqtt_gauges_call_what_bind_was_given() -> None:
    m = Metrics()
    assert value(m, "tiercache_mqtt_configured") == 0
    assert value(m, "tiercache_mqtt_connected") == 0
    connected = [False]
    m.bind(_no_manager(), clients=lambda: 7, mqtt_connected=lambda: connected[0])
    assert value(m, "tiercache_clients") == 7
    assert value(m, "tiercache_mqtt_configured") == 1
    assert value(m, "tiercache_mqtt_connected") == 0
    connected[0] = True
    assert value(m, "tiercache_mqtt_connected") == 1


def test_a_failing_gauge_source_reads_zero_and_the_scrape_survives() -> None:
    def broken() -> int:
        raise RuntimeError("client table is being rebuilt")

    m = Metrics()
    m.lookup("miss", 2)
    m.bind(_no_manager(), clients=broken)
    assert value(m, "tiercache_clients") == 0
    assert value(m, "tiercache_lookup_blocks_total", result="miss") == 2


def _no_manager() -> Any:
    """A stand-in manager with empty tiers and no pins (for gauge tests that need no cache)."""

    class _Index:
        pins: dict[bytes, int] = {}  # noqa: RUF012 - read-only stand-in

        def __contains__(self, key: bytes) -> bool:
            return False

    class _Manager:
        index = _Index()

        def usage(self) -> dict[str, dict[str, int]]:
            return {}

    return _Manager()


# -- the HTTP endpoint -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "parsed"),
    [
        ("", None),
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:9464", ("::1", 9464)),
        ("metrics.local:9100", ("metrics.local", 9100)),
    ],
)
def test_listen_strings_parse_to_host_and_port(listen: str, parsed: tuple[str, int] | None) -> None:
    assert parse_listen(listen) == parsed


@pytest.mark.parametrize(
    "listen", ["9464", ":9464", "127.0.0.1", "127.0.0.1:http", "::1:9464", "host:70000"]
)
def test_a_bad_listen_string_is_a_config_error_naming_it(listen: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(repr(listen))) as info:
        Metrics().serve(listen)
    assert isinstance(info.value, ValueError)
    assert "metrics.listen" in str(info.value)


def test_an_empty_listen_string_disables_the_endpoint() -> None:
    assert Metrics().serve("") is None


@pytest.fixture
def served() -> Iterator[tuple[Metrics, MetricsServer]]:
    m = Metrics()
    server = m.serve("127.0.0.1:0")
    assert server is not None
    yield m, server
    server.close()


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
        return body


def test_serve_on_port_0_picks_a_free_loopback_port_and_serves_the_exposition(
    served: tuple[Metrics, MetricsServer],
) -> None:
    m, server = served
    assert server.host == "127.0.0.1"
    assert server.port > 0
    m.lookup("disk", 4)
    text = http_get(f"http://127.0.0.1:{server.port}/metrics")
    assert scrape(text)[("tiercache_lookup_blocks_total", L(result="disk"))] == 4
    assert types(text) == EXPECTED_TYPES


def test_close_releases_the_port(served: tuple[Metrics, MetricsServer]) -> None:
    _, server = served
    server.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", server.port))  # free again
    server.close()  # twice is harmless


def test_a_port_in_use_is_an_error_naming_the_listen_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=re.escape(f"metrics.listen {listen!r}")):
            Metrics().serve(listen)


# -- promtool: exposition, scrape config, rules -------------------------------------------


async def test_promtool_accepts_a_real_scrape_of_a_busy_exporter(
    open_cache: OpenCache, served: tuple[Metrics, MetricsServer]
) -> None:
    m, server = served
    cache = await open_cache(host_blocks=2, stats=m)
    m.bind(cache)
    tokens = make_tokens(3)
    await cache.save(NS, tokens, make_blocks(3))
    await cache.load(NS, tokens)
    m.prefetched("early", 0.3)
    text = await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/metrics")
    checked = promtool("check", "metrics", stdin=text)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")


def test_promtool_accepts_the_scrape_config_and_its_rule_file() -> None:
    checked = promtool("check", "config", str(PROM_CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 rule files found" in checked.stdout


def test_promtool_accepts_the_rules() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    # Alert timing, MQTT only where configured, hit ratio values: see the test file.
    checked = promtool("test", "rules", str(RULES_TESTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_prometheus_scrapes_the_configured_default_listen_address() -> None:
    config = load_config(None, env={})
    assert f'targets: ["{config.metrics.listen}"]' in PROM_CONFIG.read_text()


# -- the Grafana dashboard ------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title / refId, PromQL) of every query on the dashboard."""
    return [(f"{p['title']} / {t['refId']}", t["expr"]) for p in panels() for t in p["targets"]]


# Grafana's variables, as a test stands them in: short ranges (1 s scrapes), all instances.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1m", "$instance": ".*"}


def as_promql(expr: str) -> str:
    for var, replacement in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, replacement)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def test_the_dashboard_takes_its_prometheus_from_a_datasource_variable() -> None:
    d = dashboard()
    assert d["schemaVersion"] == 39
    assert d["uid"] == "tiercache"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    uses = [p["datasource"] for p in panels()] + [
        t["datasource"] for p in panels() for t in p["targets"]
    ]
    assert uses and all(u == {"type": "prometheus", "uid": "${datasource}"} for u in uses)


def test_the_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    everything = dashboard()["panels"]
    assert len({p["id"] for p in everything}) == len(everything)
    cells: set[tuple[int, int]] = set()
    for p in everything:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine


def test_the_dashboard_shows_every_exported_metric() -> None:
    exprs = " ".join(expr for _, expr in dashboard_targets())
    shown = {name for name in EXPECTED_TYPES if re.search(rf"\b{name}(_bucket)?\b", exprs)}
    assert shown == set(EXPECTED_TYPES)


def test_the_dashboard_has_the_panels_operators_look_for() -> None:
    titles = {p["title"] for p in panels()}
    assert {
        "Occupancy per tier",
        "Hit ratio by tier",
        "Throughput per path",
        "Transfer latency p50 / p99",
        "Evictions and dropped blocks",
        "Prefetch lead time",
        "Prefetch lateness",
        "Errors and corruption",
        "Clients and MQTT",
    } <= titles


# -- every series the ops files name exists ---------------------------------------------------


def exported_labels() -> dict[str, dict[str, set[str]]]:
    """Sample name -> label -> values, from a first scrape (every label value at zero); a
    histogram's family name (as an alert's text may name it) also maps to its labels."""
    out: dict[str, dict[str, set[str]]] = {}
    for (name, labels), _ in scrape(Metrics().render()).items():
        names = [name, re.sub(r"_(bucket|count|sum)$", "", name)]
        for n in names:
            got = out.setdefault(n, {})
            for k, v in labels:
                if k != "le" or n == name:
                    got.setdefault(k, set()).add(v)
    return out


SELECTOR = re.compile(r"\b(tiercache_[a-z_]+)\b(?:\{([^}]*)\})?")
MATCHER = re.compile(r'\s*([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*')
# Labels Prometheus adds to every scraped series, and what the dashboard's variables stand for.
TARGET_LABELS = {"job", "instance"}


def selector_problems(where: str, text: str) -> list[str]:
    """What in ``text`` names a ``tiercache_*`` series the exporter does not have: an unknown
    metric, a label it does not carry, or a label value it never exports (a misspelt
    ``result="hits"`` selects nothing, and an alert on it never fires)."""
    known = exported_labels()
    problems = []
    for name, matchers in SELECTOR.findall(text):
        if name not in known:
            problems.append(f"{where}: no metric {name}")
            continue
        for m in filter(str.strip, matchers.split(",")):
            parsed = MATCHER.fullmatch(m)
            assert parsed, f"{where}: cannot read the matcher {m!r} of {name}"
            label, op, val = parsed.groups()
            if label in TARGET_LABELS:
                continue
            if label not in known[name]:
                problems.append(f"{where}: {name} has no label {label!r}")
                continue
            values = val.split("|") if op in ("=~", "!~") else [val]
            problems += [
                f"{where}: {name} never has {label}={v!r} (it has {sorted(known[name][label])})"
                for v in values
                if v not in known[name][label]
            ]
    return problems


def test_every_series_the_dashboard_queries_is_exported() -> None:
    problems = [p for where, expr in dashboard_targets() for p in selector_problems(where, expr)]
    assert problems == []


def test_every_series_the_rules_name_is_exported() -> None:
    # The live test below evaluates every rule, but an alert on a series that does not exist
    # evaluates fine (to nothing) and never fires: names and labels are checked here.
    problems = [
        p
        for rule in rules()
        for where, text in [
            (_rule_id(rule), rule["expr"]),
            *((f"{_rule_id(rule)} {k}", v) for k, v in rule.get("annotations", {}).items()),
        ]
        for p in selector_problems(where, text)
    ]
    assert problems == []


def test_the_rules_unit_tests_feed_only_exported_series() -> None:
    tests = yaml.safe_load(RULES_TESTS.read_text())["tests"]
    problems = [
        p
        for t in tests
        for s in t.get("input_series", [])
        for p in selector_problems(t["name"], s["series"])
    ]
    assert problems == []


def test_the_readme_names_every_exported_metric_and_no_other() -> None:
    readme = (ROOT / "README.md").read_text()
    named = {n for n in re.findall(r"\btiercache_[a-z_]+", readme) if not n.endswith("_")}
    assert set(EXPECTED_TYPES) - named == set()  # exported, not documented
    assert named - set(exported_labels()) == set()  # documented, not exported


def test_grafana_provisioning_points_at_a_prometheus_and_a_dashboard_folder() -> None:
    datasources = (OPS / "grafana/provisioning/datasources/prometheus.yml").read_text()
    assert "type: prometheus" in datasources
    assert "timeInterval: 15s" in datasources  # = scrape_interval in prometheus.yml
    assert "scrape_interval: 15s" in PROM_CONFIG.read_text()
    providers = (OPS / "grafana/provisioning/dashboards/tiercache.yml").read_text()
    assert "type: file" in providers and "path: /var/lib/grafana/dashboards/tiercache" in providers


# -- systemd unit and example config ---------------------------------------------------------


def unit() -> dict[str, dict[str, list[str]]]:
    """The unit file as section -> key -> values (a key may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = {}
            continue
        key, _, val = line.partition("=")
        out[section].setdefault(key.strip(), []).append(val.strip())
    return out


def test_the_unit_runs_the_daemon_with_its_config_and_drains_on_sigterm() -> None:
    s = unit()["Service"]
    assert s["Type"] == ["exec"]
    assert s["ExecStart"] == ["/usr/bin/env tiercache serve --config /etc/tiercache/tiercache.toml"]
    assert s["KillSignal"] == ["SIGTERM"]
    assert s["TimeoutStopSec"] == ["300s"]  # time to flush write-back blocks
    assert s["LimitMEMLOCK"] == ["infinity"]  # pinned host memory
    assert s["Restart"] == ["on-failure"]
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_unit_is_hardened_but_leaves_the_gpu_and_jit_usable() -> None:
    s = unit()["Service"]
    for key, val in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "CapabilityBoundingSet": "",
        "User": "tiercache",
    }.items():
        assert s[key] == [val], key
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert s["PrivateDevices"] == ["no"]  # /dev/nvidia*
    assert "MemoryDenyWriteExecute" not in s  # CUDA PTX JIT, NVRTC, torch JIT


def test_the_units_install_steps_work_before_any_tiercache_directory_exists(
    tmp_path: Path,
) -> None:
    # The steps in the unit's header, run as written into an empty root (where /etc/tiercache
    # does not exist yet: the unit's ConfigurationDirectory= makes it only at its first start).
    steps = [
        line.removeprefix("#").strip()
        for line in UNIT.read_text().splitlines()
        if line.startswith("#   install ")
    ]
    assert len(steps) == 2
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)  # systemd's own
    for step in steps:
        argv = shlex.split(step)
        argv[-1] = f"{root}{argv[-1]}"
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"{step}: {done.stderr}"
    installed = root / "etc" / "tiercache" / "tiercache.toml"
    assert load_config(installed, env={}) == load_config(EXAMPLE, env={})
    assert (root / "etc" / "systemd" / "system" / "tiercache.service").read_text() == (
        UNIT.read_text()
    )


def test_the_example_config_fits_the_units_directories() -> None:
    s = unit()["Service"]
    config = load_config(EXAMPLE, env={})
    assert Path(config.daemon.socket).parent == Path("/run") / s["RuntimeDirectory"][0]
    assert config.tiers.disk is not None
    assert config.tiers.disk.url == f"file:///var/lib/{s['StateDirectory'][0]}"
    assert s["ExecStart"][0].endswith(
        f"--config /etc/{s['ConfigurationDirectory'][0]}/tiercache.toml"
    )


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit_without_a_warning() -> None:
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_rates_the_units_exposure_at_most_2_5() -> None:
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=25", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:]


def documented_keys(text: str) -> set[tuple[str, str]]:
    """(section, key) of every ``key =`` line, commented out or not, under its ``[section]``."""
    keys: set[tuple[str, str]] = set()
    section = ""
    for line in text.splitlines():
        line = line.strip().removeprefix("#").strip()
        if m := re.fullmatch(r"\[([a-z.]+)\]", line.split("#")[0].strip()):
            section = m[1]
        elif m := re.fullmatch(r"([a-z_]+) = .*", line):
            keys.add((section, m[1]))
    return keys


def test_the_example_config_documents_every_key() -> None:
    every_key = {(name, f.name) for name, cls in SECTIONS.items() for f in fields(cls)}
    assert documented_keys(EXAMPLE.read_text()) == every_key


def test_the_example_config_loads_with_the_documented_values() -> None:
    config = load_config(EXAMPLE, env={})
    assert tomllib.loads(EXAMPLE.read_text())["metrics"]["listen"] == "127.0.0.1:9464"
    assert config.daemon.socket == "/run/tiercache/tiercache.sock"
    assert config.tiers.device is None and config.tiers.remote is None  # commented out: absent
    assert config.tiers.host.bytes == 32 * 2**30
    assert config.tiers.disk is not None and config.tiers.disk.bytes == 500 * 2**30
    assert config.metrics.listen == "127.0.0.1:9464"
    assert config.mqtt.host == ""  # MQTT off until a broker is named


# -- a real Prometheus scraping a cache under load -----------------------------------------------


def _flip_every_block(shard: Path) -> None:
    with open(shard, "r+b") as f:
        for i in range(16):
            f.seek(i * NBYTES + 7)
            byte = f.read(1)
            f.seek(i * NBYTES + 7)
            f.write(bytes([byte[0] ^ 0xFF]))


class DaemonLoad:
    """A real ``tiercache serve`` process under socket-client load, for a real Prometheus.

    ``target`` is the daemon's metrics ``host:port``. A thread drives a mix of
    every event the dashboard shows, through ``tiercache.client``: saves
    (client->host), evictions and write-back (host->disk) with a 16-block host
    tier, loads from host and from disk (promoted back), lookups that hit host,
    hit disk and miss, prefetches answered early (a load well after the
    prefetch) and late (a load racing the prefetch), corrupted blocks (bytes
    flipped in a shard file, then read) and a host tier full of pinned blocks
    (host_full errors).
    """

    HOST_BLOCKS = 16
    DISK_BLOCKS = 256
    BLOCKS_PER_TURN = 4

    def __init__(self, root: Path, mqtt: MqttConfig) -> None:
        self.root = root
        self.mqtt = mqtt
        root.mkdir(parents=True, exist_ok=True)
        self.socket = root / "tc.sock"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.target = f"127.0.0.1:{s.getsockname()[1]}"
        self.rounds = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DaemonLoad:
        env = {
            **os.environ,
            "TIERCACHE_DAEMON__SOCKET": str(self.socket),
            "TIERCACHE_TIERS_DISK__URL": str(self.root / "disk"),
            "TIERCACHE_TIERS_DISK__BYTES": str(self.DISK_BLOCKS * NBYTES),
            "TIERCACHE_TIERS_HOST__BYTES": str(self.HOST_BLOCKS * NBYTES),
            "TIERCACHE_METRICS__LISTEN": self.target,
            **mqtt_env(self.mqtt),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tiercache.daemon.cli", "serve"], env=env
        )
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            assert self.proc.poll() is None, "tiercache serve exited at start"
            assert time.monotonic() < deadline, "tiercache serve did not open its socket in 60 s"
            time.sleep(0.05)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=60) == 0
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError("the load driver failed") from self.error

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            self.error = e

    async def _main(self) -> None:
        a = await AsyncClient.connect(self.socket, name="load-a")
        b = await AsyncClient.connect(self.socket, name="load-b")
        try:
            while not self._stop.is_set():
                await self._round(a, b, self.rounds)
                self.rounds += 1
                await asyncio.sleep(0.02)
        finally:
            await a.close()
            await b.close()

    def _turn(self, r: int) -> list[int]:
        return make_tokens(self.BLOCKS_PER_TURN, seed=r)

    async def _round(self, a: AsyncClient, b: AsyncClient, r: int) -> None:
        await a.save(NS, self._turn(r), make_blocks(self.BLOCKS_PER_TURN, seed=r), session=f"s{r}")
        for back in (1, 6, -1):  # host hit, disk hit, never saved (miss)
            await a.lookup(NS, self._turn(r - back if back > 0 else 10_000_000 + r))
        if r >= 5:
            await a.load(NS, self._turn(r - 1))  # from host memory
            await a.load(NS, self._turn(r - 5))  # from disk (promoted back to host)
        if r >= 8 and r % 3:
            await a.prefetch(session=f"s{r - 8}")
            await asyncio.sleep(0.05)
            await a.load(NS, self._turn(r - 8))  # early: the prefetch finished first
        elif r >= 8:
            await asyncio.gather(
                a.prefetch(session=f"s{r - 7}"), b.load(NS, self._turn(r - 7))
            )  # late
        if r % 25 == 12:
            await self._corrupt_disk(a, r)
        if r % 25 == 20:
            await self._fill_host_with_pins(a, r)

    async def _corrupt_disk(self, a: AsyncClient, r: int) -> None:
        """Flip a byte in every block of the first shard file, then read old (disk-only) turns."""
        for shard in (self.root / "disk" / "ns").glob("*/c/0/0"):
            await asyncio.to_thread(_flip_every_block, shard)
        for old in range(max(0, r - 12), r - 6):
            await a.load(NS, self._turn(old))

    async def _fill_host_with_pins(self, a: AsyncClient, r: int) -> None:
        """Pin a session as big as the host tier, so the next save finds no room (host_full)."""
        big = make_tokens(self.HOST_BLOCKS, seed=20_000_000 + r)
        await a.save(NS, big, make_blocks(self.HOST_BLOCKS, seed=r), session=f"big-{r}")
        await a.pin(f"big-{r}")
        await a.save(NS, self._turn(30_000_000 + r), make_blocks(self.BLOCKS_PER_TURN))
        await a.unpin(f"big-{r}")
        await a.evict(session=f"big-{r}")


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: Mosquitto
) -> Iterator[tuple[PrometheusServer, DaemonLoad]]:
    """A real Prometheus (1 s scrapes, the ops rules loaded) scraping a daemon under load,
    the daemon connected to a real Mosquitto."""
    root = tmp_path_factory.mktemp("live")
    with (
        DaemonLoad(root / "cache", mosquitto.config(node="live-metrics")) as load,
        running_prometheus(root / "prometheus", [load.target], rule_files=[RULES]) as prom,
    ):
        yield prom, load


@pytest.mark.slow
@pytest.mark.service
def test_prometheus_scrapes_the_exporter(live: tuple[PrometheusServer, DaemonLoad]) -> None:
    prom, load = live
    up = prom.wait_for_data('up{job="tiercache"} == 1', timeout=15)
    load.check()
    assert [s.labels["instance"] for s in up] == [load.target]


@pytest.mark.service
@pytest.mark.parametrize(
    ("where", "expr"), dashboard_targets(), ids=[w for w, _ in dashboard_targets()]
)
def test_every_dashboard_query_returns_data(
    live: tuple[PrometheusServer, DaemonLoad], where: str, expr: str
) -> None:
    prom, load = live
    found = prom.wait_for_data(as_promql(expr))
    load.check()
    assert found, f"{where}: no series with a value after 30 s of load; query: {as_promql(expr)}"


def rules() -> list[dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def _rule_id(rule: dict[str, Any]) -> str:
    return str(rule.get("record") or rule.get("alert"))


@pytest.mark.service
def test_every_rule_expression_evaluates_without_error(
    live: tuple[PrometheusServer, DaemonLoad],
) -> None:
    prom, _ = live
    for rule in rules():
        prom.query(rule["expr"])  # raises PromQLError with Prometheus' reason


@pytest.mark.service
def test_prometheus_loaded_every_rule_and_evaluates_them_healthily(
    live: tuple[PrometheusServer, DaemonLoad],
) -> None:
    prom, _ = live
    loaded = [r for g in prom.rule_groups() for r in g["rules"]]
    assert sorted(r["name"] for r in loaded) == sorted(_rule_id(r) for r in rules())
    assert {r["name"]: r.get("lastError", "") for r in loaded} == {r["name"]: "" for r in loaded}


@pytest.mark.service
def test_every_recording_rule_records_series_under_load(
    live: tuple[PrometheusServer, DaemonLoad],
) -> None:
    prom, _ = live
    empty = [r["record"] for r in rules() if "record" in r and not prom.wait_for_data(r["record"])]
    assert empty == []


@pytest.mark.service
def test_the_exporter_reports_the_load_it_saw(live: tuple[PrometheusServer, DaemonLoad]) -> None:
    prom, load = live
    # Every kind of event the load produces shows up as an increase.
    for expr in [
        'tiercache_evictions_total{tier="host"} > 0',
        # Socket clients read disk blocks promoted into the shared arena: disk->host.
        'tiercache_transfer_bytes_total{src="disk",dst="host"} > 0',
        'tiercache_lookup_blocks_total{result="miss"} > 0',
        'tiercache_prefetch_total{result="late"} > 0',
        "tiercache_corrupt_blocks_total > 0",
        'tiercache_errors_total{kind="host_full"} > 0',
        "tiercache_clients == 2",
        "tiercache_mqtt_connected == 1",
    ]:
        assert prom.wait_for_data(expr), expr
    load.check()
