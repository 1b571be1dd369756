"""``make_policy``: the eviction policy a config names, or an error saying where it is configured."""

from __future__ import annotations

import pytest

from tiercache.policy.arc import ARCPolicy
from tiercache.policy.base import make_policy
from tiercache.policy.lru import LRUPolicy
from tiercache.policy.prefix import PrefixPolicy

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
