"""A real transformers model resumes a 3-turn chat from tiercache with output identical to recompute.

Two architectures (Llama-style and Qwen2-style, both GQA). The controls show
the equality check can fail: a changed prefix changes the reply, and so does
restoring tampered KV, so the restored cache is really what the model attends to.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache

from tests.conftest import embedded_config
from tests.integrations.chat import REPLY, generate, recompute, user_message
from tiercache import SyncCache
from tiercache.demo_models import tiny_model
from tiercache.integrations.hf import HFChatCache, generate_cache_kwarg, model_fingerprint
from tiercache.keys import TokenError
from tiercache.results import SaveResult
from tiercache.spec import SpecError


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest) -> Any:
    return tiny_model(
        request.param, seed=0, num_hidden_layers=2, hidden_size=128, intermediate_size=256
    )


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[SyncCache]:
    with SyncCache(embedded_config(tmp_path)) as c:
        yield c


def test_three_turn_chat_resumes_with_output_identical_to_recompute(
    model: Any, cache: SyncCache
) -> None:
    chat = HFChatCache(cache, model, block_size=16)
    vocab = model.config.vocab_size
    convo = torch.empty(0, dtype=torch.long)
    reused_per_turn = []
    for turn, n in enumerate((150, 40, 40)):
        convo = torch.cat([convo, user_message(turn, n, vocab)])
        past, reused = chat.restore("chat", convo)
        reused_per_turn.append(reused)
        resumed, logp = generate(model, convo, past)
        expected, expected_logp = recompute(model, convo)
        assert torch.equal(resumed, expected), (
            f"turn {turn + 1}: resumed reply differs from recompute"
        )
        torch.testing.assert_close(logp, expected_logp, atol=1e-3, rtol=0)
        chat.save("chat", resumed[:-1], past)
        convo = resumed
    # Turn 1 is cold; turns 2 and 3 reuse every full block of the previous conversation.
    assert reused_per_turn == [0, 160, 208]


def test_a_changed_prefix_changes_the_reply(model: Any) -> None:
    ids = user_message(0, 150, model.config.vocab_size)
    changed = ids.clone()
    changed[3] = (changed[3] + 1) % model.config.vocab_size
    assert not torch.equal(recompute(model, ids)[0][-REPLY:], recompute(model, changed)[0][-REPLY:])


def test_restoring_tampered_kv_changes_the_reply(model: Any, cache: SyncCache) -> None:
    chat = HFChatCache(cache, model, block_size=16)
    ids = user_message(0, 150, model.config.vocab_size)
    expected, _ = recompute(model, ids)
    with torch.no_grad():
        past = DynamicCache(config=model.config)
        model(ids[None], past_key_values=past)
    chat.save("chat", ids, past)
    restored, reused = chat.restore("chat", ids)
    assert reused == 144
    assert torch.equal(generate(model, ids, restored)[0], expected)
    tampered, _ = chat.restore("chat", ids)
    tampered.layers[0].keys.mul_(-1.0)
    assert not torch.equal(generate(model, ids, tampered)[0], expected)


def test_models_with_different_weights_do_not_share_blocks(cache: SyncCache) -> None:
    a = tiny_model("llama", seed=0, num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    b = tiny_model("llama", seed=1, num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    chat_a, chat_b = HFChatCache(cache, a), HFChatCache(cache, b)
    ids = user_message(0, 64, a.config.vocab_size)
    with torch.no_grad():
        past = DynamicCache(config=a.config)
        a(ids[None], past_key_values=past)
    chat_a.save("s", ids, past)
    assert chat_a.restore("s", ids)[1] == 48
    assert chat_b.restore("s", ids)[1] == 0


def test_a_scalar_in_the_state_dict_is_fingerprinted() -> None:
    m = tiny_model("llama", num_hidden_layers=1, hidden_size=64, intermediate_size=64)
    m.register_buffer("logit_scale", torch.tensor(1.5))  # 0-d, as per-tensor scales are
    before = model_fingerprint(m)
    m.logit_scale.fill_(2.0)
    assert model_fingerprint(m) != before


def _turn_one(model: Any, chat: HFChatCache, session: str = "s") -> torch.Tensor:
    """Turn 1 of a chat, generated and saved: the conversation so far."""
    ids = user_message(0, 150, model.config.vocab_size)
    past, _ = chat.restore(session, ids)
    out, _ = generate(model, ids, past)
    chat.save(session, out[:-1], past)
    return out


def _resume_equals_recompute(model: Any, chat: HFChatCache, convo: torch.Tensor) -> int:
    past, reused = chat.restore("s", convo)
    assert torch.equal(generate(model, convo, past)[0], recompute(model, convo)[0])
    return reused


@pytest.mark.parametrize("how", ["load_state_dict", "optimizer step"])
def test_weights_changed_in_place_after_the_cache_was_made_are_not_served_old_kv(
    cache: SyncCache, how: str
) -> None:
    """The weights are fingerprinted again when they change under the same model object:
    before, the fingerprint taken when the HFChatCache was made kept serving the old
    weights' KV, and turn 2 differed from recompute."""
    kw: dict[str, Any] = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    model = tiny_model("llama", seed=0, **kw)
    chat = HFChatCache(cache, model, block_size=16)
    convo = _turn_one(model, chat)
    assert chat.restore("s", convo)[1] == 160  # the control: unchanged weights, a hit
    if how == "load_state_dict":
        model.load_state_dict(tiny_model("llama", seed=1, **kw).state_dict())
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model(convo[None], labels=convo[None]).loss.backward()
        opt.step()
    assert _resume_equals_recompute(model, chat, convo) == 0


@pytest.mark.parametrize("model_id", [None, "tiny"])
def test_a_model_cast_after_the_cache_was_made_saves_and_resumes_in_its_new_dtype(
    cache: SyncCache, model_id: str | None
) -> None:
    """Before, the KV spec kept the dtype the model had when the HFChatCache was made: after
    ``model.to(torch.bfloat16)`` every save raised a LayoutError and every restore missed."""
    kw: dict[str, Any] = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    model = tiny_model("llama", seed=0, **kw)
    chat = HFChatCache(cache, model, block_size=16, model_id=model_id)
    _turn_one(model, chat)
    model.to(torch.bfloat16)
    convo = _turn_one(model, chat, "cast")  # saved in bfloat16
    assert chat.restore("cast", convo)[1] == 160
    past, _ = chat.restore("cast", convo)
    assert past.layers[0].keys.dtype == torch.bfloat16


def test_a_peft_adapter_switched_on_is_a_namespace_of_its_own(cache: SyncCache) -> None:
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", seed=0, num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, lora)  # B random: the adapter changes the KV
    model.add_adapter("other", lora)
    chat = HFChatCache(cache, model, block_size=16)
    convo = _turn_one(model, chat)

    model.set_adapter("other")  # same state dict, another forward
    assert _resume_equals_recompute(model, chat, convo) == 0
    model.set_adapter("default")
    assert _resume_equals_recompute(model, chat, convo) == 160
    with model.disable_adapter():  # the base model's KV: none stored
        assert _resume_equals_recompute(model, chat, convo) == 0
    model.merge_adapter()  # the same adapter, merged: other weights, other rounding
    assert _resume_equals_recompute(model, chat, convo) == 0
    model.unmerge_adapter()

    named = HFChatCache(cache, model, model_id="tiny-with-lora")  # weights named, not hashed
    assert torch.equal(_turn_one(model, named, "n"), convo)
    model.set_adapter("other")
    assert named.restore("n", convo)[1] == 0
    model.set_adapter("default")
    assert named.restore("n", convo)[1] == 160


def test_weights_it_cannot_read_are_refused_pointing_to_model_id(cache: SyncCache) -> None:
    m = tiny_model("llama", num_hidden_layers=1, hidden_size=64, intermediate_size=64)
    m.lm_head.to("meta")  # as accelerate leaves an offloaded weight

    with pytest.raises(SpecError, match=r"weight 'lm_head.weight' is on the meta device.*model_id"):
        HFChatCache(cache, m)
    assert HFChatCache(cache, m, model_id="tiny@1").restore("s", [1, 2, 3])[1] == 0


def test_one_model_id_under_another_config_does_not_share_blocks(cache: SyncCache) -> None:
    # Same weights and KV shape, another RoPE base: the saved KV is wrong for it.
    kw: dict[str, Any] = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    a = tiny_model("llama", seed=0, **kw)
    b = tiny_model("llama", seed=0, rope_theta=500.0, **kw)
    b.load_state_dict(a.state_dict())
    chat_a = HFChatCache(cache, a, model_id="my-model")
    chat_b = HFChatCache(cache, b, model_id="my-model")
    ids = user_message(0, 64, a.config.vocab_size)
    with torch.no_grad():
        past = DynamicCache(config=a.config)
        a(ids[None], past_key_values=past)
    chat_a.save("s", ids, past)
    assert HFChatCache(cache, a, model_id="my-model").restore("s", ids)[1] == 48
    assert chat_b.restore("s", ids)[1] == 0


def test_a_batch_of_two_prompts_is_refused_not_looked_up_as_one(
    model: Any, cache: SyncCache
) -> None:
    chat = HFChatCache(cache, model, block_size=16)
    ids = user_message(0, 64, model.config.vocab_size)
    with torch.no_grad():
        past = DynamicCache(config=model.config)
        model(ids[None], past_key_values=past)
    chat.save("s", ids, past)
    with pytest.raises(TokenError, match=r"got shape \(2, 64\)"):
        chat.restore("s", torch.stack([ids, ids]))
    assert chat.restore("s", ids[None])[1] == 48


def test_saving_a_cache_nothing_ran_through_stores_nothing(model: Any, cache: SyncCache) -> None:
    chat = HFChatCache(cache, model, block_size=16)
    for past in (DynamicCache(), DynamicCache(config=model.config), chat.new_cache()):
        assert chat.save("s", [], past) == SaveResult(0, 0, 0)
    with pytest.raises(ValueError, match="3 tokens given but the cache holds only 0 positions"):
        chat.save("s", [1, 2, 3], DynamicCache())
    assert chat.restore("s", user_message(0, 64, model.config.vocab_size))[1] == 0


def test_a_cache_of_a_batch_is_refused_not_saved_as_row_0(model: Any, cache: SyncCache) -> None:
    # Its row 0 would be stored under the tokens given, those of row 1 here.
    chat = HFChatCache(cache, model, block_size=16)
    a, b = (user_message(i, 64, model.config.vocab_size) for i in range(2))
    with torch.no_grad():
        past = DynamicCache(config=model.config)
        model(torch.stack([a, b]), past_key_values=past)
    with pytest.raises(ValueError, match="a batch of 2 conversations"):
        chat.save("b", b, past)
    assert chat.restore("b", b)[1] == 0


def test_a_cache_holding_more_positions_than_the_tokens_is_refused_not_stored(
    model: Any, cache: SyncCache
) -> None:
    # transformers' assisted generation runs the whole prompt again on top of a restored cache:
    # here 64 restored positions and the 104-token prompt. Saved, its positions 64-95 (the KV
    # of tokens 0-31) were stored under the keys of tokens 64-95, and a later resume got them.
    chat = HFChatCache(cache, model, block_size=16)
    vocab = model.config.vocab_size
    ids = user_message(0, 64, vocab)
    past = chat.new_cache()
    with torch.no_grad():
        model(ids[None], past_key_values=past)
    chat.save("s", ids, past)
    convo = torch.cat([ids, user_message(1, 40, vocab)])
    past, reused = chat.restore("s", convo)
    assert reused == 64
    with torch.no_grad():
        model(convo[None], past_key_values=past)  # the whole prompt again

    with pytest.raises(ValueError, match=r"^104 tokens given but the cache holds 168 positions"):
        chat.save("s", convo, past)

    nxt = torch.cat([convo, user_message(2, 10, vocab)])
    restored, reused = chat.restore("t", nxt)
    assert reused == 64  # nothing of the refused save
    assert torch.equal(generate(model, nxt, restored)[0], recompute(model, nxt)[0])


# --- quantized storage (store_dtype): error against exact recompute, measured -------------

QUANT_REPLY = 64
# Measured on these tiny seeded (random-weight) models: greedy-token agreement with exact
# recompute over 4 turns of 64 tokens (position by position), and the largest log-prob
# difference before a turn's first disagreement. Asserted with slack (agreement >= 0.8x,
# |dlogp| <= 1.5x + 1e-3). Random weights give flat next-token distributions, so one flipped
# argmax sends the rest of a turn elsewhere: these are far below what a trained model shows.
QUANT_MEASURED = {
    ("llama", "int8"): (0.4922, 0.9879),
    ("llama", "fp8_e4m3"): (0.3008, 0.9682),
    ("qwen2", "int8"): (0.3398, 0.1743),
    ("qwen2", "fp8_e4m3"): (0.2539, 0.0007851),
}


def reply_of(model: Any, ids: torch.Tensor, past: Any) -> tuple[torch.Tensor, torch.Tensor]:
    seq, logp = generate(model, ids, past, QUANT_REPLY)
    return seq[ids.numel() :], logp


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_quantized_chat_stays_within_the_measured_bound(
    model: Any, cache: SyncCache, fmt: str
) -> None:
    chat = HFChatCache(cache, model, block_size=16, store_dtype=fmt)
    vocab = model.config.vocab_size
    convo = torch.empty(0, dtype=torch.long)
    agree = total = 0
    worst = 0.0
    reused = []
    for turn, n in enumerate((150, 40, 40, 40)):
        convo = torch.cat([convo, user_message(turn, n, vocab)])
        past, r = chat.restore("chat", convo)
        reused.append(r)
        got, got_logp = reply_of(model, convo, past)
        want, want_logp = reply_of(model, convo, DynamicCache(config=model.config))
        same = got == want
        agree += int(same.sum())
        total += QUANT_REPLY
        first_diff = int((~same).nonzero()[0]) if not bool(same.all()) else QUANT_REPLY
        if first_diff:
            worst = max(worst, float((got_logp - want_logp)[:first_diff].abs().max()))
        # the chat goes on with the exact reply; its exact KV is what gets stored (quantized)
        convo = torch.cat([convo, want])
        with torch.no_grad():
            exact_past = DynamicCache(config=model.config)
            model(convo[:-1][None], past_key_values=exact_past)
        chat.save("chat", convo[:-1], exact_past)
    assert reused[0] == 0 and all(r > 0 for r in reused[1:])
    agreement = agree / total
    print(f"{model.config.model_type} {fmt}: agreement {agreement:.4f}, max |dlogp| {worst:.4g}")
    measured_agree, measured_dlogp = QUANT_MEASURED[(model.config.model_type, fmt)]
    assert agreement >= 0.8 * measured_agree
    assert worst <= 1.5 * measured_dlogp + 1e-3
    # the restored KV really is the quantized one: the replies are not those of exact KV
    assert agreement < 1.0 and worst > 0.0


def test_generate_cache_kwarg_names_what_generate_takes_without_a_warning() -> None:
    model = tiny_model("llama", seed=0)
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model.generate(
            torch.arange(1, 9)[None],
            **{generate_cache_kwarg(): cache},
            max_new_tokens=2,
            do_sample=False,
            pad_token_id=0,
        )
    assert cache.get_seq_length() == 9  # generate filled the cache it was given
    assert [w for w in caught if issubclass(w.category, FutureWarning)] == []
