"""The shared tier failing: down, killed mid-write, restarted, refusing, missing, black-holed."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import NBYTES, as_bytes, make_blocks, make_ns, make_tokens
from tests.remote.conftest import BUCKET, options
from tests.remote.test_shared_tier import objects
from tiercache import TierManager
from tiercache.bench.seaweedfs import SeaweedFS
from tiercache.sharing import Sharing
from tiercache.tiers.disk import StoreError
from tiercache.tiers.remote import RemoteOptions

NS = make_ns()


async def until(cond: Callable[[], bool], limit: float = 30.0) -> None:
    async with asyncio.timeout(limit):
        # Polled: the conditions are plain counters, with no event to wait on.
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_a_store_killed_mid_upload_stalls_nothing_serves_nothing_torn_and_recovers(
    open_node: Any, own_seaweedfs: SeaweedFS
) -> None:
    a = await open_node("a", weed=own_seaweedfs, host_blocks=16, sharing=Sharing(queue_blocks=150))
    tokens, blocks = make_tokens(200), make_blocks(200)
    await a.save(NS, tokens[: 100 * 4], blocks[:100])  # most go to disk; uploads read them back
    own_seaweedfs.kill()  # with uploads in flight
    await until(lambda: not a.remote.up)

    # Down: saves and loads are local and whole; offers beyond the queue's bound are counted.
    dropped = a.shared.uploads.dropped["queue_full"]
    await a.save(NS, tokens, blocks)
    got = await a.load(NS, tokens)
    assert got.blocks == 200 and torch.equal(got.data, as_bytes(blocks))
    assert a.shared.uploads.dropped["queue_full"] > dropped and len(a.shared.uploads) <= 150

    await asyncio.to_thread(own_seaweedfs.start)  # the daemon finds it again by itself
    assert await a.shared.drain(120) == 0
    assert a.remote.up and a.stats.errors["remote_write"] >= 1
    stored = await objects(a, f"ns/{NS.hex}/b/")
    assert len(stored) >= a.shared.uploads.uploaded >= 150

    # Whatever a second node is served is exactly what was saved.
    b = await open_node("b", weed=own_seaweedfs, host_blocks=256)
    got = await b.load(NS, tokens)
    assert got.blocks >= 100 and torch.equal(got.data, as_bytes(blocks[: got.blocks]))
    assert b.stats.corrupt_blocks == 0


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint that accepts connections and never answers: a store that hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_a_hung_store_costs_a_lookup_at_most_one_deadline_and_local_hits_are_served(
    tmp_path: Path, black_hole: str
) -> None:
    (tmp_path / "secret").write_text("s")
    opts = RemoteOptions(endpoint=black_hole, key_id="k", secret_file=str(tmp_path / "secret"))
    m = await TierManager.open(
        host_bytes=16 * NBYTES,
        remote_url=f"s3://{BUCKET}/hung",
        remote_options=dataclasses.replace(opts, timeout=0.3),
    )
    try:
        assert m.remote is not None and not m.remote.up  # started without it
        tokens = make_tokens(4)
        await m.save(NS, tokens[:8], make_blocks(2))
        for _ in range(5):
            assert (await m.lookup(NS, tokens)).tiers == ["host", "host"]
        assert m.stats.errors["remote_timeout"] <= 1
    finally:
        await m.close(flush=False)


async def test_bad_credentials_are_a_clear_error_at_open(
    tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    (tmp_path / "secret").write_text("not-the-secret")
    opts = RemoteOptions(
        endpoint=seaweedfs.endpoint, key_id="nobody", secret_file=str(tmp_path / "secret")
    )
    with pytest.raises(StoreError, match=r"refused the credentials .*key_id and secret_file"):
        await TierManager.open(
            host_bytes=4 * NBYTES,
            disk_url=str(tmp_path / "disk"),
            disk_bytes=64 * NBYTES,
            remote_url=f"s3://{BUCKET}/x",
            remote_options=opts,
        )
    # The disk tier was released: the operator can fix the config and start again.
    m = await TierManager.open(
        host_bytes=4 * NBYTES, disk_url=str(tmp_path / "disk"), disk_bytes=64 * NBYTES
    )
    await m.close()


async def test_a_missing_bucket_is_a_clear_error_at_open(
    tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist at http://127"):
        await TierManager.open(
            host_bytes=4 * NBYTES,
            remote_url="s3://no-such-bucket/x",
            remote_options=options(seaweedfs, tmp_path),
        )
