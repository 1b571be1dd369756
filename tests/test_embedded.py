"""The embedded cache: the tiers a config describes, opened in-process (``open_cache``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, as_bytes, make_blocks, make_ns, make_tokens
from tiercache.daemon.config import (
    Config,
    DeviceTierConfig,
    DiskTierConfig,
    HostTierConfig,
)
from tiercache.embedded import open_cache as open_embedded

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


async def test_more_than_one_device_for_one_cache_is_a_config_error(tmp_path: Path) -> None:
    cfg = Config()
    cfg.tiers.device = DeviceTierConfig(bytes=4 * NBYTES, devices=["cuda:0", "cuda:1"])

    with pytest.raises(ValueError, match=r"^tiers\.device\.devices: one cache uses one device"):
        await open_embedded(cfg)
