"""The vLLM connector's options (``kv_connector_extra_config``) and the model's identity."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from tiercache.storage_format import FORMATS

logger = logging.getLogger("vllm.tiercache")

SAVE_MODES = ("prompt_and_output", "prompt")
ASYNC_MODES = ("auto", "always", "never")
ATTACH_MODES = ("auto", "never")


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
    timeout_seconds: float | None = 30.0  # a call the daemon does not answer: a lost link
    min_tail_tokens: int | None = None
    async_load: str = "auto"
    attach: str = "auto"
    store_dtype: str = "exact"  # the namespaces' storage format (tiercache.storage_format)

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
            ("store_dtype", FORMATS),
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
        retry = opts.retry_seconds
        # A bool is an int, and json.loads reads NaN and Infinity: NaN would retry a dead
        # daemon on every call, Infinity never reconnect to a restarted one.
        if (
            not isinstance(retry, int | float)
            or isinstance(retry, bool)
            or not math.isfinite(retry)
            or retry < 0
        ):
            raise ConnectorConfigError(
                "kv_connector_extra_config.retry_seconds must be a finite non-negative number, "
                f"got {opts.retry_seconds!r}"
            )
        timeout = opts.timeout_seconds
        if timeout is not None and (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ConnectorConfigError(
                "kv_connector_extra_config.timeout_seconds must be a finite positive number "
                f"(null: wait for ever), got {opts.timeout_seconds!r}"
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
