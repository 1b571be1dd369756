"""Write policies (write-back, write-through) and admission (a key goes out on its N-th sighting)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from tests.policy.traces import k
from tiercache.policy.write import (
    WRITE_BACK,
    WRITE_THROUGH,
    Admission,
    WritePolicy,
    make_write_policy,
)

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


def test_a_refunded_key_is_admitted_on_its_next_offer() -> None:
    admission = Admission(3)
    assert offers(admission, ["a", "a", "a"]) == [False, False, True]

    admission.refund(k("a"))  # admitted, but there was no room to store it

    assert offers(admission, ["a", "a"]) == [True, False]
