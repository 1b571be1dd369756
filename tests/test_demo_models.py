"""The tiny demo and test models: every family builds, small, with the KV layout the cache sizes
from, and the same seed gives the same weights (the tests compare resumed against recomputed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiercache.demo_models import ARCHS, WINDOW, save_tiny, tiny_config, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_has_a_small_config(arch: str) -> None:
    cfg = tiny_config(arch)
    assert cfg.vocab_size == 2048
    assert cfg.num_attention_heads == 8
    assert cfg.num_hidden_layers <= 6
    assert not cfg.tie_word_embeddings


@pytest.mark.parametrize("arch", ["gemma3", "gpt_oss", "mistral"])
def test_the_sliding_families_have_the_demo_window(arch: str) -> None:
    assert tiny_config(arch).sliding_window == WINDOW


def test_overrides_win_over_the_family_and_the_defaults() -> None:
    cfg = tiny_config("gemma3", num_hidden_layers=2, vocab_size=512)
    assert cfg.num_hidden_layers == 2 and cfg.vocab_size == 512
    assert tiny_config("llama").num_key_value_heads == 2


def test_an_unknown_family_is_an_error_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown arch 'gpt2'; choose one of llama, qwen2"):
        tiny_config("gpt2")


def test_a_seed_is_a_model_and_another_seed_another() -> None:
    a, b, c = tiny_model(seed=1), tiny_model(seed=1), tiny_model(seed=2)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert not a.training


def test_building_a_model_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny_model(seed=9)
    assert torch.equal(torch.rand(4), expected)


def test_a_saved_model_directory_loads_back_with_its_token_ids(tmp_path: Path) -> None:
    from transformers import AutoConfig

    path = save_tiny(tmp_path / "tiny", "qwen2", seed=3)
    assert path == tmp_path / "tiny"
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "qwen2"
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert any(path.glob("*.safetensors"))
