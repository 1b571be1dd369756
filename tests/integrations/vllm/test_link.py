"""The vLLM connector's link to the daemon (``tiercache.integrations.vllm.link``) against a real
``tiercache serve``: one connection for every call, a daemon that is down is a miss (retried
once per period, not per request), a restarted daemon is reconnected within the call, a
killed one after the retry period, and an error the daemon answers keeps the
connection and is logged once."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NBYTES
from tiercache.client import Client
from tiercache.daemon.process import DaemonProcess
from tiercache.integrations.vllm.link import Link


def blocks(c: Client) -> int:
    return int(c.stats()["blocks"])


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon, not started: each test starts, stops or kills it."""
    env = {
        "TIERCACHE_TIERS_HOST__BYTES": str(64 * NBYTES),
        "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk"),
        "TIERCACHE_TIERS_DISK__BYTES": str(256 * NBYTES),
    }
    d = DaemonProcess(tmp_path, env)
    yield d
    d.stop()


def test_calls_share_one_connection_named_after_the_engine(daemon: DaemonProcess) -> None:
    daemon.start()
    link = Link(str(daemon.socket), "vllm-worker-1", retry=60)
    try:
        assert link.call("stats", blocks) == 0
        first = link.get()
        assert first is not None
        assert link.call("stats", blocks) == 0
        assert link.get() is first
    finally:
        link.close()
    assert link._client is None


def test_a_daemon_that_is_down_is_a_miss_tried_again_only_after_the_retry_period(
    daemon: DaemonProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vllm.tiercache")
    link = Link(str(daemon.socket), "vllm-scheduler-1", retry=60)
    assert link.call("lookup", blocks) is None
    assert link.call("lookup", blocks) is None
    assert caplog.text.count("tiercache daemon unavailable") == 1  # once, not per request
    assert "caching is off until it is back" in caplog.text
    # The daemon comes up: within the retry period the link does not try it.
    daemon.start()
    assert link.call("lookup", blocks) is None
    # Past it (here: a close that allows the next try at once), it connects and says so.
    link.close(retry_after=0)
    try:
        assert link.call("lookup", blocks) == 0
        assert f"tiercache daemon connected at {daemon.socket}" in caplog.text
    finally:
        link.close()


def test_a_restarted_daemon_is_reconnected_within_the_same_call(
    daemon: DaemonProcess, caplog: pytest.LogCaptureFixture
) -> None:
    daemon.start()
    link = Link(str(daemon.socket), "vllm-worker-1", retry=60)
    try:
        assert link.call("stats", blocks) == 0
        old = link.get()
        daemon.stop()
        daemon.start()
        # The old connection is lost: the call retries once on a new one, at once (not after
        # the 60 s retry period), and answers.
        assert link.call("stats", blocks) == 0
        assert link.get() is not old
        assert "tiercache stats failed, reconnecting" in caplog.text
    finally:
        link.close()


def test_a_killed_daemon_is_a_miss_and_reconnected_once_it_is_back(
    daemon: DaemonProcess,
) -> None:
    daemon.start()
    link = Link(str(daemon.socket), "vllm-worker-1", retry=0.5)
    try:
        assert link.call("stats", blocks) == 0
        daemon.kill()
        assert link.call("stats", blocks) is None  # the reconnect fails: a miss
        assert link.get() is None
        daemon.start()
        time.sleep(0.6)  # the retry period (not tried within it: the test above)
        assert link.call("stats", blocks) == 0
    finally:
        link.close()


def test_an_error_the_daemon_answers_keeps_the_connection_and_is_logged_once(
    daemon: DaemonProcess, caplog: pytest.LogCaptureFixture
) -> None:
    daemon.start()
    link = Link(str(daemon.socket), "vllm-worker-1", retry=60)
    try:
        client = link.get()
        assert link.call("ctl", lambda c: c.ctl("bogus")) is None
        assert link.call("ctl", lambda c: c.ctl("bogus")) is None
        assert caplog.text.count("tiercache ctl failed: unknown_verb") == 1
        assert "reconnecting" not in caplog.text
        assert link.get() is client
        assert link.call("stats", blocks) == 0
    finally:
        link.close()


def test_a_hung_daemon_is_a_miss_after_the_timeout_and_tried_again_ever_later(
    daemon: DaemonProcess,
) -> None:
    daemon.start()
    link = Link(str(daemon.socket), "vllm-worker-1", retry=60, timeout=1.0)
    try:
        assert link.call("stats", blocks) == 0
        os.kill(daemon.pid, signal.SIGSTOP)  # hung: its socket accepts, nothing answers
        try:
            assert link.call("stats", blocks) is None  # the engine is not stuck with it
            assert link.get() is None  # and does not try it again at once
            link.close(retry_after=0)
            assert link.call("stats", blocks) is None  # a new connection's hello times out
            assert link._next_try - time.monotonic() > 100  # the wait doubled: 60 s, 120 s
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        link.close(retry_after=0)
        assert link.call("stats", blocks) == 0  # back: connected, and the waits start over
        assert link._timeouts == 0
    finally:
        link.close()
