"""Retention: which blocks go (by age, then oldest beyond a size), and that nothing else does."""

from __future__ import annotations

import time
from typing import Any

import obstore

from tests.conftest import NBYTES, make_blocks, make_ns, make_tokens
from tests.remote.test_shared_tier import objects
from tiercache.tiers.remote import TRAILER_BYTES, StoredBlock, plan_retention, retention


def block(path: str, written: float, size: int = 10) -> StoredBlock:
    return StoredBlock(path, "ab", size, written)


def test_age_removes_exactly_the_blocks_written_before_the_cutoff() -> None:
    blocks = [block("a", 100), block("b", 150), block("c", 200)]
    assert plan_retention(blocks, now=260, max_age=100) == [block("a", 100), block("b", 150)]


def test_size_removes_the_oldest_until_the_rest_fit() -> None:
    blocks = [block("c", 300), block("a", 100), block("b", 200, size=25), block("d", 400)]
    # 55 bytes: without a (45) and b (20) the rest fits in 25; c and d stay.
    assert plan_retention(blocks, now=400, max_bytes=25) == [
        block("a", 100),
        block("b", 200, size=25),
    ]


def test_age_then_size_and_ties_broken_by_path() -> None:
    blocks = [block("y", 200), block("x", 200), block("old", 10), block("z", 300)]
    assert plan_retention(blocks, now=300, max_age=100, max_bytes=20) == [
        block("old", 10),
        block("x", 200),
    ]


def test_no_limits_remove_nothing() -> None:
    assert plan_retention([block("a", 0)], now=1e9) == []


async def test_retention_removes_old_blocks_of_a_namespace_and_nothing_else(
    open_node: Any,
) -> None:
    a = await open_node("a")
    one, two = make_ns(salt="one"), make_ns(salt="two")
    await a.save(one, make_tokens(3, seed=1), make_blocks(3, seed=1))
    await a.save(two, make_tokens(2, seed=2), make_blocks(2, seed=2))
    assert await a.shared.drain(30) == 0
    await obstore.put_async(a.remote.obj, "ns/notes.txt", b"an operator's note")
    await obstore.put_async(a.remote.obj, f"ns/{one.hex}/b/not-a-key", b"someone else's")
    before = await objects(a, "")

    report = await retention(a.remote, max_age=60, now=time.time() + 3600, namespace=one.hex)

    gone = {p for p in before if p.startswith(f"ns/{one.hex}/b/") and not p.endswith("not-a-key")}
    assert len(gone) == 3 and set(report.removed_paths) == gone
    assert await objects(a, "") == sorted(set(before) - gone)
    assert (report.removed, report.removed_bytes) == (3, 3 * (NBYTES + TRAILER_BYTES))


async def test_retention_by_size_keeps_what_fits_across_namespaces(open_node: Any) -> None:
    a = await open_node("a")
    one, two = make_ns(salt="one"), make_ns(salt="two")
    await a.save(one, make_tokens(3, seed=1), make_blocks(3, seed=1))
    await a.save(two, make_tokens(2, seed=2), make_blocks(2, seed=2))
    assert await a.shared.drain(30) == 0

    report = await retention(a.remote, max_bytes=2 * (NBYTES + TRAILER_BYTES))

    assert (report.scanned, report.removed, report.kept) == (5, 3, 2)
    assert len(await objects(a, "ns/")) == 2 + 2  # two blocks and the two namespace groups
