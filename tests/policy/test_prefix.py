"""The prefix eviction policy: leaf-first chains, learned odds of reuse, retention windows and
held session blocks."""

from __future__ import annotations

import math

import pytest

from tests.policy.traces import filled, k, names, replay
from tiercache.policy.arc import ARCPolicy
from tiercache.policy.base import POLICIES, EvictionPolicy, RetainingPolicy, make_policy
from tiercache.policy.lru import LRUPolicy
from tiercache.policy.prefix import GHOSTS, PrefixPolicy

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


def test_prefix_an_orphan_stays_an_orphan_when_touched_held_or_released() -> None:
    clock = FakeClock()
    for step in ("touch", "retain then release", "held past its window"):
        policy = chain(PrefixPolicy(8, clock=clock), "a", "b")
        policy.insert(k("x"))
        if step == "held past its window":
            policy.retain(k("b"), 5.0)
        policy.remove(k("a"))  # b's prefix can no longer be whole
        if step == "touch":
            policy.touch(k("b"))
        elif step == "retain then release":
            policy.retain(k("b"), 5.0)
            policy.retain(k("b"), None)
        else:
            clock.now += 10.0

        assert names(policy.victims()) == ["b", "x"], step


def test_prefix_an_orphan_whose_parent_returns_is_its_child_again() -> None:
    policy = PrefixPolicy(8)
    policy.insert(k("x"))
    chain(policy, "a", "b")
    policy.remove(k("a"))
    assert names(policy.victims()) == ["b", "x"]
    policy.insert(k("a"))  # back, e.g. promoted from disk: b is reachable again

    assert names(policy.victims()) == ["x", "b", "a"]  # not first, and before its parent
    policy.remove(k("a"))
    assert names(policy.victims()) == ["b", "x"]  # and an orphan again when it leaves


def test_prefix_removals_during_the_walk_that_orphan_blocks_are_walked_too() -> None:
    policy = chain(PrefixPolicy(8), "a", "b", "c")
    policy.insert(k("x"))
    policy.remove(k("a"))  # b (with its child c) is an orphan
    walked = []

    for key in policy.victims():  # taking b orphans c behind the orphans' walk
        policy.remove(key)
        walked.append(key)

    assert names(walked) == ["b", "c", "x"]
    assert len(policy) == 0


def test_prefix_keeps_no_list_for_a_window_no_block_is_held_in() -> None:
    clock = FakeClock()
    policy = filled(PrefixPolicy(8, clock=clock), "a", "b")
    for i in range(100):  # a window per session, each computed: every one different
        policy.retain(k("a"), 60.0 + i)
        policy.retain(k("b"), 90.0 + i)
    policy.retain(k("a"), None)
    clock.now += 1000.0
    assert sorted(names(policy.victims())) == ["a", "b"]

    assert policy._held == {}  # a leak would slow every walk down by the windows ever seen


def test_prefix_a_shared_root_gives_each_child_once_and_held_ones_never() -> None:
    policy = PrefixPolicy(64)
    policy.insert(k("root"))
    kids = [f"k{i}" for i in range(20)]
    for kid in kids:
        policy.insert(k(kid), parent=k("root"), position=16)
    for kid in kids[::3]:
        policy.retain(k(kid), math.inf)

    walked = names(policy.victims())

    free = [kid for kid in kids if kid not in kids[::3]]
    assert sorted(walked[: len(free)]) == sorted(free) and walked[len(free)] == "root"
    assert sorted(walked[len(free) + 1 :]) == sorted(kids[::3])  # the pinned, last


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


def test_prefix_ranks_by_the_odds_alone() -> None:
    policy = chain(PrefixPolicy(8), "a", "b")

    assert policy.odds(k("b")) == policy.odds(k("a")) == 0.5  # no history: even odds


def test_prefix_position_does_not_rank_blocks() -> None:
    """A deep block's prefill costs more, but ranking by that cost lost prefill compute on
    every trace measured (the module docstring): the less likely block goes first."""
    policy = PrefixPolicy(1)
    for key in ("a", "b", "c"):
        policy.insert(k(key))
        policy.remove(k(key))
    policy.insert(k("b"))  # b back at age 2, a never: class 0 is even odds up to age 2
    policy.insert(k("shallow"))
    policy.insert(k("deep"), position=65536)
    policy.insert(k("x"))
    policy.touch(k("b"))  # class 1 came back at age 3: sure up to there
    policy.touch(k("shallow"))  # class 0 back at age 2 again: 2/3 up to age 2

    assert (policy.odds(k("deep")), policy.odds(k("shallow"))) == (2 / 3, 1.0)
    # 2/3 x (1 + 65536 / 32768) would have outranked 1.0: the old cost kept the deep block
    assert next(policy.victims()) == k("deep")


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


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_holds_a_pinned_block_behind_every_other_until_released(name: str) -> None:
    policy = make_policy(name, 8)
    assert isinstance(policy, RetainingPolicy)
    for key in "abc":
        policy.insert(k(key))
    policy.retain(k("a"), math.inf)
    policy.insert(k("a"))  # used while pinned: still held
    policy.touch(k("a"))

    assert names(policy.victims())[:2] == ["b", "c"]
    assert "a" not in names(policy.victims())[:2] and len(policy) == 3

    policy.retain(k("a"), None)
    assert names(policy.victims()) == ["b", "c", "a"]  # back, as just used
    policy.retain(k("b"), math.inf)
    policy.remove(k("b"))  # a held block can leave the tier (an explicit evict)
    assert names(policy.victims()) == ["c", "a"] and len(policy) == 2


@pytest.mark.parametrize("name", ["lru", "arc"])
def test_lru_and_arc_hold_pins_but_refuse_a_retention_window(name: str) -> None:
    policy = make_policy(name, 8)
    policy.insert(k("a"))
    assert isinstance(policy, RetainingPolicy)
    with pytest.raises(ValueError, match=r"holds pins \(math.inf\) only"):
        policy.retain(k("a"), 300.0)


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


def test_prefix_resized_down_forgets_the_ghosts_beyond_its_new_capacity() -> None:
    policy = PrefixPolicy(4)  # room for 8 ghosts
    for key in "abcdef":
        policy.insert(k(key))
        policy.remove(k(key))

    policy.resize(2)  # room for 4: a and b never came back
    policy.insert(k("c"))  # c's ghost is still there: a reuse at age 4

    assert policy.capacity == 2
    assert policy.reuse_odds(0, 4) == 1 / 3


def test_prefix_refuses_to_resize_to_no_blocks() -> None:
    with pytest.raises(ValueError, match=r"^the prefix policy needs a positive capacity"):
        PrefixPolicy(2).resize(0)
