"""Shared factories: a small KV spec, namespaces, deterministic random blocks, caches on tmp dirs;
the real services' fixtures (tests/services), and the cost markers' bookkeeping.

The tests mirror the package: the tests of ``tiercache/x/y.py`` are ``tests/x/test_y.py``
(tests/test_layout.py checks that every module has one). Cost is a marker, not a folder:
``gpu`` (needs CUDA), ``slow`` (5 s or more), ``service`` (starts Mosquitto, Prometheus or
SeaweedFS) and ``vllm`` (runs real vLLM engines), so
``pytest -m "not slow and not service and not vllm"`` is the quick run."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.services.mosquitto import mosquitto_fixture, own_mosquitto_fixture
from tests.services.seaweedfs import open_node, own_seaweedfs, remote_url, seaweedfs
from tiercache import KVSpec, Namespace, TierManager
from tiercache.daemon.config import Config, load_config
from tiercache.tiers.remote import RemoteOptions

# The services' fixtures, for every test folder; each starts only when a test asks for it.
__all__ = [
    "mosquitto_fixture",
    "open_node",
    "own_mosquitto_fixture",
    "own_seaweedfs",
    "remote_url",
    "seaweedfs",
]

# Fixtures that start a real service: a test that asks for one must be marked ``service``.
SERVICE_FIXTURES = frozenset({"mosquitto", "own_mosquitto", "seaweedfs", "own_seaweedfs"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        starts = SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))
        if starts and item.get_closest_marker("service") is None:
            raise pytest.UsageError(
                f"{item.nodeid} starts {', '.join(sorted(starts))}: mark it `service`"
            )


@pytest.fixture(scope="session", autouse=True)
def own_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The suite's ``XDG_DATA_HOME``: a cache or daemon a test opens on the default disk tier
    (``$XDG_DATA_HOME/tiercache/disk``) gets the session's own, never the user's, which a
    running ``tiercache serve`` holds locked (the test would fail) and which the tests would
    fill with their blocks. Child processes (``DaemonProcess``) inherit it."""
    home = tmp_path_factory.mktemp("xdg-data-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_DATA_HOME", str(home))
        yield home


SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4)
NBYTES = SPEC.block_nbytes  # 512 bytes


def make_ns(model: str = "test-model", salt: str = "", spec: KVSpec = SPEC) -> Namespace:
    return Namespace(model, spec, salt)


def make_tokens(n_blocks: int, seed: int = 0, spec: KVSpec = SPEC) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (n_blocks * spec.block_size,), generator=g).tolist()


def make_blocks(n_blocks: int, seed: int = 0, spec: KVSpec = SPEC) -> torch.Tensor:
    """Random (never zero) KV blocks of ``spec``'s shape and dtype."""
    g = torch.Generator().manual_seed(seed + 1_000_003)
    return (torch.rand((n_blocks, *spec.block_shape), generator=g) + 0.5).to(spec.torch_dtype)


def llama3_70b_config(**overrides: Any) -> dict[str, Any]:
    """The fields of meta-llama/Meta-Llama-3-70B's config.json that sizing reads."""
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "torch_dtype": "bfloat16",
    }
    cfg.update(overrides)
    return cfg


def embedded_config(tmp_path: Path, write: str = "write-back", host: str = "32MiB") -> Config:
    """An embedded cache's config: ``host`` of host tier, a disk tier under ``tmp_path``."""
    return load_config(
        env={
            "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "disk"),
            "TIERCACHE_TIERS_HOST__BYTES": host,
            "TIERCACHE_POLICY__WRITE": write,
        }
    )


def flip_byte(path: Path, at: int) -> None:
    """Corrupt one bit of a file in place (a disk tier's block, in the integrity tests)."""
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))


def as_bytes(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.uint8).reshape(blocks.shape[0], -1)


OpenCache = Callable[..., Awaitable[TierManager]]


@pytest.fixture
async def open_cache(tmp_path: Path) -> AsyncIterator[OpenCache]:
    """``await open_cache(host_blocks=4, disk_blocks=64, **kwargs)``; all are closed at teardown."""
    opened: list[TierManager] = []

    async def factory(
        host_blocks: int = 4, disk_blocks: int | None = 64, **kwargs: Any
    ) -> TierManager:
        kwargs.setdefault("disk_url", str(tmp_path / "disk") if disk_blocks else None)
        m = await TierManager.open(
            host_bytes=host_blocks * NBYTES, disk_bytes=(disk_blocks or 0) * NBYTES, **kwargs
        )
        opened.append(m)
        return m

    yield factory
    for m in opened:
        await m.close(flush=False)


async def open_with_a_dead_store(
    open_cache: OpenCache, tmp_path: Path, **kwargs: Any
) -> TierManager:
    """A cache with a shared tier whose store nothing answers (a free port): it starts down
    and stays down, with no service to run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = tmp_path / "dead-store-secret"
    secret.write_text("x")
    options = RemoteOptions(
        endpoint=f"http://127.0.0.1:{port}", key_id="k", secret_file=str(secret), timeout=0.5
    )
    return await open_cache(remote_url="s3://bucket/prefix", remote_options=options, **kwargs)


def fuzz_examples(n: int) -> int:
    """``n`` hypothesis examples, times ``TIERCACHE_FUZZ_SCALE`` (default 1): the long fuzz run is
    ``TIERCACHE_FUZZ_SCALE=100 pytest tests/daemon tests/scenarios/test_stateful.py tests/daemon/test_config.py``."""
    import os

    return n * max(1, int(os.environ.get("TIERCACHE_FUZZ_SCALE", "1")))


def key(i: int) -> bytes:
    """A block key made from ``i`` (the rooms' unit tests address blocks by number)."""
    return i.to_bytes(16, "little")


def row(i: int) -> torch.Tensor:
    """Block ``i``'s bytes: ``i + 1`` everywhere (never zero, so an unwritten row shows)."""
    return torch.full((NBYTES,), i + 1, dtype=torch.uint8)


def dead_pid() -> str:
    """The pid of a process that has exited (a dead daemon's, for arena names)."""
    return subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
