"""The MQTT control channel: operator commands in, replies, status and events out.

Topics (MQTT v5, QoS 1; ``P`` = ``[mqtt] prefix``, ``N`` = ``[mqtt] node``):

- ``P/N/cmd/<verb>`` in: a JSON object of arguments (an empty payload is ``{}``).
  The reply goes to the request's Response Topic (any topic but this node's own
  ``cmd``, ``status`` and ``events`` ones) with its Correlation Data copied, or
  to ``P/N/reply`` when the request names none, as
  ``{"ok": true, "result": …}`` or ``{"ok": false, "error": {"code", "message"}}``.
- ``P/N/status`` out, retained: ``online`` / ``draining`` while connected,
  ``offline`` after ``stop()`` and, as the Last Will, when the connection dies.
- ``P/N/events/<kind>`` out: one JSON object per event.

This module only transports: every verb lives in ``Control`` (shared with the
socket channel), and ``handle_command`` turns any payload, however malformed,
into exactly one reply.

Why it is shaped this way:

- Each command runs in its own task, at most ``max_concurrent`` at a time, so
  a slow ``flush`` never stops intake and a ``stats`` sent behind it is
  answered at once. Verbs are not cancelled on a timeout: a flush cut in half
  is worse than a late reply (the requester has its own timeout). Past
  ``max_pending`` accepted commands, a command is answered ``busy`` without
  running, so its requester need not wait out its timeout.
- The data plane never waits on the broker: ``event()`` appends to a bounded
  deque (the oldest event is dropped, and counted, when it is full) that a
  publisher task drains while connected. Events raised during an outage are
  kept up to that bound and published after the reconnect.
- The connection is owned here, not by aiomqtt: a dead broker ends the
  session, ``run()`` reconnects with jittered exponential backoff forever
  (until ``stop()``), and on every connect re-announces the current status,
  so a restarted broker without persistence learns it again.

Rejected: paho-mqtt's threaded loop with its own reconnect (callbacks on a
foreign thread would have to hop back into the daemon's event loop for every
verb, and its reconnect does not re-announce status or re-subscribe on a
clean session), and MQTT v3.1.1 (no Response Topic or Correlation Data, so
concurrent requesters could not tell their replies apart).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from tiercache.daemon.config import ConfigError, MqttConfig
from tiercache.daemon.control import Control, ControlError

log = logging.getLogger(__name__)

C = TypeVar("C", bound=aiomqtt.Client)

QOS = 1
# Commands are a few small fields; a bigger payload is a mistake, not a request.
MAX_PAYLOAD_BYTES = 64 * 1024
STATES = ("online", "draining")
_COMMAND_SUBSCRIPTION = SubscribeOptions(
    qos=QOS, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND
)

# What a JSON reader calls the Python types json.loads returns.
_JSON_TYPE = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic of one node; the one place their layout is spelled out."""

    prefix: str
    node: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.node}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def commands(self) -> str:
        return f"{self.base}/cmd/+"

    @property
    def reply(self) -> str:
        return f"{self.base}/reply"

    def command(self, verb: str) -> str:
        return f"{self.base}/cmd/{verb}"

    def event(self, kind: str) -> str:
        return f"{self.base}/events/{kind}"


def _check_level(value: str, what: str) -> None:
    """A single topic level: non-empty, no separator, no wildcard."""
    if not value or any(c in value for c in "/+#\0"):
        raise ValueError(f"{what} {value!r} must be one MQTT topic level (no '/', '+', '#')")


def _check_config(cfg: MqttConfig) -> str | None:
    """Validate ``cfg`` for connecting; returns the password (read from its file) or None."""
    if not cfg.host:
        raise ConfigError("mqtt.host: empty, so MQTT is off; set it to the broker's address")
    if not 0 < cfg.port < 65536:
        raise ConfigError(
            f"mqtt.port: {cfg.port} is not a TCP port (1883 plain, 8883 TLS by convention)"
        )
    if not cfg.prefix or any(c in cfg.prefix for c in "+#\0") or cfg.prefix.endswith("/"):
        raise ConfigError(f"mqtt.prefix: {cfg.prefix!r} must be a topic without wildcards")
    try:
        _check_level(cfg.node, "node")
    except ValueError as e:
        raise ConfigError(f"mqtt.node: {e}") from None
    if cfg.tls_ca and not Path(cfg.tls_ca).is_file():
        raise ConfigError(
            f"mqtt.tls_ca: no such file {cfg.tls_ca!r} (the CA that signed the broker's certificate)"
        )
    if not cfg.password_file:
        return None
    if not cfg.username:
        raise ConfigError("mqtt.password_file is set but mqtt.username is empty; set both")
    try:
        # One line, as `echo secret > file` writes it: the newline is not the password's.
        return Path(cfg.password_file).read_text().rstrip("\r\n")
    except OSError as e:
        raise ConfigError(
            f"mqtt.password_file: cannot read {cfg.password_file!r}: {e.strerror}"
        ) from None


def _make_client(
    client_class: type[C],
    cfg: MqttConfig,
    password: str | None,
    *,
    identifier: str,
    timeout: float,
    will: aiomqtt.Will | None = None,
    keepalive: int = 30,
) -> C:
    return client_class(
        cfg.host,
        cfg.port,
        username=cfg.username or None,
        password=password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        # Clean sessions: commands sent while a daemon is away are not worth
        # replaying later (their requesters have given up), so none are queued.
        clean_start=True,
        will=will,
        timeout=timeout,
        keepalive=keepalive,
        tls_params=aiomqtt.TLSParameters(ca_certs=cfg.tls_ca) if cfg.tls_ca else None,
        max_queued_incoming_messages=1024,
    )


def _describe(cfg: MqttConfig) -> str:
    """The broker as an error message should name it (never the password)."""
    user = cfg.username or "anonymous"
    tls = f", TLS with CA {cfg.tls_ca}" if cfg.tls_ca else ""
    return f"MQTT broker {cfg.host}:{cfg.port} (user {user}{tls})"


def _publish_properties() -> Properties:
    return Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


def _reason(e: BaseException) -> str:
    """aiomqtt wraps the real cause ("Disconnected during message iteration"): show both."""
    return f"{e}: {e.__cause__}" if e.__cause__ is not None else str(e)


# -- one command: bytes in, one reply out -------------------------------------------------


def _decode_args(payload: bytes) -> dict[str, Any]:
    if not payload:
        return {}
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ControlError(
            "bad_request", f"payload is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}"
        )

    def no_constants(name: str) -> None:
        # json.loads would accept NaN/Infinity, which no other JSON parser does.
        raise ValueError(f"{name} is not valid JSON")

    try:
        args = json.loads(payload, parse_constant=no_constants)
    except RecursionError:
        raise ControlError("bad_request", "payload is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise ControlError("bad_request", f"payload is not valid JSON: {e}") from None
    if not isinstance(args, dict):
        raise ControlError(
            "bad_request",
            f"payload must be a JSON object of arguments, got a JSON {_JSON_TYPE[type(args)]}",
        )
    return args


def encode_reply(reply: dict[str, Any]) -> bytes:
    try:
        return json.dumps(reply, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:  # a result the verb should not have returned
        log.error("reply not JSON-encodable: %s", e)
        error = ControlError("internal", f"the result could not be encoded as JSON: {e}")
        return json.dumps({"ok": False, "error": error.to_dict()}).encode()


async def run_command(control: Control, verb: str, payload: bytes) -> dict[str, Any]:
    """Run one command: the reply dict, ``ok`` true or false; never raises (except cancellation)."""
    try:
        return {"ok": True, "result": await control.run(verb, _decode_args(payload))}
    except ControlError as e:
        return {"ok": False, "error": e.to_dict()}
    except Exception as e:  # Control promises ControlError only; the transport must survive a bug
        log.exception("command %r failed outside Control's error handling", verb)
        return {"ok": False, "error": {"code": "internal", "message": f"{type(e).__name__}: {e}"}}


async def handle_command(control: Control, verb: str, payload: bytes) -> bytes:
    """``run_command``, encoded: the bytes of exactly one JSON reply."""
    return encode_reply(await run_command(control, verb, payload))


# -- the daemon's side ---------------------------------------------------------------------


class MqttControl:
    """The daemon's MQTT connection: serves ``Control`` verbs, publishes status and events."""

    def __init__(
        self,
        cfg: MqttConfig,
        control: Control,
        *,
        on_connected: Callable[[bool], None] | None = None,
        max_concurrent: int = 8,
        max_pending: int = 256,
        event_queue: int = 1000,
        backoff: tuple[float, float] = (0.5, 30.0),
        timeout: float = 10.0,
        stop_grace: float = 5.0,
    ) -> None:
        self._password = _check_config(cfg)  # config errors surface at startup, not in a retry loop
        self.cfg = cfg
        self.control = control
        self.on_connected = on_connected
        self.topics = Topics(cfg.prefix, cfg.node)
        self.max_pending = max_pending
        self.backoff = backoff
        self.timeout = timeout
        self.stop_grace = stop_grace
        self._identifier = f"tiercache-{cfg.node}-{uuid.uuid4().hex[:8]}"
        self._status = "online"
        self._client: aiomqtt.Client | None = None  # set while a session is up and subscribed
        self._slots = asyncio.Semaphore(max_concurrent)  # verbs running at once
        self._commands: set[asyncio.Task[None]] = set()  # accepted, not yet replied to
        # `busy` replies to commands over the bound, not yet published (bounded the same way).
        self._refusals: set[asyncio.Task[None]] = set()
        # (topic kind, encoded payload), newest last; drained by the publisher task.
        self._events: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=event_queue)
        self._events_ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._running = False
        self._stopped = asyncio.Event()
        self.dropped_events = 0
        self.dropped_commands = 0

    @property
    def connected(self) -> bool:
        """True while connected, subscribed and serving commands."""
        return self._client is not None

    @property
    def pending_events(self) -> int:
        return len(self._events)

    # -- lifecycle --------------------------------------------------------

    async def run(self) -> None:
        """Serve until ``stop()``: connect, serve, and reconnect after any failure."""
        first, cap = self.backoff
        delay = first
        self._running = True
        will = aiomqtt.Will(self.topics.status, "offline", qos=QOS, retain=True)
        try:
            while not self._stop.is_set():
                client = _make_client(
                    aiomqtt.Client,
                    self.cfg,
                    self._password,
                    identifier=self._identifier,
                    timeout=self.timeout,
                    will=will,
                )
                try:
                    async with client:
                        log.info("connected to %s as node %s", _describe(self.cfg), self.cfg.node)
                        delay = first
                        await self._session(client)
                except aiomqtt.MqttError as e:
                    log.warning(
                        "%s: %s; retrying in about %.1f s", _describe(self.cfg), _reason(e), delay
                    )
                except Exception:  # a bug here must not end MQTT for the daemon's lifetime
                    log.exception("MQTT session failed; retrying in about %.1f s", delay)
                finally:
                    self._set_client(None)
                if self._stop.is_set():
                    break
                # Jitter: nodes that lost the same broker do not all come back at once.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, cap)
        finally:
            self._running = False
            self._stopped.set()

    async def stop(self) -> None:
        """Finish in-flight commands, publish retained ``offline``, disconnect, end ``run()``."""
        self._stop.set()
        if self._running:
            # Bounded by the grace, the `offline` publish and the DISCONNECT handshake.
            try:
                await asyncio.wait_for(self._stopped.wait(), self.stop_grace + 2 * self.timeout + 1)
            except TimeoutError:
                log.warning("MQTT did not stop cleanly within its timeouts")
        # Never started a session, or the grace ran out.
        leftover = [*self._commands, *self._refusals]
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.wait(leftover, timeout=1.0)

    async def _session(self, client: aiomqtt.Client) -> None:
        """One connection: announce, subscribe, serve until it dies or ``stop()``."""
        announced = self._status
        await client.publish(self.topics.status, announced, qos=QOS, retain=True)
        # A command someone published retained would otherwise run again on every connect.
        await client.subscribe(self.topics.commands, options=_COMMAND_SUBSCRIPTION)
        self._set_client(client)
        if self._status != announced:  # set_status() ran meanwhile, with no client to say it
            await client.publish(self.topics.status, self._status, qos=QOS, retain=True)
        intake = asyncio.create_task(self._intake(client), name="mqtt-intake")
        publisher = asyncio.create_task(self._publish_events(client), name="mqtt-events")
        stopping = asyncio.create_task(self._stop.wait(), name="mqtt-stop")
        tasks = (intake, publisher, stopping)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if stopping not in done:
            for finished in done:
                if not finished.cancelled() and (error := finished.exception()) is not None:
                    raise error
            raise aiomqtt.MqttError("the session ended without an error")
        # Let accepted commands answer while the connection is still up.
        if self._commands or self._refusals:
            await asyncio.wait(self._commands | self._refusals, timeout=self.stop_grace)
        # A clean DISCONNECT discards the Will, so say `offline` ourselves.
        await client.publish(self.topics.status, "offline", qos=QOS, retain=True)
        self._set_client(None)

    def _set_client(self, client: aiomqtt.Client | None) -> None:
        was = self.connected
        self._client = client
        if self.connected != was:
            log.info("MQTT %s", "serving commands" if client else "disconnected")
            if self.on_connected is not None:
                try:
                    self.on_connected(self.connected)
                except Exception:
                    log.exception("on_connected callback failed")

    # -- commands ---------------------------------------------------------

    async def _intake(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self._accept(message)

    def _accept(self, message: aiomqtt.Message) -> None:
        """Start a task for one command; never waits, so intake never stalls."""
        verb = message.topic.value.rsplit("/", 1)[-1]
        props = message.properties
        correlation = getattr(props, "CorrelationData", None)
        reply_to = getattr(props, "ResponseTopic", None) or self.topics.reply
        refusal = None
        if (why := self._refuse_reply_to(reply_to)) is not None:
            # Refused before the verb runs; the refusal goes to this node's reply topic.
            refusal = ControlError("bad_request", f"Response Topic {reply_to!r} {why}")
            reply_to = self.topics.reply
        tasks = self._commands
        if len(self._commands) >= self.max_pending:
            # Not run, but answered: a requester waiting on its Response Topic hears it now
            # instead of at its timeout. A flood past twice the bound goes unanswered.
            self.dropped_commands += 1
            log.warning(
                "MQTT command %r dropped: %d commands already pending", verb, len(self._commands)
            )
            if len(self._refusals) >= self.max_pending:
                return
            tasks = self._refusals
            refusal = refusal or ControlError(
                "busy",
                f"{verb}: not run, {len(self._commands)} commands are already pending on node "
                f"{self.cfg.node!r}; send it again once they are answered",
            )
        task = asyncio.create_task(
            self._serve_command(verb, message.payload, reply_to, correlation, refusal)
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _refuse_reply_to(self, topic: str) -> str | None:
        """Why a reply may not go to ``topic``, or None: any requester's Response Topic is
        honoured (MQTTX, Node-RED and paho pick their own), except one with a wildcard or any
        node's command, status and event topics, which a reply would forge (the ACL lets the
        daemons' one user write every node's status and events). Where else the daemon may
        publish is the broker ACL's call (``ops/mosquitto/acl``)."""
        if any(c in topic for c in "+#\0"):
            return "contains a wildcard or NUL (a reply needs one topic)"
        t = self.topics
        if topic == t.status or any(
            topic == b or topic.startswith(b + "/") for b in (f"{t.base}/cmd", f"{t.base}/events")
        ):
            return f"is this node's own command, status or event topic (under {t.base!r})"
        if topic.startswith(t.prefix + "/"):
            node, _, rest = topic[len(t.prefix) + 1 :].partition("/")
            if rest == "status" or rest.split("/", 1)[0] in ("cmd", "events"):
                return f"is node {node!r}'s command, status or event topic"
        return None

    async def _serve_command(
        self,
        verb: str,
        payload: bytes,
        reply_to: str,
        correlation: bytes | None,
        refusal: ControlError | None = None,
    ) -> None:
        if refusal is not None:
            reply: dict[str, Any] = {"ok": False, "error": refusal.to_dict()}
        else:
            async with self._slots:
                reply = await run_command(self.control, verb, payload)
        outcome = "ok" if reply["ok"] else reply["error"]["code"]
        log.info("MQTT command %r: %s, reply to %s", verb, outcome, reply_to)
        props = _publish_properties()
        if correlation is not None:
            props.CorrelationData = correlation
        client = self._client  # the current connection: the one the command came on may be gone
        if client is None:
            log.warning("reply to MQTT command %s lost: not connected", verb)
            return
        try:
            await client.publish(reply_to, encode_reply(reply), qos=QOS, properties=props)
        except (aiomqtt.MqttError, ValueError) as e:  # ValueError: paho refuses a wildcard topic
            log.warning("reply to MQTT command %s on %r failed: %s", verb, reply_to, e)

    # -- status and events -----------------------------------------------

    async def set_status(self, state: str) -> None:
        """Publish the node's retained status now (if connected) and after every reconnect."""
        if state not in STATES:
            raise ValueError(f"status must be one of {', '.join(STATES)}, got {state!r}")
        self._status = state
        client = self._client
        if client is None:
            return
        try:
            await client.publish(self.topics.status, state, qos=QOS, retain=True)
        except aiomqtt.MqttError as e:
            log.warning("status %s not published (sent again on reconnect): %s", state, e)

    async def event(self, kind: str, payload: dict[str, Any]) -> None:
        """Queue an event for ``events/<kind>``; never waits for the broker.

        ``payload`` is encoded now (values JSON lacks, such as paths, as strings),
        so a caller may reuse the dict at once.
        """
        _check_level(kind, "event kind")
        try:
            body = json.dumps(payload, allow_nan=False, default=str, separators=(",", ":")).encode()
        except ValueError as e:
            self.dropped_events += 1
            log.warning("event %s dropped: %s", kind, e)
            return
        if len(self._events) == self._events.maxlen:
            self.dropped_events += 1  # the deque drops the oldest on append
        self._events.append((kind, body))
        self._events_ready.set()

    async def _publish_events(self, client: aiomqtt.Client) -> None:
        while True:
            if not self._events:
                self._events_ready.clear()
                await self._events_ready.wait()
                continue
            item = self._events[0]
            await client.publish(self.topics.event(item[0]), item[1], qos=QOS)
            # Popped only once acknowledged, so a dying connection loses nothing;
            # if event() dropped it meanwhile, the head is already another event.
            if self._events and self._events[0] is item:
                self._events.popleft()


# -- the requester's side (tiercache ctl) ---------------------------------------------------


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached, refused the login, or refused the command."""


class _RequestClient(aiomqtt.Client):
    """Remembers a refused PUBACK, so a command the ACL denies fails now, not at the timeout.

    aiomqtt drops the PUBACK reason code; this hooks its (private) callback. If a
    later aiomqtt renames it, a denied command falls back to the timeout.
    """

    refused: ReasonCode | None = None

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        if isinstance(reason_code, ReasonCode) and reason_code.is_failure:
            self.refused = reason_code
        super()._on_publish(client, userdata, mid, reason_code, properties)


async def request(
    cfg: MqttConfig,
    verb: str,
    args: dict[str, Any],
    *,
    node: str | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 -- one deadline over connect, send and reply
    patient: bool = False,
) -> dict[str, Any]:
    """Send one command to ``node`` (default ``cfg.node``) and return its reply dict.

    The reply comes on a topic of its own (``P/N/reply/<uuid>``) with fresh
    Correlation Data, so concurrent requesters never see each other's replies.
    Raises ``TimeoutError`` when no reply comes in ``timeout`` seconds,
    ``BrokerUnavailable`` when the broker cannot be used, ``ConfigError`` for
    bad settings. ``patient`` (a flush or drain of many GiB takes minutes): once the
    node's status says it is up, wait for the reply as long as it stays up; an
    ``offline`` status (its Last Will) ends the wait at once.
    """
    node = cfg.node if node is None else node
    password = _check_config(cfg)
    try:
        _check_level(node, "node")  # `--node`: cfg.node was checked above
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_level(verb, "verb")
    topics = Topics(cfg.prefix, node)
    ticket = uuid.uuid4()
    reply_topic = f"{topics.reply}/{ticket.hex}"
    props = _publish_properties()
    props.ResponseTopic = reply_topic
    props.CorrelationData = ticket.bytes
    # aiomqtt's own timeouts are longer, so the overall deadline below is the one that fires.
    client = _make_client(
        _RequestClient,
        cfg,
        password,
        identifier=f"tiercache-ctl-{ticket.hex[:12]}",
        timeout=2 * timeout,
    )
    status: str | None = None
    connected = False
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline, client:
            connected = True
            await client.subscribe(reply_topic, qos=QOS)
            # The retained status tells a timeout apart: daemon offline, or never seen.
            await client.subscribe(topics.status, qos=QOS)
            await client.publish(
                topics.command(verb), json.dumps(args, allow_nan=False), qos=QOS, properties=props
            )
            if client.refused is not None:
                raise BrokerUnavailable(
                    f"{_describe(cfg)} refused the command on {topics.command(verb)}: {client.refused} "
                    "(the broker's ACL must let this user write <prefix>/+/cmd/#)"
                )
            async for message in client.messages:
                if message.topic.value == topics.status:
                    status = message.payload.decode(errors="replace")
                    if patient:
                        up = status in STATES
                        deadline.reschedule(None if up else asyncio.get_running_loop().time())
                    continue
                if getattr(message.properties, "CorrelationData", None) != ticket.bytes:
                    continue
                reply = json.loads(message.payload)
                if not isinstance(reply, dict):
                    raise ValueError(
                        f"node {node!r} sent a reply that is not a JSON object: {reply!r}"
                    )
                return reply
    except TimeoutError:
        if not connected:
            raise TimeoutError(
                f"{_describe(cfg)} did not accept a connection within {timeout:g} s "
                "(down, or a TLS listener and [mqtt] tls_ca is not set?)"
            ) from None
        seen = (
            f"its retained status is {status!r}" if status else "the broker holds no status for it"
        )
        if patient and status is not None and status not in STATES:  # no need to wait it out
            raise TimeoutError(
                f"node {node!r} is {status!r} (its status on {_describe(cfg)}): no reply will come"
            ) from None
        raise TimeoutError(
            f"no reply from node {node!r} within {timeout:g} s via {_describe(cfg)}; {seen} "
            f"(is the daemon running with [mqtt] node = {node!r}, and does the ACL let it "
            f"write {topics.reply}/#?)"
        ) from None
    except aiomqtt.MqttError as e:
        raise BrokerUnavailable(f"{_describe(cfg)}: {_reason(e)}") from None
    raise BrokerUnavailable(f"{_describe(cfg)} closed the connection before node {node!r} replied")
