"""Torch reference gather/scatter between an engine's KV cache and page-first blocks.

This is the CPU path (CPU engines and embedded mode copy with it) *and* the
oracle the CUDA kernels are checked against bit for bit, so it is written for
clarity with ``index_select`` / ``index_copy_``, never clever.

A stored block is ``[layers, planes, block_size, kv_heads, head_dim]``: planes K and V, or
one MLA latent (``KVSpec.planes``). Engine layouts, per layer:

- ``vllm`` (flash-attn): one tensor ``[2, num_blocks, block_size, heads, head_dim]``; an MLA
  group (every vLLM MLA backend): ``[num_blocks, block_size, latent]``, one latent row per
  token, which is a stored block's ``[1, block_size, 1, latent]`` byte for byte
- ``flashinfer``: one tensor ``[num_blocks, 2, block_size, heads, head_dim]``
- ``hf`` (transformers): a ``(K, V)`` pair, each ``[batch, heads, seq, head_dim]`` (an MLA
  group: a ``(latent,)`` 1-tuple, ``[batch, 1, seq, latent]``); "block ids" are block
  positions along the sequence of one batch row.
- ``vllm-cpu`` (vLLM's CPU backend): one tensor ``[num_blocks, heads, block_size,
  2 * head_dim]``, K tiled in an ISA-dependent order (MLA: ``[num_blocks, 1, block_size,
  latent]``, one plane). A layer's block is copied
  as it is, as opaque bytes filling the ``[2, block_size, heads, head_dim]`` of
  its page-first slot: it round-trips exactly, but only the same engine on the
  same ISA can read it (the connector puts the ISA in the namespace).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tiercache.spec import KVSpec, Layout

# One layer of an engine's cache: a tensor (vllm, flashinfer) or a (K, V) pair (hf; for MLA
# a (latent,) 1-tuple).
LayerCache = torch.Tensor | tuple[torch.Tensor, ...]


class LayoutError(ValueError):
    """A KV cache whose shapes do not match its KVSpec and layout."""


def _ids(
    block_ids: torch.Tensor | Sequence[int],
    spec: KVSpec,
    caches: Sequence[LayerCache],
    batch: int,
) -> torch.Tensor:
    """``block_ids`` on the caches' device, each checked to be a block of every layer (and
    ``batch`` a row of an hf cache) before anything moves: torch's own index errors came
    only after the layers before the one too short were written, and named token positions."""
    ids = torch.as_tensor(block_ids, dtype=torch.long)
    if ids.dim() != 1:
        raise LayoutError(f"block ids must be 1-D, got shape {list(ids.shape)}")
    count = num_blocks(spec, caches)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= count):
        bad = ids[(ids < 0) | (ids >= count)][0]
        raise LayoutError(f"block id {int(bad)} is out of range for a cache of {count} blocks")
    first = caches[0][0] if isinstance(caches[0], tuple) else caches[0]
    if spec.layout is Layout.HF and not 0 <= batch < first.shape[0]:
        raise LayoutError(f"batch {batch} is out of range for a batch of {first.shape[0]}")
    return ids.to(first.device)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t


def layer_tensors(c: LayerCache) -> tuple[torch.Tensor, ...]:
    """A layer's tensors: its one tensor, or its K and V."""
    return c if isinstance(c, tuple) else (c,)


def tensors(caches: Sequence[LayerCache]) -> list[torch.Tensor]:
    """Every tensor of every layer, in order."""
    return [t for c in caches for t in layer_tensors(c)]


def num_blocks(spec: KVSpec, caches: Sequence[LayerCache]) -> int:
    """How many blocks the caches (already checked against ``spec``) hold: the fewest of any
    layer, so that an id below it is inside all of them (for hf, block positions of a row)."""
    counts = []
    for c in caches:
        if isinstance(c, tuple):
            counts.append(c[0].shape[2] // spec.block_size)
        else:
            counts.append(c.shape[1 if spec.layout is Layout.VLLM and spec.planes == 2 else 0])
    return min(counts)


def _as_slot(spec: KVSpec) -> bool:
    """Whether a layer's engine block is its page-first slot's bytes as they are: vllm-cpu's
    (opaque), and an MLA latent in the vllm layout (the same order)."""
    return spec.layout is Layout.VLLM_CPU or (spec.layout is Layout.VLLM and spec.planes == 1)


def _check(spec: KVSpec, caches: Sequence[LayerCache]) -> None:
    if len(caches) != spec.num_layers:
        raise LayoutError(f"expected {spec.num_layers} layers, got {len(caches)}")
    h, bs, d = spec.num_kv_heads, spec.block_size, spec.head_dim
    for i, c in enumerate(caches):
        if spec.layout is Layout.HF:
            if not (
                isinstance(c, tuple)
                and len(c) == spec.planes
                and all(isinstance(t, torch.Tensor) for t in c)
            ):
                what = "a (K, V) pair" if spec.planes == 2 else "a (latent,) 1-tuple"
                raise LayoutError(f"layer {i}: the hf layout of this spec needs {what}")
        elif not isinstance(c, torch.Tensor):
            raise LayoutError(f"layer {i}: the {spec.layout} layout needs one tensor per layer")
        for t in layer_tensors(c):
            if t.dtype != spec.torch_dtype:
                raise LayoutError(f"layer {i}: dtype {t.dtype}, spec says {spec.dtype}")
        if spec.layout is Layout.HF:
            assert isinstance(c, tuple)
            k = c[0]
            if (
                k.dim() != 4
                or k.shape[1] != h
                or k.shape[3] != d
                or any(t.shape != k.shape for t in c)
            ):
                got = "/".join(str(list(t.shape)) for t in c)
                raise LayoutError(f"layer {i}: K/V must be [batch, {h}, seq, {d}], got {got}")
        elif spec.layout is Layout.VLLM_CPU:
            assert isinstance(c, torch.Tensor)
            if tuple(c.shape[1:]) != (h, bs, spec.planes * d) or c.dim() != 4:
                raise LayoutError(
                    f"layer {i}: shape {list(c.shape)} does not match the {spec.layout} layout of "
                    f"{spec} ([num_blocks, {h}, {bs}, {spec.planes * d}])"
                )
        elif spec.planes == 1:
            assert isinstance(c, torch.Tensor)
            if spec.layout is not Layout.VLLM:
                raise LayoutError(
                    f"an MLA latent has no {spec.layout} layout of its own: vLLM lays it out as "
                    "[num_blocks, block_size, latent] whatever its backend (layout vllm)"
                )
            if c.dim() != 3 or tuple(c.shape[1:]) != (bs, d):
                raise LayoutError(
                    f"layer {i}: shape {list(c.shape)} does not match the {spec.layout} layout of "
                    f"{spec} ([num_blocks, {bs}, {d}])"
                )
        else:
            assert isinstance(c, torch.Tensor)
            kv_dim = 0 if spec.layout is Layout.VLLM else 1
            if c.dim() != 5 or (c.shape[kv_dim], *c.shape[2:]) != (2, bs, h, d):
                raise LayoutError(
                    f"layer {i}: shape {list(c.shape)} does not match the {spec.layout} layout of {spec}"
                )


def check_blocks(spec: KVSpec, blocks: torch.Tensor, n: int, what: str = "blocks") -> None:
    """``blocks`` must be ``[n, *spec.block_shape]`` of the spec's dtype; else a LayoutError
    naming ``what`` (the argument) and both shapes."""
    if tuple(blocks.shape) != (n, *spec.block_shape) or blocks.dtype != spec.torch_dtype:
        raise LayoutError(
            f"{what} must be {[n, *spec.block_shape]} {spec.dtype}, "
            f"got {list(blocks.shape)} {blocks.dtype}"
        )


def gather(
    spec: KVSpec,
    caches: Sequence[LayerCache],
    block_ids: torch.Tensor | Sequence[int],
    *,
    batch: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy blocks ``block_ids`` out of ``caches`` into ``[n, *spec.block_shape]``."""
    _check(spec, caches)
    first = caches[0][0] if isinstance(caches[0], tuple) else caches[0]
    ids = _ids(block_ids, spec, caches, batch)
    n, bs = ids.numel(), spec.block_size
    if out is None:
        out = torch.empty((n, *spec.block_shape), dtype=spec.torch_dtype, device=first.device)
    else:
        check_blocks(spec, out, n, "out")
    for layer, c in enumerate(caches):
        if _as_slot(spec):
            assert isinstance(c, torch.Tensor)
            out[:, layer] = c.index_select(0, ids).view(n, *out.shape[2:])
        elif spec.layout is Layout.VLLM:
            assert isinstance(c, torch.Tensor)
            out[:, layer] = c.index_select(1, ids).transpose(0, 1)
        elif spec.layout is Layout.FLASHINFER:
            assert isinstance(c, torch.Tensor)
            out[:, layer] = c.index_select(0, ids)
        else:
            assert isinstance(c, tuple)
            tok = (ids[:, None] * bs + torch.arange(bs, device=ids.device)).reshape(-1)
            for kv, t in enumerate(c):
                # [heads, n*bs, d] -> [n, bs, heads, d]
                sel = t[batch].index_select(1, tok)
                out[:, layer, kv] = sel.view(spec.num_kv_heads, n, bs, spec.head_dim).permute(
                    1, 2, 0, 3
                )
    return out


def scatter(
    spec: KVSpec,
    blocks: torch.Tensor,
    caches: Sequence[LayerCache],
    block_ids: torch.Tensor | Sequence[int],
    *,
    batch: int = 0,
) -> None:
    """Copy ``blocks`` (``[n, *spec.block_shape]``) into ``caches`` at ``block_ids``."""
    _check(spec, caches)
    first = caches[0][0] if isinstance(caches[0], tuple) else caches[0]
    ids = _ids(block_ids, spec, caches, batch)
    n, bs = ids.numel(), spec.block_size
    check_blocks(spec, blocks, n)
    # Moved as bytes, like the kernels: torch has no CPU index_copy_ for fp8, and a
    # one-byte dtype viewed as uint8 keeps its shape.
    blocks = _bytes(blocks.to(first.device))
    for layer, c in enumerate(caches):
        c = tuple(_bytes(t) for t in c) if isinstance(c, tuple) else _bytes(c)
        if _as_slot(spec):
            assert isinstance(c, torch.Tensor)
            c.index_copy_(0, ids, blocks[:, layer].reshape(n, *c.shape[1:]))
        elif spec.layout is Layout.VLLM:
            assert isinstance(c, torch.Tensor)
            c.index_copy_(1, ids, blocks[:, layer].transpose(0, 1))
        elif spec.layout is Layout.FLASHINFER:
            assert isinstance(c, torch.Tensor)
            c.index_copy_(0, ids, blocks[:, layer])
        else:
            assert isinstance(c, tuple)
            tok = (ids[:, None] * bs + torch.arange(bs, device=ids.device)).reshape(-1)
            for kv, t in enumerate(c):
                src = (
                    blocks[:, layer, kv]
                    .permute(2, 0, 1, 3)
                    .reshape(spec.num_kv_heads, n * bs, spec.head_dim)
                )
                t[batch].index_copy_(1, tok, src)
