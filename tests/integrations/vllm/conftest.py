"""A real daemon for the connector's side tests (scheduler, worker): a shared host arena, a
local disk tier. The engine tests start their own (their ``daemon`` fixture overrides this)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import NBYTES
from tiercache.daemon.process import DaemonProcess


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = tmp_path_factory.mktemp("vllm-side-daemon")
    env = {
        "TIERCACHE_TIERS_HOST__BYTES": str(64 * NBYTES),
        "TIERCACHE_TIERS_HOST__SHARED": "true",
        "TIERCACHE_TIERS_DISK__URL": str(d / "disk"),
        "TIERCACHE_TIERS_DISK__BYTES": str(256 * NBYTES),
    }
    with DaemonProcess(d, env) as daemon:
        yield daemon
