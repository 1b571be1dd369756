"""The fault and load campaigns of ``tiercache bench reliability``, at CI size: nothing acknowledged
is lost, nothing wrong is served, nothing a dead client held stays held."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiercache.bench import reliability


@pytest.mark.slow
async def test_kill_9_of_the_daemon_loses_no_acknowledged_block(tmp_path: Path) -> None:
    r = await reliability.kill9(tmp_path, rounds=3, acks=15)
    assert r["kills"] == 3 and r["acked_blocks"] >= 45
    assert r["recovered_blocks"] == r["acked_blocks"]
    assert (r["lost"], r["wrong_bytes_served"]) == (0, 0)


async def test_corrupted_and_truncated_blocks_are_counted_misses_and_the_rest_is_served(
    tmp_path: Path,
) -> None:
    r = await reliability.corruption(tmp_path, blocks=48, flips=6)
    assert r["damaged_blocks"] >= 6
    assert r["misses"] == r["damaged_blocks"] == r["counted_corrupt"]
    assert r["undamaged_served"] == 48 - r["damaged_blocks"]
    assert (r["lost"], r["wrong_bytes_served"]) == (0, 0)


@pytest.mark.slow
async def test_killed_clients_release_every_lease_and_reservation(tmp_path: Path) -> None:
    r = await reliability.client_kill(tmp_path, clients=3)
    assert r["leased_blocks_before"] == 8  # the shared prefix, leased by each of the 3
    assert r["reserved_slots_before"] == 3 * 2
    assert (r["leased_blocks_after"], r["reserved_slots_after"], r["lost"]) == (0, 0, 0)


@pytest.mark.slow
async def test_sixteen_clients_under_eviction_pressure_get_no_error_and_exact_bytes(
    tmp_path: Path,
) -> None:
    r = await reliability.load(tmp_path, clients=16, seconds=4.0)
    assert r["errors"] == {}
    assert r["wrong_bytes_served"] == 0 and r["blocks_served"] > 0
    # Every acknowledged conversation is read back at the end ("lost" was a constant 0).
    assert r["acked_blocks"] > 0 and r["lost"] == 0
    assert set(r["per_op"]) == {"save", "lookup", "load", "prefetch", "pin", "unpin"}
    assert r["within_memory_budget"], (r["max_rss_bytes"], r["memory_budget_bytes"])
