"""The LRU eviction policy: least recently inserted or touched goes first."""

from __future__ import annotations

from tests.policy.traces import filled, k, names, replay
from tiercache.policy.lru import LRUPolicy

# --- LRU ------------------------------------------------------------------------------------


def test_lru_victims_are_oldest_inserted_first() -> None:
    assert names(filled(LRUPolicy(), "a", "b", "c").victims()) == ["a", "b", "c"]


def test_lru_touch_moves_a_key_to_the_back() -> None:
    policy = filled(LRUPolicy(), "a", "b", "c")

    policy.touch(k("a"))

    assert names(policy.victims()) == ["b", "c", "a"]


def test_lru_reinsert_moves_a_key_to_the_back_without_duplicating_it() -> None:
    policy = filled(LRUPolicy(), "a", "b", "c")

    policy.insert(k("a"))

    assert names(policy.victims()) == ["b", "c", "a"]
    assert len(policy) == 3


def test_lru_remove_drops_a_key() -> None:
    policy = filled(LRUPolicy(), "a", "b", "c")

    policy.remove(k("b"))

    assert names(policy.victims()) == ["a", "c"]
    assert len(policy) == 2


def test_lru_touch_and_remove_of_an_absent_key_do_nothing() -> None:
    policy = filled(LRUPolicy(), "a", "b")

    policy.touch(k("zz"))
    policy.remove(k("zz"))

    assert names(policy.victims()) == ["a", "b"]


def test_lru_victims_survive_removal_while_iterating() -> None:
    policy = filled(LRUPolicy(), "a", "b", "c")
    walked = []

    for key in policy.victims():
        policy.remove(key)
        walked.append(key)

    assert names(walked) == ["a", "b", "c"]
    assert len(policy) == 0


def test_lru_victims_are_a_live_walk_not_a_copy() -> None:
    policy = filled(LRUPolicy(), "a", "b", "c")
    walk = policy.victims()

    assert next(walk) == k("a")
    policy.remove(k("b"))  # not yet given: a copy of the order would still hold it
    assert names(walk) == ["c"]


def test_lru_takes_a_parent_and_position_and_ignores_them() -> None:
    policy = LRUPolicy()
    policy.insert(k("a"))
    policy.insert(k("b"), parent=k("a"), position=16)

    assert names(policy.victims()) == ["a", "b"]


def test_lru_replay_evicts_least_recently_used() -> None:
    evicted, resident = replay(LRUPolicy(), 3, ["a", "b", "c", "a", "d", "e", "a", "f"])

    assert evicted == ["b", "c", "d"]
    assert resident == {"a", "e", "f"}
