"""The embedded cache: the tiers a config describes, opened in-process (``open_cache``) or behind
the blocking ``SyncCache``, and the shared tier's settings passed on as they are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, as_bytes, embedded_config, make_blocks, make_ns, make_tokens
from tiercache.daemon.config import (
    Config,
    ConfigError,
    DeviceTierConfig,
    DiskTierConfig,
    HostTierConfig,
    RemoteTierConfig,
    load_config,
)
from tiercache.embedded import SyncCache, remote_options
from tiercache.embedded import open_cache as open_embedded
from tiercache.errors import CacheError
from tiercache.tiers.host import shm_free

NS = make_ns()


async def test_embedded_config_builds_the_device_tier(tmp_path: Path) -> None:
    cfg = Config()
    cfg.tiers.host = HostTierConfig(bytes=4 * NBYTES)
    cfg.tiers.disk = DiskTierConfig(url=str(tmp_path / "disk"), bytes=64 * NBYTES)
    cfg.tiers.device = DeviceTierConfig(bytes=4 * NBYTES, devices=["cpu"])
    m = await open_embedded(cfg)
    try:
        tokens, blocks = make_tokens(2, seed=5), make_blocks(2, seed=5)
        await m.save(NS, tokens, blocks, session="s")
        await m.prefetch(session="s")
        got = await m.load(NS, tokens)
    finally:
        await m.close()

    assert m.device is not None and m.device.device == torch.device("cpu")
    assert got.tiers == ["device", "device"]
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))


def test_more_than_one_device_for_one_cache_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^tiers\.device\.devices: one cache uses one device"):
        DeviceTierConfig(bytes=4 * NBYTES, devices=["cuda:0", "cuda:1"])
    DeviceTierConfig(bytes=0, devices=["cuda:0", "cuda:1"])  # no device tier: nothing to refuse


async def test_a_config_without_a_disk_tier_opens_a_host_only_cache() -> None:
    cfg = Config()
    cfg.tiers.host = HostTierConfig(bytes=4 * NBYTES)
    cfg.tiers.disk = None
    m = await open_embedded(cfg)
    try:
        tokens, blocks = make_tokens(2, seed=6), make_blocks(2, seed=6)
        await m.save(NS, tokens, blocks)
        got = await m.load(NS, tokens)
        assert got.tiers == ["host", "host"]
        assert m.disk is None and m.device is None
    finally:
        await m.close()


def test_the_sync_cache_saves_and_loads_byte_exact_and_keeps_its_disk_across_a_reopen(
    tmp_path: Path,
) -> None:
    tokens, blocks = make_tokens(3, seed=7), make_blocks(3, seed=7)
    cache = SyncCache(embedded_config(tmp_path, write="write-through"))
    try:
        cache.save(NS, tokens, blocks, session="chat")
        assert cache.lookup(NS, tokens).blocks == 3
        got = cache.load(NS, tokens)
        assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))
    finally:
        cache.close()

    again = SyncCache(embedded_config(tmp_path))
    try:
        engine = torch.zeros_like(blocks)  # the resume lands in the engine's own blocks
        got = again.load(NS, tokens, into=engine)
        assert got.tiers == ["disk"] * 3
        assert torch.equal(as_bytes(engine), as_bytes(blocks))
    finally:
        again.close()


def test_a_sync_cache_that_cannot_open_raises_and_leaves_no_loop_thread_behind() -> None:
    import threading

    cfg = Config()
    cfg.tiers.host = HostTierConfig(bytes=shm_free() + 2**30, shared=True)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(ValueError, match=r"lower \[tiers.host\] bytes or enlarge /dev/shm"):
        SyncCache(cfg)
    assert "tiercache-loop" not in {t.name for t in threading.enumerate()} - before


def test_a_closed_sync_cache_says_so_and_closing_it_again_does_nothing(tmp_path: Path) -> None:
    cache = SyncCache(embedded_config(tmp_path))
    with cache:
        cache.save(NS, make_tokens(2), make_blocks(2))
        cache.close()  # closed in the block, closed again by the with: once
    with pytest.raises(CacheError, match="this SyncCache is closed"):
        cache.lookup(NS, make_tokens(2))


def test_closing_a_sync_cache_waits_for_a_call_another_thread_has_in_flight() -> None:
    import asyncio
    import threading

    # No disk tier: its close takes no lock (a flush would), so it could end first.
    env = {"TIERCACHE_TIERS_DISK__URL": "none", "TIERCACHE_TIERS_HOST__BYTES": "1MiB"}
    cache = SyncCache(load_config(env=env))
    tokens = make_tokens(2)
    cache.save(NS, tokens, make_blocks(2))
    held, release = threading.Event(), asyncio.Event()

    async def busy() -> None:  # another request holds the cache lock for a while
        async with cache.manager._lock:
            held.set()
            await release.wait()

    loop = cache._thread.loop
    asyncio.run_coroutine_threadsafe(busy(), loop)
    held.wait()
    got: list[list[str]] = []
    reader = threading.Thread(
        target=lambda: got.append(cache.lookup(NS, tokens).tiers), daemon=True
    )
    reader.start()

    async def tasks() -> int:  # on the loop besides this one
        return len(asyncio.all_tasks()) - 1

    while asyncio.run_coroutine_threadsafe(tasks(), loop).result() < 2:
        reader.join(0.01)  # until the lookup is on the loop, waiting for the lock
    closer = threading.Thread(target=cache.close, daemon=True)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # it waits for the lookup, which waits for the lock
    loop.call_soon_threadsafe(release.set)
    closer.join(30)
    reader.join(30)
    assert not reader.is_alive() and not closer.is_alive()
    assert got == [["host", "host"]]


def test_remote_options_carry_the_remote_tiers_settings_over() -> None:
    cfg = RemoteTierConfig(
        url="s3://bucket/prefix",
        endpoint="http://127.0.0.1:8333",
        region="eu-west-1",
        key_id="AKIA",
        secret_file="/run/secrets/s3",
        timeout=3.5,
    )
    opts = remote_options(cfg)
    assert (opts.endpoint, opts.region, opts.key_id, opts.secret_file, opts.timeout) == (
        "http://127.0.0.1:8333",
        "eu-west-1",
        "AKIA",
        "/run/secrets/s3",
        3.5,
    )
