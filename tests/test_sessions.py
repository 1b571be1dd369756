"""Sessions (tiercache/sessions.py): names over chains of keys, pins counted on the index's keys,
TTLs and their deadlines, and records on a real disk tier that survive a restart."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import NBYTES, key
from tiercache.errors import SessionPinned, UnknownSession
from tiercache.index import HOST, Entry, Index
from tiercache.keys import BlockKey
from tiercache.sessions import Session, Sessions
from tiercache.stats import Stats
from tiercache.tiers.disk import DiskTier


def keys(*ids: int) -> list[BlockKey]:
    return [key(i) for i in ids]


class RecordingDisk(DiskTier):
    """A real disk tier that also logs which session records were written or deleted."""

    writes: list[str]

    async def put_session(
        self, sid: str, keys: list[BlockKey], pinned: bool, expires: float | None
    ) -> None:
        self.writes.append(f"put {sid}")
        await super().put_session(sid, keys, pinned, expires)

    async def delete_session(self, sid: str) -> None:
        self.writes.append(f"delete {sid}")
        await super().delete_session(sid)


class BrokenDisk(DiskTier):
    """A disk tier whose session store fails (a full or read-only device)."""

    async def put_session(
        self, sid: str, keys: list[BlockKey], pinned: bool, expires: float | None
    ) -> None:
        raise OSError(28, "No space left on device")

    async def delete_session(self, sid: str) -> None:
        raise OSError(30, "Read-only file system")


@pytest.fixture
async def disk(tmp_path: Path) -> AsyncIterator[RecordingDisk]:
    d = await RecordingDisk.open(str(tmp_path / "disk"), 16 * NBYTES)
    assert isinstance(d, RecordingDisk)
    d.writes = []
    yield d
    await d.close()


def stored(index: Index, *ids: int) -> Index:
    """``index`` holding blocks ``ids`` (in host slots; where does not matter here)."""
    for i in ids:
        index.add(Entry(key(i), "ns/test", NBYTES, at={HOST: i}))
    return index


def pins(index: Index) -> dict[int, int]:
    return {int.from_bytes(k, "little"): n for k, n in index.pins.items()}


# --- names and chains ----------------------------------------------------------------------------


async def test_an_unknown_session_is_named_in_the_error() -> None:
    s = Sessions(Index(), None, Stats())
    with pytest.raises(UnknownSession) as err:
        s.get("chat-1")
    assert str(err.value) == "unknown session 'chat-1'"
    for op in (s.pin("chat-1"), s.unpin("chat-1"), s.set_ttl("chat-1", 5), s.forget("chat-1")):
        with pytest.raises(UnknownSession, match=r"^unknown session 'chat-1'$"):
            await op


async def test_extend_makes_a_session_with_its_chain() -> None:
    s = Sessions(Index(), None, Stats())
    sess = await s.extend("chat-1", keys(1, 2))
    assert sess == Session("chat-1", {"": keys(1, 2)})  # one chain, of the default namespace
    assert s.get("chat-1") is sess is s["chat-1"]
    assert "chat-1" in s and "chat-2" not in s
    assert len(s) == 1
    assert list(s) == [sess]


async def test_a_longer_or_equally_long_chain_replaces_a_shorter_one_never_the_reverse(
    disk: RecordingDisk,
) -> None:
    s = Sessions(Index(), disk, Stats())
    await s.extend("chat", keys(1, 2))
    await s.extend("chat", keys(1, 2, 3))  # the conversation went on
    await s.extend("chat", keys(1, 2, 4))  # a regenerated last turn
    assert s.get("chat").keys == keys(1, 2, 4)
    await s.extend("chat", keys(1))  # a shorter chain (an earlier turn saved late)
    await s.extend("chat", keys(1, 2, 4))  # the same chain again
    assert s.get("chat").keys == keys(1, 2, 4)
    assert disk.writes == ["put chat"] * 3  # persisted on each change only


async def test_iteration_is_a_snapshot_so_sessions_may_be_forgotten_during_it() -> None:
    s = Sessions(Index(), None, Stats())
    for sid in ("a", "b", "c"):
        await s.extend(sid, keys(1))
    assert [await s.forget(sess.id) for sess in s] == [[], [], keys(1)]
    assert len(s) == 0


# --- pins ----------------------------------------------------------------------------------------


async def test_pin_counts_each_key_once_and_returns_how_many_blocks_are_stored(
    disk: RecordingDisk,
) -> None:
    index = stored(Index(), 1, 3)
    s = Sessions(index, disk, Stats())
    await s.extend("chat", keys(1, 2, 3))
    assert await s.pin("chat") == 2
    assert pins(index) == {1: 1, 2: 1, 3: 1}
    assert s.get("chat").pinned
    assert await s.pin("chat") is None  # already pinned: no second count
    assert pins(index) == {1: 1, 2: 1, 3: 1}
    assert disk.writes == ["put chat", "put chat"]


async def test_a_pinned_key_is_not_evictable_until_its_last_pin_goes() -> None:
    index = stored(Index(), 1, 2, 3)
    s = Sessions(index, None, Stats())
    await s.extend("a", keys(1, 2))
    await s.extend("b", keys(1, 2, 3))
    await s.pin("a")
    await s.pin("b")
    assert pins(index) == {1: 2, 2: 2, 3: 1}
    assert s.pinned_blocks() == 3
    assert await s.unpin("a") == 2
    assert pins(index) == {1: 1, 2: 1, 3: 1}
    assert not any(index.evictable(e) for e in index)
    assert await s.unpin("b") == 3
    assert index.pins == {}  # no zero counts left behind
    assert all(index.evictable(e) for e in index)
    assert s.pinned_blocks() == 0


async def test_unpin_of_an_unpinned_session_is_zero_and_writes_nothing(
    disk: RecordingDisk,
) -> None:
    s = Sessions(stored(Index(), 1), disk, Stats())
    await s.extend("chat", keys(1))
    assert await s.unpin("chat") == 0
    assert disk.writes == ["put chat"]


async def test_pin_keys_pins_only_the_keys_a_chain_gained() -> None:
    index = stored(Index(), 1, 2, 3)
    s = Sessions(index, None, Stats())
    await s.extend("chat", keys(1, 2))
    await s.pin("chat")
    sess = await s.extend("chat", keys(1, 2, 3, 4))
    assert s.pin_keys(sess) == 1  # key 3 is stored, key 4 is not yet
    assert pins(index) == {1: 1, 2: 1, 3: 1, 4: 1}
    assert s.pin_keys(sess) == 0


async def test_a_replaced_chain_s_keys_lose_the_pin_as_they_do_across_a_restart(
    disk: RecordingDisk,
) -> None:
    index = stored(Index(), 1, 2, 3, 4)
    s = Sessions(index, disk, Stats())
    await s.extend("chat", keys(1, 2, 3))
    await s.pin("chat")
    sess = await s.extend("chat", keys(1, 2, 4))  # a regenerated last turn
    s.pin_keys(sess)  # as its commit does
    assert pins(index) == {1: 1, 2: 1, 4: 1}
    assert sess.pinned_keys == set(keys(1, 2, 4))
    restarted = stored(Index(), 1, 2, 3, 4)
    await Sessions(restarted, disk, Stats()).restore()
    assert pins(restarted) == pins(index)


async def test_a_pin_stays_on_the_key_when_its_block_is_dropped_and_saved_again() -> None:
    index = stored(Index(), 1)
    s = Sessions(index, None, Stats())
    await s.extend("chat", keys(1))
    await s.pin("chat")
    e = index.get(key(1))
    assert e is not None
    e.at.clear()
    index.drop_if_empty(e)
    assert s.pinned_blocks() == 0
    stored(index, 1)
    assert s.pinned_blocks() == 1
    assert not index.evictable(index.get(key(1)))  # type: ignore[arg-type]


# --- TTLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0, -1.5, math.nan, math.inf])
async def test_a_ttl_must_be_positive_and_finite(seconds: float) -> None:
    s = Sessions(Index(), None, Stats())
    await s.extend("chat", [])
    with pytest.raises(ValueError) as err:
        await s.set_ttl("chat", seconds)
    assert str(err.value) == f"ttl must be positive finite seconds, got {seconds}"
    assert s.get("chat").expires is None


async def test_a_ttl_sets_a_deadline_and_the_earliest_is_next(disk: RecordingDisk) -> None:
    s = Sessions(Index(), disk, Stats())
    assert s.next_expiry == math.inf
    await s.extend("a", [])
    await s.extend("b", [])
    before = time.time()
    await s.set_ttl("a", 60)
    await s.set_ttl("b", 10)
    after = time.time()
    a, b = s.get("a").expires, s.get("b").expires
    assert a is not None and before + 60 <= a <= after + 60
    assert b is not None and before + 10 <= b <= after + 10
    assert s.next_expiry == b
    assert disk.writes == ["put a", "put b"]  # the empty chains changed nothing to write


async def test_due_returns_the_expired_sessions_and_moves_the_next_deadline() -> None:
    s = Sessions(Index(), None, Stats())
    for sid in ("a", "b", "c", "no-ttl"):
        await s.extend(sid, [])
    s.get("a").expires = 100.0
    s.get("b").expires = 200.0
    s.get("c").expires = 300.0
    assert s.due(50.0) == []
    assert s.next_expiry == 100.0
    assert s.due(200.0) == ["a", "b"]
    assert s.next_expiry == 300.0
    assert s.due(1000.0) == ["a", "b", "c"]  # due() reports; forgetting is the caller's
    assert s.next_expiry == math.inf


async def test_clearing_a_ttl_removes_the_deadline() -> None:
    s = Sessions(Index(), None, Stats())
    await s.extend("chat", [])
    await s.set_ttl("chat", 10)
    await s.set_ttl("chat", None)
    assert s.get("chat").expires is None
    assert s.due(time.time() + 3600) == []
    assert s.next_expiry == math.inf


# --- forget ----------------------------------------------------------------------------------------


async def test_a_pinned_session_is_forgotten_only_by_force(disk: RecordingDisk) -> None:
    index = stored(Index(), 1, 2)
    s = Sessions(index, disk, Stats())
    await s.extend("chat", keys(1, 2))
    await s.pin("chat")
    with pytest.raises(SessionPinned) as err:
        await s.forget("chat")
    assert str(err.value) == "session 'chat' is pinned; unpin it first"
    assert "chat" in s and pins(index) == {1: 1, 2: 1}
    assert await s.forget("chat", force=True) == keys(1, 2)  # a TTL expiry
    assert "chat" not in s
    assert index.pins == {}
    assert disk.writes[-1] == "delete chat"


async def test_forget_returns_only_the_keys_no_other_session_names() -> None:
    s = Sessions(Index(), None, Stats())
    await s.extend("a", keys(1, 2, 3))
    await s.extend("b", keys(1, 2, 4))
    assert await s.forget("a") == keys(3)
    assert await s.forget("b") == keys(1, 2, 4)


# --- persistence -----------------------------------------------------------------------------------


async def test_sessions_pins_and_ttls_survive_a_restart(tmp_path: Path) -> None:
    url = str(tmp_path / "disk")
    disk = await DiskTier.open(url, 16 * NBYTES)
    s = Sessions(Index(), disk, Stats())
    await s.extend("pinned", keys(1, 2))
    await s.pin("pinned")
    await s.extend("ttl", keys(2, 3))
    await s.set_ttl("ttl", 120)
    await s.extend("plain", keys(4))
    await s.extend("gone", keys(5))
    await s.forget("gone")
    expires = s.get("ttl").expires
    await disk.close()

    disk = await DiskTier.open(url, 16 * NBYTES)
    try:
        index = stored(Index(), 1)
        again = Sessions(index, disk, Stats())
        await again.restore()
        assert {x.id: (x.keys, x.pinned, x.pinned_keys, x.expires) for x in again} == {
            "pinned": (keys(1, 2), True, set(keys(1, 2)), None),
            "ttl": (keys(2, 3), False, set(), expires),
            "plain": (keys(4), False, set(), None),
        }
        assert pins(index) == {1: 1, 2: 1}
        assert again.pinned_blocks() == 1
        assert again.next_expiry == expires
    finally:
        await disk.close()


async def test_without_a_disk_tier_nothing_is_persisted_or_restored() -> None:
    s = Sessions(Index(), None, Stats())
    await s.extend("chat", keys(1))
    await s.pin("chat")
    await s.restore()
    assert [x.id for x in s] == ["chat"]


async def test_a_session_record_that_cannot_be_written_is_counted_not_raised(
    tmp_path: Path,
) -> None:
    disk = await BrokenDisk.open(str(tmp_path / "disk"), 16 * NBYTES)
    stats = Stats()
    try:
        s = Sessions(stored(Index(), 1), disk, stats)
        await s.extend("chat", keys(1))
        assert await s.pin("chat") == 1
        await s.set_ttl("chat", 5)
        assert await s.forget("chat", force=True) == keys(1)
        assert stats.errors == {"session_write": 4}
    finally:
        await disk.close()
