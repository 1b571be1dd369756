"""The device tier in the manager (CPU twin, ``device_name="cpu"``): prefetch promotes disk ->
host -> device, a later load is served from the device byte for byte, the budget holds, and a
block that is corrupt below never reaches it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, OpenCache, as_bytes, flip_byte, make_blocks, make_ns, make_tokens
from tiercache import TierManager
from tiercache.daemon.config import Config, DeviceTierConfig, DiskTierConfig, HostTierConfig
from tiercache.embedded import open_cache as open_embedded

NS = make_ns()


async def with_device(open_cache: OpenCache, device_blocks: int, **kwargs: object) -> TierManager:
    return await open_cache(device_bytes=device_blocks * NBYTES, device_name="cpu", **kwargs)


async def on_disk_only(
    m: TierManager, session: str, n: int, seed: int
) -> tuple[list[int], torch.Tensor]:
    """Save ``n`` blocks as ``session`` and push them out of host memory (host holds 2)."""
    tokens, blocks = make_tokens(n, seed=seed), make_blocks(n, seed=seed)
    await m.save(NS, tokens, blocks, session=session)
    await m.save(NS, make_tokens(2, seed=99), make_blocks(2, seed=99))  # fills the host
    assert set((await m.lookup(NS, tokens)).tiers) == {"disk"}
    return tokens, blocks


async def test_the_device_tier_is_off_unless_configured(open_cache: OpenCache) -> None:
    m = await open_cache()

    assert m.device is None
    assert "device" not in m.usage()


async def test_prefetch_promotes_disk_to_host_to_device_and_load_is_served_from_it(
    open_cache: OpenCache,
) -> None:
    m = await with_device(open_cache, device_blocks=4, host_blocks=2)
    tokens, blocks = await on_disk_only(m, "a", 2, seed=1)

    assert await m.prefetch(session="a") == 2
    assert (await m.lookup(NS, tokens)).tiers == ["device", "device"]
    got = await m.load(NS, tokens)

    assert got.tiers == ["device", "device"]
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))
    assert m.stats.transfer_bytes[("disk", "host")] >= 2 * NBYTES
    assert m.stats.transfer_bytes[("host", "device")] == 2 * NBYTES
    assert m.stats.transfer_bytes[("device", "client")] == 2 * NBYTES
    assert m.stats.prefetch["early"] == 1  # the lead time of the prefetch was recorded
    assert m.usage()["device"] == {
        "capacity_bytes": 4 * NBYTES,
        "used_bytes": 2 * NBYTES,
        "blocks": 2,
    }


async def test_prefetch_of_host_blocks_puts_them_on_the_device(open_cache: OpenCache) -> None:
    m = await with_device(open_cache, device_blocks=4, host_blocks=4)
    tokens, blocks = make_tokens(3, seed=2), make_blocks(3, seed=2)
    await m.save(NS, tokens, blocks, session="a")

    assert await m.prefetch(session="a") == 3
    assert await m.prefetch(session="a") == 0  # already there: nothing moves
    assert m.stats.prefetch["noop"] == 1
    got = await m.load(NS, tokens)
    assert got.tiers == ["device"] * 3
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))


async def test_the_device_budget_holds_and_evicts_the_least_recent_session(
    open_cache: OpenCache,
) -> None:
    m = await with_device(open_cache, device_blocks=2, host_blocks=4)
    a, b = make_tokens(2, seed=1), make_tokens(2, seed=2)
    await m.save(NS, a, make_blocks(2, seed=1), session="a")
    await m.save(NS, b, make_blocks(2, seed=2), session="b")

    await m.prefetch(session="a")
    await m.prefetch(session="b")

    assert (await m.lookup(NS, a)).tiers == ["host", "host"]
    assert (await m.lookup(NS, b)).tiers == ["device", "device"]
    assert m.stats.evictions["device"] == 2
    assert m.usage()["device"]["used_bytes"] == 2 * NBYTES
    got = await m.load(NS, a)  # still served, from host, byte for byte
    assert torch.equal(as_bytes(got.kv()), as_bytes(make_blocks(2, seed=1)))


async def test_a_block_corrupt_on_disk_is_a_miss_and_never_reaches_the_device(
    open_cache: OpenCache,
) -> None:
    m = await with_device(open_cache, device_blocks=4, host_blocks=2, write="write-through")
    tokens, blocks = await on_disk_only(m, "a", 2, seed=3)
    e = m.index.get(NS.block_keys(tokens)[1])
    assert e is not None and e.disk is not None and m.disk is not None
    path, offset = m.disk.location(e.disk)
    flip_byte(path, offset + 100)

    assert await m.prefetch(session="a") == 1
    assert m.stats.corrupt_blocks == 1
    assert (await m.lookup(NS, tokens)).tiers == ["device"]
    got = await m.load(NS, tokens)
    assert got.tiers == ["device"]
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks[:1]))


async def test_evicting_a_session_drops_its_device_copies(open_cache: OpenCache) -> None:
    m = await with_device(open_cache, device_blocks=4, host_blocks=4)
    tokens = make_tokens(2, seed=4)
    await m.save(NS, tokens, make_blocks(2, seed=4), session="a")
    await m.prefetch(session="a")

    assert await m.evict(session="a") == 2
    assert (await m.lookup(NS, tokens)).blocks == 0
    assert m.usage()["device"]["used_bytes"] == 0


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


async def test_more_than_one_device_for_one_cache_is_a_config_error(tmp_path: Path) -> None:
    cfg = Config()
    cfg.tiers.device = DeviceTierConfig(bytes=4 * NBYTES, devices=["cuda:0", "cuda:1"])

    with pytest.raises(ValueError, match=r"^tiers\.device\.devices: one cache uses one device"):
        await open_embedded(cfg)
