"""Who can reach what: the socket is its owner's, metrics stay on loopback unless configured,
secrets stay out of logs and metrics, and tenants never share blocks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import NBYTES, make_blocks, make_ns, make_tokens
from tests.services.mosquitto import Mosquitto, mqtt_env
from tiercache.client import Client
from tiercache.daemon.config import load_config
from tiercache.daemon.process import DaemonProcess

CONNECT_AS_NOBODY = """
import os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("refused")
else:
    print("connected")
"""


def test_another_user_cannot_connect_to_the_socket(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root (CI runs as root)")
    tmp_path.chmod(0o755)  # the directory is not what stops them: the socket's mode is
    with DaemonProcess(
        tmp_path,
        {"TIERCACHE_TIERS_DISK__URL": "none", "TIERCACHE_TIERS_HOST__BYTES": str(8 * NBYTES)},
    ) as d:
        out = subprocess.run(
            [sys.executable, "-c", CONNECT_AS_NOBODY, str(d.socket)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert out == "refused"
        with Client(d.socket) as owner:  # the owner still gets in
            assert "tiers" in owner.stats()


def test_metrics_listen_on_loopback_by_default() -> None:
    assert load_config(env={}).metrics.listen == "127.0.0.1:9464"


@pytest.mark.service
def test_no_secret_reaches_the_logs_or_the_metrics(tmp_path: Path, mosquitto: Mosquitto) -> None:
    cfg = mosquitto.config(node="secrets")
    password = Path(cfg.password_file).read_text().strip()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        listen = f"127.0.0.1:{s.getsockname()[1]}"
    env = {
        "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk"),
        "TIERCACHE_TIERS_HOST__BYTES": str(8 * NBYTES),
        "TIERCACHE_METRICS__LISTEN": listen,
        "TIERCACHE_DAEMON__LOG_LEVEL": "debug",
        **mqtt_env(cfg),
    }
    with DaemonProcess(tmp_path, env) as d, Client(d.socket) as c:
        c.save(make_ns(), make_tokens(2), make_blocks(2), session="s")
        c.ctl("stats")
        metrics = urllib.request.urlopen(f"http://{listen}/metrics", timeout=10).read().decode()
    log = d.log.read_text()
    assert "tiercache_mqtt_connected 1.0" in metrics
    assert password not in log and password not in metrics
    assert "DEBUG" in log  # the check is not vacuous: the daemon did log, at debug level


def test_tenants_with_identical_tokens_never_share_a_block(tmp_path: Path) -> None:
    with (
        DaemonProcess(
            tmp_path,
            {
                "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk"),
                "TIERCACHE_TIERS_HOST__BYTES": str(16 * NBYTES),
            },
        ) as d,
        Client(d.socket) as c,
    ):
        a, b = make_ns(salt="tenant-a"), make_ns(salt="tenant-b")
        tokens = make_tokens(3)
        c.save(a, tokens, make_blocks(3))
        assert c.lookup(a, tokens).blocks == 3
        assert c.lookup(b, tokens).blocks == 0
        assert c.load(b, tokens).blocks == 0
