"""Eviction (LRU, ARC, prefix), write and admission policies."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest

from tiercache.policy.arc import ARCPolicy
from tiercache.policy.base import EvictionPolicy, RetainingPolicy, make_policy
from tiercache.policy.lru import LRUPolicy
from tiercache.policy.prefix import ATTENTION_TOKENS, GHOSTS, PrefixPolicy
from tiercache.policy.write import (
    WRITE_BACK,
    WRITE_THROUGH,
    Admission,
    WritePolicy,
    make_write_policy,
)


def k(name: str) -> bytes:
    return name.encode()


def names(keys: Iterable[bytes]) -> list[str]:
    return [key.decode() for key in keys]


def filled(policy: EvictionPolicy, *keys: str) -> EvictionPolicy:
    for key in keys:
        policy.insert(k(key))
    return policy


def replay(
    policy: EvictionPolicy, capacity: int, trace: Iterable[str]
) -> tuple[list[str], set[str]]:
    """Drive ``policy`` the way a tier does: a hit touches, a miss evicts the first victim
    when full and inserts. Returns the evicted keys in order and the keys left resident."""
    resident: set[bytes] = set()
    evicted: list[bytes] = []
    for key in map(k, trace):
        if key in resident:
            policy.touch(key)
            continue
        if len(resident) == capacity:
            victim = next(policy.victims())
            policy.remove(victim)
            resident.remove(victim)
            evicted.append(victim)
        policy.insert(key)
        resident.add(key)
    return names(evicted), set(names(resident))


HOT = ["h1", "h2", "h1", "h2"]  # two keys, each seen twice
SCAN = [f"s{i}" for i in range(10)]  # ten one-time keys


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


# --- ARC ------------------------------------------------------------------------------------


def arc_state(policy: ARCPolicy) -> dict[str, list[str]]:
    return {
        "t1": names(policy.t1),
        "t2": names(policy.t2),
        "b1": names(policy.b1),
        "b2": names(policy.b2),
    }


def test_arc_needs_positive_capacity() -> None:
    with pytest.raises(ValueError, match=r"^ARC needs a positive capacity in blocks$"):
        ARCPolicy(0)


def test_arc_new_keys_enter_t1_and_a_second_sight_promotes_to_t2() -> None:
    policy = filled(ARCPolicy(4), "a", "b", "c")
    assert isinstance(policy, ARCPolicy)

    policy.touch(k("b"))
    policy.insert(k("c"))  # re-insert of a resident key counts as a touch

    assert arc_state(policy) == {"t1": ["a"], "t2": ["b", "c"], "b1": [], "b2": []}
    assert len(policy) == 3


def test_arc_touch_in_t2_moves_to_most_recent() -> None:
    policy = ARCPolicy(4)
    for key in ("a", "b"):
        policy.insert(k(key))
        policy.touch(k(key))

    policy.touch(k("a"))

    assert names(policy.t2) == ["b", "a"]


def test_arc_removed_keys_become_ghosts_of_their_list() -> None:
    policy = filled(ARCPolicy(4), "a", "b")
    assert isinstance(policy, ARCPolicy)
    policy.touch(k("b"))

    policy.remove(k("a"))
    policy.remove(k("b"))

    assert arc_state(policy) == {"t1": [], "t2": [], "b1": ["a"], "b2": ["b"]}
    assert len(policy) == 0


def test_arc_remove_of_an_absent_key_does_nothing() -> None:
    policy = filled(ARCPolicy(4), "a")
    assert isinstance(policy, ARCPolicy)

    policy.remove(k("zz"))

    assert arc_state(policy) == {"t1": ["a"], "t2": [], "b1": [], "b2": []}


def arc_with_ghosts(
    capacity: int, b1: list[str], b2: list[str], resident: dict[str, int]
) -> ARCPolicy:
    """An ARC whose ghost lists are ``b1`` and ``b2``; ``resident`` maps a key to 1 (t1) or 2 (t2)."""
    policy = ARCPolicy(capacity)
    for key in (*b1, *b2, *resident):
        policy.insert(k(key))
    for key in (*b2, *(key for key, seen in resident.items() if seen == 2)):
        policy.touch(k(key))
    for key in (*b1, *b2):
        policy.remove(k(key))
    assert arc_state(policy)["b1"] == b1 and arc_state(policy)["b2"] == b2
    return policy


def test_arc_ghost_overflow_drops_the_oldest_ghost_of_the_longer_list() -> None:
    policy = arc_with_ghosts(3, b1=["a"], b2=["x", "y"], resident={"z": 2})

    policy.remove(k("z"))

    assert arc_state(policy) == {"t1": [], "t2": [], "b1": ["a"], "b2": ["y", "z"]}


def test_arc_ghost_overflow_on_equal_lists_drops_from_b1() -> None:
    policy = arc_with_ghosts(3, b1=["a"], b2=["x", "y"], resident={"b": 1})

    policy.remove(k("b"))

    assert arc_state(policy) == {"t1": [], "t2": [], "b1": ["b"], "b2": ["x", "y"]}


def test_arc_ghosts_never_outnumber_capacity() -> None:
    policy = filled(ARCPolicy(3), *"abcdefgh")
    assert isinstance(policy, ARCPolicy)
    for key in "abcd":
        policy.touch(k(key))

    for key in "abcdefgh":
        policy.remove(k(key))

    assert len(policy.b1) + len(policy.b2) == 3


def test_arc_victims_come_from_t1_first_while_t1_is_above_target() -> None:
    policy = filled(ARCPolicy(4), "a", "b", "c")
    policy.touch(k("b"))

    assert names(policy.victims()) == ["a", "c", "b"]


def test_arc_b1_ghost_hit_grows_target_t1_by_one_and_enters_t2() -> None:
    policy = filled(ARCPolicy(4), "a", "b", "c")
    assert isinstance(policy, ARCPolicy)
    policy.remove(k("a"))
    policy.remove(k("b"))  # b1 = [a, b], b2 = []

    policy.insert(k("a"))

    assert policy.target_t1 == 1.0
    assert arc_state(policy) == {"t1": ["c"], "t2": ["a"], "b1": ["b"], "b2": []}


def test_arc_b1_ghost_hit_grows_target_t1_by_b2_over_b1_when_larger() -> None:
    policy = filled(ARCPolicy(4), "x", "y", "z", "w")
    assert isinstance(policy, ARCPolicy)
    for key in ("x", "y", "z"):
        policy.touch(k(key))
        policy.remove(k(key))  # b2 = [x, y, z]
    policy.remove(k("w"))  # b1 = [w]

    policy.insert(k("w"))

    assert policy.target_t1 == 3.0


def test_arc_target_t1_never_exceeds_capacity() -> None:
    policy = ARCPolicy(2)
    for round_ in range(4):
        key = k(f"g{round_}")
        policy.insert(key)
        policy.remove(key)  # into b1
        policy.insert(key)  # b1 hit: +1
        policy.remove(key)  # into b2

    assert policy.target_t1 == 2.0


def test_arc_b2_ghost_hit_shrinks_target_t1_by_b1_over_b2() -> None:
    policy = ARCPolicy(4)
    policy.target_t1 = 3.5
    for key in ("a", "b", "c", "d"):
        policy.insert(k(key))
    policy.touch(k("d"))
    for key in ("a", "b", "c", "d"):
        policy.remove(k(key))  # b1 = [a, b, c], b2 = [d]

    policy.insert(k("d"))

    assert policy.target_t1 == 0.5
    assert arc_state(policy) == {"t1": [], "t2": ["d"], "b1": ["a", "b", "c"], "b2": []}


def test_arc_b2_ghost_hit_shrinks_target_t1_by_at_least_one_and_not_below_zero() -> None:
    policy = ARCPolicy(4)
    policy.target_t1 = 1.5
    policy.insert(k("a"))
    policy.touch(k("a"))
    policy.remove(k("a"))  # b2 = [a]

    policy.insert(k("a"))
    assert policy.target_t1 == 0.5

    policy.remove(k("a"))
    policy.insert(k("a"))
    assert policy.target_t1 == 0.0


def test_arc_victims_come_from_t2_first_once_t1_is_within_target() -> None:
    policy = filled(ARCPolicy(4), "a", "b", "x", "y")
    assert isinstance(policy, ARCPolicy)
    policy.remove(k("a"))
    policy.insert(k("a"))  # b1 hit: target_t1 = 1, a in t2
    policy.touch(k("x"))  # t1 = [b, y], t2 = [a, x]
    policy.remove(k("b"))  # t1 = [y]: no longer above target

    assert policy.target_t1 == 1.0
    assert names(policy.victims()) == ["a", "x", "y"]


def test_arc_victims_survive_removal_while_iterating() -> None:
    policy = filled(ARCPolicy(4), "a", "b", "c")
    policy.touch(k("b"))  # t1 = [a, c], t2 = [b]
    walked = []

    for key in policy.victims():
        policy.remove(key)
        walked.append(key)

    assert names(walked) == ["a", "c", "b"]
    assert len(policy) == 0


def test_arc_victims_are_a_live_walk_not_a_copy() -> None:
    policy = filled(ARCPolicy(4), "a", "b", "c")
    walk = policy.victims()

    assert next(walk) == k("a")
    policy.remove(k("b"))
    assert names(walk) == ["c"]


def test_lru_flushes_frequently_used_keys_during_a_scan() -> None:
    evicted, resident = replay(LRUPolicy(), 4, HOT + SCAN)

    assert evicted == ["h1", "h2", "s0", "s1", "s2", "s3", "s4", "s5"]
    assert resident == {"s6", "s7", "s8", "s9"}


def test_arc_keeps_frequently_used_keys_through_a_scan() -> None:
    evicted, resident = replay(ARCPolicy(4), 4, HOT + SCAN)

    assert evicted == ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"]
    assert resident == {"h1", "h2", "s8", "s9"}


# --- prefix ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def chain(policy: PrefixPolicy, *keys: str) -> PrefixPolicy:
    """Insert ``keys`` as one prompt: each the parent of the next, at its block's position."""
    parent = None
    for i, key in enumerate(keys):
        policy.insert(k(key), parent=parent, position=16 * i)
        parent = k(key)
    return policy


def test_prefix_needs_positive_capacity() -> None:
    with pytest.raises(
        ValueError, match=r"^the prefix policy needs a positive capacity in blocks$"
    ):
        PrefixPolicy(0)


def test_prefix_without_history_is_lru() -> None:
    policy = filled(PrefixPolicy(8), "a", "b", "c")
    policy.touch(k("a"))

    assert names(policy.victims()) == ["b", "c", "a"]


def test_prefix_evicts_a_chain_from_its_leaf() -> None:
    policy = chain(PrefixPolicy(8), "a", "b", "c")

    assert names(policy.victims()) == ["c", "b", "a"]


def test_prefix_a_chain_touched_root_to_leaf_stays_leaf_first() -> None:
    policy = chain(PrefixPolicy(8), "a", "b", "c")
    policy.insert(k("x"))
    for key in "abc":
        policy.touch(k(key))

    assert names(policy.victims()) == ["x", "c", "b", "a"]


def test_prefix_gives_a_parent_only_after_its_subtree() -> None:
    policy = PrefixPolicy(8)
    policy.insert(k("r"))
    policy.insert(k("c"), parent=k("r"), position=16)
    policy.insert(k("z"))
    policy.touch(k("c"))  # c: used again (class 1); r, its parent, is now the stalest front

    assert names(policy.victims()) == ["c", "r", "z"]


def test_prefix_orphans_go_first() -> None:
    policy = chain(PrefixPolicy(8), "a", "b", "c")
    policy.insert(k("x"))

    policy.remove(k("a"))  # an explicit evict: b, then c, can no longer be hit

    assert names(policy.victims()) == ["b", "c", "x"]


def test_prefix_victims_survive_removal_while_iterating() -> None:
    policy = chain(PrefixPolicy(8), "a", "b", "c")
    policy.insert(k("x"))
    walked = []

    for key in policy.victims():
        policy.remove(key)
        walked.append(key)

    assert names(walked) == ["c", "b", "a", "x"]
    assert len(policy) == 0


def test_prefix_counts_a_use_once_until_something_new_is_stored() -> None:
    policy = filled(PrefixPolicy(8), "a", "b")

    for _ in range(3):  # a lookup, a load and a save of the same request
        policy.touch(k("a"))

    assert policy.reuse_odds(0, 1) == 1.0  # one reuse, at age 1, and nothing else yet
    assert policy.reuse_odds(0, 2) == 0.5  # nothing seen that old: a coin flip
    policy.insert(k("c"))
    policy.touch(k("a"))
    assert policy.reuse_odds(1, 1) == 1.0


def test_prefix_learns_the_odds_of_reuse_from_ghosts() -> None:
    policy = PrefixPolicy(1)  # room for GHOSTS ghosts
    for key in ("a", "b", "c"):
        policy.insert(k(key))
        policy.remove(k(key))  # c's ghost pushes a's out: a never came back
    policy.insert(k("b"))  # b's ghost comes back, two inserts after its use

    assert GHOSTS == 2
    assert policy.reuse_odds(0, 2) == 0.5  # one back at age 2, one never
    assert policy.reuse_odds(0, 3) == 0.0  # nothing came back that late
    policy.touch(k("b"))  # a touch with no insert since the ghost's return: the same use
    assert policy.reuse_odds(0, 2) == 0.5


def test_prefix_a_returning_ghost_resumes_its_use_count() -> None:
    policy = PrefixPolicy(1)
    for key in ("p", "q", "r", "a"):
        policy.insert(k(key))
        policy.remove(k(key))  # p and q fall off the ghost list: two that never came back
    policy.insert(k("a"))  # a comes back at age 1: used again once

    assert policy.reuse_odds(0, 1) == 1 / 3
    policy.insert(k("b"))
    policy.touch(k("a"))  # its next use counts for class 1, not class 0
    assert (policy.reuse_odds(0, 1), policy.reuse_odds(1, 1)) == (1 / 3, 1.0)


def test_prefix_blocks_used_more_are_never_worth_less() -> None:
    policy = filled(PrefixPolicy(8), "a", "b", "c")
    policy.touch(k("a"))  # class 0 came back at age 2

    assert policy.reuse_odds(4, 2) == policy.reuse_odds(0, 2) == 1.0


def test_prefix_value_is_the_odds_times_the_position_cost() -> None:
    policy = chain(PrefixPolicy(8), "a", "b")

    assert policy.value(k("b")) == 0.5 * (1 + 16 / ATTENTION_TOKENS)
    assert policy.value(k("a")) == 0.5


def test_prefix_position_cost_never_breaks_a_tie_of_odds() -> None:
    policy = PrefixPolicy(8)
    policy.insert(k("deep"), position=ATTENTION_TOKENS)
    policy.insert(k("shallow"))

    assert names(policy.victims()) == ["deep", "shallow"]  # equal odds: the stalest first


def test_prefix_retained_blocks_go_last_until_their_window_passes() -> None:
    clock = FakeClock()
    policy = filled(PrefixPolicy(8, clock=clock), "a", "b", "c")
    assert isinstance(policy, PrefixPolicy)
    policy.retain(k("a"), 300.0)

    assert names(policy.victims()) == ["b", "c", "a"]
    clock.now += 300.0
    assert names(policy.victims()) == ["a", "b", "c"]  # expired: the stalest again


def test_prefix_a_use_starts_the_retention_window_again() -> None:
    clock = FakeClock()
    policy = filled(PrefixPolicy(8, clock=clock), "a", "b", "c")
    assert isinstance(policy, PrefixPolicy)
    policy.retain(k("a"), 300.0)

    clock.now += 299.0
    policy.touch(k("a"))
    clock.now += 299.0

    assert names(policy.victims()) == ["b", "c", "a"]


def test_prefix_held_blocks_go_by_deadline() -> None:
    clock = FakeClock()
    policy = filled(PrefixPolicy(8, clock=clock), "a", "b", "c")
    assert isinstance(policy, PrefixPolicy)
    policy.retain(k("a"), 600.0)
    policy.retain(k("b"), 60.0)
    policy.retain(k("c"), math.inf)

    assert names(policy.victims()) == ["b", "a", "c"]


def test_prefix_a_released_block_is_a_candidate_again() -> None:
    policy = filled(PrefixPolicy(8), "a", "b")
    assert isinstance(policy, PrefixPolicy)
    policy.retain(k("a"), math.inf)

    policy.retain(k("a"), None)

    assert names(policy.victims()) == ["b", "a"]


@pytest.mark.parametrize(("name", "retains"), [("lru", False), ("arc", False), ("prefix", True)])
def test_only_the_prefix_policy_can_hold_session_blocks(name: str, retains: bool) -> None:
    assert isinstance(make_policy(name, 8), RetainingPolicy) is retains


@pytest.mark.parametrize("seconds", [0.0, -5.0])
def test_prefix_retention_window_must_be_positive(seconds: float) -> None:
    with pytest.raises(ValueError, match=r"^a retention window must be positive seconds"):
        PrefixPolicy(8).retain(k("a"), seconds)


# A block used again every fourth insert, between one-off blocks, in a 2-block tier.
RECURRING = [key for r in range(6) for key in ("h", f"o{r}0", f"o{r}1", f"o{r}2")] + ["h"]


@pytest.mark.parametrize("policy", [LRUPolicy(), ARCPolicy(2)], ids=["lru", "arc"])
def test_lru_and_arc_evict_a_recurring_block_before_it_recurs(policy: EvictionPolicy) -> None:
    evicted, _ = replay(policy, 2, RECURRING)

    assert evicted.count("h") == 6  # every return is a miss


def test_prefix_learns_to_keep_a_recurring_block_over_one_offs() -> None:
    evicted, resident = replay(PrefixPolicy(2), 2, RECURRING)

    # h comes back from its ghost twice while one-offs fall off the ghost list never seen
    # again; from then on class 0 is worth less than h, and its returns are hits.
    assert evicted == [
        "h", "o00", "o01", "o02", "h", "o10", "o11", "o12", "o20", "o21", "o22",
        "o30", "o31", "o32", "o40", "o41", "o42", "o50", "o51",
    ]  # fmt: skip
    assert resident == {"h", "o52"}


# --- make_policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"), [("lru", LRUPolicy), ("arc", ARCPolicy), ("prefix", PrefixPolicy)]
)
def test_make_policy_builds_the_named_policy(name: str, cls: type) -> None:
    policy = make_policy(name, 8)

    assert type(policy) is cls
    assert policy.name == name


@pytest.mark.parametrize("name", ["arc", "prefix"])
def test_make_policy_passes_capacity(name: str) -> None:
    policy = make_policy(name, 8)

    assert isinstance(policy, ARCPolicy | PrefixPolicy)
    assert policy.capacity == 8


@pytest.mark.parametrize("name", ["fifo", "LRU", ""])
def test_make_policy_rejects_unknown_name_and_says_where_it_is_configured(name: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"^unknown eviction policy {name!r}; choose 'lru', 'arc' or 'prefix' "
        r"\(\[policy\] eviction\)$",
    ):
        make_policy(name, 8)


def test_make_policy_arc_rejects_zero_capacity() -> None:
    with pytest.raises(ValueError, match=r"^ARC needs a positive capacity"):
        make_policy("arc", 0)


# --- write policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "policy", "write_on_save"),
    [("write-through", WRITE_THROUGH, True), ("write-back", WRITE_BACK, False)],
)
def test_make_write_policy_builds_the_named_policy(
    name: str, policy: WritePolicy, write_on_save: bool
) -> None:
    assert make_write_policy(name) is policy
    assert policy == WritePolicy(name, write_on_save)


@pytest.mark.parametrize("name", ["writeback", "write_back", "Write-Through", ""])
def test_make_write_policy_rejects_unknown_name_and_says_where_it_is_configured(name: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"^unknown write policy {name!r}; choose 'write-through' or 'write-back' "
        r"\(\[policy\] write\)$",
    ):
        make_write_policy(name)


# --- admission ------------------------------------------------------------------------------


def offers(admission: Admission, trace: Iterable[str]) -> list[bool]:
    return [admission.admit(k(key)) for key in trace]


def test_threshold_one_admits_every_offer() -> None:
    assert offers(Admission(), ["a", "a", "b"]) == [True, True, True]


@pytest.mark.parametrize("threshold", [2, 3, 5])
def test_a_key_is_admitted_on_its_threshold_th_offer(threshold: int) -> None:
    assert offers(Admission(threshold), ["a"] * threshold) == [False] * (threshold - 1) + [True]


def test_sightings_are_counted_per_key() -> None:
    assert offers(Admission(2), ["a", "b", "a", "c", "b"]) == [False, False, True, False, True]


def test_admission_forgets_a_key_once_admitted() -> None:
    assert offers(Admission(2), ["a", "a", "a", "a"]) == [False, True, False, True]


def test_sightings_beyond_memory_forget_the_least_recently_seen_key() -> None:
    admission = Admission(2, memory=2)

    assert offers(admission, ["a", "b", "c"]) == [False, False, False]  # a is forgotten
    assert offers(admission, ["a", "c"]) == [False, True]


def test_a_repeat_sighting_refreshes_a_key_in_memory() -> None:
    admission = Admission(3, memory=2)

    assert offers(admission, ["a", "b", "a", "c", "a"]) == [False, False, False, False, True]


@pytest.mark.parametrize("threshold", [0, -1])
def test_admission_threshold_below_one_is_rejected(threshold: int) -> None:
    with pytest.raises(ValueError, match=rf"^admission threshold must be >= 1, got {threshold}$"):
        Admission(threshold)
