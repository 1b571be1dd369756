"""The ``tiercache`` command line: ``serve``, ``status``, ``ctl``, ``demo``, ``size``, ``retention``,
``bench``.

Every error a user can cause (bad config, bad model config, bad size) exits
with status 2 and one line naming what was wrong; nothing prints a traceback
for bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence

from tiercache.bench import MODULES as BENCHMARKS
from tiercache.daemon.config import Config, ConfigError, load_config
from tiercache.daemon.ctl import CtlError
from tiercache.modelkv import ModelKV
from tiercache.spec import AttentionKind, KVSpec, SpecError, format_size, parse_size
from tiercache.storage_format import FORMATS, FormatError, check_spec, parse_format, stored_nbytes
from tiercache.tiers.disk import StoreError


def _config(path: str | None) -> Config:
    return load_config(path)


def cmd_size(args: argparse.Namespace) -> int:
    model = ModelKV.from_hf_config(args.model_config, dtype=args.dtype, block_size=args.block_size)
    first = model.groups[0].spec
    total = model.bytes_for(args.tokens, args.batch)
    if len(model.groups) == 1 and first.kind is AttentionKind.FULL:
        print(
            f"model:            {first.num_layers} layers, {first.num_kv_heads} KV heads, head dim "
            f"{first.head_dim}, {first.dtype}"
        )
        print(f"bytes per token:  {first.bytes_per_token:,}")
    else:
        n = len(model.groups)
        print(
            f"model:            {model.num_layers} layers in {n} KV cache group{'s' * (n > 1)}, "
            f"{first.dtype}"
        )
        for g in model.groups:
            spec = g.spec
            shape = (
                "" if spec.kind is AttentionKind.MLA
                else f", {spec.num_kv_heads} KV heads x head dim {spec.head_dim}"
            )  # fmt: skip
            held = spec.tokens_held(args.tokens)
            of = f" of {args.tokens:,}" if held < args.tokens else ""
            print(
                f"{'group ' + g.name + ':':<18}{g.describe()}{shape}: "
                f"{spec.bytes_per_token:,} bytes per token, holds {held:,}{of} tokens = "
                f"{spec.bytes_for(args.tokens, args.batch):,} bytes"
            )
        growing = sum(g.spec.bytes_per_token for g in model.groups if g.spec.max_tokens is None)
        past = f" ({growing:,} once past every window)" if growing < model.bytes_per_token else ""
        print(f"bytes per token:  {model.bytes_per_token:,}{past}")
    block = sum(g.spec.block_nbytes for g in model.groups)
    per_group = " (one block of each group)" if len(model.groups) > 1 else ""
    print(f"block:            {model.block_size} tokens = {block:,} bytes{per_group}")
    print(
        f"total:            {total:,} bytes ({format_size(total)}; {total / 1e9:.1f} GB) "
        f"for {args.tokens:,} tokens x batch {args.batch}"
    )
    cfg = _config(args.config)
    tiers: list[tuple[str, int, str]] = []
    if cfg.tiers.device is not None:
        tiers.append(("device", cfg.tiers.device.bytes, "exact"))  # the engine's own dtype
    tiers.append(("host", cfg.tiers.host.bytes, args.store_dtype))
    if cfg.tiers.disk is not None:
        tiers.append(("disk", cfg.tiers.disk.bytes, args.store_dtype))
    one_full = len(model.groups) == 1 and first.kind is AttentionKind.FULL
    # The host and device tiers are carved into slots of one size: [tiers.host] slot_bytes
    # (set to fit several models' blocks), else the largest block's.
    set_slot = cfg.tiers.host.slot_bytes
    largest = max(g.spec.block_nbytes for g in model.groups)
    slot = set_slot or largest
    for name, nbytes, fmt in tiers:
        if one_full:
            holds = size_line(first, nbytes, fmt, set_slot if name != "disk" else 0)
        elif name != "disk" and slot < largest:
            holds = refused(largest, slot)
        else:
            fits = model.tokens_in(nbytes, slot if name != "disk" else 0)
            holds = "a sequence of any length" if fits is None else f"{fits:,} tokens"
            if fmt != "exact":
                holds += f" (exact; {fmt} sizes are shown for one-group models only)"
        print(f"{name + ' tier:':<18}{format_size(nbytes)} holds {holds}")
    return 0


def size_line(spec: KVSpec, nbytes: int, fmt: str, slot_bytes: int = 0) -> str:
    """How many tokens and blocks ``nbytes`` of a tier holds under its storage format;
    ``slot_bytes``: the tier is carved into slots of that size ([tiers.host] slot_bytes),
    one a block whatever its size."""
    f = parse_format(fmt)
    try:
        check_spec(spec, f)
    except FormatError:
        per, how = spec.block_nbytes, f"{fmt}: a {spec.dtype} cache is stored exact"
    else:
        per, how = stored_nbytes(spec, f), fmt
    if slot_bytes and per > slot_bytes:
        return refused(per, slot_bytes)
    blocks = nbytes // (slot_bytes or per)
    slots = f" in slots of {slot_bytes:,} bytes" if slot_bytes else ""
    if how != fmt:
        return f"{blocks * spec.block_size:,} tokens ({how}{slots})"
    return f"{blocks * spec.block_size:,} tokens ({how}: {blocks:,} blocks of {per:,} bytes{slots})"


def refused(block_bytes: int, slot_bytes: int) -> str:
    """What a tier of slots holds of a model whose blocks are larger than its slots."""
    return (
        f"nothing: a block of {block_bytes:,} bytes is larger than [tiers.host] slot_bytes "
        f"({slot_bytes:,}); the daemon refuses this model"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from tiercache.daemon.demo import run_demo
    from tiercache.daemon.process import DaemonStartError

    try:
        reports = run_demo(
            _config(args.config),
            config_path=args.config,
            turns=args.turns,
            context_tokens=args.context_tokens,
            reply_tokens=args.reply_tokens,
        )
    except DaemonStartError as e:  # its log went with the demo's temporary directory
        print(f"error: the demo's tiercache daemon did not start: {e.reason}", file=sys.stderr)
        return 1
    if not all(r.identical for r in reports):
        print("error: a resumed reply differed from full recompute", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tiercache.daemon.config import preflight, to_toml

    cfg = _config(args.config)
    preflight(cfg)
    if args.check_config:
        print(to_toml(cfg), end="")
        return 0
    from tiercache.daemon.service import Daemon

    # An explicit --log-level wins over [daemon] log_level for this run.
    logging.getLogger().setLevel((args.log_level or cfg.daemon.log_level).upper())
    asyncio.run(Daemon(cfg).run())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tiercache.daemon.ctl import render_status, request

    stats = asyncio.run(request(_config(args.config), "stats", {}, args.node))
    print(json.dumps(stats, indent=2) if args.json else render_status(stats))
    return 0


def cmd_ctl(args: argparse.Namespace) -> int:
    from tiercache.daemon.ctl import parse_args, run_with_progress

    result = asyncio.run(
        run_with_progress(_config(args.config), args.verb, parse_args(args.args), args.node)
    )
    print(json.dumps(result, indent=2))
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    from tiercache.embedded import run_retention

    remote = _config(args.config).tiers.remote
    if remote is None:
        raise ConfigError("tiers.remote.url: no shared tier is configured; retention needs one")
    if args.max_age is not None and args.max_age < 0:
        raise ConfigError(f"--max-age: must be seconds >= 0, got {args.max_age}")
    max_bytes = None if args.max_bytes is None else parse_size(args.max_bytes)
    if max_bytes is None and args.max_age is None and not (remote.max_age or remote.max_bytes):
        raise ConfigError(
            "tiers.remote: set max_age or max_bytes (or pass --max-age / --max-bytes)"
        )
    report = asyncio.run(
        run_retention(
            remote,
            max_age=args.max_age,
            max_bytes=max_bytes,
            namespace=args.namespace,
            dry_run=args.dry_run,
        )
    )
    print(json.dumps({**report.as_dict(), "dry_run": args.dry_run}, indent=2))
    return 0 if not report.failed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from tiercache.bench import run

    options = [
        arg
        for flag in ("trace", "capacities", "policies")
        if getattr(args, flag) is not None
        for arg in (f"--{flag}", getattr(args, flag))
    ] + (["--main-only"] if args.main_only else [])
    if options and args.name != "trace":
        raise ConfigError(
            "--trace, --capacities, --policies and --main-only are for `bench trace`, "
            f"not {args.name}"
        )
    return run(args.name, args.out, quick=args.quick, options=options)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tiercache", description="Tiered KV-cache offload for LLM inference."
    )
    p.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="default: warning; for serve, [daemon] log_level",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "size", help="KV bytes for a model and token count, and what each tier holds"
    )
    s.add_argument(
        "--model-config", required=True, help="a Hugging Face config.json (or its directory)"
    )
    s.add_argument("--tokens", type=int, required=True)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument(
        "--dtype", default=None, help="KV dtype: fp32, bf16, fp16, fp8, int8 (default: the model's)"
    )
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--config", default=None, help="tiercache TOML config (for the tier sizes)")
    s.add_argument(
        "--store-dtype",
        default="exact",
        choices=FORMATS,
        help="storage format the client registers (Namespace.store_dtype): host and disk "
        "tiers hold blocks of this size",
    )
    s.set_defaults(func=cmd_size)

    v = sub.add_parser(
        "serve", help="run the daemon in the foreground (SIGTERM drains and flushes)"
    )
    v.add_argument(
        "--config", default=None, help="TOML config (default: built-in defaults + environment)"
    )
    v.add_argument(
        "--check-config", action="store_true", help="validate and print the effective config"
    )
    v.set_defaults(func=cmd_serve)

    st = sub.add_parser(
        "status", help="tiers, hit ratios, errors and shared tier of a running daemon"
    )
    st.add_argument("--config", default=None)
    st.add_argument("--node", default=None, help="with MQTT: the node to ask (default [mqtt] node)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    c = sub.add_parser(
        "ctl", help="an operator verb: pin, unpin, evict, flush, prefetch, stats, set, drain"
    )
    c.add_argument(
        "verb", choices=["pin", "unpin", "evict", "flush", "prefetch", "stats", "set", "drain"]
    )
    c.add_argument("args", nargs="*", help="key=value arguments, e.g. session=chat-1")
    c.add_argument("--config", default=None)
    c.add_argument("--node", default=None)
    c.set_defaults(func=cmd_ctl)

    d = sub.add_parser("demo", help="a multi-turn chat resumed from the cache, against recompute")
    d.add_argument("--config", default=None)
    d.add_argument("--turns", type=int, default=4)
    d.add_argument("--context-tokens", type=int, default=1024)
    d.add_argument("--reply-tokens", type=int, default=16)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser(
        "retention", help="delete old shared-tier blocks: by age, then oldest beyond a size"
    )
    r.add_argument("--config", default=None)
    r.add_argument("--max-age", type=int, default=None, help="seconds (default: the config's)")
    r.add_argument("--max-bytes", default=None, help='e.g. "1TiB" (default: the config\'s)')
    r.add_argument("--namespace", default=None, help="only this namespace (its hex id)")
    r.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    r.set_defaults(func=cmd_retention)

    b = sub.add_parser("bench", help="run a benchmark, writing JSON and a PNG")
    b.add_argument("name", choices=list(BENCHMARKS))
    b.add_argument("--out", default="bench-out")
    b.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    b.add_argument("--trace", help="trace: a trace in Mooncake's JSONL format (default: shipped)")
    b.add_argument("--capacities", help="trace: fractions of the working set, e.g. 0.01,0.05")
    b.add_argument("--policies", help="trace: eviction policies, e.g. lru,arc,prefix")
    b.add_argument(
        "--main-only",
        action="store_true",
        help="trace: only the host-tier sweep of each policy and capacity",
    )
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or "warning").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("tokens", "batch", "turns", "context_tokens", "reply_tokens", "block_size"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            print(
                f"error: --{name.replace('_', '-')} must be positive, got {value}", file=sys.stderr
            )
            return 2
    try:
        code: int = args.func(args)
    except (ConfigError, SpecError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CtlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if e.code != "bad_request" else 2
    except (TimeoutError, OSError) as e:  # no daemon, no broker, no reply, a port taken
        print(f"error: {e}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
