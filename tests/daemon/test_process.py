"""``tiercache serve`` as a child process: started, stopped with SIGTERM, killed, restarted, and
a start that fails says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiercache.client import Client
from tiercache.daemon.config import load_config
from tiercache.daemon.process import DaemonProcess, DaemonStartError


def env(tmp_path: Path) -> dict[str, str]:
    return {
        "TIERCACHE_TIERS_HOST__BYTES": "1MiB",
        "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk"),
    }


def test_start_waits_for_the_socket_and_stop_terminates_cleanly(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path, env(tmp_path))
    assert d.socket == tmp_path / "tiercache.sock"
    d.start()
    try:
        assert d.socket.exists()
        with Client(d.socket) as c:
            assert c.stats() is not None
    finally:
        assert d.stop() == 0
    assert d.proc is None
    assert d.stop() == 0  # stopping a stopped daemon is a no-op


def test_a_killed_daemon_can_be_started_again_over_its_stale_socket(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, env(tmp_path)) as d:
        first = d.pid
        d.kill()
        assert d.proc is None
        assert d.socket.exists()  # kill -9 leaves the socket file behind
        d.start()
        assert d.pid != first
        with Client(d.socket) as c:
            assert c.stats() is not None


def test_a_daemon_that_cannot_start_raises_with_the_tail_of_its_log(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path, {"TIERCACHE_TIERS_HOST__BYTES": "lots"})
    with pytest.raises(RuntimeError, match="did not start") as e:
        d.start()
    assert "TIERCACHE_TIERS_HOST__BYTES" in str(e.value) or "bytes" in str(e.value)
    assert d.log.exists()


def test_the_pid_of_a_daemon_not_running_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="not running"):
        _ = DaemonProcess(tmp_path).pid


def test_a_failed_start_gives_the_daemons_own_error_line_as_its_reason(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path, {"TIERCACHE_TIERS_HOST__BYTES": "lots"})
    with pytest.raises(DaemonStartError) as e:
        d.start()
    assert e.value.reason.startswith("tiers.host.bytes: bad size 'lots'")
    assert "\n" not in e.value.reason  # the daemon's one line, not its log


def test_a_default_disk_tier_in_the_tests_is_the_sessions_own(own_data_home: Path) -> None:
    # The user's (~/.local/share/tiercache/disk) may be held by their running daemon.
    disk = load_config(env={}).tiers.disk
    assert disk is not None and disk.url == f"file://{own_data_home}/tiercache/disk"
