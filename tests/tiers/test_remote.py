"""Retention: which blocks go (by age, then oldest beyond a size), and that nothing else does."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import obstore
import pytest
import torch
from zarr.core.buffer import default_buffer_prototype

from tests.conftest import NBYTES, as_bytes, make_blocks, make_ns, make_tokens
from tests.services.seaweedfs import BUCKET, objects, options, slow_gateway
from tiercache import TierManager
from tiercache.bench.seaweedfs import SeaweedFS
from tiercache.sharing import Sharing
from tiercache.tiers.disk import StoreError
from tiercache.tiers.remote import (
    MARKER,
    MAX_BACKOFF,
    TRAILER_BYTES,
    RemoteOptions,
    RemoteTier,
    StoredBlock,
    plan_retention,
    retention,
)


def block(path: str, written: float, size: int = 10) -> StoredBlock:
    return StoredBlock(path, "ab", size, written)


def test_age_removes_exactly_the_blocks_written_before_the_cutoff() -> None:
    blocks = [block("a", 100), block("b", 150), block("c", 200)]
    assert plan_retention(blocks, now=260, max_age=100) == [block("a", 100), block("b", 150)]


def test_size_removes_the_oldest_until_the_rest_fit() -> None:
    blocks = [block("c", 300), block("a", 100), block("b", 200, size=25), block("d", 400)]
    # 55 bytes: without a (45) and b (20) the rest fits in 25; c and d stay.
    assert plan_retention(blocks, now=400, max_bytes=25) == [
        block("a", 100),
        block("b", 200, size=25),
    ]


def test_age_then_size_and_ties_broken_by_path() -> None:
    blocks = [block("y", 200), block("x", 200), block("old", 10), block("z", 300)]
    assert plan_retention(blocks, now=300, max_age=100, max_bytes=20) == [
        block("old", 10),
        block("x", 200),
    ]


def test_no_limits_remove_nothing() -> None:
    assert plan_retention([block("a", 0)], now=1e9) == []


@pytest.mark.service
async def test_retention_removes_old_blocks_of_a_namespace_and_nothing_else(
    open_node: Any,
) -> None:
    a = await open_node("a")
    one, two = make_ns(salt="one"), make_ns(salt="two")
    await a.save(one, make_tokens(3, seed=1), make_blocks(3, seed=1))
    await a.save(two, make_tokens(2, seed=2), make_blocks(2, seed=2))
    assert await a.shared.drain(30) == 0
    await obstore.put_async(a.remote.obj, "ns/notes.txt", b"an operator's note")
    await obstore.put_async(a.remote.obj, f"ns/{one.hex}/b/not-a-key", b"someone else's")
    before = await objects(a, "")

    report = await retention(a.remote, max_age=60, now=time.time() + 3600, namespace=one.hex)

    gone = {p for p in before if p.startswith(f"ns/{one.hex}/b/") and not p.endswith("not-a-key")}
    assert len(gone) == 3 and set(report.removed_paths) == gone
    assert await objects(a, "") == sorted(set(before) - gone)
    assert (report.removed, report.removed_bytes) == (3, 3 * (NBYTES + TRAILER_BYTES))


@pytest.mark.service
async def test_retention_by_size_keeps_what_fits_across_namespaces(open_node: Any) -> None:
    a = await open_node("a")
    one, two = make_ns(salt="one"), make_ns(salt="two")
    await a.save(one, make_tokens(3, seed=1), make_blocks(3, seed=1))
    await a.save(two, make_tokens(2, seed=2), make_blocks(2, seed=2))
    assert await a.shared.drain(30) == 0

    report = await retention(a.remote, max_bytes=2 * (NBYTES + TRAILER_BYTES))

    assert (report.scanned, report.removed, report.kept) == (5, 3, 2)
    assert len(await objects(a, "ns/")) == 2 + 2  # two blocks and the two namespace groups


@pytest.mark.service
@pytest.mark.parametrize(
    ("limits", "wrong"),
    [
        ({"max_age": -60}, "max_age and max_bytes must be >= 0"),
        ({"max_bytes": -1}, "max_age and max_bytes must be >= 0"),
        ({"max_age": 60, "namespace": "not-a-namespace"}, "'not-a-namespace' is not a namespace"),
    ],
)
async def test_retention_refuses_limits_that_would_remove_everything_or_nothing(
    open_node: Any, limits: dict[str, Any], wrong: str
) -> None:
    a = await open_node("a")
    await a.save(NS, make_tokens(3), make_blocks(3))
    assert await a.shared.drain(30) == 0

    with pytest.raises(ValueError, match=wrong):
        await retention(a.remote, **limits)

    assert len(await objects(a, f"ns/{NS.hex}/b/")) == 3


# ------------------------------------------------------------------------------------------------
# The shared tier failing: down, killed mid-write, restarted, refusing, missing, black-holed.
# ------------------------------------------------------------------------------------------------


NS = make_ns()


async def until(cond: Callable[[], bool], limit: float = 30.0) -> None:
    async with asyncio.timeout(limit):
        # Polled: the conditions are plain counters, with no event to wait on.
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.service
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


async def open_unanswered(
    tmp_path: Path, endpoint: str, prefix: str, host_blocks: int, deadline: float = 1.0, **kw: Any
) -> TierManager:
    """A manager whose shared tier is ``endpoint`` (a store that hangs or refuses), with
    credentials that are never checked."""
    (tmp_path / "secret").write_text("s")
    opts = RemoteOptions(endpoint=endpoint, key_id="k", secret_file=str(tmp_path / "secret"))
    return await TierManager.open(
        host_bytes=host_blocks * NBYTES,
        remote_url=f"s3://{BUCKET}/{prefix}",
        remote_options=dataclasses.replace(opts, timeout=deadline),
        **kw,
    )


async def test_a_hung_store_costs_a_lookup_at_most_one_deadline_and_local_hits_are_served(
    tmp_path: Path, black_hole: str
) -> None:
    m = await open_unanswered(tmp_path, black_hole, "hung", 16, deadline=0.3)
    try:
        assert m.remote is not None and not m.remote.up  # started without it
        tokens = make_tokens(4)
        await m.save(NS, tokens[:8], make_blocks(2))
        for _ in range(5):
            assert (await m.lookup(NS, tokens)).tiers == ["host", "host"]
        assert m.stats.errors["remote_timeout"] <= 1
    finally:
        await m.close(flush=False)


@pytest.mark.service
async def test_a_store_back_is_found_up_with_nothing_to_upload_or_fetch(
    tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    # Down at start (nothing listens on its port), then it answers; the node has no traffic.
    # Only requests probed the store, so an idle node said "down" (and kept the
    # TierCacheSharedTierDown alert firing) for as long as it was idle.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = await TierManager.open(
        host_bytes=4 * NBYTES,
        remote_url=f"s3://{BUCKET}/back",
        remote_options=dataclasses.replace(
            options(seaweedfs, timeout=0.5), endpoint=f"http://127.0.0.1:{port}"
        ),
    )
    try:
        assert m.remote is not None and not m.remote.up
        async with slow_gateway(seaweedfs, 0, port):
            await until(lambda: m.remote is not None and m.remote.up, limit=4 * MAX_BACKOFF)
    finally:
        await m.close()


async def test_close_reports_the_blocks_of_an_upload_batch_stalled_in_flight(
    tmp_path: Path, black_hole: str
) -> None:
    m = await open_unanswered(tmp_path, black_hole, "stalled", 32)
    assert m.shared is not None
    await m.save(NS, make_tokens(20), make_blocks(20))
    await until(lambda: m.shared is not None and m.shared.uploads.in_flight > 0)

    await m.close(flush=False)

    # Every saved block is either uploaded or reported, the batch in flight included.
    assert m.shared.uploads.uploaded == 0
    assert m.shared.state()["dropped_blocks"] == {"shutdown": 20}


async def test_a_failed_upload_batch_keeps_its_place_in_the_queue_bound(
    tmp_path: Path, black_hole: str
) -> None:
    m = await open_unanswered(tmp_path, black_hole, "bound", 64, sharing=Sharing(queue_blocks=20))
    try:
        assert m.shared is not None
        queue = m.shared.uploads
        first = make_tokens(20, seed=1)
        await m.save(NS, first, make_blocks(20, seed=1))  # all accepted
        await until(lambda: len(queue) == 4)  # a batch of 16 in flight, stalled

        await m.save(NS, make_tokens(16, seed=2), make_blocks(16, seed=2))  # no room: refused
        assert queue.dropped == {"queue_full": 16}
        await until(lambda: m.stats.errors["remote_write"] > 0)  # the batch failed: put back

        assert all(k in queue for k in NS.block_keys(first)) and len(queue) == 20
        assert queue.dropped == {"queue_full": 16}
    finally:
        await m.close(flush=False)


async def test_a_failed_batch_doubles_the_backoff_once_not_once_per_block(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: every request is refused at once
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}"
    m = await open_unanswered(tmp_path, refused, "refused", 32, deadline=RemoteOptions().timeout)
    try:
        assert m.remote is not None and m.remote.backoff == 0.1  # the marker's PUT failed
        await m.save(NS, make_tokens(16), make_blocks(16))
        await until(lambda: m.stats.errors["remote_write"] == 16)  # one batch, all refused

        # The store is retried in 0.2 s, not MAX_BACKOFF: the batch was one failed probe.
        assert m.remote.backoff == 0.2
    finally:
        await m.close(flush=False)


@pytest.mark.service
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


@pytest.mark.service
async def test_no_credentials_at_all_are_a_clear_error_at_open_not_a_store_down(
    tmp_path: Path, seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no key configured anywhere obstore asks EC2's metadata service (here a port
    # nothing listens on, as off EC2); the tier started "unreachable" and stayed down.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_METADATA_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    with pytest.raises(StoreError, match=r"no credentials; set \[tiers.remote\] key_id and"):
        await TierManager.open(
            host_bytes=4 * NBYTES,
            remote_url=f"s3://{BUCKET}/x",
            remote_options=RemoteOptions(endpoint=seaweedfs.endpoint),
        )


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8333", "s3.example.com", "ftp://host:21"])
async def test_an_endpoint_from_the_environment_without_http_is_a_clear_error_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint: str
) -> None:
    # The config checks [tiers.remote] endpoint; AWS_ENDPOINT_URL reaches obstore unchecked,
    # which panicked on every request, and the tier started "unreachable".
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    (tmp_path / "secret").write_text("s")
    opts = RemoteOptions(key_id="k", secret_file=str(tmp_path / "secret"))
    with pytest.raises(StoreError, match=f"AWS_ENDPOINT_URL '{endpoint}' is not http"):
        await TierManager.open(
            host_bytes=4 * NBYTES, remote_url=f"s3://{BUCKET}/x", remote_options=opts
        )


@pytest.mark.service
async def test_a_missing_bucket_is_a_clear_error_at_open(
    tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist at http://127"):
        await TierManager.open(
            host_bytes=4 * NBYTES,
            remote_url="s3://no-such-bucket/x",
            remote_options=options(seaweedfs),
        )


@pytest.mark.service
@pytest.mark.parametrize("marker", [b'{"format": 2}', b"not json", b'{"format": "1"}'])
async def test_a_prefix_a_newer_release_laid_out_is_refused_not_overwritten(
    seaweedfs: SeaweedFS, marker: bytes
) -> None:
    url = f"s3://{BUCKET}/marker-{len(marker)}"
    tier = await RemoteTier.open(url, options(seaweedfs))  # writes format 1: opens again
    await RemoteTier.open(url, options(seaweedfs))
    await tier._put(MARKER, marker)
    with pytest.raises(StoreError, match=f"{MARKER} says format .*this tiercache reads format 1"):
        await RemoteTier.open(url, options(seaweedfs))
    got = await tier.store.get(MARKER, prototype=default_buffer_prototype())
    assert got is not None and got.to_bytes() == marker  # left as it was
