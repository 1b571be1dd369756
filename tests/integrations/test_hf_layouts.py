"""Every attention layout transformers caches, resumed from tiercache with output identical to
recompute: Gemma-3-style (five sliding layers to one full), gpt-oss-style (alternating, learned
sinks), Mistral-style (sliding everywhere) and DeepSeek-V2/V3 (MLA latents). Tiny models with
seeded random weights; float32, so the resumed log-probs match recompute to float noise.

Controls: a changed token the resumed KV carries changes the reply, and tampering with the
restored KV of one group changes it too, so the equality is not vacuous.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache

from tests.conftest import embedded_config, flip_byte
from tests.integrations.chat import generate, recompute, user_message
from tiercache import SyncCache
from tiercache.daemon.config import Config
from tiercache.demo_models import WINDOW, tiny_model
from tiercache.groups import needed_blocks
from tiercache.integrations.hf import HFChatCache
from tiercache.keys import Namespace
from tiercache.spec import AttentionKind, SpecError

BS = 8
FAMILIES = ["gemma3", "gpt_oss", "mistral", "deepseek_v2", "deepseek_v3"]
SIZE = {"hidden_size": 128, "intermediate_size": 256}
REPLY = 8


def make(family: str) -> Any:
    return tiny_model(family, seed=0, **SIZE)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model(family: str) -> Any:
    return make(family)


def config(tmp_path: Path, write: str = "write-back") -> Config:
    return embedded_config(tmp_path, write, host="32MiB")


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[SyncCache]:
    with SyncCache(config(tmp_path)) as c:
        yield c


def turn(chat: HFChatCache, convo: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One resumed turn checked against recompute: the reply (and the conversation with it)."""
    model = chat.model
    past, reused = chat.restore("chat", convo)
    resumed, logp = generate(model, convo, past, REPLY)
    expected, expected_logp = recompute(model, convo, REPLY)
    assert torch.equal(resumed, expected), f"resumed reply differs from recompute ({reused=})"
    torch.testing.assert_close(logp, expected_logp, atol=1e-4, rtol=0)
    chat.save("chat", resumed[:-1], past)
    return resumed, reused


def stored_blocks(cache: SyncCache, ns: Namespace) -> int:
    return sum(1 for e in cache.manager.index if e.array == f"ns/{ns.hex}")


def test_the_model_kv_has_the_groups_of_its_family(
    model: Any, family: str, cache: SyncCache
) -> None:
    chat = HFChatCache(cache, model, block_size=BS)
    kinds = {g.name: (str(g.spec.kind), len(g.layers)) for g in chat.kv.groups}
    assert (
        kinds
        == {
            "gemma3": {"sliding": ("sliding", 5), "full": ("full", 1)},
            "gpt_oss": {"sliding": ("sliding", 2), "full": ("full", 2)},
            "mistral": {"sliding": ("sliding", 4)},
            "deepseek_v2": {"mla": ("mla", 4)},
            "deepseek_v3": {"mla": ("mla", 4)},
        }[family]
    )
    # MLA: transformers caches the latent (kv_lora_rank 32 + rope 16), stored as one plane
    if family.startswith("deepseek"):
        assert chat.kv.groups[0].spec.head_dim == 48 and chat.kv.groups[0].spec.planes == 1


def test_turn_2_in_a_fresh_model_resumes_from_tiercache_also_from_disk_after_a_reopen(
    model: Any, family: str, tmp_path: Path
) -> None:
    vocab = model.config.vocab_size
    with SyncCache(config(tmp_path)) as cache:
        convo, reused = turn(HFChatCache(cache, model, block_size=BS), user_message(0, 100, vocab))
        assert reused == 0
        convo = torch.cat([convo, user_message(1, 20, vocab)])
        fresh = make(family)  # another instance, the same seeded weights
        chat = HFChatCache(cache, fresh, block_size=BS)
        _, reused = turn(chat, convo)
        assert reused == 104  # every full block of turn 1's 108 tokens
        assert chat.last_load is not None and set(chat.last_load.per_tier) == {"host"}
    with SyncCache(config(tmp_path)) as cache:  # reopened: the blocks come from disk
        chat = HFChatCache(cache, make(family), block_size=BS)
        _, reused = turn(chat, convo)
        assert reused == 120  # turn 2 again: its save holds the prompt (all but the last block)
        assert chat.last_load is not None and set(chat.last_load.per_tier) == {"disk"}


def test_a_changed_token_the_resumed_kv_carries_changes_the_reply(model: Any, family: str) -> None:
    ids = user_message(0, 100, model.config.vocab_size)
    # An early token; with sliding layers only, one within their reach (layers x window).
    at = 60 if family == "mistral" else 3
    changed = ids.clone()
    changed[at] = (changed[at] + 1) % model.config.vocab_size
    assert not torch.equal(recompute(model, ids, REPLY)[0], recompute(model, changed, REPLY)[0])


def test_tampering_with_one_groups_restored_kv_changes_the_reply(
    model: Any, cache: SyncCache
) -> None:
    chat = HFChatCache(cache, model, block_size=BS)
    ids = user_message(0, 100, model.config.vocab_size)
    past = chat.new_cache()
    with torch.no_grad():
        model(ids[None], past_key_values=past)
    chat.save("chat", ids, past)
    expected, _ = recompute(model, ids, REPLY)
    restored, reused = chat.restore("chat", ids)
    assert reused == 96 and torch.equal(generate(model, ids, restored, REPLY)[0], expected)
    # The group that is not full attention (sliding or MLA): its first layer's keys.
    group = next(g for g in chat.kv.groups if g.spec.kind is not AttentionKind.FULL)
    tampered, _ = chat.restore("chat", ids)
    tampered.layers[group.layers[0]].keys.mul_(-1.0)
    assert not torch.equal(generate(model, ids, tampered, REPLY)[0], expected)


def test_a_chat_longer_than_the_window_resumes_past_it_keeping_only_the_window(
    model: Any, cache: SyncCache
) -> None:
    chat = HFChatCache(cache, model, block_size=BS)
    vocab = model.config.vocab_size
    convo = torch.empty(0, dtype=torch.long)
    for i, n in enumerate((100, 30, 45)):
        convo, reused = turn(chat, torch.cat([convo, user_message(i, n, vocab)]))
        end = (
            convo.numel() - 1
        ) // BS  # the full blocks saved: the conversation but its last token
        assert reused == (0, 104, 144)[i]
        for g in chat.kv.groups:
            kept = sum(len(r) for r in needed_blocks(g.spec, end))
            assert stored_blocks(cache, chat.namespaces[g.name]) == kept
            if g.spec.kind is AttentionKind.SLIDING:
                assert kept == WINDOW // BS < end  # the window only, however long the chat
    assert convo.numel() > 5 * WINDOW


def test_a_corrupt_block_of_one_group_is_recomputed_with_the_same_reply(
    model: Any, tmp_path: Path
) -> None:
    vocab = model.config.vocab_size
    ids = user_message(0, 100, vocab)
    with SyncCache(config(tmp_path, "write-through")) as cache:
        chat = HFChatCache(cache, model, block_size=BS)
        past = chat.new_cache()
        with torch.no_grad():
            model(ids[None], past_key_values=past)
        chat.save("chat", ids, past)
    prompt = torch.cat([ids, user_message(1, 10, vocab)])
    with SyncCache(config(tmp_path)) as cache:  # reopened: every block on disk only
        chat = HFChatCache(cache, model, block_size=BS)
        # The last block of the group that is not full attention: every prefix needs it
        # (a sliding window ends there) or it cuts an MLA prefix there.
        group = next(g for g in chat.kv.groups if g.spec.kind is not AttentionKind.FULL)
        key = chat.namespaces[group.name].block_keys(ids)[11]
        entry, disk = cache.manager.index.get(key), cache.manager.disk
        assert entry is not None and entry.disk is not None and disk is not None
        path, offset = disk.location(entry.disk)
        flip_byte(path, offset + 7)

        past, reused = chat.restore("chat", prompt)

        assert reused == (88 if group.spec.kind is AttentionKind.MLA else 0)
        assert cache.manager.stats.corrupt_blocks == 1
        resumed, logp = generate(model, prompt, past, REPLY)
        expected, expected_logp = recompute(model, prompt, REPLY)
        assert torch.equal(resumed, expected)
        torch.testing.assert_close(logp, expected_logp, atol=1e-4, rtol=0)


def test_a_plain_dynamic_cache_is_saved_as_far_as_it_holds_whole_blocks(
    model: Any, cache: SyncCache
) -> None:
    # transformers' own sliding layers keep the last window - 1 = 31 tokens: of tokens 69-99,
    # whole blocks 9-11, but a resume after block 12 needs blocks 8-11 of a sliding group.
    chat = HFChatCache(cache, model, block_size=BS)
    ids = user_message(0, 100, model.config.vocab_size)
    past = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[None], past_key_values=past)
    chat.save("chat", ids, past)
    prompt = torch.cat([ids, user_message(1, 10, model.config.vocab_size)])

    restored, reused = chat.restore("chat", prompt)

    sliding = any(g.spec.kind is AttentionKind.SLIDING for g in chat.kv.groups)
    assert reused == (0 if sliding else 96)
    assert torch.equal(
        generate(model, prompt, restored, REPLY)[0], recompute(model, prompt, REPLY)[0]
    )


def gemma3n(**overrides: Any) -> Any:
    """A tiny Gemma 3n: sliding and full layers alternate, and the last two layers reuse the KV
    of layers 2 (sliding) and 3 (full), caching none of their own."""
    import transformers

    fields: dict[str, Any] = dict(
        vocab_size=2048, vocab_size_per_layer_input=2048, hidden_size=128, intermediate_size=256,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        sliding_window=WINDOW, num_kv_shared_layers=2, hidden_size_per_layer_input=16,
        layer_types=["sliding_attention", "full_attention"] * 3, laurel_rank=8,
        activation_sparsity_pattern=[0.0] * 6, initializer_range=0.4,
    )  # fmt: skip
    config = transformers.Gemma3nTextConfig(**{**fields, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def test_a_model_whose_last_layers_share_kv_resumes_identical_to_recompute(
    cache: SyncCache,
) -> None:
    model = gemma3n()
    chat = HFChatCache(cache, model, block_size=BS)
    assert [(g.name, g.layers) for g in chat.kv.groups] == [("sliding", (0, 2)), ("full", (1, 3))]
    ids = user_message(0, 100, model.config.vocab_size)
    past = chat.new_cache()
    with torch.no_grad():
        model(ids[None], past_key_values=past)
    chat.save("chat", ids, past)
    prompt = torch.cat([ids, user_message(1, 10, model.config.vocab_size)])
    expected, expected_logp = recompute(model, prompt, REPLY)

    restored, reused = chat.restore("chat", prompt)

    assert reused == 96
    resumed, logp = generate(model, prompt, restored, REPLY)
    assert torch.equal(resumed, expected)
    torch.testing.assert_close(logp, expected_logp, atol=1e-4, rtol=0)
    # Controls: an early token changes the reply, so does the restored KV of a layer whose KV
    # the shared layers reuse, and that of every layer changes the log-probs.
    changed = prompt.clone()
    changed[3] = (changed[3] + 1) % model.config.vocab_size
    assert not torch.equal(recompute(model, changed, REPLY)[0], expected)
    tampered, _ = chat.restore("chat", prompt)
    tampered.layers[2].values.mul_(-1.0)
    assert not torch.equal(generate(model, prompt, tampered, REPLY)[0], expected)
    for layer in range(4):
        tampered, _ = chat.restore("chat", prompt)
        tampered.layers[layer].values.mul_(-1.0)
        assert (
            float((generate(model, prompt, tampered, REPLY)[1] - expected_logp).abs().max()) > 0.1
        )


def test_a_model_whose_full_layers_have_a_wider_head_resumes_identical_to_recompute(
    cache: SyncCache,
) -> None:
    # Gemma 4: the full layers' head_dim (global_head_dim) is twice the sliding layers'.
    import transformers

    config = transformers.Gemma4TextConfig(
        vocab_size=2048, vocab_size_per_layer_input=2048, hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        global_head_dim=64, sliding_window=WINDOW, hidden_size_per_layer_input=16,
        layer_types=["sliding_attention", "full_attention"] * 2, initializer_range=0.4,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    chat = HFChatCache(cache, model, block_size=BS)
    assert [(g.name, g.spec.head_dim) for g in chat.kv.groups] == [("sliding", 32), ("full", 64)]
    ids = user_message(0, 100, model.config.vocab_size)
    past = chat.new_cache()
    with torch.no_grad():
        model(ids[None], past_key_values=past)
    chat.save("chat", ids, past)
    prompt = torch.cat([ids, user_message(1, 10, model.config.vocab_size)])

    def logits(past: Any, start: int) -> torch.Tensor:
        with torch.no_grad():
            return model(prompt[None, start:], past_key_values=past).logits[0, -1]

    expected = logits(DynamicCache(config=model.config), 0)
    restored, reused = chat.restore("chat", prompt)

    assert reused == 96
    torch.testing.assert_close(logits(restored, reused), expected, atol=1e-4, rtol=0)
    # Control: the full layers' restored KV is what the prompt's last token attends to.
    tampered, _ = chat.restore("chat", prompt)
    tampered.layers[1].values.mul_(-1.0)
    assert float((logits(tampered, reused) - expected).abs().max()) > 0.1


def test_a_model_whose_layers_cache_more_than_kv_is_refused_naming_the_layer(
    cache: SyncCache,
) -> None:
    # DeepSeek-V3.2's layers also cache indexer keys, which tiercache does not store: restored
    # without them, generate failed inside the model's indexer.
    import transformers

    config = transformers.DeepseekV32Config(
        vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=32, q_lora_rank=64,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, head_dim=16,
        n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
        topk_group=1, moe_intermediate_size=64, index_topk=16, index_head_dim=16,
        index_n_heads=4,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    with pytest.raises(
        SpecError, match=r"^layer 0 of the model is cached as a DynamicIndexedLayer"
    ):
        HFChatCache(cache, model, block_size=BS)


def test_a_chat_with_an_image_reuses_only_the_blocks_before_it(cache: SyncCache) -> None:
    # Gemma 3 with a vision tower: four placeholder ids stand for an image, and their KV (and
    # every later token's) comes from its pixels, which no block key names. Another image
    # under the same ids must not get the first image's KV.
    import transformers

    config = transformers.Gemma3Config(
        text_config=dict(
            vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=WINDOW,
            query_pre_attn_scalar=32, initializer_range=0.4,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=28, patch_size=14,
        ),
        mm_tokens_per_image=4, image_token_index=2000, boi_token_index=1998, eoi_token_index=1999,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.Gemma3ForConditionalGeneration(config).eval()
        with torch.no_grad():  # transformers starts the image projection at zero
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
        image_a, image_b = torch.randn(2, 1, 3, 28, 28)
    ids = torch.cat(
        [
            user_message(0, 20, 1990),
            torch.tensor([1998, *[2000] * 4, 1999]),
            user_message(1, 40, 1990),
        ]
    )

    def logits(pixels: torch.Tensor, past: Any = None, start: int = 0) -> torch.Tensor:
        with torch.no_grad():
            out = model(ids[None, start:], pixel_values=pixels, past_key_values=past)
        return out.logits[0, -1]

    expected = logits(image_b)
    assert float((logits(image_a) - expected).abs().max()) > 0.1  # the image matters
    chat = HFChatCache(cache, model, block_size=BS)
    past = chat.new_cache()
    with torch.no_grad():
        model(ids[None], pixel_values=image_a, past_key_values=past)
    chat.save("a", ids, past)

    restored, reused = chat.restore("b", ids)  # the same ids, image B

    assert reused == 16  # the whole blocks before the image (which starts at token 20)
    assert chat.restore("b", ids.numpy().astype("uint32"))[1] == 16  # any integer dtype
    torch.testing.assert_close(logits(image_b, restored, reused), expected, atol=1e-4, rtol=0)


def test_a_model_with_chunked_attention_is_refused_naming_its_layers(cache: SyncCache) -> None:
    # Llama 4: three chunked layers to one full. The refusal named only the group, not which
    # layers of the model it meant, nor why.
    import transformers

    config = transformers.Llama4TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        attention_chunk_size=WINDOW, num_local_experts=2, no_rope_layers=[1, 1, 1, 0],
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    with pytest.raises(SpecError) as refused:
        HFChatCache(cache, model, block_size=BS)

    assert str(refused.value) == (
        "layer 0 of the model attends in chunks (KV cache group 'chunked': 3 layers, chunks of "
        "32 tokens, layers 0, 1, 2): HFChatCache stores full, sliding and MLA layers only; a "
        "resume through transformers' cache of chunked or sink-token layers was never checked "
        "against recompute"
    )
