"""Counters of what the cache did, in base units, keyed by bounded labels only.

The manager reports every event here; the daemon's Prometheus exporter
subclasses ``Stats`` to turn the same calls into metrics, so the data path
never knows which observer it has. Labels are tier names, results and error
kinds: never a block key or a session id (unbounded cardinality).
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

# Set while a request is being timed: a request that runs another timed operation (a socket
# request that runs a manager operation) is observed once, by the outermost.
_IN_REQUEST: ContextVar[bool] = ContextVar("tiercache_in_request", default=False)


@dataclass
class Stats:
    lookups: Counter[str] = field(
        default_factory=Counter
    )  # result ("host", "disk", "miss") -> blocks
    transfer_bytes: Counter[tuple[str, str]] = field(default_factory=Counter)
    evictions: Counter[str] = field(default_factory=Counter)  # tier -> blocks
    prefetch: Counter[str] = field(default_factory=Counter)  # early, late, done, partial, noop
    errors: Counter[str] = field(default_factory=Counter)  # kind -> count
    corrupt_blocks: int = 0
    dropped_blocks: int = 0  # evicted from the last tier holding them (cache loss, not data loss)

    def lookup(self, result: str, blocks: int) -> None:
        self.lookups[result] += blocks

    def transfer(self, src: str, dst: str, nbytes: int, seconds: float | None) -> None:
        """``nbytes`` moved from ``src`` to ``dst``; ``seconds`` is None when the copy was not
        timed here (a client copying out of the shared arena in its own process)."""
        self.transfer_bytes[(src, dst)] += nbytes

    def evicted(self, tier: str, blocks: int = 1) -> None:
        self.evictions[tier] += blocks

    def prefetched(self, result: str, lead_seconds: float | None = None) -> None:
        self.prefetch[result] += 1

    def dropped(self, blocks: int = 1) -> None:
        """Blocks evicted from the last tier that held them (a cache loss, not a data loss)."""
        self.dropped_blocks += blocks

    def corrupt(self, blocks: int = 1) -> None:
        self.corrupt_blocks += blocks

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def request(self, op: str, seconds: float) -> None:
        """One API operation finished (the exporter keeps a latency histogram)."""

    def timing(self, op: str) -> _Timing:
        """Observe one request of ``op`` when it succeeds, unless an outer request is being
        timed already (then that one is the observation). A class, not a generator context
        manager: it runs on every request (a generator's costs ~3 us more)."""
        return _Timing(self, op)

    def as_dict(self) -> dict[str, object]:
        return {
            "lookup_blocks": dict(self.lookups),
            "transfer_bytes": {f"{s}->{d}": n for (s, d), n in self.transfer_bytes.items()},
            "evictions": dict(self.evictions),
            "prefetch": dict(self.prefetch),
            "errors": dict(self.errors),
            "corrupt_blocks": self.corrupt_blocks,
            "dropped_blocks": self.dropped_blocks,
        }


class _Observed(Protocol):
    stats: Stats


class _Timing:
    __slots__ = ("_op", "_stats", "_t0", "_token")

    def __init__(self, stats: Stats, op: str) -> None:
        self._stats, self._op = stats, op
        self._token: Token[bool] | None = None
        self._t0 = 0.0

    def __enter__(self) -> None:
        if not _IN_REQUEST.get():
            self._token = _IN_REQUEST.set(True)
            self._t0 = time.perf_counter()

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if self._token is None:
            return
        _IN_REQUEST.reset(self._token)
        if kind is None:
            self._stats.request(self._op, time.perf_counter() - self._t0)


S = TypeVar("S", bound=_Observed)
P = ParamSpec("P")
T = TypeVar("T")


def timed(
    op: str,
) -> Callable[
    [Callable[Concatenate[S, P], Coroutine[Any, Any, T]]],
    Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
]:
    """Decorate a coroutine method of an object with ``stats``: one request of ``op`` each call."""

    def deco(
        fn: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
    ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
        @functools.wraps(fn)
        async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
            with self.stats.timing(op):
                return await fn(self, *args, **kwargs)

        return wrapper

    return deco
