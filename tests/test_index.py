"""The index (tiercache/index.py): entries and their one location map, the prefix walk, and lease
counting that refuses to go below zero."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import key
from tiercache.errors import LeaseError
from tiercache.index import DEVICE, DISK, HOST, LOCAL, REMOTE, TIERS, Entry, Index, Location
from tiercache.tiers.disk import DiskRecord

ARRAY = "ns/test"


def record(i: int) -> DiskRecord:
    return DiskRecord(key(i), ARRAY, slot=i, nbytes=512, checksum=b"c" * 16)


def entry(i: int, **at: Location) -> Entry:
    return Entry(key(i), ARRAY, 512, at=dict(at))


def index_of(*entries: Entry) -> Index:
    index = Index()
    for e in entries:
        index.add(e)
    return index


# --- Entry: where a block lives ----------------------------------------------------------------


def test_the_tiers_are_named_fastest_first_and_only_host_and_disk_are_local() -> None:
    assert TIERS == ("device", "host", "disk", "remote")
    assert frozenset({"host", "disk"}) == LOCAL


def test_host_slot_is_the_int_location_in_host_slot_zero_included() -> None:
    assert entry(0, host=0).host_slot == 0
    assert entry(0, host=7).host_slot == 7
    assert entry(0, disk=record(0)).host_slot is None


def test_a_bool_in_the_host_map_is_not_a_host_slot() -> None:
    assert entry(0, host=True).host_slot is None


def test_disk_is_the_disk_record_location() -> None:
    rec = record(3)
    assert entry(3, disk=rec).disk is rec
    assert entry(3, host=1).disk is None
    assert entry(3, disk=True).disk is None


def test_tiers_are_listed_fastest_first_whatever_the_order_they_were_added() -> None:
    e = entry(0)
    e.at[REMOTE] = True
    e.at[DISK] = record(0)
    e.at[HOST] = 2
    e.at[DEVICE] = True
    assert e.tiers == ("device", "host", "disk", "remote")
    assert entry(0, disk=record(0), remote=True).tiers == ("disk", "remote")
    assert entry(0).tiers == ()


@pytest.mark.parametrize(
    ("at", "best"),
    [
        ({DEVICE: True, HOST: 1, DISK: record(0)}, "device"),
        ({HOST: 1, DISK: record(0), REMOTE: True}, "host"),
        ({DISK: record(0), REMOTE: True}, "disk"),
        ({REMOTE: True}, None),
        ({}, None),
    ],
)
def test_best_tier_is_the_fastest_local_tier_or_device_never_the_shared_tier(
    at: dict[str, Location], best: str | None
) -> None:
    assert Entry(key(0), ARRAY, 512, at=at).best_tier == best


def test_a_new_entry_has_no_checksum_lease_or_use_yet() -> None:
    e = Entry(key(0), ARRAY, 512)
    assert (e.checksum, e.at, e.leases, e.last_use, e.prefetched_at) == (b"", {}, 0, 0.0, 0.0)


# --- the index: one dict -----------------------------------------------------------------------


def test_added_entries_are_found_by_key() -> None:
    a, b = entry(1, host=0), entry(2, host=1)
    index = index_of(a, b)
    assert len(index) == 2
    assert key(1) in index and key(3) not in index
    assert index.get(key(1)) is a and index.get(key(2)) is b
    assert index.get(key(3)) is None


def test_adding_an_entry_for_a_present_key_replaces_it() -> None:
    old, new = entry(1, host=0), entry(1, disk=record(1))
    index = index_of(old, new)
    assert len(index) == 1
    assert index.get(key(1)) is new


def test_iteration_is_a_snapshot_so_entries_may_leave_during_it() -> None:
    index = index_of(entry(1, host=0), entry(2, host=1), entry(3, host=2))
    seen = []
    for e in index:
        seen.append(e.key)
        e.at.clear()
        assert index.drop_if_empty(e)
    assert seen == [key(1), key(2), key(3)]
    assert len(index) == 0


def test_drop_tier_removes_that_copy_only_and_keeps_the_entry() -> None:
    e = entry(1, host=0, disk=record(1), device=True)
    index = index_of(e)
    index.drop_tier(key(1), DEVICE)
    assert e.tiers == ("host", "disk")
    index.drop_tier(key(1), HOST)
    index.drop_tier(key(1), DISK)
    assert e.at == {}
    assert index.get(key(1)) is e  # dropping copies never removes the entry: drop_if_empty does


def test_drop_tier_of_an_absent_key_or_copy_is_a_no_op() -> None:
    e = entry(1, host=0)
    index = index_of(e)
    index.drop_tier(key(2), HOST)
    index.drop_tier(key(1), DEVICE)
    assert e.at == {HOST: 0}
    assert len(index) == 1


@pytest.mark.parametrize(
    "at",
    [{}, {DEVICE: True}, {REMOTE: True}, {DEVICE: True, REMOTE: True}],
    ids=["nothing", "device", "remote", "device+remote"],
)
def test_an_entry_no_local_tier_holds_leaves_the_index(at: dict[str, Location]) -> None:
    e = Entry(key(1), ARRAY, 512, at=at)
    index = index_of(e)
    assert index.drop_if_empty(e) is True
    assert key(1) not in index
    assert index.drop_if_empty(e) is True  # again: still gone, no KeyError


@pytest.mark.parametrize(
    "at",
    [{HOST: 0}, {DISK: record(1)}, {HOST: 0, DISK: record(1), DEVICE: True}],
    ids=["host", "disk", "all"],
)
def test_an_entry_a_local_tier_holds_stays(at: dict[str, Location]) -> None:
    e = Entry(key(1), ARRAY, 512, at=at)
    index = index_of(e)
    assert index.drop_if_empty(e) is False
    assert index.get(key(1)) is e


# --- prefix --------------------------------------------------------------------------------------


def test_prefix_is_the_longest_run_of_present_keys_from_the_start() -> None:
    entries = [entry(i, host=i) for i in range(5)]
    index = index_of(*entries[:3], entries[4])  # key 3 missing
    got = index.prefix([key(i) for i in range(5)])
    assert [e.key for e in got] == [key(0), key(1), key(2)]
    assert all(g is e for g, e in zip(got, entries, strict=False))


def test_prefix_is_empty_when_the_first_key_is_missing_or_no_keys_are_given() -> None:
    index = index_of(entry(1, host=0), entry(2, host=1))
    assert index.prefix([key(0), key(1), key(2)]) == []
    assert index.prefix([]) == []


def test_prefix_follows_the_order_of_the_keys_given() -> None:
    a, b = entry(1, host=0), entry(2, host=1)
    index = index_of(a, b)
    assert index.prefix([key(2), key(1)]) == [b, a]


# --- evictable, leases, pins -------------------------------------------------------------------


def test_an_entry_is_evictable_only_with_no_lease_and_no_pin() -> None:
    e = entry(1, host=0)
    index = index_of(e)
    assert index.evictable(e)
    index.lease([e])
    assert not index.evictable(e)
    index.unlease([e])
    index.pins[key(1)] += 1
    assert not index.evictable(e)
    index.pins[key(1)] -= 1
    assert index.evictable(e)


def test_a_pin_counts_before_the_block_is_stored() -> None:
    index = Index()
    index.pins[key(1)] += 1
    e = entry(1, host=0)
    index.add(e)
    assert not index.evictable(e)


def test_leases_are_counts_so_several_holders_protect_one_block() -> None:
    e = entry(1, host=0)
    index = index_of(e)
    Index.lease([e])
    Index.lease([e])
    assert e.leases == 2
    Index.unlease([e])
    assert (e.leases, index.evictable(e)) == (1, False)
    Index.unlease([e])
    assert (e.leases, index.evictable(e)) == (0, True)


def test_a_key_twice_in_one_call_is_leased_twice() -> None:
    e = entry(1, host=0)
    Index.lease([e, e])
    assert e.leases == 2
    Index.unlease([e, e])
    assert e.leases == 0


def test_lease_and_unlease_take_any_iterable_once_through() -> None:
    es = [entry(i, host=i) for i in range(3)]
    Index.lease(e for e in es)
    assert [e.leases for e in es] == [1, 1, 1]
    Index.unlease(e for e in es)
    assert [e.leases for e in es] == [0, 0, 0]


def test_a_double_release_is_a_lease_error_naming_the_block() -> None:
    e = entry(0xAB, host=0)
    Index.lease([e])
    Index.unlease([e])
    with pytest.raises(LeaseError) as err:
        Index.unlease([e])
    assert str(err.value) == (
        f"1 block(s) released more often than leased (first {key(0xAB).hex()[:16]}): "
        "a double release"
    )
    assert e.leases == 0


def test_a_refused_release_changes_no_count() -> None:
    leased, unleased = entry(1, host=0), entry(2, host=1)
    Index.lease([leased])
    with pytest.raises(LeaseError, match=r"^1 block\(s\) released more often than leased"):
        Index.unlease([leased, unleased])
    assert (leased.leases, unleased.leases) == (1, 0)


def test_one_block_released_twice_in_one_call_is_counted_as_one_block() -> None:
    e = entry(1, host=0)
    Index.lease([e])
    with pytest.raises(LeaseError, match=r"^1 block\(s\) released more often than leased"):
        Index.unlease([e, e])
    assert e.leases == 1


def test_the_error_counts_every_block_released_too_often_and_names_the_first() -> None:
    es = [entry(i, host=i) for i in range(4)]
    Index.lease(es[:1])
    with pytest.raises(LeaseError) as err:
        Index.unlease(es)
    assert str(err.value).startswith(
        f"3 block(s) released more often than leased (first {key(1).hex()[:16]})"
    )


@given(
    ops=st.lists(
        st.tuples(st.booleans(), st.lists(st.integers(0, 3), min_size=1, max_size=4)),
        max_size=30,
    )
)
@settings(max_examples=200, deadline=None)
def test_lease_counts_follow_a_model_and_never_go_below_zero(
    ops: list[tuple[bool, list[int]]],
) -> None:
    es = [entry(i, host=i) for i in range(4)]
    model = [0, 0, 0, 0]
    for is_lease, which in ops:
        if is_lease:
            Index.lease(es[i] for i in which)
            for i in which:
                model[i] += 1
            continue
        after = list(model)
        for i in which:
            after[i] -= 1
        if min(after) < 0:
            with pytest.raises(LeaseError):
                Index.unlease(es[i] for i in which)
        else:
            Index.unlease(es[i] for i in which)
            model = after
        assert [e.leases for e in es] == model
