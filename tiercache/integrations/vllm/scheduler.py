"""The vLLM connector's scheduler side: which tiercache blocks each request finds, loads
and saves.

Per step it hashes prompts into tiercache's chained keys, asks the daemon how long a prefix
it holds, and tells the worker side (``TierCacheMetadata``) which blocks to load before the
step's forward and which to save after it. The package docstring
(``tiercache.integrations.vllm``) says how and why.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.v1.metrics.cache_hit_source import CacheHitSource

from tiercache.client import Client
from tiercache.groups import needed_blocks, usable_prefix
from tiercache.integrations.vllm.groups import NULL_BLOCK, Group, by_request
from tiercache.integrations.vllm.link import Link
from tiercache.integrations.vllm.metadata import TierCacheMetadata, Transfer
from tiercache.integrations.vllm.options import Options
from tiercache.keys import BlockKey, KeyChain, media_seed, tail_key

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.tiercache")

_SLOW_TIERS = frozenset({"disk", "remote"})
_HIT_SOURCES = {"host": CacheHitSource.HOST, "disk": CacheHitSource.DISK}


@dataclass
class _Req:
    request: Request
    session: str | None
    seeds: list[BlockKey]  # per group: what the chain's first block hangs from (_extra)
    keys: list[list[BlockKey]]  # per group: the chain over the request's whole blocks so far
    block_ids: list[list[int]]  # per group: the engine blocks vLLM gave the request
    stored: int = 0  # tiercache blocks [0, stored) are in the daemon (found, or saved)
    hit: int = 0  # blocks of the usable prefix the last lookup found
    hit_tiers: list[str] = field(default_factory=list)  # per block (and the tail), slowest group
    tail: tuple[int, list[BlockKey]] | None = None  # the found tail: (tokens, key per group)
    saved_tail: tuple[int, int] | None = None  # (full blocks, tail tokens) stored for it
    local: int = 0  # tokens vLLM's own prefix cache had at lookup
    load: tuple[int, int] | None = None  # tokens [start, end) to load this step
    load_async: bool = False  # the last lookup's load runs in the background
    loaded_async: bool = False  # a load of this request ran in the background
    windows: dict[int, tuple[int, int]] = field(default_factory=dict)  # sliding: saved blocks
    # Block -> content hashes of the media items (images, video, audio) starting in it: the
    # chain is re-seeded there (``media_seed``); and the tokens where each item starts.
    media: dict[int, list[str]] = field(default_factory=dict)
    media_starts: list[int] = field(default_factory=list)
    keyed: int | None = None  # blocks [keyed, ..) are neither looked up nor saved (_new)

    def full(self, tokens: int, block: int) -> int:
        """The whole blocks of the first ``tokens`` tokens that may be looked up and saved."""
        full = tokens // block
        return full if self.keyed is None else min(full, self.keyed)

    def media_from(self, start: int) -> int | None:
        """The first token at or after ``start`` where a media item starts."""
        return next((o for o in self.media_starts if o >= start), None)


def _session(request: Request) -> str | None:
    """The request's ``kv_transfer_params.session_id``. A bad one is a client's mistake: it is
    logged and ignored (the KV is still cached, under no session name), since raising here,
    in the engine's scheduler, would stop the engine for every request."""
    params = request.kv_transfer_params or {}
    sid = params.get("session_id")
    if sid is None:
        return None
    if not isinstance(sid, str) or not sid:
        logger.warning(
            "request %s: kv_transfer_params.session_id must be a non-empty string, got %r; "
            "its KV is cached without a session",
            request.request_id,
            sid,
        )
        return None
    return sid


def _keyed_by_more(request: Request) -> str | None:
    """What, besides its token ids, :func:`_extra` and its media (:func:`_media`), the
    request's KV depends on: its blocks are neither looked up nor saved, as another request
    with the same ids but other embeddings would find them under the same keys."""
    if getattr(request, "prompt_embeds", None) is not None:
        return "prompt embeddings"
    return None


def _media(request: Request) -> dict[int, list[str]]:
    """The request's media items (images, video, audio) by the token where their placeholders
    start: ``"<offset>:<content hash>"`` (the hash is the ``identifier`` vLLM's own prefix
    cache and encoder cache key the item by)."""
    out: dict[int, list[str]] = {}
    for f in getattr(request, "mm_features", None) or ():
        at = int(f.mm_position.offset)
        out.setdefault(at, []).append(f"{at}:{f.identifier}")
    return out


def _extra(request: Request) -> str:
    """The request's LoRA adapter and ``cache_salt``, as vLLM's prefix cache keys them (an
    adapter by name and path): its chains hang from ``Namespace.seed(extra)``, so a request
    under another adapter or salt, or under none, never finds its blocks. Empty when it has
    neither: the plain chain."""
    extra: dict[str, object] = {}
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        extra["lora"] = [str(getattr(lora, "lora_name", lora)), str(getattr(lora, "lora_path", ""))]
    salt = getattr(request, "cache_salt", None)
    if salt:
        extra["cache_salt"] = str(salt)
    return json.dumps(extra, sort_keys=True) if extra else ""


class Scheduler:
    """The requests the engine's scheduler runs, what the daemon holds of each, and the
    loads and saves each step sends the worker side."""

    def __init__(
        self,
        options: Options,
        groups: list[Group],
        vllm_block: int,
        min_tail: int,
        link: Link,
        media_hashed: bool = True,
    ) -> None:
        self.options = options
        # Whether vLLM keys media items by their content (``media_hashed`` in the package):
        # when not, the blocks from a request's first item on are not cached.
        self.media_hashed = media_hashed
        self.groups = groups
        self.vllm_block = vllm_block
        self.block = groups[0].ns.spec.block_size
        self.per_block = self.block // vllm_block
        self.min_tokens = options.min_tokens or self.block
        self.min_tail = min_tail
        self.by_request = by_request(groups)
        self._link = link
        self._reqs: dict[str, _Req] = {}
        self._finishing: list[Transfer] = []  # tail and window saves of finished requests
        self._waiting: list[str] = []  # background loads to send to the worker
        self._recving: set[str] = set()  # background loads not reported done yet
        self._running = 0  # requests the last step scheduled

    def _keys(self, st: _Req, g: Group, tokens: int) -> list[BlockKey]:
        """Group ``g``'s chain over the request's first ``tokens`` tokens (whole blocks),
        extended incrementally as the request grows; re-seeded by the content hashes of the
        media starting in a block (``media_seed``), so blocks from an image on are keyed by
        the image too."""
        want = tokens // self.block
        keys = st.keys[g.index]
        while want > len(keys):
            b = len(keys)
            prev = keys[-1] if keys else st.seeds[g.index]
            if b in st.media:
                prev, end = media_seed(prev, st.media[b]), b + 1
            else:
                end = min([want, *(m for m in st.media if m > b)])
            toks = st.request.all_token_ids[b * self.block : end * self.block]
            keys += g.ns.block_keys(toks, start=prev)
        return keys[:want]

    def _new(self, request: Request) -> _Req:
        n = len(self.groups)
        seeds = [g.ns.seed(_extra(request)) for g in self.groups]
        st = _Req(request, _session(request), seeds, [[] for _ in range(n)], [[] for _ in range(n)])
        starts = _media(request)
        for offset, ids in sorted(starts.items()):
            st.media.setdefault(offset // self.block, []).extend(ids)
        st.media_starts = sorted(starts)
        if starts and not self.media_hashed:
            st.keyed = min(starts) // self.block
        self._reqs[request.request_id] = st
        return st

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if _keyed_by_more(request):
            return 0, False
        st = self._reqs.get(request.request_id) or self._new(request)
        st.load, st.hit, st.hit_tiers, st.local = None, 0, [], num_computed_tokens
        st.tail = None
        prompt = len(request.prompt_token_ids or ())
        # At least one prompt token is left to compute: the engine needs its logits. The
        # last block may still be loaded whole (its last token is computed over it).
        limit = prompt - 1
        full = st.full(prompt, self.block)
        if prompt < self.min_tokens:
            return 0, False
        if limit <= num_computed_tokens:
            # vLLM serves all of it from its own prefix cache. Tell the daemon those blocks
            # are in use, so its eviction keeps them like a hit (the lookup below does the
            # same for every block it finds, local ones included). What it holds of the full
            # groups' chains is not saved again (a gather of every block, for nothing).
            held = full
            for g in self.groups if full else ():
                chain = KeyChain(self._keys(st, g, full * self.block))
                touch = functools.partial(Client.touch, ns=g.ns, tokens=chain)
                got = self._link.call("touch", touch) or 0
                if g.window is None:
                    held = min(held, got)
            st.stored = max(st.stored, held)
            return 0, False
        if full:
            st.hit = self._usable(st, full)
            st.stored = max(st.stored, st.hit)
        hit = st.hit * self.block
        # A tail right after the namespace (no full block before it) exists only when
        # prompts shorter than a block are saved (min_tokens below a block).
        if self.min_tail and limit - hit >= self.min_tail and (hit or self.min_tokens < self.block):
            self._find_tail(st, hit, prompt)
        got = min(hit + (st.tail[0] if st.tail else 0), limit)
        n = max(got - num_computed_tokens, 0)
        st.load_async = n > 0 and self._in_background(st, num_computed_tokens, got)
        return n, st.load_async

    def _usable(self, st: _Req, full: int) -> int:
        """The blocks of the longest prefix within ``full`` every group can resume from
        (``usable_prefix``), and per block the slowest tier a group found it in."""
        tiers: dict[int, str] = {}

        # usable_prefix asks again for the run it already has when it narrows the prefix
        # (a partial hit): one lookup each, or the daemon counted (and refreshed) it twice.
        @functools.cache
        def run(i: int, first: int) -> int:
            g = self.groups[i]
            chain = KeyChain(self._keys(st, g, full * self.block))
            look = functools.partial(Client.lookup, ns=g.ns, tokens=chain, first_block=first)
            res = self._link.call("lookup", look)
            if res is None:
                return 0
            for b, tier in enumerate(res.tiers[: res.blocks], start=first):
                if _SLOWNESS.get(tier, 0) >= _SLOWNESS.get(tiers.get(b, ""), 0):
                    tiers[b] = tier
            return res.blocks

        hit = usable_prefix([g.ns.spec for g in self.groups], run, full)
        st.hit_tiers = [tiers.get(b, "host") for b in range(hit)]
        return hit

    def _in_background(self, st: _Req, start: int, end: int) -> bool:
        """Whether loading tokens ``[start, end)`` runs asynchronously (``async_load``). Under
        "auto": when it waits on a slow tier while other requests run (they would stall
        behind it). With nothing else running, a load before the step is sooner: a
        background one costs the request extra scheduler steps. Always, when a failed load
        can only be recomputed request by request (``groups.by_request``)."""
        if self.by_request:
            return True
        if self.options.async_load != "auto":
            return self.options.async_load == "always"
        tiers = st.hit_tiers[start // self.block : -(-end // self.block)]
        return self._running > 0 and any(t in _SLOW_TIERS for t in tiers)

    def _find_tail(self, st: _Req, start: int, prompt: int) -> None:
        """The longest tail (``min_tail`` .. ``prompt - start`` tokens) stored after the
        chain's first ``start // block`` blocks in every group: ``st.tail`` and its tier. A
        tail that ends with the prompt is loaded whole, and its last token computed again.
        (A sliding group's window before it is within the prefix's, found already.)"""
        # A tail key hashes token ids only: it stops before media that starts inside it.
        end = min(prompt, start + self.block - 1)
        if (media := st.media_from(start)) is not None:
            end = min(end, media)
        if end - start < self.min_tail:
            return
        toks = st.request.all_token_ids[start:end]
        first, *others = self.groups
        candidates = first.ns.tail_keys(toks, self._parent(st, first, start))[self.min_tail - 1 :]
        res = self._link.call("lookup_tail", lambda c: c.lookup_tail(first.ns, candidates))
        if res is None or res[0] < 0:
            return
        r, keys, tier = self.min_tail + res[0], [candidates[res[0]]], res[1]
        for g in others:
            key = tail_key(self._parent(st, g, start), toks[:r])
            look = functools.partial(Client.lookup_tail, ns=g.ns, candidates=[key])
            got = self._link.call("lookup_tail", look)
            if got is None or got[0] < 0:
                return
            keys.append(key)
            tier = max(tier, got[1], key=lambda t: _SLOWNESS.get(t, 0))
        st.tail = (r, keys)
        st.hit_tiers.append(tier)

    def _parent(self, st: _Req, g: Group, start: int) -> BlockKey:
        """The key a tail of group ``g`` starting at token ``start`` (a block boundary) hangs
        from: the chain's block before it, or the chain's seed for a first block."""
        return self._keys(st, g, start)[-1] if start else st.seeds[g.index]

    def _engine_ids(self, st: _Req, g: Group, first: int, end: int) -> list[int]:
        """The engine blocks of group ``g`` that hold tiercache blocks ``first ..`` up to
        token ``end`` (the last one partly, when ``end`` is inside an engine block)."""
        return st.block_ids[g.index][first * self.per_block : -(-end // self.vllm_block)]

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        st = self._reqs.get(request.request_id)
        if not num_external_tokens or st is None:
            return {}
        first = st.local // self.block
        counts: dict[CacheHitSource, int] = {}
        for i, tier in enumerate(st.hit_tiers[first:], start=first):
            n = min((i + 1) * self.block, st.local + num_external_tokens) - max(
                i * self.block, st.local
            )
            if n > 0:
                src = _HIT_SOURCES.get(tier, CacheHitSource.EXTERNAL_UNSPECIFIED)
                counts[src] = counts.get(src, 0) + n
        return counts

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if _keyed_by_more(request):
            return  # not cached: build_connector_meta saves nothing of a request it lacks
        st = self._reqs.get(request.request_id) or self._new(request)
        if num_external_tokens > 0:
            st.load = (st.local, st.local + num_external_tokens)
            if st.load_async:
                # The request waits, unscheduled, until its load is reported done: its blocks
                # are the ones allocated now, and its load goes out with this step's metadata.
                st.block_ids = [list(ids) for ids in blocks.get_block_ids()]
                self._waiting.append(request.request_id)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> TierCacheMetadata:
        meta = TierCacheMetadata()
        self._running = len(scheduler_output.num_scheduled_tokens)
        for req_id in self._waiting:
            st = self._reqs.get(req_id)
            if st is not None and st.load is not None:
                meta.loads += self._loads(req_id, st)
                self._recving.add(req_id)
        self._waiting = []
        steps: list[tuple[str, int]] = []
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = [list(ids) for ids in new.block_ids]
            if st.load is not None:
                meta.loads += self._loads(new.req_id, st)
            steps.append((new.req_id, new.num_computed_tokens))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = [list(g) for g in ids] if ids is not None else st.block_ids
                if st.load is not None:
                    meta.loads += self._loads(req_id, st)
            elif ids is not None:
                for have, more in zip(st.block_ids, ids, strict=True):
                    have += more
            steps.append((req_id, cached.num_computed_tokens[i]))
        for req_id, computed in steps:
            st = self._reqs[req_id]
            # Tokens being computed below what we counted as stored: a load failed and vLLM
            # recomputes them (or it dropped a hit): those blocks are saved again.
            st.stored = min(st.stored, computed // self.block)
            done = computed + scheduler_output.num_scheduled_tokens[req_id]
            saves = self._save(req_id, done)
            # The step that completes the prompt also saves the prompt's tail (and sliding
            # groups their window): a prompt sent again (a retry, a regenerated reply,
            # n > 1) then loads all of it but one token.
            prompt = len(st.request.prompt_token_ids or ())
            if computed < prompt <= done:
                saves += self._checkpoint(st, prompt)
            for t in saves:
                t.after = computed
            meta.saves += saves
        meta.saves += self._finishing
        self._finishing = []
        return meta

    def _loads(self, req_id: str, st: _Req) -> list[Transfer]:
        """Tokens ``[start, end)``: per group, the blocks that hold them (the last one may be
        the found tail, or a full block of which the last tokens are computed; a sliding
        group's from its window before ``end``), into the engine blocks that hold them."""
        assert st.load is not None
        start, end = st.load
        st.load = None
        st.loaded_async |= st.load_async
        last = -(-end // self.block)
        loads = []
        for g in self.groups:
            first = max(start // self.block, g.first_needed(end, self.block))
            keys = self._keys(st, g, min(last, st.hit) * self.block)
            if last > st.hit:
                assert st.tail is not None, "a load past the found chain needs its tail"
                keys = [*keys, st.tail[1][g.index]]
            if first < last:
                skip = max(start // self.vllm_block - first * self.per_block, 0)
                ids = self._engine_ids(st, g, first, end)
                chain = KeyChain(keys).to_bytes()
                loads.append(
                    Transfer(
                        req_id,
                        chain,
                        first,
                        last - first,
                        ids,
                        st.session,
                        skip,
                        background=st.load_async,
                        group=g.index,
                    )
                )
        return loads

    def _save(self, req_id: str, computed: int) -> list[Transfer]:
        """The blocks of ``req_id`` that become full this step and are not in the daemon, in
        every full and MLA group (a sliding group saves its window at a checkpoint)."""
        st = self._reqs[req_id]
        limit = computed
        if self.options.save == "prompt":
            limit = min(limit, len(st.request.prompt_token_ids or ()))
        if limit < self.min_tokens:
            return []
        full = st.full(limit, self.block)
        if full <= st.stored:
            return []
        saves = []
        for g in self.groups:
            if g.window is not None:
                continue
            keys = self._keys(st, g, full * self.block)
            ids = self._engine_ids(st, g, st.stored, full * self.block)
            if len(ids) != (full - st.stored) * self.per_block:
                return []  # not all of its blocks are allocated (cannot happen when computed)
            chain = KeyChain(keys).to_bytes()
            saves.append(
                Transfer(req_id, chain, st.stored, full - st.stored, ids, st.session, group=g.index)
            )
        st.stored = full
        return saves

    def _checkpoint(self, st: _Req, end: int, finish: bool = False) -> list[Transfer]:
        """Saves that let a request resume at token ``end``: each sliding group's blocks of
        the window before it (those vLLM still holds), and every group's tail ``[end //
        block * block, end)``, whose engine blocks hold the KV of its tokens (the rest of
        the block is not part of it)."""
        if self.options.save == "prompt":
            end = min(end, len(st.request.prompt_token_ids or ()))
        full, r = divmod(end, self.block)
        if end < self.min_tokens or full > st.stored:
            return []  # its chain is not all stored
        req_id = st.request.request_id
        saves = []
        for g in self.groups:
            if g.window is None:
                continue
            ids = st.block_ids[g.index][: full * self.per_block]
            first = needed_blocks(g.ns.spec, full)[0].start if full else 0
            while first < full and NULL_BLOCK in ids[first * self.per_block :]:
                first += 1  # vLLM freed it already (a later window): resumes need the tail
            if first < full:
                chain = KeyChain(self._keys(st, g, full * self.block)).to_bytes()
                ids = ids[first * self.per_block :]
                n, sid = full - first, st.session
                saves.append(
                    Transfer(req_id, chain, first, n, ids, sid, finish=finish, group=g.index)
                )
                st.windows[g.index] = (first, full)
        media = st.media_from(full * self.block)
        if (
            not self.min_tail
            or r < self.min_tail
            or st.saved_tail == (full, r)
            or (st.tail is not None and st.hit == full and st.tail[0] == r)
            or (media is not None and media < end)  # a tail key does not hash the media
        ):
            return saves
        st.saved_tail = (full, r)
        for g in self.groups:
            ids = self._engine_ids(st, g, full, end)
            if len(ids) != -(-r // self.vllm_block) or NULL_BLOCK in ids:
                return saves  # its engine blocks are not all allocated
            keys = [
                *self._keys(st, g, full * self.block),
                tail_key(
                    self._parent(st, g, full * self.block),
                    st.request.all_token_ids[full * self.block : end],
                ),
            ]
            # No session: a pinned chat's pin protects its full blocks, not the one or two
            # tails each of its turns leaves (those age out like any unpinned block).
            saves.append(
                Transfer(
                    req_id, KeyChain(keys).to_bytes(), full, 1, ids, finish=finish, group=g.index
                )
            )
        return saves

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._recving -= connector_output.finished_recving or set()

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        # Full blocks are saved synchronously, in the step that filled them. The tail the
        # request ends with (its last, partial block, which the next turn of a chat starts
        # in) and the sliding groups' last window are saved in the next step: its blocks
        # are held until the worker reports it.
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False, None
        st.block_ids = [list(ids) for ids in block_ids]
        # Tokens still in flight (async scheduling) are not counted: their KV may not be written.
        computed = request.num_computed_tokens - getattr(request, "num_in_flight_tokens", 0)
        saves = []
        if request.request_id not in self._recving:
            # (A request aborted while its load runs computed nothing; vLLM holds its blocks
            # until the worker reports the load.)
            saves = self._checkpoint(st, computed, finish=True)
            for t in saves:
                t.after = computed
        old = self._old_windows(st, saves)
        if old:
            saves[-1] = dataclasses.replace(saves[-1], evict=KeyChain(old).to_bytes())
        self._finishing += saves
        found = st.hit * self.block + (st.tail[0] if st.tail else 0)
        return bool(saves), {
            "tiercache": {
                "stored_blocks": st.stored,
                "found_blocks": st.hit,
                "found_tokens": found,
                "stored_tail_tokens": st.saved_tail[1] if st.saved_tail else 0,
                "loaded_async": st.loaded_async,
                "dropped_window_blocks": len(old),
                # Per group, the blocks [first, end) this request stored (or found).
                "groups": [
                    {
                        "kind": str(g.kind),
                        "ns": g.ns.hex,
                        "window": g.window,
                        "blocks": st.windows.get(g.index, (0, 0)) if g.window else (0, st.stored),
                    }
                    for g in self.groups
                ],
            }
        }

    def _old_windows(self, st: _Req, saves: list[Transfer]) -> list[BlockKey]:
        """A chat's turn that resumed at ``st.hit`` blocks and saves its own window at its
        finish (``saves``): each sliding group's blocks of the window it resumed from that its
        new window does not keep, so a long chat keeps its sliding layers' last window only
        (``tiercache.groups``: a resume from an older turn then recomputes more, never
        wrongly). Only for requests that name a session (a chat). The worker evicts them
        once every finish save is stored: one that fails leaves the old window resumable.
        None when a new window is no resume point (vLLM freed its first block already)."""
        keys: list[BlockKey] = []
        for g in self.groups if st.session and st.hit else ():
            if g.window is not None and g.index in st.windows:
                first, end = st.windows[g.index]
                if not any(
                    (t.group, t.first, t.count) == (g.index, first, end - first) for t in saves
                ):
                    return []  # not saved at this finish
                if first > needed_blocks(g.ns.spec, end)[0].start:
                    return []  # a resume at its end needs blocks vLLM has freed
                old = needed_blocks(g.ns.spec, st.hit)[0].start
                keys += self._keys(st, g, st.hit * self.block)[old : min(first, st.hit)]
        return keys

    # -- worker side -----------------------------------------------------------


# Tiers by how long a load from them waits (the slowest of a block's groups counts).
_SLOWNESS = {"host": 1, "disk": 2, "remote": 3}
