"""Two ``tiercache serve`` processes on one machine (own directories and sockets) stand for two
nodes sharing a SeaweedFS bucket; credentials come from the usual AWS environment variables."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import as_bytes, make_blocks, make_ns, make_tokens
from tests.services.mosquitto import free_port
from tiercache.bench.seaweedfs import SeaweedFS
from tiercache.client import Client
from tiercache.daemon.process import DaemonProcess

pytestmark = pytest.mark.service

NS = make_ns()


def node_env(tmp_path: Path, name: str, weed: SeaweedFS, url: str, **extra: str) -> dict[str, str]:
    return {
        **weed.env(),
        "TIERCACHE_TIERS_DISK__URL": str(tmp_path / name / "disk"),
        "TIERCACHE_TIERS_HOST__BYTES": "4MiB",
        "TIERCACHE_TIERS_REMOTE__URL": url,
        **extra,
    }


def wait_uploaded(c: Client, blocks: int, limit: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + limit
    while True:
        remote = c.stats()["remote"]
        if remote["uploaded_blocks"] >= blocks and remote["queue_blocks"] == 0:
            return dict(remote)
        assert time.monotonic() < deadline, f"uploads did not finish: {remote}"
        time.sleep(0.05)


def test_a_session_saved_on_node_a_resumes_on_node_b_from_the_shared_tier(
    tmp_path: Path, seaweedfs: SeaweedFS, remote_url: str
) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    port = free_port()
    a = DaemonProcess(tmp_path / "a", node_env(tmp_path, "a", seaweedfs, remote_url))
    b = DaemonProcess(
        tmp_path / "b",
        node_env(
            tmp_path, "b", seaweedfs, remote_url, TIERCACHE_METRICS__LISTEN=f"127.0.0.1:{port}"
        ),
    )
    tokens, blocks = make_tokens(6), make_blocks(6)
    with a, b, Client(a.socket) as ca, Client(b.socket) as cb:
        ca.save(NS, tokens, blocks, session="chat-1")
        assert wait_uploaded(ca, 6)["up"] is True

        hit = cb.lookup(NS, tokens)
        got = cb.load(NS, tokens)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()

    assert hit.tiers == ["remote"] * 6
    assert got.blocks == 6 and torch.equal(got.data, as_bytes(blocks))
    assert 'tiercache_lookup_blocks_total{result="remote"} 6.0' in metrics
    assert "tiercache_remote_up 1.0" in metrics


def test_a_daemon_with_a_missing_bucket_does_not_start_and_says_why(
    tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    d = DaemonProcess(tmp_path, node_env(tmp_path, "a", seaweedfs, "s3://no-such-bucket/p"))
    with pytest.raises(RuntimeError, match="bucket 'no-such-bucket' does not exist"):
        d.start()
