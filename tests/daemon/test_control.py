"""The operator verbs' ``stats`` counts, exactly (they drive the flush progress bar and alerts)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import (
    SPEC,
    OpenCache,
    make_blocks,
    make_ns,
    make_tokens,
    open_with_a_dead_store,
)
from tiercache.daemon.control import Control, ControlError
from tiercache.daemon.ctl import render_status
from tiercache.keys import Namespace

README = Path(__file__).resolve().parents[2] / "README.md"

NS = make_ns()


async def test_stats_counts_dirty_pinned_and_reserved_blocks(open_cache: OpenCache) -> None:
    m = await open_cache(host_blocks=8, write="write-back")
    control = Control(m)
    await m.save(NS, make_tokens(3, seed=1), make_blocks(3, seed=1), session="a")
    await m.pin("a")  # written to disk: a pin outlives a crash
    await m.save(NS, make_tokens(3, seed=3), make_blocks(3, seed=3))  # dirty
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


async def test_stats_counts_blocks_per_storage_format_and_tier_also_after_a_restart(
    open_cache: OpenCache,
) -> None:
    exact, int8 = make_ns(), Namespace("test-model", SPEC, store_dtype="int8")
    m = await open_cache(host_blocks=8, write="write-back")
    await m.save(exact, make_tokens(3, seed=1), make_blocks(3, seed=1))
    await m.save(int8, make_tokens(2, seed=2), make_blocks(2, seed=2))
    s = await Control(m).run("stats")
    assert s["formats"] == {"exact": {"host": 3}, "int8": {"host": 2}}
    await Control(m).run("flush")
    s = await Control(m).run("stats")
    assert s["formats"] == {"exact": {"host": 3, "disk": 3}, "int8": {"host": 2, "disk": 2}}
    await m.close()
    again = await open_cache(host_blocks=8)  # nothing registered yet: the arrays say
    s = await Control(again).run("stats")
    assert s["formats"] == {"exact": {"disk": 3}, "int8": {"disk": 2}}
    assert "formats: exact disk 3; int8 disk 2" in render_status(s)


@pytest.mark.parametrize("cut", [16, 34, 0])  # the prefix the logs print, one byte more, none
async def test_evict_names_a_key_that_is_not_a_block_key(open_cache: OpenCache, cut: int) -> None:
    m = await open_cache()
    tokens = make_tokens(1)
    await m.save(NS, tokens, make_blocks(1))
    given = ((await m.lookup(NS, tokens)).keys[0].hex() + "00")[:cut]
    with pytest.raises(ControlError) as err:
        await Control(m).run("evict", {"keys": [given]})
    assert (err.value.code, err.value.message) == (
        "bad_request",
        f"evict: a block key is 32 hex digits, got {given!r}",
    )
    assert (await m.lookup(NS, tokens)).blocks == 1


async def test_stats_and_status_show_the_kv_bytes_of_blocks_smaller_than_the_host_slots(
    open_cache: OpenCache,
) -> None:
    m = await open_cache(host_blocks=16)
    await m.register(make_ns(model="big", spec=replace(SPEC, num_layers=4 * SPEC.num_layers)))
    await m.save(NS, make_tokens(4), make_blocks(4))  # 4 blocks of 512 B in 2 KiB slots
    s = await Control(m).run("stats")
    assert s["tiers"]["host"] == {
        "capacity_bytes": 16 * 512,
        "used_bytes": 16 * 512,
        "blocks": 4,
        "kv_bytes": 4 * 512,
    }
    assert render_status(s).splitlines()[0] == (
        "host     8.0 KiB of    8.0 KiB (100.0%)  4 blocks, 2.0 KiB of KV in their slots"
    )


def readme_stats_section() -> str:
    """The README's list of the ``stats`` result (from its introduction to the metrics)."""
    text = README.read_text()
    start = text.index("`stats` (the verb over MQTT or the socket")
    return text[start : text.index("Prometheus metrics (", start)]


async def test_status_says_the_shared_tier_is_down_and_why(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    # Before, status printed nothing of the shared tier: a node whose store was down looked
    # healthy to the operator reading it.
    m = await open_with_a_dead_store(open_cache, tmp_path)
    line = next(x for x in render_status(await Control(m).run("stats")).splitlines() if "s3:" in x)
    assert line.startswith("remote s3://bucket/prefix: DOWN (retry in ")
    assert "error sending request" in line  # the store's own words
    assert line.endswith("queue 0 of 4096, uploaded 0, dropped none")


def test_status_shows_an_up_shared_tier_s_queue_and_drops_and_nothing_without_one() -> None:
    remote = {
        "url": "s3://b/p",
        "up": True,
        "queue_blocks": 3,
        "queue_bound": 4096,
        "uploaded_blocks": 12,
        "dropped_blocks": {"queue_full": 2, "evicted": 1},
    }
    assert "remote s3://b/p: up, queue 3 of 4096, uploaded 12, dropped evicted 1, queue_full 2" in (
        render_status({"remote": remote}).splitlines()
    )
    assert "remote" not in render_status({"remote": None})


async def test_the_readme_names_every_field_stats_answers_and_no_other(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    # Every tier and a shared tier.
    m = await open_with_a_dead_store(
        open_cache, tmp_path, device_bytes=2 * SPEC.block_nbytes, device_name="cpu"
    )
    s = await Control(m).run("stats")
    fields = {*s, *s["policy"], *s["remote"]} | {f for t in s["tiers"].values() for f in t}
    named = set(re.findall(r"`([a-z_]+)`", readme_stats_section()))
    assert set(s["tiers"]) == {"device", "host", "disk"}
    assert fields - named == set()  # answered, not documented
    # Documented, not answered (tier names and the section's own words aside).
    assert named - fields - {"device", "host", "disk", "null", "stats"} == set()
