"""Namespaces and chained block keys.

``key_i = BLAKE2b-128(key_{i-1} || tokens of block i)``, with ``key_{-1}`` the
namespace id. A byte of difference anywhere in a prefix changes every later
key, so a cache hit is always a contiguous prefix. The hash is cryptographic
and keyed only by its inputs: stable across processes, restarts and machines
(never Python's salted ``hash``), which is what lets a shared disk or object
store tier serve blocks to other processes. 128 bits make an accidental
collision negligible (about 2^-64 after 2^32 blocks), so a hit is not
re-confirmed by comparing tokens.

Full blocks make the chain. A *tail* (the first ``r < block_size`` tokens of
the block after a chain) gets its own key, ``tail_key = BLAKE2b-128(parent ||
its r tokens)`` in a separate hash domain (BLAKE2's personalization), so a tail
key never equals a chain key and every ``r`` has its own key: the bytes stored
under a key never change as a block fills up (a longer tail is another key).
A tail's block holds valid KV for its ``r`` tokens only; whoever loads it uses
those ``r`` tokens and computes the rest of the block. Tails are optional
(connectors use them to reuse a conversation's last partial block); a chain
never continues from a tail.
"""

from __future__ import annotations

import array
import hashlib
import json
import operator
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from tiercache.spec import KVSpec
from tiercache.storage_format import check_spec, parse_format, stored_nbytes

KEY_BYTES = 16
# Bumped whenever the key derivation changes, so old stored blocks become misses.
KEY_SCHEME = 1

BlockKey = bytes


class KeyChain(list[BlockKey]):
    """Block keys a client already computed (``Namespace.block_keys``), accepted wherever token
    ids are: connectors hash their own tokens, so the daemon does not hash everyone's, and
    the socket carries 16 bytes per block instead of 4 per token."""

    @classmethod
    def from_bytes(cls, raw: bytes) -> KeyChain:
        if len(raw) % KEY_BYTES:
            raise TokenError(f"a key chain is a multiple of {KEY_BYTES} bytes, got {len(raw)}")
        return cls(raw[i : i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES))

    def to_bytes(self) -> bytes:
        return b"".join(self)


# Token ids, or the chain of block keys a client already computed from them.
Tokens = Sequence[int] | np.ndarray | torch.Tensor | KeyChain


def as_tokens(tokens: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Token ids as a flat numpy array (a tensor is copied off its device). A tensor or array
    of one row (``input_ids`` of a batch of one) is flattened; a batch of several rows is a
    TokenError, not one sequence of all their tokens."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, np.ndarray) and tokens.ndim > 1:
        if sum(d != 1 for d in tokens.shape) > 1:
            raise TokenError(
                f"token ids must be one sequence (a batch of one row), got shape {tokens.shape}"
            )
        return tokens.reshape(-1)
    return np.asarray(tokens)


def keys_of(ns: Namespace, tokens: Tokens) -> KeyChain:
    """The block keys of ``tokens`` in ``ns``: hashed here, or as a client sent them."""
    if isinstance(tokens, KeyChain):
        return KeyChain(tokens)  # a copy: a session keeps the list it is given
    if isinstance(tokens, list):  # hashed as it is (``token_bytes`` packs it without numpy)
        return KeyChain(ns.block_keys(cast("list[int]", tokens)))
    return KeyChain(ns.block_keys(as_tokens(tokens)))


# The largest block index or count a caller may name: what the socket protocol carries (an
# unsigned 64-bit integer), checked in embedded mode too so code behaves the same in both.
MAX_BLOCKS = 2**64 - 1


def block_count(name: str, value: object, hint: str = "") -> int:
    """``value`` as a block index or count (an integer, numpy's and torch's included, in
    ``0 ..= MAX_BLOCKS``), else a ValueError naming ``name``. A bool or a float is refused
    rather than read as 1 or truncated: it is a caller's mistake, never a block number."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer{hint}, got {value!r:.80}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0{hint}, got {n}")
    if n > MAX_BLOCKS:
        raise ValueError(f"{name} must be < 2**64{hint}, got {n}")
    return n


def check_first_block(first_block: int) -> int:
    """``first_block`` if it can start a run of blocks, else a ValueError naming it."""
    return block_count("first_block", first_block)


def check_max_blocks(max_blocks: int | None) -> int | None:
    """``max_blocks`` if it can cap a run of blocks (None: no cap), else a ValueError naming it."""
    if max_blocks is None:
        return None
    return block_count("max_blocks", max_blocks, " (or None: no cap)")


class TokenError(ValueError):
    """Token ids that cannot be hashed (negative, too large, not integers)."""


def _h(data: bytes, prev: bytes) -> bytes:
    return hashlib.blake2b(prev + data, digest_size=KEY_BYTES).digest()


@dataclass(frozen=True, slots=True)
class Namespace:
    """What must match for a block to be reused.

    ``model`` is a fingerprint of the weights (a name plus revision, or a hash
    of the weight files); ``salt`` separates tenants: two tenants with the same
    tokens and model never share a block. ``store_dtype`` is the storage format the
    namespace asks for below the engine (``tiercache/storage_format.py``): part of the
    namespace id, so a block stored quantized is never found under keys that asked for
    exact bytes (``"exact"`` leaves the id as it was before formats existed).
    ``group`` names the KV cache group of a model with several (``tiercache.modelkv``):
    two groups of one model may have the same spec (vLLM splits Gemma 3's sliding layers
    into groups of equal shape) and must still never share a block. It is left out of the
    id when empty, so a one-group model keeps the
    namespace it had before groups existed.
    """

    model: str
    spec: KVSpec
    salt: str = ""
    store_dtype: str = "exact"
    group: str = ""
    id: bytes = field(init=False, repr=False, compare=False)
    # Derived once (a namespace is immutable): asked for on every save and load.
    hex: str = field(init=False, repr=False, compare=False)
    array: str = field(init=False, repr=False, compare=False)  # its blocks' path in every tier
    block_nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("Namespace.model must name the model (a fingerprint of its weights)")
        fmt = parse_format(self.store_dtype, "Namespace.store_dtype")
        check_spec(self.spec, fmt)
        what = {"scheme": KEY_SCHEME, "model": self.model, "spec": self.spec.to_dict()}
        what |= {"salt": self.salt} | ({"group": self.group} if self.group else {})
        if fmt != "exact":
            what["store_dtype"] = fmt
        canon = json.dumps(what, sort_keys=True, separators=(",", ":")).encode()
        object.__setattr__(self, "id", hashlib.blake2b(canon, digest_size=KEY_BYTES).digest())
        object.__setattr__(self, "hex", self.id.hex())
        object.__setattr__(self, "array", f"ns/{self.hex}")
        # Bytes one block of this namespace takes in the tiers (its stored record).
        object.__setattr__(self, "block_nbytes", stored_nbytes(self.spec, fmt))

    def block_keys(
        self, tokens: Sequence[int] | np.ndarray, start: BlockKey | None = None
    ) -> list[BlockKey]:
        """Keys of every full block of ``tokens`` (the partial tail block gets none).

        ``start`` continues a chain: the key of the block just before ``tokens``.
        """
        return chain_keys(self.id if start is None else start, tokens, self.spec.block_size)

    def seed(self, extra: str = "") -> BlockKey:
        """The key a chain's first block hangs from: the namespace id, or, for KV that
        depends on more than the token ids (a LoRA adapter, a ``cache_salt``: what vLLM's
        own prefix cache hashes into a request's blocks), one derived from the id and
        ``extra``, so that such chains never meet the plain ones or each other. Hashed in a
        domain of its own (blake2b's personalization): no token ids hash to it."""
        if not extra:
            return self.id
        h = hashlib.blake2b(extra.encode(), digest_size=KEY_BYTES, person=b"tiercache-seed")
        h.update(self.id)
        return h.digest()

    def tail_keys(
        self, tokens: Sequence[int] | np.ndarray, parent: BlockKey | None = None
    ) -> list[BlockKey]:
        """Candidate keys of the tails ``tokens[:1] .. tokens[:block_size - 1]`` after
        ``parent`` (the namespace itself when None); see :func:`tail_keys`."""
        toks = tokens[: self.spec.block_size - 1]
        return tail_keys(self.id if parent is None else parent, toks)


_U32 = array.array("I").itemsize == 4  # the fast path for lists packs C unsigned ints


def token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32 (what keys hash), or a TokenError naming the fault."""
    if type(tokens) in (list, tuple) and not {bool, np.bool_}.isdisjoint(map(type, tokens)):
        # numpy would take a bool among ints for 0 or 1
        raise TokenError("token ids must be integers, got dtype bool")
    if _U32 and type(tokens) is list:
        # A list of ints in range packs without numpy (a quarter of the time for a block);
        # anything else (negative, too large, not integers) takes the checked path below.
        try:
            packed = array.array("I", tokens)
        except (OverflowError, TypeError):
            pass
        else:
            if sys.byteorder == "big":
                packed.byteswap()
            return packed.tobytes()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise TokenError(f"token ids must be a flat sequence, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if not np.issubdtype(arr.dtype, np.integer):
        raise TokenError(f"token ids must be integers, got dtype {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) >= 2**32:
        raise TokenError(
            f"token ids must lie in [0, 2^32), got range [{int(arr.min())}, {int(arr.max())}]"
        )
    return arr.astype("<u4").tobytes()


_TAIL = b"tiercache-tail"  # BLAKE2 personalization: the tail keys' own hash domain
_MEDIA = b"tiercache-media"  # and the media seeds'


def media_seed(prev: bytes, identifiers: Sequence[str]) -> BlockKey:
    """What a chain's block hangs from when media (an image, a video, audio) starts inside
    it: ``prev`` (the key of the block before, or the chain's seed) mixed with the media
    items' content hashes (``identifiers``, as the engine hashes them), in a hash domain of
    its own. Every later block chains from it, so the KV of a prompt with one image is
    never found by a prompt of the same token ids with another image, or with none (the
    placeholder ids of two images are the same)."""
    h = hashlib.blake2b("\0".join(identifiers).encode(), digest_size=KEY_BYTES, person=_MEDIA)
    h.update(prev)
    return h.digest()


def tail_keys(parent: bytes, tokens: Sequence[int] | np.ndarray) -> list[BlockKey]:
    """``[tail_key(parent, tokens[:r]) for r in 1 .. len(tokens)]``, hashed incrementally.

    ``parent`` is the key of the last full block before the tail (the namespace id
    when the tail is the first block). A connector sends these candidates, shortest
    first, and the daemon answers which is the longest it holds.
    """
    raw = token_bytes(tokens)
    h = hashlib.blake2b(parent, digest_size=KEY_BYTES, person=_TAIL)
    keys: list[BlockKey] = []
    for off in range(0, len(raw), 4):
        h.update(raw[off : off + 4])
        keys.append(h.copy().digest())
    return keys


def tail_key(parent: bytes, tokens: Sequence[int] | np.ndarray) -> BlockKey:
    """The key of a tail of ``len(tokens)`` tokens after ``parent`` (see the module doc)."""
    if len(tokens) == 0:
        raise TokenError("a tail holds at least one token")
    raw = token_bytes(tokens)
    return hashlib.blake2b(parent + raw, digest_size=KEY_BYTES, person=_TAIL).digest()


def chain_keys(seed: bytes, tokens: Sequence[int] | np.ndarray, block_size: int) -> list[BlockKey]:
    raw = token_bytes(tokens)
    step = 4 * block_size
    keys: list[BlockKey] = []
    prev = seed
    for off in range(0, len(raw) - step + 1, step):
        prev = _h(raw[off : off + step], prev)
        keys.append(prev)
    return keys
