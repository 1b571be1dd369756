"""``tiercache ctl``, ``status`` and ``serve --check-config`` against a real daemon, over the
local socket and over a real Mosquitto (as the ``operator`` user of ops/mosquitto/acl)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import NBYTES, dead_pid, make_blocks, make_ns, make_tokens
from tests.services.mosquitto import Mosquitto, mqtt_env
from tiercache.client import Client
from tiercache.daemon import protocol as wire
from tiercache.daemon.cli import main
from tiercache.daemon.config import (
    Config,
    ConfigError,
    DaemonConfig,
    HostTierConfig,
    TiersConfig,
    load_config,
    preflight,
)
from tiercache.daemon.ctl import _progress_line, parse_args, run_with_progress
from tiercache.daemon.protocol import PROTOCOL_VERSION
from tiercache.tiers.host import shm_free

NS = make_ns()
NODE = "ctl-test-node"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, mosquitto: Mosquitto) -> Iterator[Path]:
    """A ``tiercache serve`` process with a session "chat" of 3 blocks; yields its socket."""
    root = tmp_path_factory.mktemp("ctl")
    mqtt = mosquitto.config(node=NODE)
    env = {
        **os.environ,
        "TIERCACHE_DAEMON__SOCKET": str(root / "tc.sock"),
        "TIERCACHE_TIERS_DISK__URL": str(root / "disk"),
        "TIERCACHE_TIERS_HOST__BYTES": str(64 * NBYTES),
        "TIERCACHE_METRICS__LISTEN": "",
        **mqtt_env(mqtt),
    }
    proc = subprocess.Popen([sys.executable, "-m", "tiercache.daemon.cli", "serve"], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (root / "tc.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (
                "tiercache serve did not start"
            )
            time.sleep(0.05)
        with Client(root / "tc.sock") as c:
            c.save(NS, make_tokens(3), make_blocks(3), session="chat")
        yield root / "tc.sock"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


@pytest.fixture
def via_socket(served: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERCACHE_DAEMON__SOCKET", str(served))
    monkeypatch.setenv("TIERCACHE_MQTT__HOST", "")


@pytest.fixture
def via_mqtt(served: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch) -> None:
    op = mosquitto.config("operator", node=NODE)
    monkeypatch.setenv("TIERCACHE_DAEMON__SOCKET", "/nonexistent/so-it-must-be-mqtt.sock")
    for key, value in (
        ("HOST", op.host),
        ("PORT", str(op.port)),
        ("NODE", NODE),
        ("USERNAME", op.username),
        ("PASSWORD_FILE", op.password_file),
    ):
        monkeypatch.setenv(f"TIERCACHE_MQTT__{key}", value)


@pytest.mark.parametrize("channel", ["via_socket", "via_mqtt"])
def test_ctl_pin_and_unpin_a_session(
    channel: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    request.getfixturevalue(channel)
    assert main(["ctl", "pin", "session=chat"]) == 0
    assert '"blocks": 3' in capsys.readouterr().out
    assert main(["ctl", "unpin", "session=chat"]) == 0
    assert '"blocks": 3' in capsys.readouterr().out


@pytest.mark.parametrize("channel", ["via_socket", "via_mqtt"])
def test_status_shows_the_tiers(
    channel: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    request.getfixturevalue(channel)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("host ") and "sessions 1" in out


@pytest.mark.parametrize("channel", ["via_socket", "via_mqtt"])
def test_a_refused_command_exits_1_with_the_daemons_reason(
    channel: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    request.getfixturevalue(channel)
    assert main(["ctl", "pin", "session=nobody"]) == 1
    assert "unknown_session: unknown session 'nobody'" in capsys.readouterr().err


@pytest.mark.parametrize("channel", ["via_socket", "via_mqtt"])
@pytest.mark.parametrize("value", ["NaN", "-Infinity", "1e999"])
def test_a_number_json_cannot_carry_is_sent_as_a_string_and_refused_by_the_daemon(
    channel: str, value: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    request.getfixturevalue(channel)
    assert main(["ctl", "set", "name=session.ttl", "session=chat", f"value={value}"]) == 1
    assert (
        f"bad_value: set session.ttl: must be seconds > 0 or null, got '{value}'"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("channel", ["via_socket", "via_mqtt"])
@pytest.mark.parametrize("session", ["42", "true", "null", "[1]"])
def test_a_session_id_that_parses_as_json_is_still_a_session_id(
    channel: str, session: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    request.getfixturevalue(channel)
    assert main(["ctl", "pin", f"session={session}"]) == 1
    assert f"unknown_session: unknown session {session!r}" in capsys.readouterr().err


@pytest.mark.parametrize("channel", ["via_socket", "via_mqtt"])
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stats", "node=elsewhere"], "stats: unknown argument 'node'; stats takes no arguments"),
        (["flush", "session=chat"], "flush: unknown argument 'session'; flush takes no arguments"),
        (["pin", "sesion=chat"], "pin: unknown argument 'sesion'; pin takes session"),
    ],
)
def test_an_argument_the_verb_does_not_take_exits_2_naming_it(
    channel: str,
    argv: list[str],
    message: str,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `ctl drain node=gpu-2` must not drain the default node instead of gpu-2.
    request.getfixturevalue(channel)
    assert main(["ctl", *argv]) == 2
    assert f"error: bad_request: {message}" in capsys.readouterr().err


@pytest.mark.service
@pytest.mark.parametrize("node", ["a/b", "+", ""])
def test_a_node_that_is_not_one_topic_level_exits_2_naming_it(
    via_mqtt: None, node: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--node", node]) == 2
    assert f"error: node {node!r} must be one MQTT topic level" in capsys.readouterr().err


@pytest.mark.service
def test_a_malformed_argument_exits_2(via_socket: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ctl", "pin", "chat"]) == 2
    assert "argument 'chat' is not key=value" in capsys.readouterr().err


def test_no_daemon_exits_1_saying_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIERCACHE_DAEMON__SOCKET", str(tmp_path / "none.sock"))
    monkeypatch.setenv("TIERCACHE_MQTT__HOST", "")
    assert main(["status"]) == 1
    assert f"no tiercache daemon at {tmp_path / 'none.sock'}" in capsys.readouterr().err


def test_check_config_prints_the_effective_config_as_toml(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIERCACHE_TIERS_HOST__BYTES", "2GiB")
    monkeypatch.setenv("TIERCACHE_POLICY__EVICTION", "arc")
    assert main(["serve", "--check-config"]) == 0
    cfg = tomllib.loads(capsys.readouterr().out)
    assert cfg["tiers"]["host"]["bytes"] == 2 * 2**30
    assert cfg["policy"]["eviction"] == "arc"


def test_check_config_output_loads_back_as_the_same_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A disabled disk tier must be printed as such: a missing [tiers.disk] means the default.
    monkeypatch.setenv("TIERCACHE_TIERS_DISK__URL", "none")
    monkeypatch.setenv("TIERCACHE_TIERS_HOST__BYTES", "1MiB")
    assert main(["serve", "--check-config"]) == 0
    printed = tmp_path / "effective.toml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(printed, env={}) == load_config(None)


def test_check_config_names_a_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[policy]\neviction = "fifo"\n')
    assert main(["serve", "--config", str(bad), "--check-config"]) == 2
    assert "policy.eviction: 'fifo' is not one of lru, arc" in capsys.readouterr().err


def test_check_config_runs_the_machine_checks_serve_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What only fails when the cache opens (two GPUs for one cache, no CUDA, a host arena
    /dev/shm cannot hold) fails the check too, by key, with no traceback; serve the same."""
    monkeypatch.setenv("TIERCACHE_TIERS_HOST__BYTES", "1MiB")
    monkeypatch.setenv("TIERCACHE_TIERS_DEVICE__BYTES", "1GiB")
    monkeypatch.setenv("TIERCACHE_TIERS_DEVICE__DEVICES", "cuda:0,cuda:1")
    assert main(["serve", "--check-config"]) == 2
    assert "error: tiers.device.devices: one cache uses one device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        monkeypatch.setenv("TIERCACHE_TIERS_DEVICE__DEVICES", "cuda:0")
        for command in (["serve", "--check-config"], ["serve"]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert "error: tiers.device.devices: cuda:0, but torch sees no CUDA device" in err
    monkeypatch.setenv("TIERCACHE_TIERS_DEVICE__BYTES", "0")
    monkeypatch.setenv("TIERCACHE_TIERS_HOST__BYTES", str(shm_free() + 2**40))
    for command in (["serve", "--check-config"], ["serve"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "error: tiers.host.bytes: " in err and "lower it or enlarge /dev/shm" in err


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"TIERCACHE_DAEMON__LOG_LEVEL": "verbose"},
            "daemon.log_level: 'verbose' is not one of debug, info, warning, error, critical",
        ),
        (
            {"TIERCACHE_METRICS__LISTEN": "localhost"},
            "metrics.listen: 'localhost' is not host:port",
        ),
        (
            {"TIERCACHE_MQTT__HOST": "127.0.0.1", "TIERCACHE_MQTT__PORT": "99999"},
            "mqtt.port: 99999 is not a TCP port",
        ),
        (
            {"TIERCACHE_MQTT__HOST": "127.0.0.1", "TIERCACHE_MQTT__NODE": "a/b"},
            "mqtt.node: node 'a/b' must be one MQTT topic level",
        ),
        (
            {"TIERCACHE_DAEMON__SOCKET_GROUP": "no-such-group-tiercache"},
            "daemon.socket_group: 'no-such-group-tiercache' is not a group on this machine",
        ),
    ],
)
def test_check_config_refuses_what_serve_would_refuse_after_starting(
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Settings serve only reads once the cache and its socket are up (the log level, the
    metrics address, MQTT) fail the check, and serve, at once: one line, no traceback."""
    monkeypatch.setenv("TIERCACHE_TIERS_HOST__BYTES", "1MiB")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for command in (["serve", "--check-config"], ["serve"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and "Traceback" not in err


def test_serve_with_its_metrics_port_taken_exits_1_in_one_line_and_removes_its_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        monkeypatch.setenv("TIERCACHE_METRICS__LISTEN", listen)
        monkeypatch.setenv("TIERCACHE_DAEMON__SOCKET", str(tmp_path / "tc.sock"))
        monkeypatch.setenv("TIERCACHE_TIERS_DISK__URL", "none")
        monkeypatch.setenv("TIERCACHE_TIERS_HOST__BYTES", "1MiB")
        monkeypatch.setenv("TIERCACHE_MQTT__HOST", "")
        assert main(["serve"]) == 1
    err = capsys.readouterr().err
    assert f"metrics.listen {listen!r}: cannot listen there" in err and "Traceback" not in err
    assert not (tmp_path / "tc.sock").exists()  # the socket it had bound is closed again


def test_a_dead_daemons_arena_counts_as_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tiercache.tiers.host as host

    dead = dead_pid()
    arena = tmp_path / f"tiercache-{dead}-0badf00d"
    arena.write_bytes(b"x" * 2**28)
    stale = host.stale_arenas(tmp_path)
    assert [p for p, _ in stale] == [arena] and stale[0][1] >= 2**28
    monkeypatch.setattr(host, "SHM_DIR", tmp_path)
    free = host.shm_free(tmp_path)
    # More than is free, less than free plus the dead arena (128 MiB of slack either way).
    preflight(Config(tiers=TiersConfig(host=HostTierConfig(bytes=free + 2**27))))
    with pytest.raises(ConfigError, match="lower it or enlarge"):
        preflight(Config(tiers=TiersConfig(host=HostTierConfig(bytes=free + 2**29))))


def test_ctl_arguments_are_json_when_they_parse_and_strings_otherwise() -> None:
    assert parse_args(["session=chat-1", "value=3", "x=null", 'keys=["ab"]']) == {
        "session": "chat-1",
        "value": 3,
        "x": None,
        "keys": ["ab"],
    }


def test_flush_progress_counts_dirty_blocks_written() -> None:
    line = _progress_line("flush", {"dirty_blocks": 40}, {"dirty_blocks": 10}, 1.5)
    assert line == "flush: [######################        ] 30/40 blocks    1.5s"


class Terminal(io.StringIO):
    """What ctl writes its progress line to when run in a terminal."""

    def isatty(self) -> bool:
        return True


async def test_a_failed_progress_poll_is_skipped_and_ctl_ends_with_the_verbs_outcome(
    tmp_path: Path,
) -> None:
    # Polls that fail (here: connections the daemon drops before answering; over MQTT a
    # timeout or a busy node) say nothing about the flush, which goes on. A real daemon
    # cannot be made to drop a poll on cue, so this peer speaks the protocol: it cuts the
    # first, third and fifth stats polls, and answers the flush once the fifth came.
    polls: list[int] = []
    fifth = asyncio.Event()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await wire.read_frame(reader)
        if hello is not None:
            reply = wire.HelloReply(PROTOCOL_VERSION, "peer")
            writer.write(wire.reply_frame(wire.decode(hello)["id"], reply))
        frame = await wire.read_frame(reader)
        if frame is None:  # a poll ctl gave up once the flush was answered
            return
        req = wire.decode(frame)
        if req["args"]["verb"] == "flush":
            await fifth.wait()
            writer.write(wire.reply_frame(req["id"], {"bytes": 42}))
        else:
            polls.append(len(polls) + 1)
            n = polls[-1]
            if n == 5:  # the fourth's answer is on ctl's line
                fifth.set()
            if n % 2:
                writer.close()  # cut before the answer
                return
            writer.write(wire.reply_frame(req["id"], {"dirty_blocks": 4 if n == 2 else 1}))
        bye = await wire.read_frame(reader)
        if bye is not None:
            writer.write(wire.reply_frame(wire.decode(bye)["id"], None))
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(peer, str(tmp_path / "peer.sock"))
    cfg = Config(daemon=DaemonConfig(socket=str(tmp_path / "peer.sock")))
    out = Terminal()
    async with server:
        result = await asyncio.wait_for(run_with_progress(cfg, "flush", {}, out=out), 60)
    assert result == {"bytes": 42}
    assert polls[:5] == [1, 2, 3, 4, 5]  # a sixth may have started meanwhile
    assert "flush: [" + "#" * 22 in out.getvalue() and "] 3/4 blocks" in out.getvalue()


@pytest.mark.service
def test_serve_on_the_socket_of_a_running_daemon_exits_2_in_one_line(
    served: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIERCACHE_DAEMON__SOCKET", str(served))
    monkeypatch.setenv("TIERCACHE_TIERS_DISK__URL", "none")
    monkeypatch.setenv("TIERCACHE_TIERS_HOST__BYTES", "1MiB")
    monkeypatch.setenv("TIERCACHE_METRICS__LISTEN", "")
    monkeypatch.setenv("TIERCACHE_MQTT__HOST", "")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "daemon.socket: another daemon is serving" in err and "Traceback" not in err
    with Client(served) as c:  # the running one is left alone
        assert c.lookup(NS, make_tokens(3)).blocks == 3
