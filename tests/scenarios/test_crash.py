"""A daemon killed with SIGKILL (no drain, no flush) and started again on its disk tier: a
pinned session comes back whole from disk, byte-exact, under the default write-back policy;
an unpinned session's blocks that only host memory held are gone, as write-back says."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import NBYTES, as_bytes, make_blocks, make_ns, make_tokens
from tiercache.client import Client
from tiercache.daemon.process import DaemonProcess

NS = make_ns()


def test_a_pinned_session_survives_a_kill_9_under_write_back(tmp_path: Path) -> None:
    env = {
        "TIERCACHE_TIERS_HOST__BYTES": str(16 * NBYTES),
        "TIERCACHE_TIERS_DISK__URL": f"file://{tmp_path / 'disk'}",
        "TIERCACHE_POLICY__WRITE": "write-back",
    }
    chat, blocks = make_tokens(4), make_blocks(4)
    other, other_blocks = make_tokens(2, seed=1), make_blocks(2, seed=1)
    with DaemonProcess(tmp_path, env) as d:
        with Client(d.socket) as c:
            c.save(NS, chat[:8], blocks[:2], session="chat")
            c.pin("chat")  # its two blocks go to disk now
            c.save(NS, chat, blocks, session="chat")  # the next turn writes through
            c.save(NS, other, other_blocks, session="unpinned")
            assert c.lookup(NS, other).blocks == 2
        d.kill()
        d.start()
        with Client(d.socket) as c:
            assert c.lookup(NS, chat).tiers == ["disk"] * 4
            assert torch.equal(as_bytes(c.load(NS, chat).kv()), as_bytes(blocks))
            assert c.lookup(NS, other).blocks == 0  # host only when the daemon died
            assert c.stats()["pinned_blocks"] == 4
