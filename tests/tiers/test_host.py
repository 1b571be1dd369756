"""The host tier's arena: fixed slots within a byte budget, private or in /dev/shm."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.conftest import dead_pid
from tiercache.tiers.host import MAX_SLOTS, SHM_DIR, ArenaFull, HostArena, MappedArena, shm_free

SLOT = 64


@pytest.fixture
def arena() -> Iterator[HostArena]:
    a = HostArena(SLOT, 4 * SLOT, pin=False)
    yield a
    a.close()


def shm_name() -> str:
    return f"tiercache-test-{os.getpid()}-{secrets.token_hex(4)}"


def pattern(n: int, seed: int) -> torch.Tensor:
    return torch.randint(
        1, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


# --- sizing ---------------------------------------------------------------------------------


@given(slot_bytes=st.integers(1, 4096), budget=st.integers(1, 64 * 1024))
@settings(max_examples=50)
def test_slot_count_is_the_most_whole_slots_within_the_budget(slot_bytes: int, budget: int) -> None:
    assume(budget >= slot_bytes)
    a = HostArena(slot_bytes, budget, pin=False)
    try:
        assert a.num_slots == budget // slot_bytes
        assert a.capacity_bytes == a.num_slots * slot_bytes <= budget
        assert a.buffer.numel() == a.capacity_bytes
    finally:
        a.close()


def test_budget_remainder_is_left_unused() -> None:
    a = HostArena(100, 1050, pin=False)
    try:
        assert (a.num_slots, a.capacity_bytes, tuple(a.buffer.shape)) == (10, 1000, (10, 100))
    finally:
        a.close()


def test_budget_smaller_than_one_block_is_rejected_and_names_the_key() -> None:
    with pytest.raises(
        ValueError,
        match=r"^host tier budget \(63 B\) is smaller than one block \(64 B\); raise \[tiers\.host\] bytes$",
    ):
        HostArena(64, 63, pin=False)


def test_a_block_too_small_for_the_budget_is_refused_before_the_arena_is_carved() -> None:
    # A 2 B block carved 32 MiB into 16 M slots, ~40 B of bookkeeping each (a 1 GiB arena:
    # ~10 GiB), and the arena stayed in 2 B slots, too small for any real model's block.
    a = HostArena(None, 2 * MAX_SLOTS + 2, pin=False)
    try:
        with pytest.raises(
            ValueError,
            match=rf"^a 2 B block would carve the {2 * MAX_SLOTS + 2} B host tier into "
            rf"{MAX_SLOTS + 1} slots, more than the {MAX_SLOTS} .* slot_bytes to at least 3$",
        ):
            a.format(2)
        assert not a.formatted
        a.format(3)
        assert a.num_slots == (2 * MAX_SLOTS + 2) // 3 <= MAX_SLOTS
    finally:
        a.close()


@pytest.mark.parametrize("slot_bytes", [0, -1])
def test_slot_size_must_be_positive(slot_bytes: int) -> None:
    with pytest.raises(
        ValueError, match=rf"^host arena slot size must be positive, got {slot_bytes}$"
    ):
        HostArena(slot_bytes, 1024, pin=False)


def test_pin_false_leaves_the_arena_pageable(arena: HostArena) -> None:
    assert arena.pinned is False


# --- allocate / free ------------------------------------------------------------------------


def test_fresh_arena_is_all_free(arena: HostArena) -> None:
    assert (arena.free_slots, arena.used_bytes) == (4, 0)


def test_allocate_hands_out_slots_in_order(arena: HostArena) -> None:
    assert [arena.allocate() for _ in range(4)] == [0, 1, 2, 3]
    assert (arena.free_slots, arena.used_bytes) == (0, 4 * SLOT)


def test_allocate_when_every_slot_is_used_raises_arena_full(arena: HostArena) -> None:
    for _ in range(4):
        arena.allocate()

    with pytest.raises(ArenaFull, match=r"^all 4 host slots are in use$"):
        arena.allocate()


def test_freed_slots_are_reused_after_the_never_used_ones_in_free_order(arena: HostArena) -> None:
    arena.allocate()
    arena.allocate()

    arena.free(1)
    arena.free(0)

    assert [arena.allocate() for _ in range(4)] == [2, 3, 1, 0]


def test_free_returns_a_slots_bytes_to_the_budget(arena: HostArena) -> None:
    slots = [arena.allocate() for _ in range(3)]

    arena.free(slots[1])

    assert (arena.free_slots, arena.used_bytes) == (2, 2 * SLOT)


def test_freeing_a_slot_twice_is_an_error(arena: HostArena) -> None:
    slot = arena.allocate()
    arena.free(slot)

    with pytest.raises(ValueError, match=r"^host slot 0 is not allocated$"):
        arena.free(slot)
    assert arena.free_slots == 4


@pytest.mark.parametrize("slot", [1, -1, 4, 100])
def test_freeing_a_slot_never_allocated_or_out_of_range_is_an_error(
    arena: HostArena, slot: int
) -> None:
    arena.allocate()

    with pytest.raises(ValueError, match=rf"^host slot {slot} is not allocated$"):
        arena.free(slot)


def test_allocate_and_free_keep_used_bytes_within_budget_through_churn(arena: HostArena) -> None:
    held: list[int] = []
    for step in range(40):
        if step % 3 == 2 and held:
            arena.free(held.pop(0))
        else:
            try:
                held.append(arena.allocate())
            except ArenaFull:
                arena.free(held.pop())
        assert arena.used_bytes == len(held) * SLOT <= arena.capacity_bytes
        assert len(set(held)) == len(held)


# --- views ----------------------------------------------------------------------------------


def test_view_is_one_slot_of_uint8(arena: HostArena) -> None:
    view = arena.view(2)

    assert (view.dtype, tuple(view.shape)) == (torch.uint8, (SLOT,))


def test_view_with_nbytes_is_a_prefix_of_the_slot(arena: HostArena) -> None:
    assert tuple(arena.view(1, 10).shape) == (10,)


def test_view_writes_land_in_the_arena_buffer_at_the_slot(arena: HostArena) -> None:
    data = pattern(SLOT, seed=1)

    arena.view(2).copy_(data)

    assert torch.equal(arena.buffer[2], data)
    assert torch.equal(arena.buffer.view(-1)[2 * SLOT : 3 * SLOT], data)


def test_view_writes_do_not_touch_neighbouring_slots(arena: HostArena) -> None:
    arena.view(1).copy_(pattern(SLOT, seed=2))
    arena.view(2, 10).copy_(pattern(10, seed=3))

    assert bytes(arena.buffer[0]) == bytes(SLOT)
    assert bytes(arena.buffer[2, 10:]) == bytes(SLOT - 10)
    assert bytes(arena.buffer[3]) == bytes(SLOT)


def test_fresh_arena_reads_as_zeros(arena: HostArena) -> None:
    assert bytes(arena.buffer.view(-1)) == bytes(4 * SLOT)


def test_write_copies_rows_into_the_given_slots_in_order(arena: HostArena) -> None:
    rows = torch.stack([pattern(10, seed=7), pattern(10, seed=8)])

    arena.write([3, 1], rows)

    assert torch.equal(arena.view(3, 10), rows[0])
    assert torch.equal(arena.view(1, 10), rows[1])
    assert bytes(arena.buffer[3, 10:]) == bytes(SLOT - 10)
    assert bytes(arena.buffer[0]) == bytes(arena.buffer[2]) == bytes(SLOT)


def test_read_copies_the_given_slots_into_out_in_order(arena: HostArena) -> None:
    arena.view(0).copy_(pattern(SLOT, seed=9))
    arena.view(2).copy_(pattern(SLOT, seed=10))
    out = torch.empty((2, 12), dtype=torch.uint8)

    arena.read([2, 0], out)

    assert torch.equal(out[0], pattern(SLOT, seed=10)[:12])
    assert torch.equal(out[1], pattern(SLOT, seed=9)[:12])


def test_private_arena_creates_no_shared_memory_file() -> None:
    a = HostArena(SLOT, 2 * SLOT, pin=False)
    try:
        assert a.shared is False
        assert not (SHM_DIR / a.name).exists()
    finally:
        a.close()


# --- shared arena ---------------------------------------------------------------------------


@pytest.fixture
def shared_arena() -> Iterator[HostArena]:
    a = HostArena(SLOT, 4 * SLOT, shared=True, name=shm_name(), pin=False)
    yield a
    a.close()


def test_shared_arena_is_a_dev_shm_file_of_the_capacity(shared_arena: HostArena) -> None:
    path = SHM_DIR / shared_arena.name

    assert path.stat().st_size == 4 * SLOT


def test_shared_arena_file_is_owner_read_write_only(shared_arena: HostArena) -> None:
    mode = (SHM_DIR / shared_arena.name).stat().st_mode

    assert stat.S_IMODE(mode) == 0o600


def test_shared_arena_default_name_is_unique_per_arena() -> None:
    a = HostArena(SLOT, SLOT, shared=True, pin=False)
    b = HostArena(SLOT, SLOT, shared=True, pin=False)
    try:
        assert a.name != b.name
        assert a.name.startswith(f"tiercache-{os.getpid()}-")
    finally:
        a.close()
        b.close()


def test_shared_arena_name_already_taken_is_refused(shared_arena: HostArena) -> None:
    with pytest.raises(FileExistsError):
        HostArena(SLOT, SLOT, shared=True, name=shared_arena.name, pin=False)


def test_close_unlinks_the_shared_memory_file() -> None:
    a = HostArena(SLOT, 2 * SLOT, shared=True, name=shm_name(), pin=False)
    path = SHM_DIR / a.name
    assert path.exists()

    a.close()

    assert not path.exists()


def test_close_with_a_view_still_alive_still_unlinks() -> None:
    a = HostArena(SLOT, 2 * SLOT, shared=True, name=shm_name(), pin=False)
    view = a.view(0)

    a.close()

    assert not (SHM_DIR / a.name).exists()
    del view


def test_mapped_arena_in_this_process_shares_bytes_both_ways(shared_arena: HostArena) -> None:
    mapped = MappedArena(shared_arena.name, SLOT, 4)
    try:
        shared_arena.view(0).copy_(pattern(SLOT, seed=4))
        mapped.view(3, 8).copy_(pattern(8, seed=5))

        assert torch.equal(mapped.view(0), pattern(SLOT, seed=4))
        assert torch.equal(shared_arena.view(3, 8), pattern(8, seed=5))
    finally:
        mapped.close()


def test_mapped_arena_with_the_wrong_geometry_is_refused(shared_arena: HostArena) -> None:
    path = SHM_DIR / shared_arena.name

    with pytest.raises(
        ValueError, match=rf"^shared arena {path} is 256 B, smaller than 5 x {SLOT} B$"
    ):
        MappedArena(shared_arena.name, SLOT, 5)


def test_mapped_arena_of_a_missing_name_is_refused_saying_what_the_engine_must_see() -> None:
    # A CPU engine in a container of its own, without the daemon's /dev/shm, gets here.
    name = shm_name()
    with pytest.raises(FileNotFoundError) as err:
        MappedArena(name, SLOT, 4)
    assert f"shared arena {SHM_DIR / name}" in str(err.value)
    assert "must see the daemon's /dev/shm" in str(err.value)


CHILD = """
import json, sys, torch
from tiercache.tiers.host import MappedArena
name, slot_bytes, num_slots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = MappedArena(name, slot_bytes, num_slots)
seen = bytes(m.view(1)).hex()
m.view(2).copy_(torch.arange(1, slot_bytes + 1, dtype=torch.uint8))
m.close()
print(json.dumps({"seen": seen}))
"""


@pytest.fixture(scope="module")
def child_run() -> Iterator[tuple[HostArena, dict[str, str], Path]]:
    """A shared arena whose slot 1 the parent filled before another process mapped it,
    read slot 1, wrote slot 2 and exited."""
    a = HostArena(SLOT, 4 * SLOT, shared=True, name=shm_name(), pin=False)
    a.view(1).copy_(pattern(SLOT, seed=6))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, a.name, str(SLOT), "4"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    yield a, json.loads(out), SHM_DIR / a.name
    a.close()


def test_another_process_sees_bytes_written_before_it_mapped(
    child_run: tuple[HostArena, dict[str, str], Path],
) -> None:
    _, result, _ = child_run

    assert result["seen"] == bytes(pattern(SLOT, seed=6).numpy()).hex()


def test_bytes_another_process_writes_appear_in_the_arena(
    child_run: tuple[HostArena, dict[str, str], Path],
) -> None:
    arena, _, _ = child_run

    assert bytes(arena.view(2)) == bytes(range(1, SLOT + 1))
    assert bytes(arena.view(3)) == bytes(SLOT)


def test_a_mapping_process_exiting_leaves_the_shared_file_in_place(
    child_run: tuple[HostArena, dict[str, str], Path],
) -> None:
    _, _, path = child_run

    assert path.exists()


def test_a_shared_arena_larger_than_dev_shm_is_refused_by_name() -> None:
    too_big = shm_free() + 2**30
    with pytest.raises(ValueError, match=r"lower \[tiers.host\] bytes or enlarge /dev/shm"):
        HostArena(SLOT, too_big, shared=True, pin=False)


def test_arenas_of_dead_owners_are_reaped_and_live_ones_kept(tmp_path: Path) -> None:
    from tiercache.tiers.host import reap_stale_arenas

    dead = dead_pid()
    (tmp_path / f"tiercache-{dead}-0badf00d").write_bytes(b"x")
    (tmp_path / f"tiercache-{os.getpid()}-0badf00d").write_bytes(b"x")
    (tmp_path / "someone-else").write_bytes(b"x")
    assert reap_stale_arenas(tmp_path) == [f"tiercache-{dead}-0badf00d"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"tiercache-{os.getpid()}-0badf00d", "someone-else"]
    )
