"""The cache lock (tiercache/lock.py): it knows the task that holds it, so ``held()`` and ``free()``
tell "held by me" from "held by someone else", and name the function that broke the rule."""

from __future__ import annotations

import asyncio

import pytest

from tiercache.lock import CacheLock


class Room:
    """Stand-ins for the functions that check the lock (``DiskRoom.write``, ``Promoter.to_host``)."""

    def __init__(self, lock: CacheLock) -> None:
        self.lock = lock

    def change_index(self) -> None:
        self.lock.held()

    def read_disk(self) -> None:
        self.lock.free()


async def test_outside_the_lock_free_passes_and_held_names_the_function() -> None:
    room = Room(CacheLock())
    assert not room.lock.mine()
    room.read_disk()
    with pytest.raises(AssertionError) as err:
        room.change_index()
    assert str(err.value) == "Room.change_index must run under the cache lock"


async def test_inside_the_lock_held_passes_and_free_names_the_function() -> None:
    room = Room(CacheLock())
    async with room.lock as entered:
        assert entered is room.lock
        assert room.lock.mine()
        room.change_index()
        with pytest.raises(AssertionError) as err:
            room.read_disk()
    assert str(err.value) == "Room.read_disk: block I/O must not run under the cache lock"


async def test_leaving_the_lock_clears_its_owner() -> None:
    lock = CacheLock()
    async with lock:
        pass
    assert not lock.mine()
    with pytest.raises(AssertionError):
        lock.held()


async def test_an_exception_inside_releases_the_lock_and_clears_its_owner() -> None:
    lock = CacheLock()
    with pytest.raises(KeyError):
        async with lock:
            raise KeyError("boom")
    assert not lock.mine()
    async with asyncio.timeout(1):
        async with lock:
            assert lock.mine()


async def test_another_task_sees_the_lock_held_by_someone_else_not_by_itself() -> None:
    lock = CacheLock()

    def checks() -> tuple[bool, bool, bool]:
        try:
            lock.held()
            held = True
        except AssertionError:
            held = False
        try:
            lock.free()
            free = True
        except AssertionError:
            free = False
        return lock.mine(), held, free

    async def in_another_task() -> tuple[bool, bool, bool]:
        return checks()

    async with lock:
        assert checks() == (True, True, False)
        # A task started while the lock is held (a gather'd child too) does not hold it: the
        # owner is the task, so a child's I/O passes free() and its index change fails held().
        assert await asyncio.create_task(in_another_task()) == (False, False, True)


async def test_the_lock_is_not_reentrant_a_second_enter_by_its_holder_waits() -> None:
    lock = CacheLock()
    async with lock:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05), lock:
                pass  # pragma: no cover - never entered
        assert lock.mine()  # the abandoned second enter leaves the first holder in place
    assert not lock.mine()


async def test_tasks_take_the_lock_one_at_a_time_each_its_owner_inside() -> None:
    lock = CacheLock()
    log: list[str] = []

    async def worker(name: str) -> None:
        async with lock:
            log.append(f"{name} in {lock.mine()}")
            await asyncio.sleep(0.01)  # another task runs here, and must wait
            log.append(f"{name} out {lock.mine()}")

    await asyncio.gather(worker("a"), worker("b"), worker("c"))
    assert log == [
        "a in True",
        "a out True",
        "b in True",
        "b out True",
        "c in True",
        "c out True",
    ]
    assert not lock.mine()
