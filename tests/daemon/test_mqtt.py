"""The MQTT control channel, against a real Mosquitto running the shipped config and ACL.

Every daemon here is a ``MqttControl`` over a real ``Control`` and
``TierManager`` (host tier of 4 blocks, a disk tier; session ``chat`` holds 2
blocks on the host only). Each test gets its own node name, so tests sharing
the session's broker never see each other's topics. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import NBYTES, OpenCache, fuzz_examples, make_blocks, make_ns, make_tokens
from tests.services.mosquitto import (
    USERS,
    Mosquitto,
    TcpProxy,
    free_port,
    make_ca,
)
from tiercache import TierManager
from tiercache.daemon.config import ConfigError, MqttConfig
from tiercache.daemon.control import SETTABLE, VERBS, Control
from tiercache.daemon.mqtt import (
    MAX_PAYLOAD_BYTES,
    BrokerUnavailable,
    MqttControl,
    handle_command,
    request,
)

WAIT = 5.0  # seconds; no wait in this file is longer


# -- helpers ---------------------------------------------------------------------------


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT} s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Daemon:
    mqtt: MqttControl
    control: Control
    transitions: list[bool] = field(default_factory=list)  # every on_connected(...) call


@asynccontextmanager
async def serving(cfg: MqttConfig, control: Control, **kwargs: Any) -> AsyncIterator[Daemon]:
    """Run a MqttControl until it serves commands; stop it (bounded) on exit."""
    daemon = Daemon(MqttControl(cfg, control, backoff=(0.05, 0.2), **kwargs), control)
    daemon.mqtt.on_connected = daemon.transitions.append
    task = asyncio.create_task(daemon.mqtt.run())
    try:
        await until(lambda: daemon.mqtt.connected or task.done(), "the daemon to connect")
        if task.done():
            task.result()  # run() ended: show why
        yield daemon
    finally:
        await asyncio.wait_for(daemon.mqtt.stop(), WAIT)
        await asyncio.wait_for(task, WAIT)


def client_for(cfg: MqttConfig, user: str | None) -> aiomqtt.Client:
    return aiomqtt.Client(
        cfg.host,
        cfg.port,
        username=user,
        password=USERS[user] if user else None,
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=WAIT,
    )


def properties(response_topic: str | None = None, correlation: bytes | None = None) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props


class Operator:
    """A raw MQTT v5 client logged in as ``operator``, reading everything under one node."""

    def __init__(self, client: aiomqtt.Client, node: str) -> None:
        self.client = client
        self.base = f"tiercache/{node}"
        self._unclaimed: list[aiomqtt.Message] = []

    async def send(
        self,
        verb: str,
        payload: bytes = b"",
        *,
        reply_to: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        await self.client.publish(
            f"{self.base}/cmd/{verb}", payload, qos=1, properties=properties(reply_to, correlation)
        )

    async def next(self, topic: str) -> aiomqtt.Message:
        """The next message on ``topic`` (relative to the node), in arrival order."""
        topic = f"{self.base}/{topic}"
        for m in self._unclaimed:
            if m.topic.value == topic:
                self._unclaimed.remove(m)
                return m
        try:
            async with asyncio.timeout(WAIT):
                async for m in self.client.messages:
                    if m.topic.value == topic:
                        return m
                    self._unclaimed.append(m)
        except TimeoutError:
            raise AssertionError(f"no message on {topic} within {WAIT} s") from None
        raise AssertionError("the operator's connection ended")

    async def reply(self, topic: str = "reply") -> dict[str, Any]:
        body: dict[str, Any] = json.loads((await self.next(topic)).payload)
        return body


@asynccontextmanager
async def operator_on(broker: Mosquitto, node: str) -> AsyncIterator[Operator]:
    async with client_for(broker.config("operator", node=node), "operator") as client:
        await client.subscribe(f"tiercache/{node}/#", qos=1)
        yield Operator(client, node)


async def retained_status(broker: Mosquitto, node: str) -> str | None:
    """The retained status a newcomer sees, or None when the broker holds none."""
    async with client_for(broker.config("operator", node=node), "operator") as client:
        await client.subscribe(f"tiercache/{node}/status", qos=1)
        try:
            async with asyncio.timeout(1.0):
                async for m in client.messages:
                    return m.payload.decode()
        except TimeoutError:
            return None
    return None


def ok(result: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def node() -> str:
    return f"node-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def manager(open_cache: OpenCache) -> TierManager:
    m = await open_cache(host_blocks=4, disk_blocks=64)
    await m.save(make_ns(), make_tokens(2), make_blocks(2), session="chat")
    return m


@pytest.fixture
def ctl(mosquitto: Mosquitto, node: str) -> MqttConfig:
    """The [mqtt] settings of `tiercache ctl` run by an operator."""
    return mosquitto.config("operator", node=node)


@pytest.fixture
async def daemon(mosquitto: Mosquitto, manager: TierManager, node: str) -> AsyncIterator[Daemon]:
    async with serving(mosquitto.config("tiercache", node=node), Control(manager)) as d:
        yield d


@pytest.fixture
async def operator(mosquitto: Mosquitto, node: str) -> AsyncIterator[Operator]:
    async with operator_on(mosquitto, node) as op:
        yield op


# -- every verb, round trip through request() (Response Topic + Correlation Data) --------------


@pytest.mark.service
async def test_pin_pins_the_session_and_replies_with_its_block_count(
    daemon: Daemon, ctl: MqttConfig, manager: TierManager
) -> None:
    assert await request(ctl, "pin", {"session": "chat"}, timeout=WAIT) == ok({"blocks": 2})
    assert manager.sessions["chat"].pinned


@pytest.mark.service
async def test_unpin_unpins_the_session(
    daemon: Daemon, ctl: MqttConfig, manager: TierManager
) -> None:
    await manager.pin("chat")
    assert await request(ctl, "unpin", {"session": "chat"}, timeout=WAIT) == ok({"blocks": 2})
    assert not manager.sessions["chat"].pinned


@pytest.mark.service
async def test_evict_forgets_the_session_and_its_blocks(
    daemon: Daemon, ctl: MqttConfig, manager: TierManager
) -> None:
    assert await request(ctl, "evict", {"session": "chat"}, timeout=WAIT) == ok({"blocks": 2})
    assert "chat" not in manager.sessions
    assert len(manager.index) == 0


@pytest.mark.service
async def test_flush_writes_host_only_blocks_to_disk_once(daemon: Daemon, ctl: MqttConfig) -> None:
    assert await request(ctl, "flush", {}, timeout=WAIT) == ok({"bytes": 2 * NBYTES})
    assert await request(ctl, "flush", {}, timeout=WAIT) == ok({"bytes": 0})


@pytest.mark.service
async def test_prefetch_promotes_a_sessions_disk_blocks_to_host(
    daemon: Daemon, ctl: MqttConfig, manager: TierManager
) -> None:
    ns, chat = make_ns(), make_tokens(2)
    await manager.flush()
    await manager.save(ns, make_tokens(4, seed=1), make_blocks(4, seed=1), session="other")
    assert (await manager.lookup(ns, chat)).tiers == ["disk", "disk"]
    assert await request(ctl, "prefetch", {"session": "chat"}, timeout=WAIT) == ok({"blocks": 2})
    assert (await manager.lookup(ns, chat)).tiers == ["host", "host"]


@pytest.mark.service
async def test_stats_replies_with_the_managers_counters(daemon: Daemon, ctl: MqttConfig) -> None:
    reply = await request(ctl, "stats", {}, timeout=WAIT)
    assert reply == ok(await daemon.control.run("stats", {}))
    assert (reply["result"]["blocks"], reply["result"]["sessions"]) == (2, 1)


@pytest.mark.service
async def test_set_changes_a_setting_at_run_time(
    daemon: Daemon, ctl: MqttConfig, manager: TierManager
) -> None:
    args = {"name": "policy.admission", "value": 3}
    assert await request(ctl, "set", args, timeout=WAIT) == ok(args)
    assert manager.admission.threshold == 3


@pytest.mark.service
async def test_drain_flushes_and_stops_taking_saves(
    daemon: Daemon, ctl: MqttConfig, manager: TierManager
) -> None:
    assert await request(ctl, "drain", {}, timeout=WAIT) == ok(
        {"flushed_bytes": 2 * NBYTES, "draining": True}
    )
    assert manager.draining


# -- reply routing -----------------------------------------------------------------------------


@pytest.mark.service
async def test_reply_goes_to_the_response_topic_with_the_correlation_data_copied(
    daemon: Daemon, operator: Operator
) -> None:
    await operator.send(
        "pin",
        b'{"session": "chat"}',
        reply_to=f"{operator.base}/reply/mine",
        correlation=b"\x00id\xff",
    )
    message = await operator.next("reply/mine")
    assert getattr(message.properties, "CorrelationData", None) == b"\x00id\xff"
    assert json.loads(message.payload) == ok({"blocks": 2})


@pytest.mark.service
async def test_reply_without_a_response_topic_goes_to_the_nodes_reply_topic(
    daemon: Daemon, operator: Operator
) -> None:
    await operator.send("pin", b'{"session": "chat"}')
    message = await operator.next("reply")
    assert not hasattr(message.properties, "CorrelationData")
    assert json.loads(message.payload) == ok({"blocks": 2})


@pytest.mark.service
async def test_concurrent_requests_each_get_their_own_reply(
    daemon: Daemon, ctl: MqttConfig
) -> None:
    pin, unknown, bad = await asyncio.gather(
        request(ctl, "pin", {"session": "chat"}, timeout=WAIT),
        request(ctl, "pin", {"session": "nope"}, timeout=WAIT),
        request(ctl, "set", {"name": "policy.admission", "value": 0}, timeout=WAIT),
    )
    assert pin == ok({"blocks": 2})
    assert unknown["error"]["code"] == "unknown_session"
    assert bad["error"]["code"] == "bad_value"


@pytest.mark.service
async def test_any_requesters_response_topic_gets_the_reply_with_its_correlation_data(
    daemon: Daemon, mosquitto: Mosquitto, node: str
) -> None:
    # What MQTTX, Node-RED or paho do: subscribe to a reply topic of their own choosing.
    reply_to = f"app/replies/{uuid.uuid4().hex}"
    async with client_for(mosquitto.config("operator", node=node), "operator") as client:
        await client.subscribe(reply_to, qos=1)
        await client.publish(
            f"tiercache/{node}/cmd/stats",
            b"{}",
            qos=1,
            properties=properties(reply_to, b"ticket-7"),
        )
        async with asyncio.timeout(WAIT):
            message = await anext(aiter(client.messages))
    assert message.topic.value == reply_to
    assert getattr(message.properties, "CorrelationData", None) == b"ticket-7"
    assert json.loads(message.payload) == ok(await daemon.control.run("stats", {}))


@pytest.mark.service
@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("status", "is this node's own command, status or event topic (under {base!r})"),
        ("events/drain_done", "is this node's own command, status or event topic (under {base!r})"),
        ("cmd/flush", "is this node's own command, status or event topic (under {base!r})"),
        ("reply/+", "contains a wildcard or NUL (a reply needs one topic)"),
    ],
)
async def test_a_response_topic_on_the_nodes_own_topics_is_refused_and_nothing_runs(
    daemon: Daemon,
    operator: Operator,
    manager: TierManager,
    mosquitto: Mosquitto,
    node: str,
    topic: str,
    why: str,
) -> None:
    # A reply on the status topic would overwrite it; on cmd/ it would be a forged command.
    reply_to = f"{operator.base}/{topic}"
    await operator.send("pin", b'{"session": "chat"}', reply_to=reply_to, correlation=b"c")
    assert await operator.reply() == error(
        "bad_request", f"Response Topic {reply_to!r} {why.format(base=operator.base)}"
    )
    assert not manager.sessions["chat"].pinned
    assert await retained_status(mosquitto, node) == "online"  # status intact


@pytest.mark.service
@pytest.mark.parametrize("topic", ["status", "events/drain_done"])
async def test_a_response_topic_on_another_nodes_status_or_events_is_refused(
    daemon: Daemon, operator: Operator, manager: TierManager, mosquitto: Mosquitto, topic: str
) -> None:
    # The ACL lets the daemon's user write every node's status and events (one user for all
    # nodes) and the operator neither: a reply there would be a status or event forged for them.
    other = f"other-{uuid.uuid4().hex[:8]}"
    reply_to = f"tiercache/{other}/{topic}"
    async with operator_on(mosquitto, other) as watcher:
        await operator.send("pin", b'{"session": "chat"}', reply_to=reply_to, correlation=b"c")
        assert await operator.reply() == error(
            "bad_request",
            f"Response Topic {reply_to!r} is node {other!r}'s command, status or event topic",
        )
        assert not manager.sessions["chat"].pinned
        with pytest.raises(AssertionError, match="no message"):
            await watcher.next(topic)


@pytest.mark.service
async def test_a_retained_command_left_on_the_broker_is_not_run_when_the_daemon_connects(
    mosquitto: Mosquitto, manager: TierManager, node: str, operator: Operator, ctl: MqttConfig
) -> None:
    pin = f"tiercache/{node}/cmd/pin"
    await operator.client.publish(pin, b'{"session": "chat"}', qos=1, retain=True)
    try:
        async with serving(mosquitto.config("tiercache", node=node), Control(manager)):
            # Commands are served in order of arrival: the retained one would come first.
            assert (await request(ctl, "stats", {}, timeout=WAIT))["result"]["pinned_blocks"] == 0
        assert not manager.sessions["chat"].pinned
    finally:
        await operator.client.publish(pin, b"", qos=1, retain=True)  # clears it


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.service
async def test_invalid_json_is_a_bad_request(daemon: Daemon, operator: Operator) -> None:
    await operator.send("pin", b"{session: chat}")
    assert await operator.reply() == error(
        "bad_request",
        "payload is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    )


@pytest.mark.service
async def test_a_payload_that_is_not_a_json_object_is_a_bad_request(
    daemon: Daemon, operator: Operator
) -> None:
    await operator.send("pin", b'["chat"]')
    assert await operator.reply() == error(
        "bad_request", "payload must be a JSON object of arguments, got a JSON array"
    )


@pytest.mark.service
async def test_an_empty_payload_means_no_arguments(daemon: Daemon, operator: Operator) -> None:
    await operator.send("pin", b"")
    assert await operator.reply() == error(
        "bad_request", "pin: 'session' must be a non-empty string"
    )


@pytest.mark.service
async def test_an_unknown_verb_is_named_in_the_error(daemon: Daemon, ctl: MqttConfig) -> None:
    assert await request(ctl, "explode", {}, timeout=WAIT) == error(
        "unknown_verb", f"unknown verb 'explode'; verbs: {', '.join(VERBS)}"
    )


@pytest.mark.service
async def test_an_out_of_range_setting_is_a_bad_value_and_changes_nothing(
    daemon: Daemon, ctl: MqttConfig, manager: TierManager
) -> None:
    reply = await request(ctl, "set", {"name": "policy.admission", "value": 0}, timeout=WAIT)
    assert reply == error("bad_value", "set policy.admission: must be an integer >= 1, got 0")
    assert manager.admission.threshold == 1


@pytest.mark.service
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            {"name": "policy.admission", "value": 2**64},
            f"set policy.admission: must be at most {2**63 - 1} (a 64-bit integer, as in the "
            f"config file), got {2**64}",
        ),
        (
            {"name": "session.ttl", "session": "chat", "value": 10**400},
            f"set session.ttl: must be seconds > 0 or null, got {10**400}",
        ),
    ],
    ids=["admission-over-64-bits", "ttl-over-a-float"],
)
async def test_an_integer_only_json_can_carry_is_a_bad_value_and_changes_nothing(
    daemon: Daemon, ctl: MqttConfig, manager: TierManager, args: dict[str, Any], message: str
) -> None:
    # JSON integers have no bound; the socket's msgpack (every stats reply) stops at 64 bits.
    assert await request(ctl, "set", args, timeout=WAIT) == error("bad_value", message)
    assert manager.admission.threshold == 1
    assert manager.sessions["chat"].expires is None
    assert (await request(ctl, "stats", {}, timeout=WAIT))["ok"] is True


@pytest.mark.service
async def test_an_unknown_session_is_named_in_the_error(daemon: Daemon, ctl: MqttConfig) -> None:
    assert await request(ctl, "pin", {"session": "nope"}, timeout=WAIT) == error(
        "unknown_session", "unknown session 'nope'"
    )


@pytest.mark.service
@pytest.mark.parametrize(
    ("verb", "payload", "code"),
    [
        ("pin", b"\xff\xfe\x00garbage", "bad_request"),
        ("stats", b"null", "bad_request"),
        ("set", b'{"name": "session.ttl", "session": "chat", "value": NaN}', "bad_request"),
        ("stats", b"[" * 5000 + b"]" * 5000, "bad_request"),
        ("stats", b" " * (MAX_PAYLOAD_BYTES + 1), "bad_request"),
        ("", b"{}", "unknown_verb"),
        ("ピン", b"{}", "unknown_verb"),
        ("set", b'{"name": ["policy.write"], "value": "write-through"}', "bad_request"),
    ],
    ids=["not-utf8", "null", "nan", "deep", "too-big", "empty-verb", "unicode-verb", "list-name"],
)
async def test_malformed_commands_through_the_broker_get_an_error_reply(
    daemon: Daemon, operator: Operator, verb: str, payload: bytes, code: str
) -> None:
    await operator.send(verb, payload)
    reply = await operator.reply()
    assert (reply["ok"], reply["error"]["code"]) == (False, code)


@pytest.mark.service
async def test_a_request_nobody_answers_times_out_naming_the_broker_and_node(
    mosquitto: Mosquitto, ctl: MqttConfig
) -> None:
    with pytest.raises(TimeoutError) as e:
        await request(ctl, "stats", {}, node="nobody", timeout=1)
    assert str(e.value) == (
        f"no reply from node 'nobody' within 1 s via MQTT broker 127.0.0.1:{mosquitto.port} "
        "(user operator); the broker holds no status for it (is the daemon running with "
        "[mqtt] node = 'nobody', and does the ACL let it write tiercache/nobody/reply/#?)"
    )


# -- status, Last Will, reconnect ----------------------------------------------------------------


@pytest.mark.service
async def test_status_is_online_while_serving_and_offline_after_stop(
    mosquitto: Mosquitto, manager: TierManager, node: str
) -> None:
    async with serving(mosquitto.config("tiercache", node=node), Control(manager)) as d:
        assert await retained_status(mosquitto, node) == "online"
    assert not d.mqtt.connected
    assert d.transitions == [True, False]
    assert await retained_status(mosquitto, node) == "offline"


@pytest.mark.service
async def test_a_request_to_a_stopped_node_times_out_saying_it_is_offline(
    mosquitto: Mosquitto, manager: TierManager, node: str, ctl: MqttConfig
) -> None:
    async with serving(mosquitto.config("tiercache", node=node), Control(manager)):
        pass
    with pytest.raises(TimeoutError, match="its retained status is 'offline'"):
        await request(ctl, "stats", {}, timeout=1)


@pytest.mark.service
async def test_the_last_will_marks_the_node_offline_when_its_connection_dies(
    mosquitto: Mosquitto, manager: TierManager, node: str, operator: Operator
) -> None:
    proxy = TcpProxy(mosquitto.port)
    await proxy.start()
    async with serving(
        mosquitto.config("tiercache", node=node, port=proxy.port), Control(manager)
    ) as d:
        assert (await operator.next("status")).payload == b"online"
        await proxy.cut()  # no DISCONNECT reaches the broker: the Will fires
        assert (await operator.next("status")).payload == b"offline"
        await until(lambda: not d.mqtt.connected, "the daemon to notice")
        assert d.transitions == [True, False]
        assert await retained_status(mosquitto, node) == "offline"


@pytest.mark.service
async def test_after_a_reconnect_the_node_announces_its_current_status_again(
    mosquitto: Mosquitto, manager: TierManager, node: str, operator: Operator
) -> None:
    proxy = TcpProxy(mosquitto.port)
    await proxy.start()
    async with serving(
        mosquitto.config("tiercache", node=node, port=proxy.port), Control(manager)
    ) as d:
        await d.mqtt.set_status("draining")
        await proxy.cut()
        await until(lambda: not d.mqtt.connected, "the daemon to notice the cut")
        await proxy.start()
        await until(lambda: d.mqtt.connected, "the daemon to reconnect")
        seen = [(await operator.next("status")).payload.decode() for _ in range(4)]
        assert seen == ["online", "draining", "offline", "draining"]
        assert d.transitions == [True, False, True]
        await proxy.cut()


class HeldAfterConnack(TcpProxy):
    """Passes the broker's first packet (the CONNACK) on, then holds the rest until ``release()``:
    the client is connected but still setting up its session (announce, subscribe)."""

    def __init__(self, target: int) -> None:
        super().__init__(target)
        self.released = asyncio.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._open |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._held(up_reader, writer))

    async def _held(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(65536))
        await self.released.wait()
        await self._pipe(reader, writer)


@pytest.mark.service
async def test_a_status_set_while_the_session_is_set_up_is_announced_once_it_is(
    mosquitto: Mosquitto, manager: TierManager, node: str, operator: Operator
) -> None:
    proxy = HeldAfterConnack(mosquitto.port)
    await proxy.start()
    cfg = mosquitto.config("tiercache", node=node, port=proxy.port)
    mqtt = MqttControl(cfg, Control(manager), backoff=(0.05, 0.2))
    task = asyncio.create_task(mqtt.run())
    try:
        # The announcement reached the broker; its PUBACK (and the SUBACK after it) are held.
        assert (await operator.next("status")).payload == b"online"
        assert not mqtt.connected
        await mqtt.set_status("draining")  # a drain over the socket, say
        proxy.released.set()
        assert (await operator.next("status")).payload == b"draining"
        assert await retained_status(mosquitto, node) == "draining"
    finally:
        await asyncio.wait_for(mqtt.stop(), WAIT)
        await asyncio.wait_for(task, WAIT)
        await proxy.cut()


@pytest.mark.service
async def test_the_daemon_reconnects_by_itself_after_the_broker_is_killed_and_restarted(
    own_mosquitto: Mosquitto, manager: TierManager, node: str
) -> None:
    broker = own_mosquitto
    async with serving(broker.config("tiercache", node=node), Control(manager)) as d:
        broker.kill()
        await until(lambda: not d.mqtt.connected, "the daemon to notice the broker is gone")
        assert d.transitions == [True, False]
        await asyncio.sleep(0.3)  # a few failed attempts while it is down
        broker.start()
        await until(lambda: d.mqtt.connected, "the daemon to reconnect")
        assert d.transitions == [True, False, True]
        reply = await request(
            broker.config("operator", node=node), "pin", {"session": "chat"}, timeout=WAIT
        )
        assert reply == ok({"blocks": 2})
        # The killed broker kept no retained messages: the status is the daemon's new announcement.
        assert await retained_status(broker, node) == "online"


# -- the broker's ACL (ops/mosquitto/acl) --------------------------------------------------------


@pytest.mark.service
async def test_a_user_outside_the_acl_cannot_command_a_node(
    daemon: Daemon, mosquitto: Mosquitto, node: str, ctl: MqttConfig, manager: TierManager
) -> None:
    async with client_for(ctl, "guest") as guest:
        await guest.publish(f"tiercache/{node}/cmd/pin", b'{"session": "chat"}', qos=1)
    # The broker acknowledged (and denied) the guest's command before this request: nothing is in flight.
    assert (await request(ctl, "stats", {}, timeout=WAIT))["result"]["pinned_blocks"] == 0
    assert not manager.sessions["chat"].pinned


@pytest.mark.service
async def test_the_daemons_own_user_cannot_publish_commands(
    daemon: Daemon, mosquitto: Mosquitto, node: str, ctl: MqttConfig, manager: TierManager
) -> None:
    async with client_for(ctl, "tiercache") as itself:
        await itself.publish(f"tiercache/{node}/cmd/pin", b'{"session": "chat"}', qos=1)
    assert (await request(ctl, "stats", {}, timeout=WAIT))["result"]["pinned_blocks"] == 0
    assert not manager.sessions["chat"].pinned


@pytest.mark.service
async def test_a_refused_command_fails_at_once_with_the_brokers_reason(
    daemon: Daemon, mosquitto: Mosquitto, node: str
) -> None:
    started = time.monotonic()
    with pytest.raises(
        BrokerUnavailable, match=r"refused the command on tiercache/.*/cmd/pin: Not authorized"
    ):
        await request(
            mosquitto.config("guest", node=node), "pin", {"session": "chat"}, timeout=WAIT
        )
    assert time.monotonic() - started < WAIT / 2


async def test_a_broker_that_is_not_there_is_reported_by_address(node: str) -> None:
    cfg = MqttConfig(host="127.0.0.1", port=free_port(), node=node)
    with pytest.raises(
        BrokerUnavailable, match=rf"^MQTT broker 127.0.0.1:{cfg.port} \(user anonymous\): .*refused"
    ):
        await request(cfg, "stats", {}, timeout=WAIT)


@pytest.mark.service
async def test_anonymous_clients_are_refused(mosquitto: Mosquitto, node: str) -> None:
    with pytest.raises(BrokerUnavailable, match=r"user anonymous\): .*Not authorized"):
        await request(mosquitto.config(None, node=node), "stats", {}, timeout=WAIT)


# -- TLS -------------------------------------------------------------------------------------------


@pytest.mark.service
async def test_daemon_and_ctl_work_over_tls_with_the_test_ca(
    mosquitto: Mosquitto, manager: TierManager, node: str
) -> None:
    assert mosquitto.tls_port is not None and mosquitto.ca is not None
    port, ca = mosquitto.tls_port, mosquitto.ca
    async with serving(
        mosquitto.config("tiercache", node=node, port=port, tls_ca=ca), Control(manager)
    ):
        ctl_tls = mosquitto.config("operator", node=node, port=port, tls_ca=ca)
        reply = await request(ctl_tls, "pin", {"session": "chat"}, timeout=WAIT)
    assert reply == ok({"blocks": 2})


@pytest.mark.service
async def test_tls_with_a_ca_that_did_not_sign_the_broker_fails_with_a_certificate_error(
    mosquitto: Mosquitto, node: str, tmp_path: Path
) -> None:
    other = make_ca(tmp_path, "other-ca")
    cfg = mosquitto.config("operator", node=node, port=mosquitto.tls_port, tls_ca=other)
    with pytest.raises(
        BrokerUnavailable, match=r"TLS with CA .*other-ca.crt\): .*CERTIFICATE_VERIFY_FAILED"
    ):
        await request(cfg, "stats", {}, timeout=WAIT)


@pytest.mark.service
async def test_a_plain_client_on_the_tls_port_times_out_with_a_hint(
    mosquitto: Mosquitto, node: str
) -> None:
    cfg = mosquitto.config("operator", node=node, port=mosquitto.tls_port)
    with pytest.raises(
        TimeoutError, match=r"did not accept a connection within 0.5 s .*tls_ca is not set"
    ):
        await request(cfg, "stats", {}, timeout=0.5)


@pytest.mark.service
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"host": ""}, "mqtt.host: empty, so MQTT is off"),
        ({"port": 0}, "mqtt.port: 0 is not a TCP port"),
        ({"node": "a/b"}, "mqtt.node: node 'a/b' must be one MQTT topic level"),
        ({"prefix": "tc/#"}, "mqtt.prefix: 'tc/#' must be a topic without wildcards"),
        ({"tls_ca": "/nonexistent/ca.crt"}, "mqtt.tls_ca: no such file '/nonexistent/ca.crt'"),
        ({"password_file": "/nonexistent/pw"}, "mqtt.password_file: cannot read '/nonexistent/pw'"),
        ({"username": ""}, "mqtt.password_file is set but mqtt.username is empty"),
    ],
)
async def test_bad_settings_are_config_errors_naming_the_key(
    mosquitto: Mosquitto, manager: TierManager, change: dict[str, object], message: str
) -> None:
    cfg = mosquitto.config("tiercache", node="n")
    for key, value in change.items():
        setattr(cfg, key, value)
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        MqttControl(cfg, Control(manager))


# -- events ----------------------------------------------------------------------------------------


@pytest.mark.service
async def test_events_are_published_on_their_kind_topic(daemon: Daemon, operator: Operator) -> None:
    await daemon.mqtt.event("evicted", {"session": "chat", "blocks": 2})
    await daemon.mqtt.event("drained", {"flushed_bytes": 1024})
    assert json.loads((await operator.next("events/evicted")).payload) == {
        "session": "chat",
        "blocks": 2,
    }
    assert json.loads((await operator.next("events/drained")).payload) == {"flushed_bytes": 1024}


@pytest.mark.service
async def test_events_during_an_outage_never_block_drop_the_oldest_and_are_sent_after_reconnect(
    mosquitto: Mosquitto, manager: TierManager, node: str, operator: Operator
) -> None:
    proxy = TcpProxy(mosquitto.port)
    await proxy.start()
    cfg = mosquitto.config("tiercache", node=node, port=proxy.port)
    async with serving(cfg, Control(manager), event_queue=100) as d:
        await proxy.cut()
        await until(lambda: not d.mqtt.connected, "the daemon to notice the cut")
        async with asyncio.timeout(1.0):  # the data plane never waits on the broker
            for seq in range(150):
                await d.mqtt.event("tick", {"seq": seq})
        assert (d.mqtt.dropped_events, d.mqtt.pending_events) == (50, 100)
        await proxy.start()
        seqs = [json.loads((await operator.next("events/tick")).payload)["seq"] for _ in range(100)]
        assert seqs == list(range(50, 150))
        await until(lambda: d.mqtt.pending_events == 0, "the queue to drain")
        await proxy.cut()


# -- concurrency -------------------------------------------------------------------------------------


@pytest.mark.service
async def test_a_slow_verb_does_not_hold_up_other_commands(
    mosquitto: Mosquitto, manager: TierManager, node: str, ctl: MqttConfig
) -> None:
    release = asyncio.Event()

    async def slow_drained(flushed: int) -> None:
        await release.wait()

    control = Control(manager, on_drained=slow_drained)
    async with serving(mosquitto.config("tiercache", node=node), control):
        drain = asyncio.create_task(request(ctl, "drain", {}, timeout=WAIT))
        await until(lambda: control.draining, "the drain to start")
        stats = await request(ctl, "stats", {}, timeout=WAIT)
        assert stats["result"]["draining"] is True
        assert not drain.done()
        release.set()
        assert await drain == ok({"flushed_bytes": 2 * NBYTES, "draining": True})


@pytest.mark.service
async def test_a_patient_request_waits_past_its_timeout_while_the_node_is_up(
    mosquitto: Mosquitto, manager: TierManager, node: str, ctl: MqttConfig
) -> None:
    release = asyncio.Event()

    async def slow_drained(flushed: int) -> None:
        await release.wait()  # a drain that flushes many GiB

    async with serving(
        mosquitto.config("tiercache", node=node), Control(manager, on_drained=slow_drained)
    ):
        drain = asyncio.create_task(request(ctl, "drain", {}, timeout=0.5, patient=True))
        await asyncio.sleep(1.0)  # twice the timeout
        assert not drain.done()
        release.set()
        assert await asyncio.wait_for(drain, WAIT) == ok(
            {"flushed_bytes": 2 * NBYTES, "draining": True}
        )


@pytest.mark.service
async def test_a_patient_request_ends_at_once_when_the_node_goes_offline(
    mosquitto: Mosquitto, manager: TierManager, node: str, ctl: MqttConfig
) -> None:
    release = asyncio.Event()

    async def stuck(flushed: int) -> None:
        await release.wait()

    proxy = TcpProxy(mosquitto.port)
    await proxy.start()
    cfg = mosquitto.config("tiercache", node=node, port=proxy.port)
    async with serving(cfg, Control(manager, on_drained=stuck)) as d:
        drain = asyncio.create_task(request(ctl, "drain", {}, timeout=60, patient=True))
        await until(lambda: d.control.draining, "the drain to start")
        await proxy.cut()  # the daemon's connection dies: its Will says `offline`
        with pytest.raises(TimeoutError, match=f"node '{node}' is 'offline' .*no reply will come"):
            await asyncio.wait_for(drain, WAIT)
        release.set()


@pytest.mark.service
async def test_commands_beyond_the_pending_bound_are_refused_as_busy_and_counted(
    mosquitto: Mosquitto, manager: TierManager, node: str, operator: Operator
) -> None:
    release = asyncio.Event()

    async def slow_drained(flushed: int) -> None:
        await release.wait()

    control = Control(manager, on_drained=slow_drained)
    cfg = mosquitto.config("tiercache", node=node)
    async with serving(cfg, control, max_concurrent=1, max_pending=2) as d:
        await operator.send("drain", reply_to=f"{operator.base}/reply/drain")  # runs, blocks
        await operator.send("stats", reply_to=f"{operator.base}/reply/stats")  # waits for the slot
        await operator.send("stats", reply_to=f"{operator.base}/reply/dropped")  # over the bound
        await until(lambda: d.mqtt.dropped_commands == 1, "the third command to be dropped")
        # Its requester hears so at once, not at its own timeout.
        dropped = await operator.reply("reply/dropped")
        assert dropped == {
            "ok": False,
            "error": {
                "code": "busy",
                "message": f"stats: not run, 2 commands are already pending on node {node!r}; "
                "send it again once they are answered",
            },
        }
        release.set()
        assert (await operator.reply("reply/drain"))["ok"] is True
        assert (await operator.reply("reply/stats"))["result"]["draining"] is True


# -- any input, one well-formed reply ----------------------------------------------------------------

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_value = st.recursive(
    json_leaf | st.sampled_from(["chat", *SETTABLE, "write-through", "warning", "00ff"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
json_args = st.dictionaries(
    st.sampled_from(["session", "name", "value", "keys"]) | st.text(max_size=6), json_value
)
payloads = st.binary(max_size=64) | json_args.map(lambda a: json.dumps(a).encode()) | st.just(b"")


@settings(
    max_examples=fuzz_examples(300),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(verb=st.sampled_from(VERBS) | st.text(max_size=12), payload=payloads)
async def test_any_verb_and_payload_get_exactly_one_well_formed_reply(
    manager: TierManager, verb: str, payload: bytes
) -> None:
    level = logging.getLogger().level  # `set daemon.log_level` may be drawn
    try:
        reply = json.loads(await handle_command(Control(manager), verb, payload))
    finally:
        logging.getLogger().setLevel(level)
    if reply["ok"] is True:
        assert set(reply) == {"ok", "result"}
        assert isinstance(reply["result"], dict)
    else:
        assert reply["ok"] is False
        assert set(reply) == {"ok", "error"}
        assert set(reply["error"]) == {"code", "message"}
        assert all(isinstance(v, str) and v for v in reply["error"].values())
        assert reply["error"]["code"] != "internal", reply  # bad input is never a bug

    def no_constants(name: str) -> None:
        raise ValueError(name)

    try:
        decoded = json.loads(payload, parse_constant=no_constants) if payload else {}
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict):
        assert reply["error"]["code"] == "bad_request"
    elif verb not in VERBS:
        assert reply["error"]["code"] == "unknown_verb"
