"""``tiercache status`` and ``tiercache ctl VERB``: operator commands to a running daemon.

A command goes over MQTT when ``[mqtt]`` is configured (it reaches any node
by name), else over the local socket. Long operations (flush, drain, prefetch
of a session) show a progress bar on a terminal, measured by polling ``stats``
on a second channel while the command runs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, TextIO

from tiercache.client import AsyncClient, RemoteError
from tiercache.daemon.config import Config
from tiercache.spec import format_size

LONG_VERBS = ("flush", "drain", "prefetch")
STRING_ARGS = ("session", "name")  # never JSON-parsed: the verbs take only strings there


class CtlError(RuntimeError):
    """The daemon refused a command (``code``) or could not be reached."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def parse_args(items: list[str]) -> dict[str, Any]:
    """``["session=chat-1", "value=3", "name=policy.admission"]`` -> a dict; values are JSON
    when they parse as JSON (numbers, true/false/null, lists), else strings. ``NaN``,
    ``Infinity`` and ``1e999`` stay strings: JSON has no such numbers (MQTT could not send them).
    A session id or a setting's name is always a string, ``session=42`` too."""

    def no_constants(name: str) -> None:
        raise ValueError(name)

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CtlError("bad_request", f"argument {item!r} is not key=value")
        if key in STRING_ARGS:
            out[key] = raw
            continue
        try:
            value = json.loads(raw, parse_constant=no_constants)
            json.dumps(value, allow_nan=False)  # 1e999 parses, as infinity
        except ValueError:  # JSONDecodeError too
            value = raw
        out[key] = value
    return out


async def request(
    cfg: Config, verb: str, args: dict[str, Any], node: str | None = None
) -> dict[str, Any]:
    """One verb to the daemon; its result, or CtlError."""
    if cfg.mqtt.host:
        from tiercache.daemon.mqtt import request as mqtt_request

        # A flush or drain over MQTT waits as long as the node is up, as over the socket.
        reply = await mqtt_request(cfg.mqtt, verb, args, node=node, patient=verb in LONG_VERBS)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise CtlError(str(err.get("code")), str(err.get("message")))
        result: dict[str, Any] = reply.get("result") or {}
        return result
    try:
        client = await AsyncClient.connect(cfg.daemon.socket, name="tiercache-ctl")
    except ConnectionError as e:
        raise CtlError("unreachable", str(e)) from None
    try:
        return await client.ctl(verb, **args)
    except RemoteError as e:
        raise CtlError(e.code, e.message) from None
    finally:
        await client.close()


async def run_with_progress(
    cfg: Config, verb: str, args: dict[str, Any], node: str | None = None, out: TextIO = sys.stderr
) -> dict[str, Any]:
    """``request``, with a progress line on ``out`` while a long verb runs (terminals only).

    The line is only a view: a poll that fails (a timeout, a ``busy`` node, a dropped
    connection) is skipped and the next one tried, and ctl ends with the verb's own outcome."""
    task = asyncio.create_task(request(cfg, verb, args, node))
    if verb not in LONG_VERBS or not out.isatty():
        return await task
    start: dict[str, Any] | None = None  # the first poll that answered
    t0 = time.monotonic()
    try:
        while not task.done():
            poll = asyncio.create_task(_poll(cfg, node))
            # A slow poll never holds up the verb's answer.
            await asyncio.wait({task, poll}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                poll.cancel()
                await asyncio.gather(poll, return_exceptions=True)
                break
            now = poll.result()
            if now is not None:
                start = start if start is not None else now
                out.write("\r" + _progress_line(verb, start, now, time.monotonic() - t0))
                out.flush()
            await asyncio.wait({task}, timeout=0.25)
    finally:
        out.write("\r" + " " * 78 + "\r")
    return await task


async def _poll(cfg: Config, node: str | None) -> dict[str, Any] | None:
    """The daemon's stats for a progress line, or None if this poll failed."""
    try:
        return await request(cfg, "stats", {}, node)
    except (CtlError, OSError, ValueError):  # OSError: timeouts and lost connections
        return None


def _progress_line(verb: str, start: dict[str, Any], now: dict[str, Any], elapsed: float) -> str:
    if verb in ("flush", "drain") and start.get("dirty_blocks"):
        total, left = start["dirty_blocks"], now.get("dirty_blocks", 0)
        frac = min(1.0, max(0.0, (total - left) / total))
        bar = "#" * int(frac * 30)
        return f"{verb}: [{bar:<30}] {total - left}/{total} blocks  {elapsed:5.1f}s"
    moved = now.get("transfer_bytes", {}).get("disk->host", 0) - start.get(
        "transfer_bytes", {}
    ).get("disk->host", 0)
    return f"{verb}: {format_size(max(0, moved))} promoted  {elapsed:5.1f}s"


def _remote_line(r: dict[str, Any]) -> str:
    """The shared tier in one line: whether its store answers (why not, when it retries),
    its write-behind queue and what it uploaded and dropped."""
    health = (
        "up"
        if r.get("up")
        else f"DOWN (retry in {r.get('retry_in_s', 0):.1f}s; {r.get('last_error') or 'no answer'})"
    )
    dropped = ", ".join(f"{k} {v}" for k, v in sorted((r.get("dropped_blocks") or {}).items()))
    return (
        f"remote {r.get('url', '')}: {health}, queue {r.get('queue_blocks', 0)} of "
        f"{r.get('queue_bound', 0)}, uploaded {r.get('uploaded_blocks', 0)}, "
        f"dropped {dropped or 'none'}"
    )


def render_status(stats: dict[str, Any]) -> str:
    lines = []
    for tier, u in stats.get("tiers", {}).items():
        cap = u["capacity_bytes"] or 1
        kv = u.get("kv_bytes", u["used_bytes"])  # blocks smaller than the host's slots
        lines.append(
            f"{tier:<5} {format_size(u['used_bytes']):>10} of {format_size(u['capacity_bytes']):>10} "
            f"({100 * u['used_bytes'] / cap:5.1f}%)  {u['blocks']} blocks"
            + (f", {format_size(kv)} of KV in their slots" if kv < u["used_bytes"] else "")
        )
    formats = stats.get("formats") or {}
    if len(formats) > 1 or any(f != "exact" for f in formats):  # all exact: nothing to say
        per = "; ".join(
            f"{fmt} " + ", ".join(f"{t} {n}" for t, n in sorted(tiers.items()))
            for fmt, tiers in sorted(formats.items())
        )
        lines.append(f"formats: {per}")
    lookups = stats.get("lookup_blocks", {})
    total = sum(lookups.values()) or 1
    hits = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(lookups.items()))
    lines.append(
        f"blocks {stats.get('blocks', 0)}, sessions {stats.get('sessions', 0)}, "
        f"pinned {stats.get('pinned_blocks', 0)}, dirty {stats.get('dirty_blocks', 0)}"
    )
    lines.append(f"lookups: {hits or 'none yet'}")
    lines.append(
        f"corrupt blocks {stats.get('corrupt_blocks', 0)}, errors {stats.get('errors', {}) or 'none'}"
    )
    if remote := stats.get("remote"):
        lines.append(_remote_line(remote))
    policy = stats.get("policy", {})
    lines.append(
        f"policy: {policy.get('eviction')}, {policy.get('write')}, admission {policy.get('admission')}"
        + ("  (draining)" if stats.get("draining") else "")
    )
    return "\n".join(lines)
