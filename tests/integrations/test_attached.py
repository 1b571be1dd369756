"""An engine's KV caches attached to the daemon, per connection: attached once per client,
again on a new one, and turned off once (copying through host memory instead) where the
daemon cannot attach. The GPU round trips are in tests/test_ipc_gpu.py; these use a client
that records what it is asked."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from tests.conftest import SPEC, make_ns
from tiercache.client import RemoteError
from tiercache.integrations.attached import AttachedKV
from tiercache.ipc import IpcError
from tiercache.keys import KeyChain


class FakeClient:
    def __init__(self, refuse: Exception | None = None) -> None:
        self.refuse = refuse
        self.calls: list[tuple[str, Any]] = []

    def attach(self, ns: Any, caches: Any) -> object:
        self.calls.append(("attach", ns))
        if self.refuse is not None:
            raise self.refuse
        return ("cache", id(self))

    def save_kv(self, cache: Any, keys: Any, block_ids: Any, **kw: Any) -> str:
        self.calls.append(("save_kv", (cache, list(block_ids), kw)))
        return "saved"

    def load_kv(self, cache: Any, keys: Any, block_ids: Any, **kw: Any) -> list[str]:
        self.calls.append(("load_kv", (cache, list(block_ids), kw)))
        return []


NS = make_ns()
KEYS = KeyChain.from_bytes(b"")


def attached() -> AttachedKV:
    return AttachedKV(NS, [torch.zeros(4, *SPEC.block_shape)])


def test_a_client_is_attached_once_and_its_cache_used_for_saves_and_loads() -> None:
    kv, client = attached(), FakeClient()
    assert kv.save(client, KEYS, [3, 4], 0, "s") == "saved"  # type: ignore[arg-type]
    assert kv.load(client, KEYS, [5], 2, wait=False) == []  # type: ignore[arg-type]
    assert [c[0] for c in client.calls] == ["attach", "save_kv", "load_kv"]
    assert client.calls[1][1] == (("cache", id(client)), [3, 4], {"first_block": 0, "session": "s"})
    assert client.calls[2][1] == (("cache", id(client)), [5], {"first_block": 2})


def test_a_new_connection_attaches_again() -> None:
    kv, first, second = attached(), FakeClient(), FakeClient()
    kv.save(first, KEYS, [0], 0, None)  # type: ignore[arg-type]
    kv.save(second, KEYS, [0], 0, None)  # type: ignore[arg-type]
    assert [c[0] for c in second.calls] == ["attach", "save_kv"]
    assert second.calls[1][1][0] == ("cache", id(second))


@pytest.mark.parametrize(
    "refusal",
    [
        RemoteError("no_cuda", "the daemon has no CUDA"),
        RemoteError("ipc_failed", "cannot open the handle"),
        RemoteError("unknown_op", "an older daemon"),
        RemoteError("bad_layout", "not this layout"),
        IpcError("not shareable"),
    ],
)
def test_a_daemon_that_cannot_attach_turns_it_off_once_with_a_warning(
    refusal: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    kv, client = attached(), FakeClient(refuse=refusal)
    with caplog.at_level(logging.WARNING, logger="vllm.tiercache"):
        assert kv.save(client, KEYS, [0], 0, None) is None  # type: ignore[arg-type]
    assert not kv.enabled
    assert "copied through host memory" in caplog.text
    assert kv.load(FakeClient(), KEYS, [0], 0, wait=True) is None  # type: ignore[arg-type]
    assert client.calls == [("attach", NS)]  # never asked again


def test_any_other_refusal_is_raised_and_leaves_it_on() -> None:
    kv = attached()
    with pytest.raises(RemoteError, match="busy"):
        kv.save(FakeClient(refuse=RemoteError("busy", "later")), KEYS, [0], 0, None)  # type: ignore[arg-type]
    assert kv.enabled
