"""The vLLM connector's scheduler side (``tiercache.integrations.vllm.scheduler``): a request's
session, and against a real daemon, what a prompt finds (beyond vLLM's own prefix cache, up to
its last token), what a step loads into the request's blocks and what it saves (whole blocks
and the prompt's tail), which another engine's scheduler then finds. vLLM's requests and step
outputs are stand-ins with the fields the scheduler side reads."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.conftest import SPEC, make_blocks, make_ns, make_tokens
from tiercache.client import Client
from tiercache.daemon.process import DaemonProcess
from tiercache.integrations.vllm.groups import FULL, Group
from tiercache.integrations.vllm.link import Link
from tiercache.integrations.vllm.options import Options
from tiercache.integrations.vllm.scheduler import Scheduler, _session
from tiercache.integrations.vllm.worker import Worker
from tiercache.keys import KeyChain


class _Request:
    def __init__(self, params: dict[str, object] | None) -> None:
        self.request_id = "r1"
        self.kv_transfer_params = params


def test_a_request_names_its_session_and_a_bad_name_is_ignored_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert _session(_Request({"session_id": "chat-42"})) == "chat-42"  # type: ignore[arg-type]
    assert _session(_Request(None)) is None  # type: ignore[arg-type]
    assert _session(_Request({"session_id": 7})) is None  # type: ignore[arg-type]
    assert _session(_Request({"session_id": ""})) is None  # type: ignore[arg-type]
    assert caplog.text.count("kv_transfer_params.session_id must be a non-empty string") == 2


# -- against a real daemon -----------------------------------------------------------

NS = make_ns("vllm-scheduler")
GROUP = Group(0, FULL, None, ("l0", "l1"), NS, SPEC)
B = SPEC.block_size  # 4 tokens, one engine block each


class Prompt:
    """What the scheduler side reads of a vLLM request."""

    def __init__(self, req_id: str, tokens: list[int], session: str | None = None) -> None:
        self.request_id = req_id
        self.prompt_token_ids = tokens
        self.all_token_ids = list(tokens)
        self.kv_transfer_params = {"session_id": session} if session else None
        self.num_computed_tokens = 0


def step(req_id: str, block_ids: list[int], computed: int, scheduled: int) -> Any:
    """vLLM's output of a step that schedules new request ``req_id`` (and nothing else)."""
    new = SimpleNamespace(req_id=req_id, block_ids=(block_ids,), num_computed_tokens=computed)
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set())
    return SimpleNamespace(
        num_scheduled_tokens={req_id: scheduled},
        scheduled_new_reqs=[new],
        scheduled_cached_reqs=cached,
    )


def scheduler(socket: str | Path, min_tail: int = 0, **options: Any) -> Scheduler:
    link = Link(str(socket), "vllm-scheduler-test", retry=60)
    return Scheduler(Options(**options), [GROUP], B, min_tail, link)


def test_a_stored_prefix_is_matched_beyond_vllms_own_cache_up_to_the_prompts_last_token(
    daemon: DaemonProcess,
) -> None:
    tokens = make_tokens(4, seed=1)
    with Client(daemon.socket) as c:
        c.save(NS, tokens[: 3 * B], make_blocks(3, seed=1))
    s = scheduler(daemon.socket)
    # 3 blocks stored of a 14-token prompt: 12 tokens to load, 2 to compute.
    assert s.get_num_new_matched_tokens(Prompt("a", tokens[:14]), 0) == (12, False)  # type: ignore[arg-type]
    # Of a 12-token prompt, its last token is computed: the engine needs its logits.
    assert s.get_num_new_matched_tokens(Prompt("b", tokens[:12]), 0) == (11, False)  # type: ignore[arg-type]
    # vLLM's prefix cache has the first 2 blocks: the connector adds the third.
    assert s.get_num_new_matched_tokens(Prompt("c", tokens[:14]), 8) == (4, False)  # type: ignore[arg-type]
    # A prompt that differs in its first token finds nothing.
    other = [tokens[0] + 1, *tokens[1:14]]
    assert s.get_num_new_matched_tokens(Prompt("d", other), 0) == (0, False)  # type: ignore[arg-type]
    # With async_load "always" the load goes in the background.
    always = scheduler(daemon.socket, async_load="always")
    assert always.get_num_new_matched_tokens(Prompt("e", tokens[:14]), 0) == (12, True)  # type: ignore[arg-type]


def test_a_short_prompt_or_a_daemon_that_is_down_is_a_miss(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    tokens = make_tokens(3, seed=2)
    with Client(daemon.socket) as c:
        c.save(NS, tokens, make_blocks(3, seed=2))
    short = scheduler(daemon.socket, min_tokens=4 * B)
    assert short.get_num_new_matched_tokens(Prompt("a", tokens), 0) == (0, False)  # type: ignore[arg-type]
    down = scheduler(tmp_path / "nobody.sock")
    assert down.get_num_new_matched_tokens(Prompt("b", tokens), 0) == (0, False)  # type: ignore[arg-type]


def test_a_found_prefix_is_loaded_into_the_blocks_vllm_gave_the_request(
    daemon: DaemonProcess,
) -> None:
    tokens = make_tokens(4, seed=3)
    with Client(daemon.socket) as c:
        c.save(NS, tokens[: 3 * B], make_blocks(3, seed=3))
    s = scheduler(daemon.socket)
    req = Prompt("r1", tokens[:14], session="chat")
    assert s.get_num_new_matched_tokens(req, 0) == (12, False)  # type: ignore[arg-type]
    s.update_state_after_alloc(req, None, 12)  # type: ignore[arg-type]
    meta = s.build_connector_meta(step("r1", [10, 11, 12, 13], computed=12, scheduled=2))  # type: ignore[arg-type]
    (load,) = meta.loads
    assert (load.req_id, load.first, load.count, load.block_ids) == ("r1", 0, 3, [10, 11, 12])
    assert (load.session, load.skip, load.background) == ("chat", 0, False)
    assert KeyChain.from_bytes(load.keys) == KeyChain(NS.block_keys(tokens[: 3 * B]))
    assert meta.saves == []  # all of its whole blocks are in the daemon already


def test_a_new_prompts_blocks_and_tail_are_saved_and_found_by_another_engine(
    daemon: DaemonProcess,
) -> None:
    # Engine A computes a 10-token prompt: its 2 whole blocks and its 2-token tail are saved
    # (by A's worker side, for real). Engine B finds all of it but the last token.
    tokens = make_tokens(3, seed=4)[:10]
    a = scheduler(daemon.socket, min_tail=1)
    req = Prompt("r1", tokens, session="chat-a")
    assert a.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
    a.update_state_after_alloc(req, None, 0)  # type: ignore[arg-type]
    meta = a.build_connector_meta(step("r1", [5, 6, 7], computed=0, scheduled=10))  # type: ignore[arg-type]
    assert meta.loads == []
    blocks, tail = meta.saves
    assert (blocks.first, blocks.count, blocks.block_ids, blocks.session) == (
        0,
        2,
        [5, 6],
        "chat-a",
    )
    assert (tail.first, tail.count, tail.block_ids, tail.session) == (2, 1, [7], None)
    shape = (2, 8, B, SPEC.num_kv_heads, SPEC.head_dim)
    kv = {n: torch.rand(shape).to(SPEC.torch_dtype) + 1 for n in ("l0", "l1")}
    worker = Worker([GROUP], 1, Link(str(daemon.socket), "vllm-worker-test", retry=60), False)
    worker.register(kv)
    worker.save(meta)
    worker.shutdown()
    with Client(daemon.socket) as c:
        assert c.pin("chat-a") == 2  # the session names its whole blocks

    b = scheduler(daemon.socket, min_tail=1)
    assert b.get_num_new_matched_tokens(Prompt("r2", tokens), 0) == (9, False)  # type: ignore[arg-type]


def test_a_prompt_vllm_serves_itself_saves_only_what_the_daemon_lacks(
    daemon: DaemonProcess,
) -> None:
    # vLLM's own prefix cache has all of a 13-token prompt but its last token. Blocks the
    # daemon holds are not saved again (each save gathers every block it names); those it
    # lacks are, as after a miss.
    tokens = make_tokens(4, seed=5)[:13]
    with Client(daemon.socket) as c:
        c.save(NS, tokens[: 2 * B], make_blocks(2, seed=5))
    s = scheduler(daemon.socket)
    req = Prompt("r1", tokens)
    assert s.get_num_new_matched_tokens(req, 12) == (0, False)  # type: ignore[arg-type]
    s.update_state_after_alloc(req, None, 0)  # type: ignore[arg-type]
    meta = s.build_connector_meta(step("r1", [4, 5, 6, 7], computed=12, scheduled=1))  # type: ignore[arg-type]
    (save,) = meta.saves
    assert (save.first, save.count, save.block_ids) == (2, 1, [6])

    # A daemon that holds none of it: all three are saved.
    other = [tokens[0] + 1, *tokens[1:]]
    req = Prompt("r2", other)
    assert s.get_num_new_matched_tokens(req, 12) == (0, False)  # type: ignore[arg-type]
    s.update_state_after_alloc(req, None, 0)  # type: ignore[arg-type]
    meta = s.build_connector_meta(step("r2", [8, 9, 10, 11], computed=12, scheduled=1))  # type: ignore[arg-type]
    (save,) = meta.saves
    assert (save.first, save.count, save.block_ids) == (0, 3, [8, 9, 10])
