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
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

from tests.conftest import SPEC, make_blocks, make_ns, make_tokens
from tests.integrations.vllm.test_worker import background_done
from tiercache.client import Client
from tiercache.daemon.process import DaemonProcess
from tiercache.integrations.vllm.groups import FULL, SLIDING, Group
from tiercache.integrations.vllm.link import Link
from tiercache.integrations.vllm.options import Options
from tiercache.integrations.vllm.scheduler import Scheduler, _session
from tiercache.integrations.vllm.worker import Worker
from tiercache.keys import KeyChain, Namespace
from tiercache.spec import AttentionKind, KVSpec


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


def save_for_real(daemon: DaemonProcess, meta: Any) -> None:
    """A worker side saves what ``meta`` says from an engine's (random) paged KV cache."""
    shape = (2, 8, B, SPEC.num_kv_heads, SPEC.head_dim)
    kv = {n: torch.rand(shape).to(SPEC.torch_dtype) + 1 for n in ("l0", "l1")}
    worker = Worker([GROUP], 1, Link(str(daemon.socket), "vllm-worker-test", retry=60), False)
    worker.register(kv)
    worker.save(meta)
    worker.shutdown()


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


def test_a_partial_hit_is_one_lookup_in_the_daemon(daemon: DaemonProcess) -> None:
    # usable_prefix narrows the prefix to the run found and asks for it again: the daemon
    # counted every block of a partial hit twice (and refreshed it twice).
    tokens = make_tokens(4, seed=3)
    with Client(daemon.socket) as c:
        c.save(NS, tokens[: 2 * B], make_blocks(2, seed=3))
        before = c.stats()["lookup_blocks"]
    s = scheduler(daemon.socket)
    assert s.get_num_new_matched_tokens(Prompt("r1", tokens), 0) == (2 * B, False)  # type: ignore[arg-type]
    with Client(daemon.socket) as c:
        after = c.stats()["lookup_blocks"]
    assert after.get("host", 0) - before.get("host", 0) == 2
    assert after.get("miss", 0) - before.get("miss", 0) == 2  # blocks 2 and 3


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
    save_for_real(daemon, meta)
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


# -- a sliding group's windows across a chat's turns -----------------------------------

W = 8  # the sliding group's window: 2 blocks
SLIDING_SPEC = KVSpec(1, 2, 8, "bfloat16", B, kind=AttentionKind.SLIDING, window=W)
FULL_SPEC = KVSpec(1, 2, 8, "bfloat16", B)
HYBRID = [
    Group(0, FULL, None, ("f0",), Namespace("vllm-windows", FULL_SPEC, group="g0"), FULL_SPEC),
    Group(
        1, SLIDING, W, ("s0",), Namespace("vllm-windows", SLIDING_SPEC, group="g1"), SLIDING_SPEC
    ),
]


def cached_step(
    req_id: str, new_ids: tuple[list[int], ...] | None, computed: int, scheduled: int
) -> Any:
    """vLLM's output of a step that goes on with running request ``req_id`` (or, with no
    ``req_id``, schedules nothing)."""
    cached = SimpleNamespace(
        req_ids=[req_id] if req_id else [],
        new_block_ids=[new_ids],
        resumed_req_ids=set(),
        num_computed_tokens=[computed],
    )
    sched = {req_id: scheduled} if req_id else {}
    return SimpleNamespace(
        num_scheduled_tokens=sched, scheduled_new_reqs=[], scheduled_cached_reqs=cached
    )


def held(ids: list[int], computed: int) -> list[int]:
    """A sliding group's block table once ``computed`` tokens are: vLLM's null block (0)
    stands for the blocks out of the window."""
    skipped = max(0, computed - W + 1) // B
    return [0 if i < skipped else b for i, b in enumerate(ids)]


def third_turn_finds(daemon: DaemonProcess, seed: int, end: int, finish_saved: bool) -> int:
    """A chat of a hybrid model (a full and a sliding group): turn 1 (16 prompt tokens, 18 in
    all) is saved; turn 2 (22 prompt tokens) resumes from it, runs to ``end`` tokens and
    finishes, its finish saves stored or (``finish_saved`` False) lost. What turn 3 (the
    chat's first 40 tokens) finds."""
    s = Scheduler(Options(), HYBRID, B, 0, Link(str(daemon.socket), "vllm-scheduler-test", 60))
    kv = {n: torch.rand(2, 64, B, 2, 8).to(torch.bfloat16) + 1 for n in ("f0", "s0")}
    w = Worker(HYBRID, 1, Link(str(daemon.socket), "vllm-worker-test", 60), attach=False)
    w.register(kv)
    tokens = make_tokens(10, seed=seed)

    t1 = Prompt("t1", tokens[:16], session="chat")
    t1.all_token_ids = tokens[:18]
    assert s.get_num_new_matched_tokens(t1, 0) == (0, False)  # type: ignore[arg-type]
    s.update_state_after_alloc(t1, None, 0)  # type: ignore[arg-type]
    full, sliding = [1, 2, 3, 4, 5], [11, 12, 13, 14, 15]
    out = step("t1", [], computed=0, scheduled=16)
    out.scheduled_new_reqs[0].block_ids = (full[:4], sliding[:4])
    w.save(s.build_connector_meta(out))
    t1.num_computed_tokens = 18
    s.request_finished_all_groups(t1, (full, held(sliding, 18)))  # type: ignore[arg-type]
    w.save(s.build_connector_meta(cached_step("", ([], []), 0, 0)))

    t2 = Prompt("t2", tokens[:22], session="chat")
    t2.all_token_ids = tokens[:end]
    assert s.get_num_new_matched_tokens(t2, 0) == (16, True)  # type: ignore[arg-type]
    full, sliding = list(range(21, 30)), list(range(31, 40))
    allocated = SimpleNamespace(get_block_ids=lambda: (full[:6], sliding[:6]))
    s.update_state_after_alloc(t2, allocated, 16)  # type: ignore[arg-type]
    w.start_load(s.build_connector_meta(cached_step("", ([], []), 0, 0)), forward=False)
    assert background_done(w) == ({"t2"}, set())
    s.update_connector_output(SimpleNamespace(finished_recving={"t2"}))  # type: ignore[arg-type]
    out = step("t2", [], computed=16, scheduled=6)
    out.scheduled_new_reqs[0].block_ids = (full[:6], sliding[:6])
    w.save(s.build_connector_meta(out))
    w.save(s.build_connector_meta(cached_step("t2", (full[6:], sliding[6:]), 22, end - 22)))
    t2.num_computed_tokens = end
    s.request_finished_all_groups(t2, (full, held(sliding, end)))  # type: ignore[arg-type]
    finishing = s.build_connector_meta(cached_step("", ([], []), 0, 0))
    if finish_saved:
        w.save(finishing)
    w.shutdown()

    t3 = Prompt("t3", tokens[:40], session="chat")
    return s.get_num_new_matched_tokens(t3, 0)[0]  # type: ignore[arg-type]


def test_a_chats_old_window_is_evicted_only_once_its_new_window_is_stored(
    daemon: DaemonProcess,
) -> None:
    # Turn 2 ends at 34 tokens: its window (blocks 6, 7) lets turn 3 resume at 32, and the
    # window turn 2 resumed from (blocks 2, 3) goes.
    assert third_turn_finds(daemon, seed=20, end=34, finish_saved=True) == 32
    # The finish saves are lost (the daemon restarting, a save not admitted): the old window
    # stays, and with it turn 2's prompt (window 3, 4): turn 3 resumes at 20, not from 0.
    assert third_turn_finds(daemon, seed=21, end=34, finish_saved=False) == 20
    # Turn 2 ends at 35 tokens: vLLM has freed block 6 already, so the window it saves
    # (block 7) is no resume point, and the old one is kept.
    assert third_turn_finds(daemon, seed=22, end=35, finish_saved=True) == 20


def test_a_step_scheduled_before_vllm_saw_a_failed_load_saves_nothing(
    daemon: DaemonProcess,
) -> None:
    # vLLM schedules step N + 1 before it sees step N's output (async scheduling). A load
    # of step N fails (its blocks evicted after the lookup); step N + 1 computes the prompt's
    # next chunk over them. Its blocks are not saved: the daemon would keep them (a block it
    # has is never written again) and serve KV that never was the prompt's.
    tokens = make_tokens(5, seed=31)
    chain = KeyChain(NS.block_keys(tokens))
    with Client(daemon.socket) as c:
        c.save(NS, tokens[: 2 * B], make_blocks(2, seed=31))
    s = scheduler(daemon.socket)
    req = Prompt("r1", tokens)
    assert s.get_num_new_matched_tokens(req, 0) == (8, False)  # type: ignore[arg-type]
    s.update_state_after_alloc(req, None, 8)  # type: ignore[arg-type]
    with Client(daemon.socket) as c:
        c.evict(keys=chain[:2])
    step_n = s.build_connector_meta(step("r1", [1, 2, 3, 4, 5], computed=8, scheduled=4))  # type: ignore[arg-type]
    step_n1 = s.build_connector_meta(cached_step("r1", None, computed=12, scheduled=8))  # type: ignore[arg-type]
    kv = {n: torch.rand(2, 8, B, 2, 8).to(torch.bfloat16) + 1 for n in ("l0", "l1")}
    w = Worker([GROUP], 1, Link(str(daemon.socket), "vllm-worker-test", 60), attach=False)
    w.register(kv)
    for meta in (step_n, step_n1):
        w.start_load(meta, forward=True)
        w.save(meta)
    assert w.load_errors() == {1, 2}
    w.shutdown()
    with Client(daemon.socket) as c:
        assert c.lookup(NS, chain, first_block=2).blocks == 0
        assert c.lookup(NS, chain, first_block=3).blocks == 0


def media(*items: tuple[str, int]) -> list[MultiModalFeatureSpec]:
    """vLLM's features of images ``(content hash, placeholder offset)``, 2 tokens each."""
    return [
        MultiModalFeatureSpec(None, "image", ident, PlaceholderRange(offset=at, length=2))
        for ident, at in items
    ]


def test_a_prompt_with_an_image_is_found_from_the_image_on_only_with_that_image(
    daemon: DaemonProcess,
) -> None:
    # The image's placeholder ids are the same whatever its pixels: a chain over token ids
    # alone would hand one image's KV to a prompt with another. The chain is re-seeded by
    # the image's content hash in the block it starts in (block 1 here): the blocks before
    # it are found by any prompt of the same ids, the blocks from it on only with that image.
    tokens = make_tokens(3, seed=55)[:10]  # 2 whole blocks and a tail of 2
    s = scheduler(daemon.socket, min_tail=1)
    first = Prompt("a", tokens)
    first.mm_features = media(("img-a", B + 1))  # type: ignore[attr-defined]
    assert s.get_num_new_matched_tokens(first, 0) == (0, False)  # type: ignore[arg-type]
    s.update_state_after_alloc(first, None, 0)  # type: ignore[arg-type]
    meta = s.build_connector_meta(step("a", [1, 2, 3], computed=0, scheduled=10))  # type: ignore[arg-type]
    assert [(t.first, t.count) for t in meta.saves] == [(0, 2), (2, 1)]  # the tail after it too
    save_for_real(daemon, meta)

    def found(req_id: str, images: list[MultiModalFeatureSpec], toks: list[int] = tokens) -> int:
        req = Prompt(req_id, toks)
        req.mm_features = images  # type: ignore[attr-defined]
        return s.get_num_new_matched_tokens(req, 0)[0]  # type: ignore[arg-type]

    assert found("same image", media(("img-a", B + 1))) == 9  # its blocks and its tail
    assert found("other image", media(("img-b", B + 1))) == B  # block 0 only
    assert found("no image", []) == B
    assert found("image elsewhere", media(("img-a", B + 2))) == B
    assert found("a second image", media(("img-a", B + 1), ("img-c", 2 * B + 1))) == 2 * B
    # A tail is keyed by its token ids only: one that an image starts in is neither saved
    # nor found.
    late = make_tokens(3, seed=56)[:10]
    with_image = Prompt("l", late)
    with_image.mm_features = media(("img-d", 2 * B + 1))  # type: ignore[attr-defined]
    assert s.get_num_new_matched_tokens(with_image, 0) == (0, False)  # type: ignore[arg-type]
    s.update_state_after_alloc(with_image, None, 0)  # type: ignore[arg-type]
    meta = s.build_connector_meta(step("l", [4, 5, 6], computed=0, scheduled=10))  # type: ignore[arg-type]
    assert [(t.first, t.count) for t in meta.saves] == [(0, 2)]
    save_for_real(daemon, meta)
    assert found("late image", media(("img-d", 2 * B + 1)), late) == 2 * B
    assert found("late, no image", [], late) == 2 * B  # the image starts after both blocks


def test_images_vllm_numbers_by_request_are_cached_only_before_the_first(
    daemon: DaemonProcess,
) -> None:
    # With its caches off, vLLM names an image by a count of requests, the same in every
    # engine (connector.media_hashed): another image under that name must not find this
    # one's blocks. Only the blocks before the block the first image starts in are cached.
    tokens = make_tokens(3, seed=57)[:10]
    name = "renderer0-mm-1-image-0"
    hashed = scheduler(daemon.socket, min_tail=1)
    first = Prompt("a", tokens)
    first.mm_features = media((name, B + 1))  # type: ignore[attr-defined]
    hashed.get_num_new_matched_tokens(first, 0)  # type: ignore[arg-type]
    hashed.update_state_after_alloc(first, None, 0)  # type: ignore[arg-type]
    save_for_real(daemon, hashed.build_connector_meta(step("a", [1, 2, 3], 0, 10)))  # type: ignore[arg-type]
    link = Link(str(daemon.socket), "vllm-scheduler-test", retry=60)
    s = Scheduler(Options(), [GROUP], B, 1, link, media_hashed=False)
    other = Prompt("b", tokens)
    other.mm_features = media((name, B + 1))  # type: ignore[attr-defined]
    assert s.get_num_new_matched_tokens(other, 0) == (B, False)  # type: ignore[arg-type]
    s.update_state_after_alloc(other, None, B)  # type: ignore[arg-type]
    meta = s.build_connector_meta(step("b", [4, 5, 6], computed=B, scheduled=10 - B))  # type: ignore[arg-type]
    assert meta.saves == []  # block 0 was found; nothing from the image on is saved


@pytest.mark.parametrize(("field", "a", "b"), [("prompt_embeds", torch.zeros(1), torch.ones(1))])
def test_a_request_whose_kv_depends_on_more_than_its_token_ids_is_not_cached(
    daemon: DaemonProcess, field: str, a: object, b: object
) -> None:
    # Keys are chained over token ids only: a request with the same ids and other
    # embeddings would find (and load) the first one's KV.
    tokens = make_tokens(3, seed=50 + len(field))
    s = scheduler(daemon.socket)
    first = Prompt("a", tokens)
    setattr(first, field, a)
    assert s.get_num_new_matched_tokens(first, 0) == (0, False)  # type: ignore[arg-type]
    s.update_state_after_alloc(first, None, 0)  # type: ignore[arg-type]
    meta = s.build_connector_meta(step("a", [1, 2, 3], computed=0, scheduled=12))  # type: ignore[arg-type]
    assert meta.saves == []
    with Client(daemon.socket) as c:
        c.save(NS, tokens, make_blocks(3, seed=50))  # as if saved all the same
    second = Prompt("b", tokens)
    setattr(second, field, b)
    assert s.get_num_new_matched_tokens(second, 0) == (0, False)  # type: ignore[arg-type]
    assert s.get_num_new_matched_tokens(Prompt("c", tokens), 0) == (11, False)  # type: ignore[arg-type]


def adapter(name: str, path: str = "/adapters") -> SimpleNamespace:
    return SimpleNamespace(lora_name=name, lora_path=f"{path}/{name}", lora_int_id=1)


@pytest.mark.parametrize(
    ("field", "a", "others"),
    [
        # by name and path, as vLLM's prefix cache keys an adapter (its int id is per engine)
        ("lora_request", adapter("a"), [adapter("b"), adapter("a", "/elsewhere")]),
        ("cache_salt", "tenant-a", ["tenant-b"]),
    ],
)
def test_a_lora_adapter_or_a_cache_salt_has_chains_of_its_own(
    daemon: DaemonProcess, field: str, a: object, others: list[object]
) -> None:
    # Saved for real (the worker gathers the blocks) under adapter or salt ``a``, a prompt
    # and its tail are found under ``a`` again, and by no request under another adapter or
    # salt, or under none; and a plain request's blocks are not found under ``a``.
    tokens = make_tokens(3, seed=60 + len(field))[:10]
    s = scheduler(daemon.socket, min_tail=1)
    first = Prompt("a", tokens)
    setattr(first, field, a)
    assert s.get_num_new_matched_tokens(first, 0) == (0, False)  # type: ignore[arg-type]
    s.update_state_after_alloc(first, None, 0)  # type: ignore[arg-type]
    meta = s.build_connector_meta(step("a", [5, 6, 7], computed=0, scheduled=10))  # type: ignore[arg-type]
    assert [(t.first, t.count) for t in meta.saves] == [(0, 2), (2, 1)]  # 2 blocks and the tail
    save_for_real(daemon, meta)

    again = Prompt("b", tokens)
    setattr(again, field, a)
    assert s.get_num_new_matched_tokens(again, 0) == (9, False)  # type: ignore[arg-type]
    for i, other in enumerate(others):
        req = Prompt(f"c{i}", tokens)
        setattr(req, field, other)
        assert s.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
    assert s.get_num_new_matched_tokens(Prompt("d", tokens), 0) == (0, False)  # type: ignore[arg-type]
    plain = make_tokens(3, seed=70 + len(field))
    with Client(daemon.socket) as c:
        c.save(NS, plain, make_blocks(3, seed=70))
    assert s.get_num_new_matched_tokens(Prompt("e", plain), 0) == (11, False)  # type: ignore[arg-type]
    under_a = Prompt("f", plain)
    setattr(under_a, field, a)
    assert s.get_num_new_matched_tokens(under_a, 0) == (0, False)  # type: ignore[arg-type]
