"""The ARC eviction policy (Megiddo and Modha): its lists, ghosts and adaptive target, and
that it keeps frequently used keys through a scan that LRU flushes them for."""

from __future__ import annotations

import random

import pytest

from tests.policy.traces import HOT, SCAN, filled, k, names, replay
from tiercache.policy.arc import ARCPolicy
from tiercache.policy.lru import LRUPolicy

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


def test_arc_a_t1_victim_of_a_full_t1_leaves_no_ghost() -> None:
    # The paper's case IV(A) with |T1| = c: T1's oldest goes without a ghost (B1 stays
    # empty), so a scan longer than the cache does not fill B1 with keys never seen again.
    evicted, _ = replay(ARCPolicy(3), 3, ["a", "b", "c", "d"])
    policy = ARCPolicy(3)
    for key in ("a", "b", "c"):
        policy.insert(k(key))
    policy.remove(k("a"))  # the victim the tier took for d

    policy.insert(k("d"))

    assert evicted == ["a"]
    assert arc_state(policy) == {"t1": ["b", "c", "d"], "t2": [], "b1": [], "b2": []}


def test_arc_a_new_key_drops_the_oldest_b1_ghost_while_t1_and_b1_hold_c_keys() -> None:
    policy = arc_with_ghosts(3, b1=["a", "b"], b2=[], resident={"x": 2, "y": 1})

    policy.insert(k("z"))  # |T1| + |B1| = 3 = c: the paper drops B1's oldest

    assert arc_state(policy) == {"t1": ["y", "z"], "t2": ["x"], "b1": ["b"], "b2": []}


def test_arc_a_new_key_drops_the_oldest_b2_ghost_when_the_directory_holds_2c_keys() -> None:
    policy = arc_with_ghosts(2, b1=["a"], b2=["x", "y"], resident={"z": 2})

    policy.insert(k("n"))  # |T1| + |B1| = 1 < c, and 4 keys = 2c: B2's oldest goes

    assert arc_state(policy) == {"t1": ["n"], "t2": ["z"], "b1": ["a"], "b2": ["y"]}


class PaperARC:
    """Megiddo and Modha's ARC (FAST '03, Fig. 4) as a tier drives it: on a miss with the
    cache full the victim (REPLACE) is chosen before the missed key is looked at, so a ghost
    hit adapts p after it and the paper's tie (x in B2 and |T1| = p) cannot arise."""

    def __init__(self, c: int) -> None:
        self.c, self.p = c, 0.0
        self.t1: dict[str, None] = {}
        self.t2: dict[str, None] = {}
        self.b1: dict[str, None] = {}
        self.b2: dict[str, None] = {}
        self.evicted: list[str] = []

    def _replace(self) -> None:
        if self.t1 and (len(self.t1) > self.p or not self.t2):
            key = next(iter(self.t1))
            del self.t1[key]
            self.b1[key] = None
        else:
            key = next(iter(self.t2))
            del self.t2[key]
            self.b2[key] = None
        self.evicted.append(key)

    def access(self, x: str) -> None:
        c = self.c
        if x in self.t1 or x in self.t2:
            self.t1.pop(x, None)
            self.t2.pop(x, None)
            self.t2[x] = None
        elif x in self.b1 or x in self.b2:
            if len(self.t1) + len(self.t2) == c:
                self._replace()
            if x in self.b1:
                self.p = min(c, self.p + max(len(self.b2) / len(self.b1), 1))
                del self.b1[x]
            else:
                self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1))
                del self.b2[x]
            self.t2[x] = None
        else:
            l1 = len(self.t1) + len(self.b1)
            if l1 == c and len(self.t1) < c:
                del self.b1[next(iter(self.b1))]
                self._replace()
            elif l1 == c:
                key = next(iter(self.t1))
                del self.t1[key]
                self.evicted.append(key)
            elif l1 + len(self.t2) + len(self.b2) >= c:
                if l1 + len(self.t2) + len(self.b2) == 2 * c:
                    del self.b2[next(iter(self.b2))]
                if len(self.t1) + len(self.t2) == c:
                    self._replace()
            self.t1[x] = None


@pytest.mark.parametrize("seed", range(40))
def test_arc_evicts_as_the_paper_does_and_keeps_its_directory_bounds(seed: int) -> None:
    rng = random.Random(seed)
    c = rng.randint(1, 8)
    trace = [str(rng.randint(0, rng.choice([c, 2 * c, 4 * c]))) for _ in range(400)]
    paper = PaperARC(c)
    for x in trace:
        paper.access(x)
    policy = ARCPolicy(c)

    evicted, resident = replay(policy, c, trace)

    assert evicted == paper.evicted
    assert resident == set(paper.t1) | set(paper.t2)
    assert arc_state(policy) == {n: list(getattr(paper, n)) for n in ("t1", "t2", "b1", "b2")}
    assert policy.target_t1 == paper.p


def test_arc_directory_stays_within_2c_on_a_tier_holding_more_than_c_blocks() -> None:
    # A disk tier sized by one block size holds more blocks of a smaller one: residents past
    # c, removed in any order, never grow the ghosts past the directory's 2c.
    rng = random.Random(0)
    policy = ARCPolicy(4)
    resident: set[str] = set()
    for step in range(5000):
        key = str(rng.randint(0, 60))
        if key in resident and rng.random() < 0.5:
            policy.remove(k(key))
            resident.discard(key)
        else:
            policy.insert(k(key))
            resident.add(key)
        assert len(policy.b1) + len(policy.b2) <= 8, step
        assert len(policy) + len(policy.b1) + len(policy.b2) <= max(8, len(resident)), step


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


def test_arc_resized_down_keeps_its_target_and_ghosts_within_the_new_capacity() -> None:
    policy = ARCPolicy(8)
    for key in "abcdef":
        policy.insert(k(key))
    policy.touch(k("f"))
    for key in "abcdef":
        policy.remove(k(key))  # b1 = [a, b, c, d, e], b2 = [f]
    policy.insert(k("a"))  # a b1 hit: into t2
    policy.insert(k("g"))
    policy.target_t1 = 6.0

    policy.resize(2)

    assert (policy.capacity, policy.target_t1) == (2, 2.0)
    # T1 + B1 within c (B1's oldest ghosts go), and the directory, 4 keys, within 2c.
    assert arc_state(policy) == {"t1": ["g"], "t2": ["a"], "b1": ["e"], "b2": ["f"]}


def test_arc_resized_up_keeps_what_it_had() -> None:
    policy = ARCPolicy(2)
    for key in "ab":
        policy.insert(k(key))
        policy.remove(k(key))

    policy.resize(4)
    policy.insert(k("c"))
    policy.remove(k("c"))

    assert policy.capacity == 4
    assert arc_state(policy) == {"t1": [], "t2": [], "b1": ["a", "b", "c"], "b2": []}


def test_arc_refuses_to_resize_to_no_blocks() -> None:
    with pytest.raises(ValueError, match=r"^ARC needs a positive capacity in blocks$"):
        ARCPolicy(2).resize(0)
