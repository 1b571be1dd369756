"""The blocking client against a real ``tiercache serve``: round trips byte for byte, the
operator verbs, and a clear error where there is no daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, as_bytes, make_blocks, make_ns, make_tokens
from tiercache.client import Client
from tiercache.daemon.process import DaemonProcess


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = tmp_path_factory.mktemp("client-daemon")
    env = {
        "TIERCACHE_TIERS_HOST__BYTES": str(64 * NBYTES),
        "TIERCACHE_TIERS_DISK__URL": str(d / "disk"),
        "TIERCACHE_TIERS_DISK__BYTES": str(256 * NBYTES),
    }
    with DaemonProcess(d, env) as daemon:
        yield daemon


def test_connecting_where_no_daemon_listens_is_a_connection_error_with_a_hint(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConnectionError, match="tiercache serve") as e:
        Client(tmp_path / "nobody.sock")
    assert str(tmp_path / "nobody.sock") in str(e.value)


def test_save_lookup_and_load_round_trip_byte_exact(daemon: DaemonProcess) -> None:
    ns = make_ns("client-roundtrip")
    tokens, blocks = make_tokens(3, seed=1), make_blocks(3, seed=1)
    with Client(daemon.socket, name="test") as c:
        assert c.lookup(ns, tokens).blocks == 0
        c.save(ns, tokens, blocks)
        assert c.lookup(ns, tokens).blocks == 3
        assert c.lookup(ns, tokens, first_block=1).blocks == 2
        got = c.load(ns, tokens)
        assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))
        assert c.touch(ns, tokens) == 3


def test_load_into_hands_every_block_over_where_it_lies_in_the_arena(
    daemon: DaemonProcess,
) -> None:
    ns = make_ns("client-load-into")
    tokens, blocks = make_tokens(3, seed=2), make_blocks(3, seed=2)
    out = torch.zeros((3, NBYTES), dtype=torch.uint8)
    handed: list[int] = []

    def consume(i: int, rows: torch.Tensor) -> None:
        handed.extend(range(i, i + rows.shape[0]))
        out[i : i + rows.shape[0]] = rows

    with Client(daemon.socket) as c:
        c.save(ns, tokens, blocks)
        tiers = c.load_into(ns, tokens, consume)
    assert len(tiers) == 3
    assert handed == [0, 1, 2]
    assert torch.equal(out, as_bytes(blocks))


def test_blocks_saved_by_one_client_are_found_by_another(daemon: DaemonProcess) -> None:
    ns = make_ns("client-shared")
    tokens, blocks = make_tokens(2, seed=3), make_blocks(2, seed=3)
    with Client(daemon.socket) as a:
        a.save(ns, tokens, blocks)
    with Client(daemon.socket) as b:
        assert b.lookup(ns, tokens).blocks == 2


def test_session_verbs_pin_unpin_and_evict_count_the_sessions_blocks(
    daemon: DaemonProcess,
) -> None:
    ns = make_ns("client-session")
    tokens, blocks = make_tokens(4, seed=4), make_blocks(4, seed=4)
    with Client(daemon.socket) as c:
        c.save(ns, tokens, blocks, session="chat-1")
        assert c.pin("chat-1") == 4
        assert c.unpin("chat-1") == 4
        assert c.evict(session="chat-1") == 4
        assert c.lookup(ns, tokens).blocks == 0


def test_stats_and_ctl_answer_the_operator_verbs(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c:
        stats = c.stats()
        assert isinstance(stats, dict) and stats
        assert c.ctl("stats").keys() == stats.keys()
        assert c.flush() >= 0
