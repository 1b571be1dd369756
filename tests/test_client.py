"""The blocking client against a real ``tiercache serve``: round trips byte for byte, the
operator verbs, and a clear error where there is no daemon."""

from __future__ import annotations

import asyncio
import gc
import math
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import NBYTES, SPEC, as_bytes, make_blocks, make_ns, make_tokens
from tiercache import BlockShapeError
from tiercache import client as client_module
from tiercache.client import AsyncClient, Client, RemoteError
from tiercache.daemon import protocol as wire
from tiercache.daemon.config import load_config
from tiercache.daemon.process import DaemonProcess
from tiercache.daemon.protocol import PROTOCOL_VERSION
from tiercache.embedded import SyncCache
from tiercache.errors import CacheError
from tiercache.keys import Namespace


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


def test_a_load_into_the_engines_blocks_copies_them_once_and_takes_at_most_its_rows(
    daemon: DaemonProcess,
) -> None:
    ns = make_ns("client-into")
    tokens, blocks = make_tokens(3, seed=4), make_blocks(3, seed=4)
    with Client(daemon.socket) as c:
        c.save(ns, tokens, blocks)
        engine = torch.zeros((2, *SPEC.block_shape), dtype=SPEC.torch_dtype)
        got = c.load(ns, tokens, into=engine)
        assert got.blocks == 2  # two rows to fill: two blocks, of the three cached
        assert got.kv().data_ptr() == engine.data_ptr()
        assert torch.equal(as_bytes(engine), as_bytes(blocks[:2]))
        out = torch.zeros_like(engine)
        assert torch.equal(as_bytes(got.kv(out=out)), as_bytes(blocks[:2]))  # a copy
        with pytest.raises(BlockShapeError, match=re.escape("[2, 2, 2, 4, 2, 8]")):
            got.kv(out=torch.zeros_like(blocks))


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_a_quantized_load_into_dequantizes_straight_out_of_the_arena(
    daemon: DaemonProcess, fmt: str
) -> None:
    ns = Namespace(f"client-into-{fmt}", SPEC, store_dtype=fmt)
    tokens, blocks = make_tokens(3, seed=5), make_blocks(3, seed=5)
    with Client(daemon.socket) as c:
        c.save(ns, tokens, blocks)
        engine = torch.zeros((4, *SPEC.block_shape), dtype=SPEC.torch_dtype)
        got = c.load(ns, tokens, into=engine)
        assert got.blocks == 3 and got.data.shape[0] == 0  # no records copied out
        assert torch.equal(as_bytes(got.kv()), as_bytes(c.load(ns, tokens).kv()))
        assert not engine[3].any()
        assert not torch.equal(as_bytes(engine[:3]), as_bytes(blocks))  # quantized


@pytest.mark.parametrize(
    ("into", "message"),
    [
        (torch.zeros((2, *SPEC.block_shape), dtype=torch.float32), "into must be bfloat16"),
        (torch.zeros((2, 4, 2, 8), dtype=torch.bfloat16), "bfloat16 [n, 2, 2, 4, 2, 8]"),
        (torch.zeros((*SPEC.block_shape, 2), dtype=torch.bfloat16).movedim(-1, 0), "contiguous"),
    ],
)
def test_an_into_that_cannot_take_blocks_is_refused_before_any_lease(
    daemon: DaemonProcess, into: torch.Tensor, message: str
) -> None:
    ns = make_ns("client-into-bad")
    tokens = make_tokens(2, seed=6)
    with Client(daemon.socket) as c:
        c.save(ns, tokens, make_blocks(2, seed=6))
        with pytest.raises(BlockShapeError, match=re.escape(message)):
            c.load(ns, tokens, into=into)
        assert c.load(ns, tokens).blocks == 2


def test_closing_twice_is_a_no_op_and_a_call_after_close_is_a_connection_error(
    daemon: DaemonProcess,
) -> None:
    with Client(daemon.socket) as c:
        c.close()  # and __exit__ closes again
    with pytest.raises(ConnectionError, match="closed"):
        c.lookup(make_ns("client-closed"), make_tokens(1))


def test_calls_in_flight_on_other_threads_end_when_the_client_is_closed(
    daemon: DaemonProcess,
) -> None:
    ns = make_ns("client-close-in-flight")
    c = Client(daemon.socket)
    c.lookup(ns, make_tokens(1))  # registered: a save's first request is its reserve
    outcomes: list[BaseException | object] = []

    def save(seed: int) -> None:
        try:
            outcomes.append(c.save(ns, make_tokens(2, seed=seed), make_blocks(2, seed=seed)))
        except BaseException as e:
            outcomes.append(e)

    lock = c._c._lock
    savers = [threading.Thread(target=save, args=(seed,), daemon=True) for seed in range(8)]
    closer = threading.Thread(target=c.close, daemon=True)
    os.kill(daemon.pid, signal.SIGSTOP)  # the reserves' replies wait
    try:
        for saver in savers:  # each reserve queued behind the one before
            saver.start()
            _until(lambda: lock.locked())
        _until(lambda: len(lock._waiters or ()) == len(savers) - 1)
        closer.start()  # the close queued behind them: their commits come after it
        _until(lambda: len(lock._waiters or ()) == len(savers))
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    for thread in (closer, *savers):  # a commit found the connection closed: none may hang
        thread.join(30 if thread is closer else 1)
    assert not closer.is_alive() and not any(s.is_alive() for s in savers)
    assert len(outcomes) == len(savers)
    assert all(isinstance(o, ConnectionError) for o in outcomes)


def _until(done: Callable[[], bool]) -> None:
    for _ in range(3000):
        if done():
            return
        time.sleep(0.01)
    raise AssertionError("never happened")


def test_a_refused_hello_closes_the_socket_it_opened(
    daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)  # a newer client
    gc.disable()  # an unclosed transport is a cycle: only the collector would close its socket
    try:
        before = _open_fds()
        with pytest.raises(RemoteError, match="bad_version"):
            Client(daemon.socket)
        assert _open_fds() == before
    finally:
        gc.enable()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_negative_max_blocks_is_refused_by_name_not_served_as_a_miss(
    daemon: DaemonProcess,
) -> None:
    ns = make_ns("client-max-blocks")
    tokens = make_tokens(2, seed=8)
    with Client(daemon.socket) as c:
        c.save(ns, tokens, make_blocks(2, seed=8))
        for load in (c.load, partial(c.load_into, consume=lambda i, rows: None)):
            with pytest.raises(ValueError, match="max_blocks must be >= 0"):
                load(ns, tokens, max_blocks=-1)
        assert c.load(ns, tokens, max_blocks=1).blocks == 1


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan, math.inf, True, "5"])
def test_a_timeout_no_call_can_keep_is_refused_by_name_not_blamed_on_the_daemon(
    daemon: DaemonProcess, timeout: Any
) -> None:
    with pytest.raises(ValueError, match=r"^timeout must be positive seconds or None, got "):
        Client(daemon.socket, timeout=timeout)


BAD_BLOCK_NUMBERS = [
    (2**70, "must be < 2**64"),  # msgpack's OverflowError before
    (True, "must be an integer"),  # sent as block 1 by save and load before
    (1.5, "must be an integer"),
]


@pytest.mark.parametrize(("value", "error"), BAD_BLOCK_NUMBERS)
def test_a_block_number_no_block_has_is_refused_by_name_in_every_call(
    daemon: DaemonProcess, value: Any, error: str
) -> None:
    ns = make_ns(f"client-bad-block-number-{value!r}")
    tokens, blocks = make_tokens(2, seed=9), make_blocks(2, seed=9)
    with Client(daemon.socket) as c:
        calls: list[tuple[str, Callable[[], object]]] = [
            ("first_block", lambda: c.save(ns, tokens, blocks, first_block=value)),
            ("first_block", lambda: c.lookup(ns, tokens, first_block=value)),
            ("first_block", lambda: c.load(ns, tokens, first_block=value)),
            ("first_block", lambda: c.load_into(ns, tokens, lambda i, r: None, first_block=value)),
            ("max_blocks", lambda: c.load(ns, tokens, max_blocks=value)),
        ]
        for name, call in calls:
            with pytest.raises(ValueError) as e:
                call()
            assert str(e.value).startswith(f"{name} {error}")
            assert str(e.value).endswith(f"got {value!r}")
        assert c.save(ns, tokens, blocks, first_block=np.int64(0)).stored == 2
        assert c.load(ns, tokens, first_block=np.int64(1)).blocks == 1


async def test_a_reply_cut_off_by_the_daemons_death_is_a_lost_connection(tmp_path: Path) -> None:
    # A daemon killed while it writes a reply: the client reads part of a frame, then the end
    # of the stream. That is a lost connection (which the vLLM link reconnects after), not a
    # protocol error escaping to the engine. The real daemon cannot be stopped mid-frame on
    # cue, so this peer speaks the protocol up to the reply it cuts.
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = wire.decode(await wire.read_frame(reader) or b"")
        writer.write(wire.reply_frame(hello["id"], wire.HelloReply(PROTOCOL_VERSION, "peer")))
        ctl = wire.decode(await wire.read_frame(reader) or b"")
        reply = wire.reply_frame(ctl["id"], {"blocks": 3})
        writer.write(reply[: len(reply) // 2])
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(peer, str(tmp_path / "peer.sock"))
    async with server:
        c = await AsyncClient.connect(tmp_path / "peer.sock")
        with pytest.raises(ConnectionError, match="inside a"):
            await c.stats()
        with pytest.raises(ConnectionError):
            await c.stats()
        await c.close()


def test_a_call_the_daemon_does_not_answer_times_out_and_the_client_works_again(
    daemon: DaemonProcess,
) -> None:
    ns = make_ns("client-timeout")
    tokens, blocks = make_tokens(2, seed=7), make_blocks(2, seed=7)
    with Client(daemon.socket, timeout=1.0) as c:
        c.save(ns, tokens, blocks)
        stuck = Client(daemon.socket, timeout=1.0)
        os.kill(daemon.pid, signal.SIGSTOP)  # hung: its socket accepts, nothing answers
        try:
            with pytest.raises(TimeoutError, match="did not answer"):
                c.lookup(ns, tokens)
            with pytest.raises(TimeoutError):
                Client(daemon.socket, timeout=1.0)  # the hello is bounded too
            stuck.close()  # returns without the daemon's answer to its bye
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        # The late reply to the call that timed out is not taken for the next one's.
        assert c.lookup(ns, tokens).blocks == 2
        assert torch.equal(as_bytes(c.load(ns, tokens).kv()), as_bytes(blocks))


def test_a_daemons_errors_are_the_embedded_caches_error_classes(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    # Code written against the embedded cache catches the same failures from a daemon: each
    # error code arrives as a RemoteError that is also the embedded error it stands for.
    ns, tokens = make_ns("client-typed-errors"), make_tokens(2, seed=90)
    failures: list[Callable[[Any], object]] = [
        lambda c: c.pin("no-such-session"),
        lambda c: c.evict(session="pinned-chat"),
    ]
    config = load_config(env={"TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk")})
    with Client(daemon.socket) as remote, SyncCache(config) as local:
        for cache in (remote, local):
            cache.save(ns, tokens, make_blocks(2, seed=90), session="pinned-chat")
            cache.pin("pinned-chat")
        for fail in failures:
            with pytest.raises(CacheError) as embedded:
                fail(local)
            with pytest.raises(RemoteError) as got:
                fail(remote)
            assert isinstance(got.value, type(embedded.value)), (got.value, embedded.value)
            assert got.value.code in str(got.value)
            again = pickle.loads(pickle.dumps(got.value))  # across processes, say
            assert (type(again), again.code, again.message) == (
                type(got.value),
                got.value.code,
                got.value.message,
            )
    assert isinstance(wire.remote_error("bad_request", "x"), ValueError)
    assert type(wire.remote_error("a_code_from_a_newer_daemon", "x")) is RemoteError
