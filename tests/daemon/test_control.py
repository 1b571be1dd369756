"""The operator verbs' ``stats`` counts, exactly (they drive the flush progress bar and alerts)."""

from __future__ import annotations

from tests.conftest import OpenCache, make_blocks, make_ns, make_tokens
from tiercache.daemon.control import Control

NS = make_ns()


async def test_stats_counts_dirty_pinned_and_reserved_blocks(open_cache: OpenCache) -> None:
    m = await open_cache(host_blocks=8, write="write-back")
    control = Control(m)
    await m.save(NS, make_tokens(3, seed=1), make_blocks(3, seed=1), session="a")
    await m.pin("a")
    r = await m.reserve(NS, make_tokens(2, seed=2))
    s = await control.run("stats")
    assert (s["dirty_blocks"], s["pinned_blocks"], s["reserved_slots"], s["leased_blocks"]) == (
        3,
        3,
        2,
        0,
    )
    await m.abort(r)
    await control.run("flush")
    lease = await m.acquire(NS, make_tokens(3, seed=1))
    s = await control.run("stats")
    assert (s["dirty_blocks"], s["pinned_blocks"], s["reserved_slots"], s["leased_blocks"]) == (
        0,
        3,
        0,
        3,
    )
    await m.release(lease)
