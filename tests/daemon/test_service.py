"""What only the composed daemon does: MQTT events from real counter changes, the status it
publishes through a drain and a shutdown, and TTL expiry on its timer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import torch

from tests.conftest import NBYTES, as_bytes, make_blocks, make_ns, make_tokens
from tests.services.mosquitto import Mosquitto, mqtt_env
from tiercache.client import AsyncClient
from tiercache.daemon import service
from tiercache.daemon.config import MqttConfig, load_config
from tiercache.daemon.mqtt import request as mqtt_request
from tiercache.daemon.service import Daemon

NS = make_ns()


def daemon_env(tmp_path: Path, host_blocks: int, **more: str) -> dict[str, str]:
    """A daemon in ``tmp_path`` (socket, disk tier) with no metrics endpoint."""
    return {
        "TIERCACHE_DAEMON__SOCKET": str(tmp_path / "tc.sock"),
        "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk"),
        "TIERCACHE_TIERS_HOST__BYTES": str(host_blocks * NBYTES),
        "TIERCACHE_METRICS__LISTEN": "",
        **more,
    }


def mqtt_daemon(
    tmp_path: Path, mosquitto: Mosquitto, node: str, host_blocks: int
) -> tuple[Daemon, MqttConfig, dict[str, str]]:
    """A daemon of ``node`` on the test broker (not started), an operator's MQTT settings for
    that node, and the daemon's environment (to start another on the same disk)."""
    env = daemon_env(tmp_path, host_blocks, **mqtt_env(mosquitto.config(node=node)))
    return Daemon(load_config(env=env)), mosquitto.config("operator", node=node), env


async def _next(messages: AsyncIterator[aiomqtt.Message], topic: str, within: float = 15) -> Any:
    async def find() -> Any:
        async for msg in messages:
            if msg.topic.matches(topic):
                assert isinstance(msg.payload, bytes | bytearray)
                payload = bytes(msg.payload).decode()
                return json.loads(payload) if payload.startswith("{") else payload
        raise AssertionError("subscription ended")

    return await asyncio.wait_for(find(), within)


@pytest.mark.service
async def test_the_daemon_publishes_events_status_and_drain(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "EVENT_INTERVAL", 0.2)
    node = "service-test"
    cfg = mosquitto.config(node=node)
    env = daemon_env(tmp_path, 4, **mqtt_env(cfg))
    op = mosquitto.config("operator", node=node)
    password = (await asyncio.to_thread(Path(op.password_file).read_text)).strip()
    daemon = Daemon(load_config(env=env))
    async with aiomqtt.Client(
        op.host,
        op.port,
        username=op.username,
        password=password,
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as watcher:
        await watcher.subscribe(f"tiercache/{node}/#", qos=1)
        messages = watcher.messages
        await daemon.start()
        try:
            assert await _next(messages, f"tiercache/{node}/status") == "online"
            client = await AsyncClient.connect(tmp_path / "tc.sock")
            await client.save(
                NS, make_tokens(10), make_blocks(10)
            )  # 6 evictions from a 4-block host
            event = await _next(messages, f"tiercache/{node}/events/evictions")
            assert event == {"blocks": {"host": 6}, "interval_s": 0.2}
            drained = await client.ctl("drain")
            assert drained["draining"] is True
            assert await _next(messages, f"tiercache/{node}/status") == "draining"
            assert await _next(messages, f"tiercache/{node}/events/drain_done") == {
                "flushed_bytes": drained["flushed_bytes"]
            }
            await client.close()
        finally:
            await daemon.shutdown()
        # Shutdown drains (again) and then leaves: the retained status ends at offline.
        assert await _next(messages, f"tiercache/{node}/status") == "draining"
        assert await _next(messages, f"tiercache/{node}/status") == "offline"


async def test_the_daemon_expires_sessions_on_its_timer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "EXPIRE_INTERVAL", 0.05)
    env = daemon_env(tmp_path, 8)
    daemon = Daemon(load_config(env=env))
    await daemon.start()
    try:
        client = await AsyncClient.connect(tmp_path / "tc.sock")
        await client.save(NS, make_tokens(2), make_blocks(2), session="brief")
        await client.ctl("set", name="session.ttl", session="brief", value=0.1)
        for _ in range(100):
            if (await client.lookup(NS, make_tokens(2))).blocks == 0:
                break
            await asyncio.sleep(0.05)
        assert (await client.lookup(NS, make_tokens(2))).blocks == 0
        assert (await client.stats())["sessions"] == 0
        await client.close()
    finally:
        await daemon.shutdown()


@pytest.mark.service
async def test_a_command_that_comes_while_the_daemon_shuts_down_is_refused_and_changes_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    daemon, op, env = mqtt_daemon(tmp_path, mosquitto, "closing-test", 4)
    await daemon.start()
    replies: list[dict[str, Any]] = []
    try:
        client = await AsyncClient.connect(tmp_path / "tc.sock")
        await client.save(NS, make_tokens(2), make_blocks(2), session="chat")
        await client.close()
        assert (await mqtt_request(op, "stats", {}, timeout=15))["ok"] is True  # serving
        manager = daemon.manager
        assert manager is not None
        close = manager.close

        async def close_then_command(flush: bool = True) -> None:
            await close(flush)  # the disk tier is closed and its lock released: MQTT is still up
            replies.append(await mqtt_request(op, "evict", {"session": "chat"}, timeout=15))
            replies.append(await mqtt_request(op, "stats", {}, timeout=15))

        manager.close = close_then_command  # type: ignore[method-assign]
    finally:
        await daemon.shutdown()
    assert replies[0] == {
        "ok": False,
        "error": {"code": "shutting_down", "message": "evict: the daemon is shutting down"},
    }
    assert replies[1]["ok"] is True  # stats still answers, for a drain's progress bar
    again = Daemon(load_config(env=env))
    await again.start()
    try:
        client = await AsyncClient.connect(tmp_path / "tc.sock")
        assert (await client.lookup(NS, make_tokens(2))).blocks == 2  # nothing was evicted
        await client.close()
    finally:
        await again.shutdown()


async def until(cond: Callable[[], bool]) -> None:
    for _ in range(3000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


async def test_a_second_signal_cuts_the_drain_short_and_leaves_the_disk_consistent(
    tmp_path: Path,
) -> None:
    # The second SIGTERM or SIGINT did nothing: the daemon went on draining, however long.
    env = daemon_env(tmp_path, 8)
    flushed, written_back = make_tokens(2, seed=1), make_tokens(2, seed=2)
    daemon = Daemon(load_config(env=env))
    run = asyncio.create_task(daemon.run())  # serves until SIGTERM or SIGINT
    await until(lambda: (tmp_path / "tc.sock").exists())
    client = await AsyncClient.connect(tmp_path / "tc.sock")
    await client.save(NS, flushed, make_blocks(2, seed=1))
    await client.ctl("flush")
    await client.save(NS, written_back, make_blocks(2, seed=2))  # on the host only
    await client.close()
    assert daemon.manager is not None
    async with daemon.manager._lock:  # a drain that cannot end: its flush waits for the lock
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: not (tmp_path / "tc.sock").exists())  # then the drain starts
        os.kill(os.getpid(), signal.SIGINT)
        done, _ = await asyncio.wait({run}, timeout=60)
    assert run in done
    run.result()

    again = Daemon(load_config(env=env))  # the journal replays: what was flushed is there
    await again.start()
    try:
        client = await AsyncClient.connect(tmp_path / "tc.sock")
        assert (await client.lookup(NS, flushed)).tiers == ["disk", "disk"]
        assert (await client.lookup(NS, written_back)).blocks == 0  # the drain never wrote it
        got = await client.load(NS, flushed)
        assert torch.equal(as_bytes(got.kv()), as_bytes(make_blocks(2, seed=1)))
        assert (await client.stats())["corrupt_blocks"] == 0
        await client.close()
    finally:
        await again.shutdown()


@pytest.mark.service
async def test_a_second_signal_cuts_a_long_operator_verb_short(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # Shutdown waits for the operator verbs already running (Control.close), and the second
    # signal only cut the drain, which starts after that wait: a flush sent over MQTT that
    # took minutes held the daemon for minutes, signals or not.
    daemon, op, _ = mqtt_daemon(tmp_path, mosquitto, "cut-verb-test", 8)
    run = asyncio.create_task(daemon.run())  # serves until SIGTERM or SIGINT
    await until(lambda: (tmp_path / "tc.sock").exists())
    client = await AsyncClient.connect(tmp_path / "tc.sock")
    await client.save(NS, make_tokens(2, seed=3), make_blocks(2, seed=3))
    await client.close()
    assert (await mqtt_request(op, "stats", {}, timeout=15))["ok"] is True
    assert daemon.manager is not None and daemon.control is not None
    control = daemon.control
    async with daemon.manager._lock:  # a flush that cannot end: it waits for the lock
        flush = asyncio.create_task(mqtt_request(op, "flush", {}, timeout=60))
        await until(lambda: bool(control._verbs))
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: control.closing)  # shutdown waits for the flush
        os.kill(os.getpid(), signal.SIGINT)
        reply = await flush  # while the flush still could not have run
    assert reply["ok"] is False and reply["error"]["code"] == "shutting_down", reply
    done, _ = await asyncio.wait({run}, timeout=60)
    assert run in done
    run.result()
