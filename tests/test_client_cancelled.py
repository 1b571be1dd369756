"""Callers that give up halfway: a cancelled request or save leaves the cache and the
connection as if it had never been made (no slot kept, no reply handed to the next request)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import NBYTES, as_bytes, make_blocks, make_ns, make_tokens
from tiercache.client import AsyncClient
from tiercache.daemon.config import load_config
from tiercache.daemon.service import Daemon
from tiercache.manager import TierManager

NS = make_ns()


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    env = {
        "TIERCACHE_DAEMON__SOCKET": str(tmp_path / "tc.sock"),
        "TIERCACHE_TIERS_HOST__BYTES": str(8 * NBYTES),
        "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk"),
        "TIERCACHE_METRICS__LISTEN": "",
    }
    d = Daemon(load_config(env=env))
    await d.start()
    yield d
    await d.shutdown()


async def _waiting(task: asyncio.Task[object]) -> None:
    for _ in range(50):  # let it reach the lock (or the socket) and block there
        await asyncio.sleep(0.01)
    assert not task.done()


async def test_a_cancelled_request_does_not_hand_its_reply_to_the_next(daemon: Daemon) -> None:
    c = await AsyncClient.connect(daemon.config.daemon.socket)
    tokens, other = make_tokens(2), make_tokens(3, seed=7)
    await c.save(NS, tokens, make_blocks(2))
    manager = daemon.manager
    assert manager is not None
    async with manager._lock:  # the daemon is busy: the lookup's reply comes late
        slow = asyncio.create_task(c.lookup(NS, tokens))
        await _waiting(slow)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
    # The late reply (2 blocks found) is on the wire before this one's: it must be dropped.
    assert (await c.lookup(NS, other)).blocks == 0
    got = await c.load(NS, tokens)
    assert got.blocks == 2 and got.data.equal(as_bytes(make_blocks(2)))
    await c.close()


async def test_a_save_whose_commit_is_cancelled_leaves_nothing_reserved_in_the_daemon(
    daemon: Daemon,
) -> None:
    c = await AsyncClient.connect(daemon.config.daemon.socket)
    manager = daemon.manager
    assert manager is not None
    async with manager._lock:  # reserve waits too: cancel the save while it waits somewhere
        save = asyncio.create_task(c.save(NS, make_tokens(2), make_blocks(2)))
        await _waiting(save)
        save.cancel()
        with pytest.raises(asyncio.CancelledError):
            await save
    for _ in range(50):
        await asyncio.sleep(0.01)
    assert manager.host.free_slots == manager.host.num_slots == 8
    assert (await c.lookup(NS, make_tokens(3, seed=9))).blocks == 0  # the connection is in step
    await c.close()


async def test_a_reservation_whose_reply_the_next_request_reads_is_given_back(
    daemon: Daemon,
) -> None:
    c = await AsyncClient.connect(daemon.config.daemon.socket)
    await c.register(NS)
    manager = daemon.manager
    assert manager is not None
    async with manager._lock:  # the reserve's reply comes late
        save = asyncio.create_task(c.save(NS, make_tokens(2), make_blocks(2)))
        await _waiting(save)
        # Queued on the connection behind the reserve: when the save is cancelled, this
        # request reads the reserve's late reply before its own, and must undo it.
        lookup = asyncio.create_task(c.lookup(NS, make_tokens(3, seed=9)))
        await _waiting(lookup)
        save.cancel()
        with pytest.raises(asyncio.CancelledError):
            await save
    assert (await lookup).blocks == 0  # its own reply, not the reservation's
    for _ in range(50):
        if manager.host.free_slots == manager.host.num_slots:
            break
        await asyncio.sleep(0.01)
    assert manager.host.free_slots == manager.host.num_slots == 8
    assert not c._late  # nothing left waiting for a reply
    await c.close()


async def _two_saved(daemon: Daemon) -> tuple[AsyncClient, list[int], TierManager]:
    """A client of ``daemon`` that saved two blocks: it, their tokens, the daemon's cache."""
    c = await AsyncClient.connect(daemon.config.daemon.socket)
    tokens = make_tokens(2)
    await c.save(NS, tokens, make_blocks(2))
    assert daemon.manager is not None
    return c, tokens, daemon.manager


async def _released(manager: TierManager, blocks: int) -> None:
    """Wait for the daemon to end every lease (a release may land after its caller left)."""
    for _ in range(50):
        if all(e.leases == 0 for e in manager.index):
            break
        await asyncio.sleep(0.01)
    assert [e.leases for e in manager.index] == [0] * blocks  # evictable again


async def test_a_load_cancelled_while_its_lease_is_on_its_way_gives_the_lease_back(
    daemon: Daemon,
) -> None:
    c, tokens, manager = await _two_saved(daemon)
    async with manager._lock:  # the acquire's reply comes late
        load = asyncio.create_task(c.load(NS, tokens))
        await _waiting(load)
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
    assert (await c.lookup(NS, make_tokens(3, seed=9))).blocks == 0  # reads the late lease
    await _released(manager, 2)
    assert not c._late
    await c.close()


async def test_a_load_cancelled_while_its_release_waits_behind_another_request_still_releases(
    daemon: Daemon,
) -> None:
    # The release was cut short before it was sent: the blocks stayed leased (unevictable)
    # for as long as the client stayed connected.
    c, tokens, manager = await _two_saved(daemon)
    busy, done = asyncio.Event(), asyncio.Event()

    async def busy_daemon() -> None:
        async with manager._lock:
            busy.set()
            await done.wait()

    held: list[asyncio.Future[None]] = []

    def consume(row: int, rows: object) -> None:  # the lease is used: now the daemon is busy
        held.append(asyncio.ensure_future(busy_daemon()))

    load = asyncio.create_task(c.load_into(NS, tokens, consume))
    await asyncio.sleep(0)  # the load's acquire is on its way, holding the connection
    other = asyncio.create_task(c.touch(NS, tokens))  # next on the connection, before the release
    await busy.wait()
    await _waiting(load)  # its release waits for the touch, which waits for the busy daemon
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    done.set()
    assert await other == 2
    await _released(manager, 2)
    assert await c.evict(keys=[e.key for e in manager.index]) == 2
    await c.close()
