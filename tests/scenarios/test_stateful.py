"""Hypothesis drives the manager (tiny host and disk tiers, so eviction is constant) through random
saves, loads, evictions, pins, flushes, restarts and chunk corruption, against a plain model:
every load returns exactly the bytes that were saved under those keys, or stops early (a miss);
no tier ever exceeds its budget; nothing is served that was never saved."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.conftest import NBYTES, SPEC, fuzz_examples, make_ns
from tiercache import TierManager

NS = make_ns()
# Four conversations sharing prefixes: 0 and 1 share their first two blocks, 2 extends 0.
BASE = [list(range(i * 4, i * 4 + 4)) for i in range(8)]
SEQS = [
    [t for b in (0, 1, 2, 3) for t in BASE[b]],
    [t for b in (0, 1, 4, 5) for t in BASE[b]],
    [t for b in (0, 1, 2, 3, 6, 7) for t in BASE[b]],
    [t for b in (5, 6, 7) for t in BASE[b]],
]


def content(key: bytes) -> torch.Tensor:
    """The block bytes every save of ``key`` writes (a function of the key alone)."""
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
    return torch.randint(1, 256, (NBYTES,), generator=g, dtype=torch.uint8)


class CacheMachine(RuleBasedStateMachine):
    eviction = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="tiercache-stateful-"))
        self.write = "write-back"
        self.m = self._open()
        self.saved: set[bytes] = set()  # every key ever saved: nothing else may be served

    def _open(self) -> TierManager:
        return self.loop.run_until_complete(
            TierManager.open(
                host_bytes=3 * NBYTES,
                disk_url=str(self.dir),
                disk_bytes=5 * NBYTES,
                write=self.write,
                eviction=self.eviction,
            )
        )

    @rule(
        seq=st.integers(0, len(SEQS) - 1),
        blocks=st.integers(1, 6),
        session=st.sampled_from([None, "a", "b"]),
    )
    def save(self, seq: int, blocks: int, session: str | None) -> None:
        tokens = SEQS[seq][: blocks * SPEC.block_size]
        keys = NS.block_keys(tokens)
        data = torch.stack([content(k) for k in keys])
        self.loop.run_until_complete(self.m.save(NS, tokens, data, session=session))
        self.saved.update(keys)

    @rule(seq=st.integers(0, len(SEQS) - 1))
    def load(self, seq: int) -> None:
        tokens = SEQS[seq]
        keys = NS.block_keys(tokens)
        got = self.loop.run_until_complete(self.m.load(NS, tokens))
        for i in range(got.blocks):
            assert keys[i] in self.saved
            assert torch.equal(got.data[i], content(keys[i])), (
                f"block {i} of seq {seq} has wrong bytes"
            )

    @rule(seq=st.integers(0, len(SEQS) - 1))
    def evict(self, seq: int) -> None:
        self.loop.run_until_complete(self.m.evict(keys=NS.block_keys(SEQS[seq])))

    @rule(session=st.sampled_from(["a", "b"]), pin=st.booleans())
    def pin(self, session: str, pin: bool) -> None:
        if session in self.m.sessions:
            op = self.m.pin if pin else self.m.unpin
            self.loop.run_until_complete(op(session))

    @rule(seq=st.integers(0, len(SEQS) - 1))
    def prefetch(self, seq: int) -> None:
        self.loop.run_until_complete(self.m.prefetch(NS, SEQS[seq]))

    @rule()
    def flush(self) -> None:
        self.loop.run_until_complete(self.m.flush())

    @rule(flush=st.booleans(), write=st.sampled_from(["write-back", "write-through"]))
    def restart(self, flush: bool, write: str) -> None:
        self.loop.run_until_complete(self.m.close(flush=flush))
        self.write = write
        self.m = self._open()

    @precondition(
        lambda self: any(e.disk is not None and e.host_slot is None for e in self.m.index)
    )
    @rule(data=st.data())
    def corrupt_a_chunk(self, data: st.DataObject) -> None:
        """Flip a byte of a block that only the disk holds, so the next read of it hits the chunk."""
        on_disk = sorted(
            (e for e in self.m.index if e.disk is not None and e.host_slot is None),
            key=lambda e: e.key,
        )
        e = data.draw(st.sampled_from(on_disk))
        assert e.disk is not None
        assert self.m.disk is not None
        path, offset = self.m.disk.location(e.disk)
        at = offset + data.draw(st.integers(0, e.nbytes - 1))
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ 0xFF]))

    @invariant()
    def budgets_hold(self) -> None:
        usage = self.m.usage()
        assert usage.get("host", {"used_bytes": 0})["used_bytes"] <= 3 * NBYTES
        assert usage["disk"]["used_bytes"] <= 5 * NBYTES
        in_host = sum(e.nbytes for e in self.m.index if "host" in e.at)
        assert usage.get("host", {"kv_bytes": 0})["kv_bytes"] == in_host

    @invariant()
    def pins_match_pinned_sessions(self) -> None:
        for e in self.m.index:
            holders = sum(1 for s in self.m.sessions if e.key in s.pinned_keys)
            assert self.m.index.pins[e.key] == holders

    def teardown(self) -> None:
        self.loop.run_until_complete(self.m.close(flush=False))
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ARCCacheMachine(CacheMachine):
    eviction = "arc"


SETTINGS = settings(
    max_examples=fuzz_examples(40),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CacheMachine.TestCase.settings = SETTINGS
ARCCacheMachine.TestCase.settings = SETTINGS
TestLRUCacheMachine = CacheMachine.TestCase
TestARCCacheMachine = ARCCacheMachine.TestCase
