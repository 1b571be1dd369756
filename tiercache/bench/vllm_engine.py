"""Run one vLLM engine over a list of prompts and write what it generated: the process the
vLLM tests and the vLLM benchmark start, one per engine.

    python -m tiercache.bench.vllm_engine JOB.json OUT.json

``JOB.json``::

    {"model": "/path/to/model", "connector": null | {"name": "TierCacheConnector",
     "extra": {...}} | {"name": "ExampleConnector", "extra": {...}},
     "prompts": [{"tokens": [...], "session": "chat-1", "max_tokens": 8},
                 {"tokens": [...], "image": {"seed": 1, "size": 64}},  # with a noise image
                                             # (its placeholder token among the tokens)
                 {"after": 0, "tokens": [...]},  # a chat's next turn: step 0's prompt, its
                                                 # reply, then these tokens
                 {"batch": [[...], [...]], "max_tokens": 128},   # throughput ("outputs": true
                                                                 # adds each one's result)
                 {"stagger": {"first": [...], "first_max_tokens": 48, "second": [...],
                              "after": 8}},  # second arrives while first decodes
                 {"wait": "/tmp/x"},                             # barrier: x.ready, then x.go
                 {"reset_prefix_cache": true}, ...],  # empty vLLM's own prefix cache
     "warmup": true, "kv_cache_gib": 1, "max_model_len": 4096, "prefix_caching": false,
     "reserved_cpus": 1, "tokenizer": false,
     "engine_args": {"disable_hybrid_kv_cache_manager": true}}

(``engine_args``: more keyword arguments of ``vllm.LLM``; ``tokenizer``: load the model
directory's tokenizer and processor, which a multimodal model's image prompts need.)

Each ``tokens`` prompt is generated alone (greedy, one request at a time), so its wall time
with ``max_tokens: 1`` is its time to first token. ``OUT.json`` has the engine's
start-up time and, per prompt, the tokens, their log-probs, the wall time,
vLLM's ``num_cached_tokens`` and the connector's ``kv_transfer_params``.

vLLM starts engine processes with multiprocessing, so it must run as a script
(under ``if __name__ == "__main__"``), never inside a test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONNECTOR_MODULES = {
    "TierCacheConnector": "tiercache.integrations.vllm",
    "ExampleConnector": "vllm.distributed.kv_transfer.kv_connector.v1.example_connector",
}


def run(job: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.get("kv_cache_gib", 1)))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw: dict[str, Any] = {}
    conn = job.get("connector")
    if conn:
        kw["kv_transfer_config"] = {
            "kv_connector": conn["name"],
            "kv_connector_module_path": conn.get("module") or CONNECTOR_MODULES[conn["name"]],
            "kv_role": "kv_both",
            "kv_connector_extra_config": conn.get("extra", {}),
        }
    t0 = time.perf_counter()
    llm = LLM(
        model=job["model"],
        gpu_memory_utilization=0.3,
        max_model_len=job.get("max_model_len", 4096),
        max_num_batched_tokens=job.get("max_model_len", 4096),
        enforce_eager=True,
        skip_tokenizer_init=not job.get("tokenizer", False),
        enable_prefix_caching=job.get("prefix_caching", False),
        seed=0,
        **kw,
        **job.get("engine_args", {}),
    )
    started = time.perf_counter() - t0

    def greedy(max_tokens: int, logprobs: bool = True, extra: Any = None) -> Any:
        """Greedy sampling of exactly ``max_tokens`` token ids (with their log-probs)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            detokenize=False,
            logprobs=0 if logprobs else None,
            extra_args=extra,
        )

    def generate(
        tokens: list[int], max_tokens: int, session: str | None, image: dict[str, int] | None
    ) -> dict[str, Any]:
        extra = {"kv_transfer_params": {"session_id": session}} if session else None
        sp = greedy(max_tokens, extra=extra)
        prompt = TokensPrompt(prompt_token_ids=tokens)
        if image is not None:
            prompt["multi_modal_data"] = {"image": noise_image(**image)}
        t = time.perf_counter()
        out = llm.generate([prompt], sp, use_tqdm=False)[0]
        return {"seconds": time.perf_counter() - t, **result(out)}

    def result(out: Any) -> dict[str, Any]:
        comp = out.outputs[0]
        return {
            "tokens": list(comp.token_ids),
            "logprobs": [
                (lp or {})[t].logprob
                for lp, t in zip(comp.logprobs or [], comp.token_ids, strict=True)
            ],
            "num_cached_tokens": out.num_cached_tokens,
            "kv_transfer_params": out.kv_transfer_params,
        }

    if job.get("warmup", True):
        # Shorter than a block: neither looked up nor saved; warms the kernels.
        generate([3, 4, 5, 6, 7, 8, 9, 10], 4, None, None)

    def batch(prompts: list[list[int]], max_tokens: int, outputs: bool) -> dict[str, Any]:
        sp = greedy(max_tokens, logprobs=outputs)
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        seconds = time.perf_counter() - t
        res: dict[str, Any] = {
            "seconds": seconds,
            "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        }
        if outputs:
            res["outputs"] = [result(o) for o in outs]
        return res

    def stagger(first: list[int], first_max: int, second: list[int], after: int) -> dict[str, Any]:
        """``first`` generates ``first_max`` tokens; ``second`` (one token) arrives once
        ``first`` has ``after``: the gaps between ``first``'s tokens (what a load that runs
        before a step costs the requests already decoding) and ``second``'s TTFT."""
        eng = llm.llm_engine
        eng.add_request("first", TokensPrompt(prompt_token_ids=first), greedy(first_max))
        stamps: list[float] = []  # when each of first's tokens arrived
        added = done = 0.0
        outs: dict[str, Any] = {}
        while eng.has_unfinished_requests():
            step: list[Any] = list(eng.step())
            for o in step:
                now = time.perf_counter()
                if o.request_id == "first":
                    stamps += [now] * (len(o.outputs[0].token_ids) - len(stamps))
                elif o.finished:
                    done = now
                if o.finished:
                    outs[o.request_id] = o
            if not added and len(stamps) >= after:
                eng.add_request("second", TokensPrompt(prompt_token_ids=second), greedy(1))
                added = time.perf_counter()
        gaps = [b - a for a, b in zip(stamps[after - 1 :], stamps[after:], strict=False)]
        return {
            "gaps": gaps,
            "second_ttft": done - added,
            "first": result(outs["first"]),
            "second": result(outs["second"]),
        }

    def wait(name: str) -> dict[str, Any]:
        # A barrier with the process that started us (a benchmark restarting the daemon).
        Path(name + ".ready").touch()
        t = time.perf_counter()
        while not Path(name + ".go").exists():
            if time.perf_counter() - t > 600:
                raise TimeoutError(f"nobody released {name}.go")
            time.sleep(0.05)
        return {"waited_seconds": time.perf_counter() - t}

    results: list[dict[str, Any]] = []
    sent: list[list[int]] = []  # each step's prompt ([] for batches and barriers)
    for p in job["prompts"]:
        prompt: list[int] = []
        if "wait" in p:
            results.append(wait(p["wait"]))
        elif "reset_prefix_cache" in p:
            # Only between requests, so vLLM frees every block: False would be a bug here.
            if not llm.reset_prefix_cache():
                raise RuntimeError("vLLM did not reset its prefix cache")
            results.append({"reset": True})
        elif "stagger" in p:
            g = p["stagger"]
            results.append(stagger(g["first"], g["first_max_tokens"], g["second"], g["after"]))
        elif "batch" in p:
            results.append(batch(p["batch"], p.get("max_tokens", 8), p.get("outputs", False)))
        else:
            if "after" in p:
                j = p["after"]
                prompt = sent[j] + results[j]["tokens"]
            prompt = prompt + list(p["tokens"])
            results.append(
                generate(prompt, p.get("max_tokens", 8), p.get("session"), p.get("image"))
            )
            results[-1]["prompt_tokens"] = len(prompt)
        sent.append(prompt)
    return {"startup_seconds": started, "results": results}


def noise_image(seed: int, size: int) -> Any:
    """A ``size`` x ``size`` RGB image of uniform noise drawn from ``seed``."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def launch(
    job: dict[str, Any],
    workdir: Path,
    name: str,
    timeout: float = 900,
    on_wait: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """Run ``job`` in a fresh engine process; its log goes to ``workdir/<name>.log``. At each
    ``wait`` step the engine pauses while ``on_wait(step name)`` runs here."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_path, out_path, log_path = (
        workdir / f"{name}{ext}" for ext in (".job.json", ".out.json", ".log")
    )
    job_path.write_text(json.dumps(job))
    out_path.unlink(missing_ok=True)
    barriers = [p["wait"] for p in job["prompts"] if "wait" in p]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(job.get("kv_cache_gib", 1)),
        # vllm-cpu keeps cores for its scheduler process: one, and one more when a KV
        # connector is configured (for NIXL's transfers). On a 2-core machine that second
        # core would leave none, and vLLM would then compute on both cores in a connector
        # engine but on one in an engine without: the same reservation for every engine
        # keeps their compute the same.
        "VLLM_CPU_NUM_OF_RESERVED_CPU": str(job.get("reserved_cpus", 1)),
    }
    deadline = time.monotonic() + timeout
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tiercache.bench.vllm_engine", str(job_path), str(out_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vLLM engine {name!r} ran past {timeout:.0f} s")
                if barriers and Path(barriers[0] + ".ready").exists():
                    if on_wait is not None:
                        on_wait(barriers[0])
                    Path(barriers.pop(0) + ".go").touch()
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text(errors="replace")[-6000:]
        raise RuntimeError(f"vLLM engine {name!r} failed (exit {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(out_path.read_text())
    result["log"] = str(log_path)
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m tiercache.bench.vllm_engine JOB.json OUT.json", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        job = json.load(f)
    out = run(job)
    with open(args[1], "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
