"""What a hit means for a model of several KV cache groups, and a cache that saves, looks up and
loads all of a model's groups with that rule.

Each group (``tiercache.modelkv.KVGroup``) is stored in a namespace of its own
(``Namespace.group``), its block keys chained over the tokens as for any model, so block
``i`` of every group covers the same tokens. A resumed conversation needs, of each group,
the blocks its layers attend to from the resume point on (``needed_blocks``); a prefix of
P blocks is usable only when every group holds its needed blocks:

- full attention and MLA: every block below P;
- sliding window W (with ``sinks`` sink tokens): the blocks covering tokens [P·bs - W,
  P·bs) and the blocks of the sink tokens. Layers in transformers and vLLM attend to the
  W - 1 tokens before a query and itself; asking for W tokens before the resume point is
  one more, so the rule holds under either convention, at the cost of one block at most;
- chunked local attention with chunk C: the blocks covering the current chunk,
  [⌊P·bs / C⌋·C, P·bs) (none when P·bs is a chunk boundary).

``usable_prefix`` finds the longest such P from what each group holds, asking only for the
runs it needs; a block that is missing, evicted or fails its checksum in any group makes
every prefix that needs it unusable, so the answer is a shorter prefix or 0, never KV
that does not belong together.

Retention: ``GroupedCache.save`` stores of a windowed group only the blocks a resume at
the saved end E needs (``needed_blocks(spec, E)``: the last window before E and the sink
blocks), and when the same session saves again it evicts (by key) the blocks its previous
save kept there that the new save does not keep, once every group holds what a resume at
the new end needs (a save that fails, is not all admitted or lacks blocks the caller does
not hold leaves the previous end resumable). A long Gemma 3 chat so keeps the global
layers' KV for every block and the local layers' for its last window only. The price: a
resume at an earlier point than the session's last save (regenerating an earlier reply,
branching from an older turn) finds no sliding blocks there, so it is a shorter hit or a
miss and the model recomputes those tokens; it never gets wrong KV. The previous save is
remembered by the ``GroupedCache`` object (a new process remembers none: blocks left over
by a save it did not see age out under the eviction policy). Evicting by key removes a
block that another session saved too; that session's resume is then a shorter hit, also
never wrong. Pinned and leased blocks are not evicted.

Round trips: a lookup asks each group once for its needed run (``lookup`` with
``first_block``), and again only for groups whose run was cut short; a load reads each
group's needed runs and, if one of them comes back short (a corrupt copy is dropped as it
is read), goes back to the rule with what it learned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from tiercache.keys import BlockKey, KeyChain, Namespace, Tokens, as_tokens
from tiercache.modelkv import KVGroup, ModelKV
from tiercache.results import LoadResult, SaveResult
from tiercache.spec import AttentionKind, KVSpec


def needed_blocks(spec: KVSpec, end: int) -> list[range]:
    """The blocks of a group with ``spec`` that a resume after ``end`` blocks needs, as ranges
    in order (see the module doc); also what a save ending there keeps of a windowed group."""
    bs = spec.block_size
    if spec.kind is AttentionKind.SLIDING:
        start = max(0, end * bs - spec.window) // bs
        sinks = min(-(-spec.sinks // bs), end)
        if sinks >= start:
            return [range(0, end)] if end else []
        return [r for r in (range(0, sinks), range(start, end)) if r]
    if spec.kind is AttentionKind.CHUNKED:
        start = end * bs // spec.window * spec.window // bs
        return [range(start, end)] if start < end else []
    return [range(0, end)] if end else []


def usable_prefix(specs: Sequence[KVSpec], run: Callable[[int, int], int], limit: int) -> int:
    """The longest prefix, in blocks and at most ``limit``, at which every group can resume.

    ``run(g, start)`` says how many blocks group ``g`` (``specs[g]``) holds without a gap
    from block ``start`` (a lookup with ``first_block``; any answer beyond what is asked for
    may be cut at ``limit``). A block missing at ``m`` rules out every prefix longer than
    ``m`` that needs it, and since the needed ranges only move forward as the prefix grows,
    no prefix between ``m`` and the candidate can avoid it: the next candidate is ``m``.
    """
    p = limit
    while p > 0:
        bound = p
        for g, spec in enumerate(specs):
            for r in needed_blocks(spec, p):
                got = run(g, r.start)
                if got < len(r):
                    bound = min(bound, r.start + got)
        if bound == p:
            return p
        p = bound
    return 0


class BlockCache(Protocol):
    """What a GroupedCache (and the transformers integration) stores through: the embedded
    ``SyncCache`` or a daemon ``Client``."""

    def lookup(self, ns: Namespace, tokens: Tokens, *, first_block: int = 0) -> Any: ...

    def save(
        self,
        ns: Namespace,
        tokens: Tokens,
        blocks: torch.Tensor,
        *,
        first_block: int = 0,
        session: str | None = None,
    ) -> SaveResult: ...

    def load(
        self,
        ns: Namespace,
        tokens: Tokens,
        *,
        first_block: int = 0,
        max_blocks: int | None = None,
    ) -> LoadResult: ...

    def evict(
        self, *, session: str | None = None, keys: Sequence[BlockKey] | None = None
    ) -> int: ...


@dataclass(slots=True)
class GroupedLoad:
    """A load of every group at one prefix: ``blocks`` blocks (0: a miss) and, by group name,
    one ``LoadResult`` per needed range (its ``first_block`` says where it starts)."""

    blocks: int
    block_size: int
    groups: dict[str, list[LoadResult]] = field(default_factory=dict)
    seconds: float = 0.0  # the whole load, its lookups and reads of every group

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def per_tier(self) -> dict[str, int]:
        """Blocks read from each tier, all groups together."""
        out: dict[str, int] = {}
        for parts in self.groups.values():
            for r in parts:
                for tier, n in r.per_tier.items():
                    out[tier] = out.get(tier, 0) + n
        return out


# Token ids (a GroupedCache hashes them once per group and call).
TokenIds = Sequence[int] | np.ndarray | torch.Tensor


class _Runs:
    """The runs a rule evaluation learned, per group: a run found from ``start`` to ``end``
    answers every start inside it without another round trip.

    A load that read all it asked for says nothing of the blocks after it: its run answers
    only once ``limit`` (the rule's, which no candidate's blocks reach) is at its end. Else
    a sink range read whole would pass for a run that stops there, and a shorter candidate
    whose sinks and window merge into one range would be cut at the sinks.
    """

    def __init__(self, ask: Callable[[int, int], int]) -> None:
        self._ask = ask
        self._known: dict[int, list[tuple[int, int, bool]]] = {}
        self.limit = 0

    def __call__(self, g: int, start: int) -> int:
        for a, end, ends in self._known.get(g, []):
            if a <= start <= end and (ends or end >= self.limit):
                return end - start
        got = self._ask(g, start)
        self.learn(g, start, got)
        return got

    def learn(self, g: int, start: int, got: int, asked: int | None = None) -> None:
        """Group ``g`` holds ``got`` blocks from ``start``: a lookup's whole run, or a load's
        of ``asked`` blocks (which may go on past them when it read them all)."""
        self._known.setdefault(g, []).append((start, start + got, asked is None or got < asked))


def _cut(loads: list[tuple[range, LoadResult]], want: range) -> LoadResult | None:
    """The blocks ``want`` from a load already made whose asked range covers it (a load stops
    at the first block missing or failing its checksum, so what it lacks is not there)."""
    for asked, got in loads:
        end = asked.start + got.blocks
        if asked.start <= want.start <= end and want.stop <= asked.stop:
            a, b = want.start - asked.start, min(want.stop, end) - asked.start
            tiers = got.tiers[a:b]
            per_tier = {t: tiers.count(t) for t in set(tiers)}
            return LoadResult(got.data[a:b], tiers, got.namespace, 0.0, per_tier, want.start)
    return None


def remember(
    kept: dict[tuple[str, str], list[BlockKey]],
    keeping: dict[BlockKey, int],
    at: tuple[str, str],
    keys: list[BlockKey],
) -> None:
    """``kept[at] = keys``, with ``keeping`` counting the lists of ``kept`` that name each key."""
    for k in kept.get(at, []):
        keeping[k] -= 1
        if not keeping[k]:
            del keeping[k]
    for k in keys:
        keeping[k] = keeping.get(k, 0) + 1
    kept[at] = keys


class GroupedCache:
    """Every KV cache group of one model (``ModelKV``) through one ``BlockCache``: each group in
    its own namespace, a hit as ``usable_prefix`` says, windowed groups kept to their window.

    A model of one group keeps the namespace it had without groups (``Namespace.group`` is
    empty), so its stored blocks stay reachable.
    """

    def __init__(
        self,
        cache: BlockCache,
        model: str,
        kv: ModelKV,
        *,
        salt: str = "",
        store_dtype: str = "exact",
    ) -> None:
        self.cache = cache
        self.kv = kv
        # Largest blocks first, in every operation: the first namespace a cache (or a restarted
        # daemon) sees sizes its host slots, and then every group's blocks fit.
        self.groups = tuple(sorted(kv.groups, key=lambda g: -g.spec.block_nbytes))
        several = len(kv.groups) > 1
        self.namespaces = {
            g.name: Namespace(
                model, g.spec, salt, store_dtype=store_dtype, group=g.name if several else ""
            )
            for g in kv.groups
        }
        # (session, group) -> keys the session's last save kept of a windowed group
        self._kept: dict[tuple[str, str], list[BlockKey]] = {}
        self._keeping: dict[BlockKey, int] = {}  # key -> how many of those lists name it

    def _chains(self, tokens: TokenIds, max_blocks: int | None) -> dict[str, KeyChain]:
        """Each group's keys of the full blocks of ``tokens`` (at most ``max_blocks``)."""
        ids = as_tokens(tokens)
        n = ids.size // self.kv.block_size
        n = n if max_blocks is None else max(0, min(n, max_blocks))
        ids = ids[: n * self.kv.block_size]
        return {name: KeyChain(ns.block_keys(ids)) for name, ns in self.namespaces.items()}

    def _runs(self, chains: dict[str, KeyChain]) -> _Runs:
        def ask(g: int, start: int) -> int:
            name = self.groups[g].name
            return int(
                self.cache.lookup(self.namespaces[name], chains[name], first_block=start).blocks
            )

        return _Runs(ask)

    def lookup(self, tokens: TokenIds, *, max_blocks: int | None = None) -> int:
        """How many blocks of ``tokens`` (at most ``max_blocks``) every group can resume at."""
        chains = self._chains(tokens, max_blocks)
        limit = len(chains[self.groups[0].name])
        return usable_prefix([g.spec for g in self.groups], self._runs(chains), limit)

    def load(self, tokens: TokenIds, *, max_blocks: int | None = None) -> GroupedLoad:
        """The needed blocks of every group at the longest usable prefix of ``tokens`` (at most
        ``max_blocks`` blocks), byte-exact.

        It reads first and asks after: the needed runs at the longest candidate are loaded at
        once (a load stops at the first block missing or failing its checksum, so it answers
        the rule's question as well as a lookup). Only when a run comes back short does the
        rule run, on what the loads said and lookups for the rest; a run it then needs is cut
        from what was read, or loaded. A resume whose blocks are all there is one load per
        group and range; a copy that failed its checksum is dropped as it is read, so the
        next candidate does not count on it.
        """
        t0 = time.perf_counter()
        chains = self._chains(tokens, max_blocks)
        p = len(chains[self.groups[0].name])
        runs = self._runs(chains)
        loads: dict[int, list[tuple[range, LoadResult]]] = {}
        while True:
            out, bound = GroupedLoad(p, self.kv.block_size), p
            for i, g in enumerate(self.groups):
                parts = out.groups[g.name] = []
                for r in needed_blocks(g.spec, p):
                    got = _cut(loads.setdefault(i, []), r)
                    if got is None:
                        ns = self.namespaces[g.name]
                        got = self.cache.load(
                            ns, chains[g.name], first_block=r.start, max_blocks=len(r)
                        )
                        loads[i].append((r, got))
                        runs.learn(i, r.start, got.blocks, len(r))
                    parts.append(got)
                    if got.blocks < len(r):  # a whole range (the sinks') bounds nothing
                        bound = min(bound, r.start + got.blocks)
            if bound >= p:
                out.seconds = time.perf_counter() - t0
                return out
            runs.limit = bound
            p = usable_prefix([g.spec for g in self.groups], runs, bound)

    def save(
        self,
        tokens: TokenIds,
        gather: Callable[[KVGroup, list[int]], torch.Tensor],
        *,
        held: Mapping[str, range] | None = None,
        session: str | None = None,
    ) -> dict[str, SaveResult]:
        """Store what a resume after ``tokens``' full blocks needs, group by group.

        ``gather(group, block_ids)`` returns those blocks of the group (``[n,
        *group.spec.block_shape]``); ``held`` names, per group, the blocks the caller can
        gather (default: all of them; an engine whose sliding layers dropped old tokens holds
        only the last ones). Of a full or MLA group every block is kept, of a windowed group
        the blocks ``needed_blocks`` names at the end, and with a ``session`` the blocks the
        session's previous save kept there and this one does not are evicted. Blocks already
        stored are not gathered again.
        """
        chains = self._chains(tokens, None)
        end = len(chains[self.groups[0].name])
        results: dict[str, SaveResult] = {}
        windows: dict[str, list[BlockKey]] = {}
        whole = True  # every group stores all a resume at the end needs
        for g in self.groups:
            ns, chain = self.namespaces[g.name], chains[g.name]
            can = held.get(g.name, range(end)) if held is not None else range(end)
            total = SaveResult(0, 0, 0)
            for r in needed_blocks(g.spec, end):
                lo, hi = max(r.start, can.start), min(r.stop, can.stop)
                whole = whole and (lo, hi) == (r.start, r.stop)
                if lo >= hi:
                    continue
                have = int(self.cache.lookup(ns, KeyChain(chain[:hi]), first_block=lo).blocks)
                # The last block is saved even when stored, so the session names the chain.
                first = min(lo + have, hi - 1) if session else lo + have
                if first < hi:
                    ids = list(range(first, hi))
                    total += self.cache.save(
                        ns, chain, gather(g, ids), first_block=first, session=session
                    )
                total += SaveResult(0, first - lo, 0)
            results[g.name] = total
            if session and g.spec.max_tokens is not None:
                windows[g.name] = [chain[i] for r in needed_blocks(g.spec, end) for i in r]
        # Only now: a group that failed (an error, blocks not admitted or without room, blocks
        # the caller does not hold) would leave neither the new end nor the previous one
        # resumable.
        whole = whole and all(r.rejected == 0 for r in results.values())
        for name, kept in windows.items():
            self._retire(session or "", name, kept, whole)
        return results

    def _retire(self, session: str, group: str, kept: list[BlockKey], evict: bool) -> None:
        """Evict what ``session``'s previous save kept of a windowed group and this one does
        not; unless ``evict`` is False (this save is not whole), then both are remembered."""
        before = self._kept.get((session, group), [])
        keep = set(kept)
        gone = [k for k in before if k not in keep]
        remember(self._kept, self._keeping, (session, group), kept if evict else [*kept, *gone])
        # What another session's last save kept too (a chat forked there) is its window still.
        gone = [k for k in gone if k not in self._keeping]
        if evict and gone:
            self.cache.evict(keys=gone)
