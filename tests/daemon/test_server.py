"""The socket data plane of a real daemon: round trips through the shared arena, the protocol's
typed errors for every kind of bad input, and leases that die with their client."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import NBYTES, SPEC, as_bytes, fuzz_examples, make_blocks, make_ns, make_tokens
from tiercache.client import AsyncClient, Client, RemoteError
from tiercache.daemon.config import ConfigError, load_config
from tiercache.daemon.process import DaemonProcess
from tiercache.daemon.protocol import MAX_FRAME, PROTOCOL_VERSION, decode, encode
from tiercache.daemon.service import Daemon
from tiercache.kernels import reference_quant as rq
from tiercache.keys import KeyChain, Namespace
from tiercache.spec import KVSpec
from tiercache.storage_format import encode as encode_records

NS = make_ns()


def daemon_env(tmp: Path, host_blocks: int = 8) -> dict[str, str]:
    return {
        "TIERCACHE_DAEMON__SOCKET": str(tmp / "tc.sock"),
        "TIERCACHE_TIERS_DISK__URL": str(tmp / "disk"),
        "TIERCACHE_TIERS_DISK__BYTES": str(256 * NBYTES),
        "TIERCACHE_TIERS_HOST__BYTES": str(host_blocks * NBYTES),
        "TIERCACHE_METRICS__LISTEN": "",
    }


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = Daemon(load_config(env=daemon_env(tmp_path)))
    await d.start()
    yield d
    await d.shutdown()


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[AsyncClient]:
    c = await AsyncClient.connect(daemon.config.daemon.socket)
    yield c
    await c.close()


async def raw(daemon: Daemon) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(daemon.config.daemon.socket)


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frame: bytes
) -> dict | None:  # type: ignore[type-arg]
    writer.write(frame)
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readexactly(4), 5)
    except asyncio.IncompleteReadError:
        return None
    return decode(await reader.readexactly(struct.unpack(">I", head)[0]))


HELLO = encode({"id": 1, "op": "hello", "args": {"version": PROTOCOL_VERSION}})


async def test_save_and_load_through_the_shared_arena_are_byte_exact(client: AsyncClient) -> None:
    tokens, blocks = make_tokens(5), make_blocks(5)
    assert (await client.save(NS, tokens, blocks, session="s")).stored == 5
    hit = await client.lookup(NS, tokens)
    assert (hit.blocks, hit.tiers) == (5, ["host"] * 5)
    got = await client.load(NS, tokens)
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))


async def test_lookup_and_load_from_a_first_block_and_evict_by_keys(client: AsyncClient) -> None:
    tokens, blocks = make_tokens(6), make_blocks(6)
    await client.save(NS, tokens, blocks)
    assert await client.evict(keys=[NS.block_keys(tokens)[2]]) == 1

    assert (await client.lookup(NS, tokens)).blocks == 2
    assert (await client.lookup(NS, tokens, first_block=3)).blocks == 3
    got = await client.load(NS, tokens, first_block=3)
    assert got.first_block == 3 and torch.equal(as_bytes(got.kv()), as_bytes(blocks[3:]))
    # A protocol-1 client sends no first_block: its lookup is of the prefix, as before.
    old = await client.call("lookup", ns=NS.hex, keys=KeyChain(NS.block_keys(tokens)).to_bytes())
    assert (old["blocks"], old["full_blocks"]) == (2, 6)
    with pytest.raises(RemoteError) as err:
        await client.call("lookup", ns=NS.hex, keys=b"", first_block=-1)
    assert err.value.code == "bad_request" and "'first_block'" in err.value.message


async def test_groups_of_one_spec_register_as_namespaces_of_their_own(client: AsyncClient) -> None:
    a, b = (Namespace(NS.model, SPEC, group=g) for g in ("sliding-0", "sliding-1"))
    tokens = make_tokens(2)
    await client.save(a, tokens, make_blocks(2, seed=1))
    await client.save(b, tokens, make_blocks(2, seed=2))

    got_a, got_b = await client.load(a, tokens), await client.load(b, tokens)

    assert torch.equal(as_bytes(got_a.kv()), as_bytes(make_blocks(2, seed=1)))
    assert torch.equal(as_bytes(got_b.kv()), as_bytes(make_blocks(2, seed=2)))
    assert (await client.lookup(NS, tokens)).blocks == 0  # nor does the group-less namespace


async def test_a_tail_is_stored_found_by_its_longest_candidate_and_loaded_byte_exact(
    client: AsyncClient,
) -> None:
    # Two full blocks, then a 2-token tail after them (its own key, a block of its own).
    tokens, blocks = make_tokens(3), make_blocks(3)
    chain = NS.block_keys(tokens[:8])
    after = tokens[8:11]  # the 3 tokens a later request has after the chain
    tail = NS.tail_keys(after, chain[-1])
    assert (await client.save(NS, KeyChain([*chain, tail[1]]), blocks)).stored == 3
    assert await client.lookup_tail(NS, tail) == (1, "host")  # tokens[8:10] are cached
    assert await client.lookup_tail(NS, tail[:1]) == (-1, "miss")  # 1 token: never stored
    assert await client.lookup_tail(NS, NS.tail_keys(after, chain[0])) == (-1, "miss")
    got = await client.load(NS, KeyChain([*chain, tail[1]]))
    assert got.blocks == 3 and torch.equal(as_bytes(got.kv()), as_bytes(blocks))
    with pytest.raises(RemoteError) as err:
        await client.call("lookup_tail", ns=NS.hex, keys="not bytes")
    assert err.value.code == "bad_request" and "tail keys" in err.value.message


async def test_load_into_hands_over_every_cached_block_in_place_and_stops_at_a_miss(
    client: AsyncClient,
) -> None:
    # Two chains saved interleaved, so one chain's blocks lie in non-adjacent slots; 12 blocks
    # to read through an 8-slot host tier: the lease comes in rounds, the runs in pieces.
    a, b = make_tokens(12, seed=1), make_tokens(12, seed=2)
    blocks_a, blocks_b = make_blocks(12, seed=1), make_blocks(12, seed=2)
    for i in range(0, 12, 3):
        await client.save(NS, a[: 4 * (i + 3)], blocks_a[i : i + 3], first_block=i)
        await client.save(NS, b[: 4 * (i + 3)], blocks_b[i : i + 3], first_block=i)
    got = torch.zeros_like(as_bytes(blocks_a))
    runs: list[int] = []

    def consume(i: int, rows: torch.Tensor) -> None:
        runs.append(rows.shape[0])
        got[2 + i : 2 + i + rows.shape[0]] = rows

    tiers = await client.load_into(NS, a, consume, first_block=2)
    assert len(tiers) == 10 and sum(runs) == 10
    assert torch.equal(got[2:], as_bytes(blocks_a)[2:])
    # A chain that is cached only up to block 1 hands over blocks 0 and 1, nothing more.
    changed = [*a[:8], *(t + 1 for t in a[8:])]
    runs.clear()
    assert len(await client.load_into(NS, changed, consume)) == 2 and sum(runs) == 2


async def test_a_save_bigger_than_the_host_tier_goes_through_in_rounds(client: AsyncClient) -> None:
    tokens, blocks = make_tokens(20), make_blocks(20)  # host holds 8
    assert (await client.save(NS, tokens, blocks)).stored == 20
    got = await client.load(NS, tokens)
    assert got.blocks == 20 and torch.equal(as_bytes(got.kv()), as_bytes(blocks))
    assert "disk" in got.tiers


async def test_the_socket_is_owner_only(daemon: Daemon) -> None:
    mode = stat.S_IMODE(os.stat(daemon.config.daemon.socket).st_mode)
    assert mode == 0o600


async def test_a_wrong_protocol_version_is_refused_and_closed(daemon: Daemon) -> None:
    reader, writer = await raw(daemon)
    reply = await roundtrip(
        reader, writer, encode({"id": 1, "op": "hello", "args": {"version": 99}})
    )
    assert reply is not None and reply["error"]["code"] == "bad_version"
    assert "this daemon speaks 1" in reply["error"]["message"]
    assert await reader.read() == b""  # closed
    writer.close()


async def test_a_request_before_hello_is_refused(daemon: Daemon) -> None:
    reader, writer = await raw(daemon)
    reply = await roundtrip(reader, writer, encode({"id": 7, "op": "lookup", "args": {}}))
    assert reply == {
        "id": 7,
        "ok": False,
        "error": {"code": "no_hello", "message": "the first request must be 'hello', got 'lookup'"},
    }
    writer.close()


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        ({"id": 2, "op": "explode", "args": {}}, "unknown_op"),
        ({"id": 2, "op": 5}, "bad_request"),
        ({"id": 2, "op": "lookup", "args": []}, "bad_request"),
        ({"id": 2, "op": "lookup", "args": {"ns": "nope", "tokens": b""}}, "unknown_namespace"),
        (
            {"id": 2, "op": "register", "args": {"model": "m", "spec": {"num_layers": -1}}},
            "bad_spec",
        ),
        ({"id": 2, "op": "register", "args": {"model": "m", "spec": {"bogus": 1}}}, "bad_spec"),
        (
            {
                "id": 2,
                "op": "register",
                "args": {
                    "model": "m",
                    "spec": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": 5},
                },
            },
            "bad_spec",
        ),
        ({"id": 2, "op": "commit", "args": {"txn": 12345}}, "unknown_txn"),
        ({"id": 2, "op": "release", "args": {"lease": -3}}, "bad_request"),
        ({"id": 2, "op": "ctl", "args": {"verb": "explode"}}, "unknown_verb"),
        (
            {"id": 2, "op": "ctl", "args": {"verb": "pin", "args": {"session": "nobody"}}},
            "unknown_session",
        ),
        (
            {
                "id": 2,
                "op": "ctl",
                "args": {"verb": "set", "args": {"name": "policy.admission", "value": 0}},
            },
            "bad_value",
        ),
    ],
)
async def test_bad_requests_get_typed_errors_and_the_connection_stays_usable(
    daemon: Daemon,
    msg: dict,
    code: str,  # type: ignore[type-arg]
) -> None:
    reader, writer = await raw(daemon)
    assert (await roundtrip(reader, writer, HELLO))["ok"]  # type: ignore[index]
    reply = await roundtrip(reader, writer, encode(msg))
    assert reply is not None and reply["ok"] is False and reply["error"]["code"] == code, reply
    again = await roundtrip(
        reader, writer, encode({"id": 3, "op": "ctl", "args": {"verb": "stats"}})
    )
    assert again is not None and again["ok"] is True
    writer.close()


async def test_bad_tokens_and_shapes_are_typed_errors(client: AsyncClient) -> None:
    await client.register(NS)
    with pytest.raises(RemoteError) as err:
        await client.call("lookup", ns=NS.hex, tokens=b"\x01\x02\x03")
    assert err.value.code == "bad_request"
    with pytest.raises(RemoteError) as err:
        await client.call("reserve", ns=NS.hex, tokens=b"\0" * 4 * 8, first_block=1, count=5)
    assert err.value.code == "bad_shape" and "do not fit the 2 full blocks" in err.value.message


@pytest.mark.parametrize("op", ["lookup", "touch", "reserve", "acquire", "prefetch"])
async def test_a_sequence_request_with_neither_keys_nor_tokens_names_both(
    client: AsyncClient, op: str
) -> None:
    # It named only 'tokens' ("must be packed ... bytes"), as if keys were not an option.
    await client.register(NS)
    with pytest.raises(RemoteError) as err:
        await client.call(op, ns=NS.hex)
    assert err.value.code == "bad_request"
    assert err.value.message.startswith(f"{op} needs")
    assert "'keys'" in err.value.message and "'tokens'" in err.value.message


@pytest.mark.parametrize(("op", "field"), [("reserve", "count"), ("acquire", "max_blocks")])
async def test_a_reservation_or_lease_of_no_block_is_refused_not_held(
    daemon: Daemon, client: AsyncClient, op: str, field: str
) -> None:
    # It was granted: an empty reservation or lease, held until the client hung up.
    tokens = make_tokens(2)
    await client.save(NS, tokens, make_blocks(2))
    if op == "reserve":
        tokens = make_tokens(2, seed=9)  # blocks to save, not the ones saved
    chain = KeyChain(NS.block_keys(tokens)).to_bytes()
    with pytest.raises(RemoteError) as err:
        await client.call(op, ns=NS.hex, keys=chain, **{field: 0})
    assert err.value.code == "bad_request"
    assert f"'{field}' must be a positive integer" in err.value.message
    assert daemon.server is not None
    (conn,) = daemon.server._conns.values()
    assert not conn.reservations and not conn.leases
    assert len((await client.call(op, ns=NS.hex, keys=chain, **{field: 1}))["slots"]) == 1


async def test_a_garbage_frame_is_an_error_but_not_the_end(daemon: Daemon) -> None:
    reader, writer = await raw(daemon)
    reply = await roundtrip(reader, writer, struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    assert reply is not None and reply["error"]["code"] == "bad_frame"
    assert (await roundtrip(reader, writer, HELLO))["ok"]  # type: ignore[index]
    writer.close()


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"op": "o" * (MAX_FRAME - 40), "args": []}, "bad_request"),
        ({"op": "ctl", "args": {"verb": "pin", "args": {"session": "s" * (MAX_FRAME - 60)}}},
         "unknown_session"),
        ({"id": b"\0" * (MAX_FRAME - 40), "op": "nope"}, "bad_request"),
    ],
)  # fmt: skip
async def test_a_request_quoted_in_its_error_still_gets_a_reply_that_fits_a_frame(
    daemon: Daemon,
    args: dict,  # type: ignore[type-arg]
    code: str,
) -> None:
    # The error quotes what was sent: whole, its reply was over MAX_FRAME and the daemon
    # hung up without one.
    reader, writer = await raw(daemon)
    assert (await roundtrip(reader, writer, HELLO))["ok"]  # type: ignore[index]
    reply = await roundtrip(reader, writer, encode({"id": 2, **args}))
    assert reply is not None and reply["error"]["code"] == code, reply
    assert len(reply["error"]["message"]) < 1100
    again = await roundtrip(
        reader, writer, encode({"id": 3, "op": "ctl", "args": {"verb": "stats"}})
    )
    assert again is not None and again["ok"] is True
    writer.close()


async def test_an_oversized_frame_is_refused_and_the_connection_closed(daemon: Daemon) -> None:
    reader, writer = await raw(daemon)
    reply = await roundtrip(reader, writer, struct.pack(">I", MAX_FRAME + 1))
    assert reply is not None and reply["error"]["code"] == "frame_too_large"
    assert await reader.read() == b""
    writer.close()


async def test_a_truncated_frame_does_not_hurt_the_daemon(
    daemon: Daemon, client: AsyncClient
) -> None:
    tokens = make_tokens(2)
    await client.save(NS, tokens, make_blocks(2))
    _, writer = await raw(daemon)
    writer.write(struct.pack(">I", 1000) + b"\x81")
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.05)
    assert (await client.lookup(NS, tokens)).blocks == 2


CHILD = textwrap.dedent(
    """
    import asyncio, os, sys, torch
    from tiercache import KVSpec, Namespace
    from tiercache.client import AsyncClient
    from tiercache.daemon.protocol import pack_tokens

    async def main(path, what):
        c = await AsyncClient.connect(path)
        ns = Namespace("test-model", KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4))
        await c.register(ns)
        tokens = pack_tokens(list(range(4 * 8)))
        if what == "lease":
            await c.call("acquire", ns=ns.hex, tokens=tokens)
        else:
            await c.call("reserve", ns=ns.hex, tokens=tokens)
        print("holding", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.parametrize("what", ["lease", "reservation"])
async def test_a_client_killed_while_holding_blocks_releases_them(
    daemon: Daemon, client: AsyncClient, what: str
) -> None:
    tokens = list(range(4 * 8))
    await client.save(NS, tokens, make_blocks(8))  # fills all 8 host slots
    if what == "reservation":
        await client.ctl("evict", keys=[k.hex() for k in NS.block_keys(tokens)])
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, daemon.config.daemon.socket, what, stdout=subprocess.PIPE
    )
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), 30)
    assert line.strip() == b"holding"
    m = daemon.manager
    assert m is not None and m.host is not None
    if what == "lease":
        assert all(e.leases == 1 for e in m.index)
    else:
        assert m.host.free_slots == 0 and len(m.index) == 0
    child.kill()  # SIGKILL: no chance to say goodbye
    await child.wait()
    for _ in range(100):
        if daemon.server is not None and daemon.server.clients == 1:
            break
        await asyncio.sleep(0.02)
    assert all(e.leases == 0 for e in m.index)
    if what == "reservation":
        assert m.host.free_slots == 8


def _arena_maps() -> set[str]:
    """The shared arenas this process maps (by /dev/shm path)."""
    with open("/proc/self/maps") as f:
        fields = (line.split(maxsplit=5) for line in f)
        paths = (f[5].strip().removesuffix(" (deleted)") for f in fields if len(f) == 6)
        return {p for p in paths if p.startswith("/dev/shm/tiercache-")}


@pytest.mark.parametrize("end", ["stop", "kill"])
def test_a_client_unmaps_the_arena_as_soon_as_its_daemon_is_gone(tmp_path: Path, end: str) -> None:
    # Held until the client's next request, its mapping could be the arena's last one, and
    # that request would pay for freeing every page of it.
    env = {"TIERCACHE_TIERS_DISK__URL": "none", "TIERCACHE_TIERS_HOST__BYTES": str(8 * NBYTES)}
    tokens, blocks = make_tokens(2), make_blocks(2)
    before = _arena_maps()
    with DaemonProcess(tmp_path, env) as d, Client(d.socket) as c:
        c.save(NS, tokens, blocks)
        mapped = _arena_maps() - before
        assert len(mapped) == 1  # the check is not vacuous: the client maps the arena
        d.stop() if end == "stop" else d.kill()
        deadline = time.monotonic() + 10
        while _arena_maps() & mapped and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _arena_maps() & mapped  # unmapped with no request from this client
        with pytest.raises(ConnectionError):
            c.load(NS, tokens)


async def test_drain_refuses_saves_but_serves_loads(client: AsyncClient) -> None:
    tokens, blocks = make_tokens(2), make_blocks(2)
    await client.save(NS, tokens, blocks)
    assert (await client.ctl("drain"))["draining"] is True
    with pytest.raises(RemoteError) as err:
        await client.save(NS, make_tokens(1, seed=9), make_blocks(1, seed=9))
    assert err.value.code == "draining"
    got = await client.load(NS, tokens)
    assert torch.equal(as_bytes(got.kv()), as_bytes(blocks))


MESSAGES = st.dictionaries(
    st.sampled_from(["id", "op", "args", "x"]),
    st.one_of(
        st.none(),
        st.integers(-(2**40), 2**40),
        st.text(max_size=8),
        st.binary(max_size=16),
        st.sampled_from(
            [
                "hello",
                "register",
                "lookup",
                "reserve",
                "commit",
                "abort",
                "acquire",
                "release",
                "prefetch",
                "ctl",
                "bye",
            ]
        ),
        st.dictionaries(
            st.text(max_size=6),
            st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=6), st.binary(max_size=8)),
            max_size=4,
        ),
    ),
    max_size=4,
)


@settings(
    max_examples=fuzz_examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(msgs=st.lists(MESSAGES, max_size=6))
async def test_fuzzed_messages_always_get_a_reply_and_never_hurt_the_daemon(
    daemon: Daemon,
    msgs: list[dict],  # type: ignore[type-arg]
) -> None:
    reader, writer = await raw(daemon)
    try:
        await roundtrip(reader, writer, HELLO)
        for msg in msgs:
            try:
                reply = await roundtrip(
                    reader, writer, struct.pack(">I", len(b := msgpack.packb(msg))) + b
                )
            except ConnectionError:
                reply = None
            if reply is None:  # the daemon hung up (bye, a bad hello): it must still serve others
                break
            assert set(reply) == {"id", "ok", "result"} or set(reply) == {"id", "ok", "error"}
            assert reply["ok"] or reply["error"]["code"] != "internal", reply
    finally:
        writer.close()
    c = await AsyncClient.connect(daemon.config.daemon.socket)
    assert "tiers" in await c.stats()
    await c.close()


async def test_closing_ends_connected_clients_before_waiting_for_the_listener(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # From Python 3.12.1 on, Server.wait_closed() returns only once every connection has
    # ended; emulated here (so the suite on 3.11 catches it): a drain that waits on it
    # while a client is still connected would hang until systemd's SIGKILL.
    d = Daemon(load_config(env=daemon_env(tmp_path)))
    await d.start()
    assert d.server is not None
    server = d.server

    async def wait_closed_312(self: asyncio.AbstractServer) -> None:
        while server.clients:  # noqa: ASYNC110 -- a stand-in for the stdlib's own wait
            await asyncio.sleep(0.01)

    monkeypatch.setattr(asyncio.base_events.Server, "wait_closed", wait_closed_312)
    c = await AsyncClient.connect(d.config.daemon.socket)
    assert server.clients == 1
    await asyncio.wait_for(d.shutdown(), 10)
    assert server.clients == 0 and not server.path.exists()
    await c.close()


def test_sigterm_flushes_write_back_blocks_and_exits_0(tmp_path: Path) -> None:
    env = {**os.environ, **daemon_env(tmp_path), "TIERCACHE_POLICY__WRITE": "write-back"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiercache.daemon.cli", "serve"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    sock = tmp_path / "tc.sock"
    try:
        for _ in range(300):
            if sock.exists():
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            asyncio.run(asyncio.sleep(0.05))
        tokens, blocks = make_tokens(3), make_blocks(3)

        async def save() -> None:
            c = await AsyncClient.connect(sock)
            await c.save(NS, tokens, blocks)
            await c.close()

        asyncio.run(save())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not sock.exists()

    async def reopen() -> None:
        from tiercache import TierManager

        m = await TierManager.open(
            host_bytes=8 * NBYTES, disk_url=str(tmp_path / "disk"), disk_bytes=256 * NBYTES
        )
        got = await m.load(NS, tokens)
        assert got.tiers == ["disk"] * 3 and torch.equal(as_bytes(got.kv()), as_bytes(blocks))
        await m.close()

    asyncio.run(reopen())


async def test_a_live_socket_is_not_taken_over_and_a_stale_one_is(
    tmp_path: Path, daemon: Daemon
) -> None:
    env = daemon_env(tmp_path)
    env["TIERCACHE_TIERS_DISK__URL"] = str(tmp_path / "disk2")
    second = Daemon(load_config(env=env))
    with pytest.raises(ConfigError, match="another daemon is serving"):
        await second.start()
    await second.shutdown()
    stale = tmp_path / "stale.sock"
    import socket as socket_mod

    s = socket_mod.socket(socket_mod.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: what a kill -9 leaves behind
    env2 = {
        **env,
        "TIERCACHE_DAEMON__SOCKET": str(stale),
        "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk3"),
    }
    third = Daemon(load_config(env=env2))
    await third.start()
    c = await AsyncClient.connect(stale)
    assert "tiers" in await c.stats()
    await c.close()
    await third.shutdown()


assert SPEC.block_nbytes == NBYTES


async def test_attaching_caches_for_a_quantized_namespace_is_refused_as_bad_layout(
    client: AsyncClient,
) -> None:
    # The attached copies move exact bytes; bad_layout sends the engine to host copies.
    quant = Namespace(NS.model, NS.spec, store_dtype="int8")
    await client.register(quant)
    with pytest.raises(RemoteError) as err:
        await client.call("attach", ns=quant.hex, layers=[], event=b"")
    assert err.value.code == "bad_layout" and "'int8'" in err.value.message


async def test_attaching_gpu_caches_to_a_daemon_without_cuda_is_refused_by_name(
    client: AsyncClient,
) -> None:
    # CI's daemon has no GPU: the refusal must be clear, and nothing else on the connection break.
    await client.register(NS)
    with pytest.raises(RemoteError) as err:
        await client.call("attach", ns=NS.hex, layers=[], event=b"")
    assert err.value.code == "no_cuda" and "shared host arena" in err.value.message

    keys = KeyChain(NS.block_keys(make_tokens(1))).to_bytes()
    for op in ("save_kv", "load_kv"):
        with pytest.raises(RemoteError) as err:
            await client.call(op, ns=NS.hex, engine=1, keys=keys, block_ids=[0])
        assert err.value.code == "unknown_engine"
    with pytest.raises(RemoteError) as err:
        await client.call("detach", engine=7)
    assert err.value.code == "unknown_engine"

    tokens, blocks = make_tokens(2), make_blocks(2)
    assert (await client.save(NS, tokens, blocks)).stored == 2
    assert torch.equal(as_bytes((await client.load(NS, tokens)).kv()), as_bytes(blocks))


async def test_each_socket_request_is_one_latency_observation_within_the_clients_wall_time(
    tmp_path: Path,
) -> None:
    # The manager's own timing nests inside the server's: before the fix, lookup, lookup_tail,
    # prefetch and acquire (a load) were observed twice per socket request.
    from tests.daemon.test_metrics import http_get, scrape

    env = {**daemon_env(tmp_path), "TIERCACHE_METRICS__LISTEN": "127.0.0.1:0"}
    d = Daemon(load_config(env=env))
    await d.start()
    try:
        assert d.http is not None
        url = f"http://127.0.0.1:{d.http.port}/metrics"
        c = await AsyncClient.connect(d.config.daemon.socket)
        tokens = make_tokens(4)
        await c.save(NS, tokens, make_blocks(4))

        def observed(op: str) -> tuple[float, float]:
            got = scrape(http_get(url))
            key = frozenset({("op", op)})
            # An op outside the exported set appears at its first observation.
            count = got.get(("tiercache_request_seconds_count", key), 0.0)
            return count, got.get(("tiercache_request_seconds_sum", key), 0.0)

        n = 5
        calls = {
            "lookup": lambda: c.lookup(NS, tokens),
            "lookup_tail": lambda: c.lookup_tail(NS, NS.tail_keys(tokens)),
            "prefetch": lambda: c.prefetch(NS, tokens),
            "acquire": lambda: c.load(NS, tokens),
        }
        for op, call in calls.items():
            count0, sum0 = await asyncio.to_thread(observed, op)
            t0 = time.perf_counter()
            for _ in range(n):
                await call()
            wall = time.perf_counter() - t0
            count, total = await asyncio.to_thread(observed, op)
            assert count - count0 == n, op
            assert 0 < (total - sum0) / n <= wall / n, op
        await c.close()
    finally:
        await d.shutdown()


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
async def test_a_quantized_namespace_round_trips_over_the_socket_and_stays_apart(
    client: AsyncClient, fmt: str
) -> None:
    qns = Namespace(NS.model, SPEC, store_dtype=fmt)
    await client.register(NS)  # the first namespace sizes the host slots: the exact one's
    tokens, blocks = make_tokens(3), make_blocks(3)
    assert (await client.save(qns, tokens, blocks)).stored == 3
    assert (await client.lookup(NS, tokens)).blocks == 0  # never served as exact
    got = await client.load(qns, tokens)
    assert got.data.shape == (3, qns.block_nbytes) and qns.block_nbytes < NBYTES
    assert torch.equal(got.data, encode_records(SPEC, blocks, fmt))  # type: ignore[arg-type]
    q = rq.quantize(blocks, "int8" if fmt == "int8" else "fp8")
    err = (got.kv().float() - blocks.float()).abs()
    assert bool((err <= rq.error_bound(q, SPEC.torch_dtype)).all())
    with pytest.raises(RemoteError) as bad:
        await client.call("register", model="m", spec=SPEC.to_dict(), store_dtype="int4")
    assert bad.value.code == "bad_request" and "'int4' is not one of exact" in bad.value.message


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
async def test_quantized_records_with_a_scale_encode_never_writes_are_refused_by_block(
    daemon: Daemon, client: AsyncClient, scale: float
) -> None:
    # They were stored: the head decoded as NaN, inf or negated values on every later load.
    qns = Namespace(NS.model, SPEC, store_dtype="int8")
    await client.register(NS)
    tokens, blocks = make_tokens(3), make_blocks(3)
    records = encode_records(SPEC, blocks, "int8").clone()
    at = qns.block_nbytes - 4  # the last scale: last layer, V, last head
    records[1, at:] = torch.tensor([scale]).view(torch.uint8)
    with pytest.raises(RemoteError) as err:
        await client.save(qns, tokens, records)
    assert err.value.code == "bad_request"
    assert f"block 1, layer 1, V, head 1 has scale {scale}" in err.value.message
    assert (await client.lookup(qns, tokens)).blocks == 0
    assert daemon.manager is not None and daemon.manager.host.free_slots == 8
    assert (await client.save(qns, tokens, blocks)).stored == 3  # encoded by the client


async def test_fp8_records_with_a_nan_code_are_refused_naming_the_head(
    daemon: Daemon, client: AsyncClient
) -> None:
    # Only the scales were checked: the element decoded as NaN for every reader.
    qns = Namespace(NS.model, SPEC, store_dtype="fp8_e4m3")
    await client.register(NS)
    tokens, blocks = make_tokens(3), make_blocks(3)
    records = encode_records(SPEC, blocks, "fp8_e4m3").clone()
    records[2, (((1 * 2 + 0) * 4 + 1) * 2 + 1) * 8] = 0xFF  # layer 1, K, token 1, head 1
    with pytest.raises(RemoteError) as err:
        await client.save(qns, tokens, records)
    assert err.value.code == "bad_request"
    assert "block 2, layer 1, K, head 1 holds code 0xff (an fp8 NaN)" in err.value.message
    assert (await client.lookup(qns, tokens)).blocks == 0
    assert daemon.manager is not None and daemon.manager.host.free_slots == 8


async def test_a_first_namespace_of_tiny_blocks_is_refused_and_a_real_one_still_registers(
    tmp_path: Path,
) -> None:
    # A 2 B block carved the 64 MiB arena into 32 M slots (1.3 GiB of the daemon's memory; a
    # default 1 GiB arena: ~10 GiB) and every real model was refused as too big for them.
    env = daemon_env(tmp_path)
    env["TIERCACHE_TIERS_HOST__BYTES"] = str(64 * 2**20)
    d = Daemon(load_config(env=env))
    await d.start()
    try:
        c = await AsyncClient.connect(d.config.daemon.socket)
        tiny = KVSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=1)
        with pytest.raises(RemoteError) as err:
            await c.register(Namespace("tiny", tiny))
        assert err.value.code == "bad_request"
        assert "a 2 B block would carve the 67108864 B host tier into 33554432 slots" in str(
            err.value
        )
        tokens, blocks = make_tokens(2), make_blocks(2)
        assert (await c.save(NS, tokens, blocks)).stored == 2
        assert torch.equal((await c.load(NS, tokens)).data, as_bytes(blocks))
        await c.close()
    finally:
        await d.shutdown()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a process as another user")
async def test_socket_group_members_may_map_the_arena_and_others_may_not(tmp_path: Path) -> None:
    """``[daemon] socket_group`` opens the socket and the shared arena to the group, so an
    engine running as another user in it can copy through the arena; anyone else cannot."""
    import grp
    import pwd

    group = grp.getgrgid(os.getgid())
    env = {**daemon_env(tmp_path), "TIERCACHE_DAEMON__SOCKET_GROUP": group.gr_name}
    d = Daemon(load_config(env=env))
    await d.start()
    try:
        assert d.manager is not None
        arena = d.manager.host.path
        assert arena is not None
        for path in (Path(d.config.daemon.socket), arena):
            st_ = path.stat()
            assert (stat.S_IMODE(st_.st_mode), st_.st_gid) == (0o660, group.gr_gid)
        nobody = pwd.getpwnam("nobody")
        assert nobody.pw_gid != group.gr_gid
        probe = ["/bin/sh", "-c", f": <> {arena}"]  # opens it read-write, as a client maps it
        member = await asyncio.to_thread(
            subprocess.run,
            probe,
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[group.gr_gid],
            cwd="/",
            capture_output=True,
        )
        assert member.returncode == 0, member.stderr
        other = await asyncio.to_thread(
            subprocess.run,
            probe,
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            cwd="/",
            capture_output=True,
        )
        assert other.returncode != 0 and b"Permission denied" in other.stderr
    finally:
        await d.shutdown()
