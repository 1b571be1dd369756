"""Namespaces and chained block keys."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tiercache.keys import (
    KEY_BYTES,
    Namespace,
    TokenError,
    chain_keys,
    keys_of,
    media_seed,
    tail_key,
    tail_keys,
    token_bytes,
)
from tiercache.spec import KVSpec

BLOCK = 4


def make_spec(**overrides: Any) -> KVSpec:
    kwargs: dict[str, Any] = {
        "num_layers": 32,
        "num_kv_heads": 8,
        "head_dim": 128,
        "block_size": BLOCK,
    }
    kwargs.update(overrides)
    return KVSpec(**kwargs)


def make_ns(
    model: str = "meta-llama/Meta-Llama-3-8B@main", salt: str = "tenant-a", **spec: Any
) -> Namespace:
    return Namespace(model, make_spec(**spec), salt=salt)


def tokens(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


# --- namespace ------------------------------------------------------------------------------


def test_namespace_id_is_16_bytes_and_hex_is_its_32_hex_digits() -> None:
    ns = make_ns()

    assert len(ns.id) == KEY_BYTES == 16
    assert ns.hex == ns.id.hex()
    assert len(ns.hex) == 32


def test_namespace_id_is_blake2b_of_canonical_json() -> None:
    ns = make_ns()
    canon = json.dumps(
        {"scheme": 1, "model": ns.model, "spec": ns.spec.to_dict(), "salt": "tenant-a"},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()

    assert ns.id == hashlib.blake2b(canon, digest_size=16).digest()


def test_namespace_id_is_pinned() -> None:
    # Changing this value orphans every stored block: bump KEY_SCHEME if you must.
    assert make_ns().hex == "07ec8b8b9f7f4e0d161ac500c0f74400"


def test_namespaces_and_keys_of_full_attention_specs_are_those_of_before_kv_cache_groups() -> None:
    # Computed before KVSpec had kind/window/sinks and Namespace had group (the README's
    # example namespace): a full-attention spec must keep every stored block reachable.
    spec = KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)
    ns = Namespace("llama-3-8b@main", spec, salt="tenant-a")

    assert ns.hex == "6b35479121eba65fbe0a21366ac2a0aa"
    assert ns.block_keys(list(range(32)))[1].hex() == "f48fd1f0ed926419faa624331c5fc126"
    assert Namespace("llama-3-8b@main", spec, "tenant-a", group="").id == ns.id


def test_kv_cache_groups_of_one_shape_get_namespaces_and_keys_of_their_own() -> None:
    a, b = (
        Namespace("gemma-3@main", make_spec(), "t", group=g) for g in ("sliding-0", "sliding-1")
    )

    assert a.spec == b.spec
    assert len({a.id, b.id, make_ns(model="gemma-3@main", salt="t").id}) == 3
    assert set(a.block_keys(tokens(8))).isdisjoint(b.block_keys(tokens(8)))


def test_attention_kind_is_part_of_the_namespace() -> None:
    assert make_ns(kind="sliding", window=4096).id != make_ns().id
    assert make_ns(kind="sliding", window=4096).id != make_ns(kind="sliding", window=2048).id


def test_same_inputs_give_the_same_namespace_id() -> None:
    assert make_ns().id == make_ns().id


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"salt": "tenant-b"}, id="salt"),
        pytest.param({"salt": ""}, id="no-salt"),
        pytest.param({"model": "meta-llama/Meta-Llama-3-8B@rev2"}, id="model"),
        pytest.param({"num_layers": 31}, id="spec-layers"),
        pytest.param({"num_kv_heads": 4}, id="spec-kv-heads"),
        pytest.param({"head_dim": 64}, id="spec-head-dim"),
        pytest.param({"dtype": "fp8"}, id="spec-dtype"),
        pytest.param({"block_size": 8}, id="spec-block-size"),
        pytest.param({"layout": "flashinfer"}, id="spec-layout"),
    ],
)
def test_salt_model_and_every_spec_field_change_the_namespace_id(other: dict[str, Any]) -> None:
    assert make_ns(**other).id != make_ns().id


def test_dtype_alias_does_not_change_the_namespace_id() -> None:
    assert make_ns(dtype="bf16").id == make_ns(dtype=torch.bfloat16).id == make_ns().id


def test_namespaces_with_different_salts_give_different_keys_for_the_same_tokens() -> None:
    a, b = make_ns(salt="tenant-a"), make_ns(salt="tenant-b")

    keys_a, keys_b = a.block_keys(tokens(8)), b.block_keys(tokens(8))

    assert set(keys_a).isdisjoint(keys_b)


def test_namespace_needs_a_model() -> None:
    with pytest.raises(ValueError, match=r"^Namespace\.model must name the model"):
        Namespace("", make_spec())


# --- chained keys ---------------------------------------------------------------------------


def test_first_key_is_blake2b_128_of_namespace_id_then_little_endian_u32_tokens() -> None:
    ns = make_ns()
    block = tokens(BLOCK)
    expected = hashlib.blake2b(
        ns.id + np.array(block, dtype="<u4").tobytes(), digest_size=16
    ).digest()

    assert ns.block_keys(block) == [expected]


def test_each_key_chains_on_the_previous_key() -> None:
    ns = make_ns()
    toks = tokens(3 * BLOCK)

    k0, k1, k2 = ns.block_keys(toks)

    def h(prev: bytes, block: list[int]) -> bytes:
        return hashlib.blake2b(
            prev + np.array(block, dtype="<u4").tobytes(), digest_size=16
        ).digest()

    assert k1 == h(k0, toks[BLOCK : 2 * BLOCK])
    assert k2 == h(k1, toks[2 * BLOCK :])


def test_block_keys_are_pinned() -> None:
    # Changing these values orphans every stored block: bump KEY_SCHEME if you must.
    keys = make_ns().block_keys(list(range(10)))

    assert [k.hex() for k in keys] == [
        "de5638bfde2728d5dc9f6246e65de964",
        "f220c39796a09a0c163936a73d9d4fae",
    ]


def test_keys_are_the_same_in_another_process_with_another_hash_seed() -> None:
    ns = make_ns()
    toks = list(range(10))
    script = (
        "import json; from tiercache.keys import Namespace; from tiercache.spec import KVSpec; "
        "ns = Namespace('meta-llama/Meta-Llama-3-8B@main', "
        "KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, block_size=4), salt='tenant-a'); "
        f"print(json.dumps([ns.hex, [k.hex() for k in ns.block_keys({toks!r})]]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}

    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout

    assert json.loads(out) == [ns.hex, [k.hex() for k in ns.block_keys(toks)]]


@pytest.mark.parametrize(
    ("n_tokens", "n_keys"),
    [
        (0, 0),
        (1, 0),
        (BLOCK - 1, 0),
        (BLOCK, 1),
        (2 * BLOCK - 1, 1),
        (2 * BLOCK, 2),
        (5 * BLOCK + 3, 5),
    ],
)
def test_only_full_blocks_get_keys(n_tokens: int, n_keys: int) -> None:
    assert len(make_ns().block_keys(tokens(n_tokens))) == n_keys


def test_partial_tail_does_not_change_the_full_blocks_keys() -> None:
    ns = make_ns()

    assert ns.block_keys(tokens(2 * BLOCK + 3)) == ns.block_keys(tokens(2 * BLOCK))


def test_keys_of_a_prefix_are_a_prefix_of_the_keys() -> None:
    ns = make_ns()
    full = ns.block_keys(tokens(6 * BLOCK))

    for n in range(7):
        assert ns.block_keys(tokens(n * BLOCK)) == full[:n]


def test_start_continues_a_chain() -> None:
    ns = make_ns()
    toks = tokens(5 * BLOCK)
    full = ns.block_keys(toks)

    assert ns.block_keys(toks[2 * BLOCK :], start=full[1]) == full[2:]


def test_block_keys_is_chain_keys_seeded_by_namespace_id() -> None:
    ns = make_ns()

    assert ns.block_keys(tokens(3 * BLOCK)) == chain_keys(ns.id, tokens(3 * BLOCK), BLOCK)


def test_same_block_at_different_positions_gets_different_keys() -> None:
    keys = make_ns().block_keys([7] * (3 * BLOCK))

    assert len(set(keys)) == 3


@given(
    toks=st.lists(st.integers(0, 2**32 - 1), min_size=BLOCK, max_size=6 * BLOCK),
    data=st.data(),
)
def test_changing_a_token_changes_its_block_key_and_every_later_key_only(
    toks: list[int], data: st.DataObject
) -> None:
    ns = make_ns()
    n_full = len(toks) // BLOCK
    pos = data.draw(st.integers(0, n_full * BLOCK - 1), label="pos")
    new = data.draw(st.integers(0, 2**32 - 1).filter(lambda t: t != toks[pos]), label="new")
    changed = [*toks[:pos], new, *toks[pos + 1 :]]
    block = pos // BLOCK

    before, after = ns.block_keys(toks), ns.block_keys(changed)

    assert after[:block] == before[:block]
    assert all(a != b for a, b in zip(after[block:], before[block:], strict=True))


def test_changing_a_token_in_the_partial_tail_changes_no_key() -> None:
    ns = make_ns()
    toks = tokens(2 * BLOCK + 2)
    changed = [*toks[:-1], 7]

    assert ns.block_keys(changed) == ns.block_keys(toks)


@pytest.mark.parametrize(
    "as_tokens",
    [
        pytest.param(list, id="list"),
        pytest.param(tuple, id="tuple"),
        pytest.param(lambda t: [np.int64(v) for v in t], id="list-of-numpy-ints"),
        pytest.param(lambda t: np.array(t, dtype=np.int64), id="int64"),
        pytest.param(lambda t: np.array(t, dtype=np.uint32), id="uint32"),
        pytest.param(lambda t: np.array(t, dtype=">i8"), id="big-endian-int64"),
        pytest.param(lambda t: torch.tensor(t, dtype=torch.int64), id="torch-int64"),
    ],
)
def test_keys_depend_on_token_values_not_their_container_or_dtype(as_tokens: Any) -> None:
    ns = make_ns()
    toks = [0, 1, 2**31, 2**32 - 1, 5, 6, 7, 8]

    assert ns.block_keys(as_tokens(toks)) == ns.block_keys(toks)


# --- token validation -----------------------------------------------------------------------


def test_token_bytes_are_little_endian_u32() -> None:
    assert token_bytes([1, 256, 2**32 - 1]) == b"\x01\x00\x00\x00\x00\x01\x00\x00\xff\xff\xff\xff"


def test_no_tokens_are_no_bytes() -> None:
    assert token_bytes([]) == b""


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([1, -1, 2], r"^token ids must lie in \[0, 2\^32\), got range \[-1, 2\]$"),
        ([0, 2**32], r"^token ids must lie in \[0, 2\^32\), got range \[0, 4294967296\]$"),
        ([1.0, 2.0], r"^token ids must be integers, got dtype float64$"),
        ([True, False], r"^token ids must be integers, got dtype bool$"),
        ([3, True, 4], r"^token ids must be integers, got dtype bool$"),  # not 3, 1, 4
        ((3, np.True_), r"^token ids must be integers, got dtype bool$"),
        (["a", "b"], r"^token ids must be integers, got dtype <U1$"),
        ([2**70], r"^token ids must be integers, got dtype object$"),
        ([[1, 2], [3, 4]], r"^token ids must be a flat sequence, got shape \(2, 2\)$"),
    ],
)
def test_unhashable_token_ids_are_rejected(bad: Any, message: str) -> None:
    with pytest.raises(TokenError, match=message):
        make_ns().block_keys(bad)


@pytest.mark.parametrize("make", [torch.tensor, np.array], ids=["torch", "numpy"])
def test_a_batch_of_several_rows_is_refused_and_a_batch_of_one_is_its_row(make: Any) -> None:
    ns, toks = make_ns(), tokens(2 * BLOCK)
    with pytest.raises(TokenError, match=r"one sequence .* got shape \(2, 4\)"):
        keys_of(ns, make([toks[:BLOCK], toks[BLOCK:]]))
    assert keys_of(ns, make([toks])) == ns.block_keys(toks)


def test_token_error_is_a_value_error() -> None:
    assert issubclass(TokenError, ValueError)


# --- tails ----------------------------------------------------------------------------------


def test_tail_keys_are_the_tail_key_of_every_prefix_of_the_tokens() -> None:
    ns = make_ns()
    parent = ns.block_keys(tokens(BLOCK))[0]
    tail = tokens(BLOCK - 1, start=7)
    assert tail_keys(parent, tail) == [tail_key(parent, tail[:r]) for r in range(1, BLOCK)]
    assert len(set(tail_keys(parent, tail))) == BLOCK - 1  # every length its own key
    expected = hashlib.blake2b(
        parent + np.array(tail[:2], dtype="<u4").tobytes(), digest_size=16, person=b"tiercache-tail"
    ).digest()
    assert tail_key(parent, tail[:2]) == expected


def test_a_tail_key_is_never_the_chain_key_of_the_same_tokens() -> None:
    # Same parent and the same bytes hashed: only the hash domain tells them apart.
    ns = make_ns()
    block = tokens(BLOCK)
    assert tail_key(ns.id, block) != ns.block_keys(block)[0]


def test_namespace_tail_keys_stop_short_of_a_block_and_follow_parent_and_tokens() -> None:
    ns = make_ns()
    keys = ns.tail_keys(tokens(3 * BLOCK))
    assert len(keys) == BLOCK - 1  # a tail is shorter than a block
    assert keys == tail_keys(ns.id, tokens(BLOCK - 1))
    parent = ns.block_keys(tokens(BLOCK))[0]
    assert ns.tail_keys(tokens(2), parent) != ns.tail_keys(tokens(2))
    assert ns.tail_keys(tokens(2, start=5)) != ns.tail_keys(tokens(2))
    assert make_ns(salt="other").tail_keys(tokens(2)) != ns.tail_keys(tokens(2))


def test_an_empty_tail_has_no_key() -> None:
    with pytest.raises(TokenError, match="at least one token"):
        tail_key(b"\0" * KEY_BYTES, [])


def test_a_media_seed_follows_the_chain_and_the_media_and_meets_no_other_key() -> None:
    ns = make_ns()
    prev = ns.block_keys(tokens(BLOCK))[0]
    seed = media_seed(prev, ["5:img-a"])
    assert len(seed) == KEY_BYTES
    others = {
        media_seed(prev, ["5:img-b"]),  # another image
        media_seed(prev, ["6:img-a"]),  # the same image elsewhere
        media_seed(ns.id, ["5:img-a"]),  # after another block
        media_seed(prev, ["5:img-a", "7:img-b"]),  # and a second one
        prev,
        ns.seed("5:img-a"),  # a LoRA adapter's or a salt's seed of the same text
    }
    assert seed not in others and len(others) == 6
    assert ns.block_keys(tokens(BLOCK), start=seed) != ns.block_keys(tokens(BLOCK), start=prev)
