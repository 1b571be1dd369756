"""Fault and load campaigns against a real daemon: what was injected, how often, what was lost.

Each campaign returns a dict with its counts; "lost" and "wrong_bytes_served"
must be 0. The test suite runs every campaign with small counts
(tests/bench/test_reliability.py); ``tiercache bench reliability --out docs/results`` runs
them bigger and writes ``reliability.json``, ``reliability.png`` and
``reliability.md`` (the report kept in the repo). Everything runs on this
machine, on loopback and in temporary directories, bounded in count and time.

- kill9: a client saves blocks (write-through) as fast as it can while the
  daemon is SIGKILLed at a different point each round, with a save in flight.
  After a restart every acknowledged block must load byte-exact.
- corruption: bytes flipped inside stored blocks and a shard file truncated;
  every damaged block must be a counted miss, every other one served exact.
- client_kill: clients SIGKILLed while holding read leases and save
  reservations; the daemon must release all of them.
- load: 16 clients (by default) run a mix of saves, lookups, loads,
  prefetches, pins and unpins against a host tier under eviction pressure;
  every load is checked byte for byte, and at the end every acknowledged
  conversation is read back (what is not served was lost); the daemon's memory
  is sampled.

Block contents are a function of the block key, so any block served can be
checked without remembering what was saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import torch

from tiercache.bench.common import cli, write
from tiercache.client import AsyncClient, RemoteError
from tiercache.daemon.process import DaemonProcess
from tiercache.keys import Namespace
from tiercache.manager import TierManager
from tiercache.spec import KVSpec

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_size=16)  # 16 KiB
NS = Namespace("reliability", SPEC)
MEMORY_OVERHEAD = (
    768 * 2**20
)  # the daemon's own footprint beyond its host tier: Python, torch, zarr


def content(key: bytes) -> torch.Tensor:
    """The bytes every save of ``key`` writes: a function of the key alone (never zero)."""
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
    return torch.randint(1, 256, (1, SPEC.block_nbytes), dtype=torch.uint8, generator=g)


def chain(seed: int, blocks: int) -> list[int]:
    return [(seed * 7919 + i) % 2**31 for i in range(blocks * SPEC.block_size)]


def blocks_for(tokens: list[int]) -> torch.Tensor:
    return torch.cat([content(k) for k in NS.block_keys(tokens)])


def env(
    workdir: Path, host_blocks: int, disk_blocks: int, write: str = "write-through"
) -> dict[str, str]:
    return {
        "TIERCACHE_TIERS_DISK__URL": str(workdir / "disk"),
        "TIERCACHE_TIERS_DISK__BYTES": str(disk_blocks * SPEC.block_nbytes),
        "TIERCACHE_TIERS_HOST__BYTES": str(host_blocks * SPEC.block_nbytes),
        "TIERCACHE_POLICY__WRITE": write,
        "TIERCACHE_DAEMON__LOG_LEVEL": "warning",
    }


async def _served_exactly(client: AsyncClient, tokens: list[int]) -> tuple[int, int]:
    """Load ``tokens``; (blocks served, blocks served with wrong bytes)."""
    got = await client.load(NS, tokens)
    keys = NS.block_keys(tokens)
    wrong = sum(
        1 for i in range(got.blocks) if not torch.equal(got.data[i : i + 1], content(keys[i]))
    )
    return got.blocks, wrong


# -- kill -9 ---------------------------------------------------------------------


async def kill9(workdir: Path, rounds: int = 3, acks: int = 30, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    daemon = DaemonProcess(workdir, env(workdir, host_blocks=64, disk_blocks=100_000))
    acked: list[list[int]] = []
    in_flight: list[list[int]] = []
    n = 0
    for r in range(rounds):
        await asyncio.to_thread(daemon.start)
        client = await AsyncClient.connect(daemon.socket)
        target = acks + rng.randrange(acks)  # a different kill point each round
        for _ in range(target):
            tokens = chain(1_000_000 * (r + 1) + n, 1)
            n += 1
            await client.save(NS, tokens, blocks_for(tokens))
            acked.append(tokens)
        tokens = chain(1_000_000 * (r + 1) + n, 4)
        n += 1
        pending = asyncio.create_task(client.save(NS, tokens, blocks_for(tokens)))
        await asyncio.sleep(rng.random() * 0.002)
        daemon.kill()  # mid-save: the reply never comes
        in_flight.append(tokens)
        with contextlib.suppress(ConnectionError, RemoteError, asyncio.IncompleteReadError):
            await pending
        await client.close()
    await asyncio.to_thread(daemon.start)
    client = await AsyncClient.connect(daemon.socket)
    recovered = wrong = extra = 0
    for tokens in acked:
        served, bad = await _served_exactly(client, tokens)
        recovered += served
        wrong += bad
    for tokens in in_flight:  # unacknowledged: may or may not be there, never wrong
        served, bad = await _served_exactly(client, tokens)
        extra += served
        wrong += bad
    await client.close()
    daemon.stop()
    return {
        "injected": f"SIGKILL of the daemon with a save in flight, {rounds} times",
        "kills": rounds,
        "acked_blocks": len(acked),
        "recovered_blocks": recovered,
        "lost": len(acked) - recovered,
        "unacked_blocks_found": extra,
        "wrong_bytes_served": wrong,
    }


# -- corruption ------------------------------------------------------------------


async def corruption(
    workdir: Path, blocks: int = 64, flips: int = 8, seed: int = 0
) -> dict[str, Any]:
    rng = random.Random(seed)
    root = str(workdir / "disk")
    seqs = [chain(2_000_000 + i, 1) for i in range(blocks)]
    m = await TierManager.open(
        host_bytes=4 * SPEC.block_nbytes,
        disk_url=root,
        disk_bytes=4 * blocks * SPEC.block_nbytes,
        write="write-through",
    )
    for tokens in seqs:
        await m.save(NS, tokens, blocks_for(tokens))
    assert m.disk is not None
    where: dict[int, tuple[list[int], Path, int]] = {}  # slot -> (tokens, shard file, offset)
    for tokens in seqs:
        e = m.index.get(NS.block_keys(tokens)[0])
        assert e is not None and e.disk is not None
        where[e.disk.slot] = (tokens, *m.disk.location(e.disk))
    await m.close()
    damaged = set(rng.sample(sorted(where), flips))
    # Truncate the last shard file in the middle of its last stored block.
    _, path, offset = where[max(where)]
    truncated = {s for s, (_, p, o) in where.items() if p == path and o >= offset}
    await asyncio.to_thread(
        _damage, [(where[s][1], where[s][2]) for s in damaged], path, offset, rng
    )
    m = await TierManager.open(
        host_bytes=4 * SPEC.block_nbytes, disk_url=root, disk_bytes=4 * blocks * SPEC.block_nbytes
    )
    served = wrong = 0
    for tokens, _, _ in where.values():
        got = await m.load(NS, tokens)
        if got.blocks:
            served += 1
            wrong += int(not torch.equal(got.data, content(NS.block_keys(tokens)[0])))
    missed = blocks - served
    counted = m.disk.corrupt_reads if m.disk else 0
    await m.close()
    bad = damaged | truncated
    return {
        "injected": f"{flips} flipped bits in stored blocks; one shard file truncated mid-block",
        "blocks": blocks,
        "damaged_blocks": len(bad),
        "misses": missed,
        "counted_corrupt": counted,
        "undamaged_served": served,
        "lost": (blocks - len(bad)) - served,
        "wrong_bytes_served": wrong,
    }


def _damage(flips: list[tuple[Path, int]], truncate: Path, at: int, rng: random.Random) -> None:
    for path, offset in flips:
        with open(path, "r+b") as f:
            pos = offset + rng.randrange(SPEC.block_nbytes)
            f.seek(pos)
            byte = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    os.truncate(truncate, at + SPEC.block_nbytes // 2)


# -- clients killed holding leases and reservations ---------------------------------

_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from tiercache.bench.reliability import NS, chain
    from tiercache.client import AsyncClient
    from tiercache.keys import KeyChain

    async def main(path, i):
        c = await AsyncClient.connect(path)
        await c.register(NS)
        held = KeyChain(NS.block_keys(chain(3_000_000, 8))).to_bytes()
        await c.call("acquire", ns=NS.hex, keys=held)
        mine = KeyChain(NS.block_keys(chain(3_100_000 + int(i), 2))).to_bytes()
        await c.call("reserve", ns=NS.hex, keys=mine)
        print("holding", flush=True)
        await asyncio.sleep(120)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def client_kill(workdir: Path, clients: int = 4) -> dict[str, Any]:
    daemon = DaemonProcess(workdir, env(workdir, host_blocks=64, disk_blocks=4096))
    await asyncio.to_thread(daemon.start)
    admin = await AsyncClient.connect(daemon.socket)
    shared = chain(3_000_000, 8)
    await admin.save(NS, shared, blocks_for(shared))
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HOLDER, str(daemon.socket), str(i), stdout=subprocess.PIPE
        )
        for i in range(clients)
    ]
    for p in procs:
        assert p.stdout is not None
        line = await asyncio.wait_for(p.stdout.readline(), 60)
        assert line.strip() == b"holding", line
    held = await admin.stats()
    for p in procs:
        p.send_signal(signal.SIGKILL)
        await p.wait()
    after: dict[str, Any] = {}
    for _ in range(200):  # the daemon notices each closed connection on its own
        after = await admin.stats()
        if after["leased_blocks"] == 0 and after["reserved_slots"] == 0:
            break
        await asyncio.sleep(0.02)
    await admin.close()
    daemon.stop()
    return {
        "injected": f"SIGKILL of {clients} clients holding a read lease and a save reservation each",
        "clients_killed": clients,
        "leased_blocks_before": held["leased_blocks"],
        "reserved_slots_before": held["reserved_slots"],
        "leased_blocks_after": after["leased_blocks"],
        "reserved_slots_after": after["reserved_slots"],
        "lost": after["leased_blocks"] + after["reserved_slots"],
    }


# -- load --------------------------------------------------------------------------


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def load(
    workdir: Path, clients: int = 16, seconds: float = 10.0, seed: int = 0
) -> dict[str, Any]:
    host_blocks = 256
    daemon = DaemonProcess(
        workdir, env(workdir, host_blocks=host_blocks, disk_blocks=100_000, write="write-back")
    )
    await asyncio.to_thread(daemon.start)
    lat: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    wrong = served = 0
    acked: dict[tuple[int, int], list[int]] = {}  # (client, conversation): its longest saved turn
    rss: list[int] = []
    deadline = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal wrong, served
        rng = random.Random(seed * 1000 + w)
        c = await AsyncClient.connect(daemon.socket, name=f"load-{w}")
        mine: list[list[int]] = []  # this client's conversations (session = index)

        async def timed(op: str, call: Awaitable[Any]) -> Any:
            t0 = time.perf_counter()
            try:
                return await call
            except RemoteError as e:
                errors[f"{op}: {e.code}: {e.message[:120]}"] += 1
                return None
            except ConnectionError as e:
                errors[f"{op}: {type(e).__name__}: {e}"] += 1
                return None
            finally:
                lat[op].append(time.perf_counter() - t0)

        while time.monotonic() < deadline:
            op = rng.choices(["save", "lookup", "load", "prefetch", "pin"], [3, 4, 4, 1, 1])[0]
            if op == "save" or not mine:
                if mine and rng.random() < 0.5:  # the next turn of a conversation
                    i = rng.randrange(len(mine))
                    tokens = mine[i] + chain(rng.randrange(2**30), rng.randint(1, 4))
                    mine[i] = tokens
                else:
                    i = len(mine)
                    tokens = chain(rng.randrange(2**30), rng.randint(2, 8))
                    mine.append(tokens)
                saved = await timed(
                    "save", c.save(NS, tokens, blocks_for(tokens), session=f"{w}-{i}")
                )
                if saved is not None and not saved.rejected:  # acknowledged, every block
                    acked[(w, i)] = tokens
            elif op == "lookup":
                tokens = rng.choice(mine)
                await timed("lookup", c.lookup(NS, tokens))
            elif op == "load":
                tokens = rng.choice(mine)
                got = await timed("load", c.load(NS, tokens))
                if got is not None:
                    keys = NS.block_keys(tokens)
                    served += got.blocks
                    wrong += sum(
                        1
                        for j in range(got.blocks)
                        if not torch.equal(got.data[j : j + 1], content(keys[j]))
                    )
            elif op == "prefetch":
                s = f"{w}-{rng.randrange(len(mine))}"
                await timed("prefetch", c.prefetch(session=s))
            else:
                s = f"{w}-{rng.randrange(len(mine))}"
                await timed("pin", c.pin(s))
                await timed("unpin", c.unpin(s))
        await c.close()

    async def sampler() -> None:
        while time.monotonic() < deadline:
            rss.append(_rss(daemon.pid))
            await asyncio.sleep(0.25)

    t0 = time.perf_counter()
    await asyncio.gather(sampler(), *(worker(w) for w in range(clients)))
    elapsed = time.perf_counter() - t0
    # Every acknowledged conversation, read back once the load is over: what is not served
    # (host evictions go to the disk tier, which has room for all) was lost.
    c = await AsyncClient.connect(daemon.socket, name="load-check")
    acked_blocks = lost = 0
    for tokens in acked.values():
        got, bad = await _served_exactly(c, tokens)
        acked_blocks += len(tokens) // SPEC.block_size
        lost += len(tokens) // SPEC.block_size - got
        wrong += bad
    await c.close()
    daemon.stop()
    ops = sum(len(v) for v in lat.values())
    budget = host_blocks * SPEC.block_nbytes + MEMORY_OVERHEAD
    return {
        "injected": f"{clients} clients, {seconds:.0f} s of saves, lookups, loads, prefetches, pins; "
        f"host tier of {host_blocks} blocks under eviction pressure",
        "clients": clients,
        "seconds": elapsed,
        "ops": ops,
        "ops_per_s": ops / elapsed,
        "per_op": {
            op: {
                "n": len(v),
                "p50_s": statistics.median(v),
                "p99_s": sorted(v)[min(len(v) - 1, int(0.99 * len(v)))],
            }
            for op, v in sorted(lat.items())
        },
        "errors": dict(errors),
        "blocks_served": served,
        "wrong_bytes_served": wrong,
        "max_rss_bytes": max(rss, default=0),
        "memory_budget_bytes": budget,
        "within_memory_budget": max(rss, default=0) <= budget,
        "acked_blocks": acked_blocks,
        "lost": lost,
    }


# -- report ------------------------------------------------------------------------

CAMPAIGNS: dict[str, Callable[..., Coroutine[Any, Any, dict[str, Any]]]] = {
    "kill9": kill9,
    "corruption": corruption,
    "client_kill": client_kill,
    "load": load,
}


def plot(result: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_op = result["campaigns"]["load"]["per_op"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ops = list(per_op)
    x = range(len(ops))
    ax.bar([i - 0.2 for i in x], [per_op[o]["p50_s"] * 1e3 for o in ops], width=0.4, label="p50")
    ax.bar([i + 0.2 for i in x], [per_op[o]["p99_s"] * 1e3 for o in ops], width=0.4, label="p99")
    ax.set_xticks(list(x), ops)
    ax.set_ylabel("latency (ms)")
    load_r = result["campaigns"]["load"]
    ax.set_title(
        f"{load_r['clients']} clients, {load_r['ops_per_s']:.0f} ops/s, "
        f"{load_r['wrong_bytes_served']} wrong bytes served"
    )
    ax.legend()
    return fig


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# tiercache reliability report",
        "",
        f"Generated by `tiercache bench reliability` on {result['machine']['date']} "
        f"({result['machine']['cpus']} CPUs). Every campaign ran against a real daemon "
        '(or, for corruption, the disk tier itself); "lost" and "wrong bytes served" must be 0.',
        "",
        "| campaign | what was injected | lost | wrong bytes served | figures |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for name, r in result["campaigns"].items():
        figures = ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in r.items()
            if k not in ("injected", "lost", "wrong_bytes_served", "per_op", "errors")
            and not isinstance(v, dict)
        )
        lines.append(
            f"| {name} | {r['injected']} | {r['lost']} | {r.get('wrong_bytes_served', 0)} | {figures} |"
        )
    load_r = result["campaigns"]["load"]
    lines += [
        "",
        f"Load: {load_r['ops_per_s']:.0f} operations/s over {load_r['seconds']:.1f} s, "
        f"errors {load_r['errors'] or 'none'}, daemon RSS at most "
        f"{load_r['max_rss_bytes'] / 2**20:.0f} MiB against a budget of "
        f"{load_r['memory_budget_bytes'] / 2**20:.0f} MiB (host tier + a stated "
        f"{MEMORY_OVERHEAD // 2**20} MiB for the interpreter, torch and zarr). The clients are "
        "asyncio tasks in one Python process on the same 2 cores as the daemon, so these "
        "latencies include the clients' own CPU time (hashing keys, generating and checking "
        "block bytes): they bound the daemon's latency from above.",
        "",
        "| operation | n | p50 | p99 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for op, s in load_r["per_op"].items():
        lines.append(f"| {op} | {s['n']} | {s['p50_s'] * 1e3:.2f} ms | {s['p99_s'] * 1e3:.2f} ms |")
    lines += [
        "",
        "Fault tests that need a service or root live in the test suite and run on "
        "every CI run: a disk that fills up (a 1 MiB tmpfs), a Mosquitto broker killed and "
        "restarted, Prometheus scraping a daemon under load (tests/scenarios, tests/daemon).",
        "",
    ]
    return "\n".join(lines)


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    sizes: dict[str, dict[str, Any]] = (
        {
            "kill9": {"rounds": 2, "acks": 10},
            "corruption": {"blocks": 32, "flips": 4},
            "client_kill": {"clients": 2},
            "load": {"clients": 4, "seconds": 2.0},
        }
        if quick
        else {
            "kill9": {"rounds": 10, "acks": 50},
            "corruption": {"blocks": 256, "flips": 32},
            "client_kill": {"clients": 8},
            "load": {"clients": 16, "seconds": 30.0},
        }
    )
    results: dict[str, Any] = {}
    for name, fn in CAMPAIGNS.items():
        workdir = Path(tempfile.mkdtemp(prefix=f"tiercache-{name}-"))
        try:
            results[name] = asyncio.run(fn(workdir, **sizes[name]))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    result = {"campaigns": results}
    write(out, "reliability", result, plot(result))
    from tiercache.bench.common import machine

    (out / "reliability.md").write_text(markdown({**result, "machine": machine()}))
    return result


def report(result: dict[str, Any]) -> str:
    return "\n".join(
        f"{name}: lost {r['lost']}, wrong bytes served {r.get('wrong_bytes_served', 0)}"
        for name, r in result["campaigns"].items()
    )


def main(argv: Sequence[str] | None = None) -> int:
    return cli(__doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
