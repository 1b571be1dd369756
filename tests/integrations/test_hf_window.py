"""The sliding layers of HFChatCache's caches hold the whole blocks of their window and no more,
however long the turn or the chat, and a resume from what they saved equals recompute.

Tiny seeded models with five sliding layers to one full (Gemma 3), alternating (gpt-oss) and
sliding everywhere (Mistral); float32. test_hf_layouts.py has the controls that a changed
prefix and tampered KV change the reply, so that equality to recompute is not vacuous.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
from transformers.cache_utils import DynamicSlidingWindowLayer

from tests.conftest import embedded_config
from tests.integrations.chat import generate, recompute, user_message
from tiercache import SyncCache
from tiercache.demo_models import WINDOW, tiny_model
from tiercache.groups import needed_blocks
from tiercache.integrations.hf import HFChatCache
from tiercache.integrations.hf_window import WindowBlocksLayer, window_start
from tiercache.spec import AttentionKind

BS = 8
REPLY = 40  # longer than the window: a turn alone passes it
HELD = WINDOW + BS  # at most: the window, the partial block it starts in, the last token


@pytest.fixture(scope="module", params=["gemma3", "gpt_oss", "mistral"])
def model(request: pytest.FixtureRequest) -> Any:
    return tiny_model(request.param, seed=0, hidden_size=128, intermediate_size=256)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[SyncCache]:
    with SyncCache(embedded_config(tmp_path)) as c:
        yield c


def sliding_held(past: Any) -> list[int]:
    return [int(x.keys.shape[-2]) for x in past.layers if isinstance(x, DynamicSlidingWindowLayer)]


def check_reply(model: Any, convo: torch.Tensor, past: Any) -> torch.Tensor:
    resumed, logp = generate(model, convo, past, REPLY)
    expected, expected_logp = recompute(model, convo, REPLY)
    assert torch.equal(resumed, expected)
    torch.testing.assert_close(logp, expected_logp, atol=1e-3, rtol=0)  # chunked prefill
    return resumed


def test_a_restored_cache_holds_the_window_however_long_the_turn(
    model: Any, cache: SyncCache
) -> None:
    # Recording every token until a crop, which generate never calls, a restored sliding layer
    # held the restored window and the whole turn: 31 + 60 tokens after turn 2, not <= 40.
    chat = HFChatCache(cache, model, block_size=BS)
    convo = torch.empty(0, dtype=torch.long)
    for turn in range(4):
        convo = torch.cat([convo, user_message(turn, 20, model.config.vocab_size)])
        past, reused = chat.restore("chat", convo)
        assert reused == max(0, convo.numel() - 21) // BS * BS  # every whole block saved
        convo = check_reply(model, convo, past)
        assert sliding_held(past) and max(sliding_held(past)) <= HELD
        chat.save("chat", convo[:-1], past)
    assert convo.numel() > 6 * WINDOW


def test_a_cache_carried_from_turn_to_turn_holds_the_window_and_saves_it(
    model: Any, cache: SyncCache
) -> None:
    # Carried through a chat (transformers' way of continuing one), its sliding layers held
    # the whole conversation, as much as full-attention layers.
    chat = HFChatCache(cache, model, block_size=BS)
    past = chat.new_cache()
    convo = torch.empty(0, dtype=torch.long)
    for turn in range(4):
        convo = torch.cat([convo, user_message(turn, 20, model.config.vocab_size)])
        convo = check_reply(model, convo, past)
        assert max(sliding_held(past)) <= HELD
        chat.save("chat", convo[:-1], past)
    nxt = torch.cat([convo, user_message(9, 5, model.config.vocab_size)])

    restored, reused = HFChatCache(cache, model, block_size=BS).restore("chat", nxt)

    assert reused == (convo.numel() - 1) // BS * BS  # the window's whole blocks were all saved
    check_reply(model, nxt, restored)


def test_window_start_is_the_first_block_a_resume_needs(model: Any, cache: SyncCache) -> None:
    spec = next(g for g in HFChatCache(cache, model, block_size=BS).kv.groups).spec
    assert spec.kind is AttentionKind.SLIDING
    for length in range(0, 5 * WINDOW):
        ranges = needed_blocks(spec, length // BS)
        want = ranges[0].start * BS if ranges else 0
        assert window_start(length, WINDOW, BS) == want, length


def layer_after(chunks: list[int]) -> tuple[WindowBlocksLayer, torch.Tensor]:
    """A layer fed forwards of ``chunks`` tokens, each token's keys its position."""
    layer, pos = WindowBlocksLayer(WINDOW, BS), 0
    for n in chunks:
        kv = torch.arange(pos, pos + n, dtype=torch.float32).reshape(1, 1, n, 1)
        layer.update(kv, kv.clone())
        pos += n
    return layer, torch.arange(pos, dtype=torch.float32)


def test_a_rollback_of_the_last_forward_leaves_the_window_as_if_never_seen() -> None:
    # transformers rolls back the tokens of the last forward (assisted decoding's rejected
    # candidates, a deferred stop): the window before them must still be there.
    layer, keys = layer_after([70, 1, 1, 12])
    layer.crop(-12)
    assert layer.get_seq_length() == 72
    held = layer.keys[0, 0, :, 0]
    assert torch.equal(held, keys[72 - held.numel() : 72]) and held.numel() >= WINDOW - 1
    k, _ = layer.update(torch.full((1, 1, 1, 1), 72.0), torch.zeros(1, 1, 1, 1))
    assert torch.equal(k[0, 0, :, 0], keys[72 - WINDOW + 1 : 73])  # what attention sees
    with pytest.raises(RuntimeError, match="the window before them is gone"):
        layer.crop(-20)  # more than the last forward's token: its window is not held
