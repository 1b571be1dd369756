"""What the cache's operations return (tiercache/results.py): save/lookup/load results, and the
handles a caller holds between a transaction's steps (``Reservation``, ``Lease``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.conftest import NBYTES, SPEC, as_bytes, key, make_blocks, make_ns
from tiercache.errors import LeaseError
from tiercache.index import DISK, HOST, Entry, Index
from tiercache.keys import Namespace
from tiercache.results import Lease, LoadResult, LookupResult, Reservation, SaveResult
from tiercache.storage_format import store_rows
from tiercache.tiers.disk import DiskRecord

NS = make_ns()
KV_SHAPE = (SPEC.num_layers, 2, SPEC.block_size, SPEC.num_kv_heads, SPEC.head_dim)


def host_entry(i: int, slot: int) -> Entry:
    return Entry(key(i), "ns/test", NBYTES, at={HOST: slot})


def disk_entry(i: int) -> Entry:
    return Entry(
        key(i), "ns/test", NBYTES, at={DISK: DiskRecord(key(i), "ns/test", i, NBYTES, b"")}
    )


# --- SaveResult, LookupResult ------------------------------------------------------------------


def test_save_results_add_field_by_field() -> None:
    total = SaveResult(1, 2, 3) + SaveResult(10, 20, 30)
    assert total == SaveResult(stored=11, present=22, rejected=33)


def test_a_save_result_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SaveResult(0, 0, 0).stored = 1  # type: ignore[misc]


def test_a_lookup_counts_the_cached_prefix_not_every_key() -> None:
    hit = LookupResult(keys=[key(0), key(1), key(2)], tiers=["host", "disk"], block_size=16)
    assert (hit.blocks, hit.tokens) == (2, 32)
    miss = LookupResult(keys=[key(0)], tiers=[], block_size=16)
    assert (miss.blocks, miss.tokens) == (0, 0)


# --- LoadResult ----------------------------------------------------------------------------------


def test_kv_is_the_blocks_in_the_spec_shape_and_dtype_byte_exact() -> None:
    blocks = make_blocks(3)
    got = LoadResult(store_rows(NS, blocks), ["host", "disk", "host"], NS)
    kv = got.kv()
    assert kv.shape == (3, *KV_SHAPE)
    assert kv.dtype == torch.bfloat16
    assert torch.equal(as_bytes(kv), as_bytes(blocks))
    assert (got.blocks, got.tokens) == (3, 3 * SPEC.block_size)


def test_kv_takes_only_the_rows_served_from_a_larger_out_buffer() -> None:
    blocks = make_blocks(4)
    got = LoadResult(store_rows(NS, blocks), ["host", "host"], NS)  # 2 of 4 rows verified
    assert got.kv().shape == (2, *KV_SHAPE)
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks[:2]))


def test_kv_of_an_empty_load_has_no_blocks_but_the_block_shape() -> None:
    got = LoadResult(torch.empty((0, NBYTES), dtype=torch.uint8), [], NS)
    assert got.kv().shape == (0, *KV_SHAPE)
    assert (got.blocks, got.tokens) == (0, 0)


def test_kv_of_a_quantized_namespace_is_decoded_to_the_kv_dtype() -> None:
    ns = Namespace("test-model", SPEC, store_dtype="int8")
    blocks = make_blocks(2)
    records = store_rows(ns, blocks)
    assert records.shape == (2, ns.block_nbytes) and ns.block_nbytes < NBYTES
    kv = LoadResult(records, ["host", "host"], ns).kv()
    assert kv.shape == (2, *KV_SHAPE)
    assert kv.dtype == torch.bfloat16
    # Values in [0.5, 1.5): int8 steps of at most 1.5/127, then rounded to bfloat16.
    torch.testing.assert_close(kv.float(), blocks.float(), atol=0.02, rtol=0)


def test_a_load_result_starts_with_no_timing_or_tier_counts() -> None:
    got = LoadResult(torch.empty((0, NBYTES), dtype=torch.uint8), [], NS)
    assert (got.seconds, got.per_tier) == (0.0, {})


# --- Reservation, Lease -------------------------------------------------------------------------


def test_a_reservations_slots_are_its_entries_host_slots_in_order() -> None:
    r = Reservation(NS, "ns/test", [key(0), key(1), key(2)], None, first_block=0)
    assert (r.slots, r.present, r.rejected, r.walked) == ([], 0, 0, 0)
    r.entries = [host_entry(0, 5), disk_entry(1), host_entry(2, 0)]
    assert r.slots == [5, 0]


def test_a_leases_slots_skip_blocks_not_in_host_memory() -> None:
    lease = Lease([host_entry(0, 3), disk_entry(1), host_entry(2, 1)], ["host", "disk", "host"])
    assert lease.slots == [3, 1]
    assert lease.prefix == 0


def test_ending_a_lease_makes_its_blocks_evictable_again() -> None:
    index = Index()
    entries = [host_entry(0, 0), host_entry(1, 1)]
    for e in entries:
        index.add(e)
    index.lease(entries)
    lease = Lease(list(entries), ["host", "host"], prefix=2)
    assert not any(index.evictable(e) for e in entries)
    lease.end(index)
    assert all(index.evictable(e) for e in entries)
    assert (lease.entries, lease.slots) == ([], [])


def test_a_second_end_of_a_lease_is_a_no_op() -> None:
    index = Index()
    e = host_entry(0, 0)
    index.lease([e, e])  # another reader holds it too
    lease = Lease([e], ["host"])
    lease.end(index)
    lease.end(index)
    assert e.leases == 1


def test_ending_a_lease_on_blocks_someone_else_released_is_a_lease_error() -> None:
    index = Index()
    e = host_entry(0, 0)
    lease = Lease([e], ["host"])  # never leased in the index
    with pytest.raises(LeaseError, match=r"a double release$"):
        lease.end(index)
    assert lease.entries == [e]  # not marked ended: the bookkeeping bug stays visible
