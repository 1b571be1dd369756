"""Sessions: a chat's name, the chains of block keys it saved, its pin and its TTL.

A session is what operators steer by name (``pin``, ``unpin``, ``evict``, ``prefetch``, TTLs
over the socket and MQTT): the blocks themselves are keyed by content, the session only
names a chain of them, one per namespace it saved in (a model with several KV cache groups
saves each group in a namespace of its own, so pin, evict, TTL and prefetch by session
reach every group). Pins belong to keys, not entries (``Index.pins``): a block of a
pinned session stays protected even if its copy is dropped (a corrupt disk copy) and saved
again. Records are persisted to the disk tier on every change of chain, pin or TTL, so
pins and TTLs survive a restart.

Everything here runs under the manager's lock (``TierManager``), which it does not take
itself; persisting a record is a small write to the disk tier's session store, made under
the lock so that a record never lags the state another request already saw.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tiercache.errors import SessionPinned, UnknownSession
from tiercache.groups import needed_blocks
from tiercache.index import Index
from tiercache.keys import BlockKey
from tiercache.spec import KVSpec
from tiercache.stats import Stats
from tiercache.tiers.disk import DiskTier

log = logging.getLogger(__name__)


def window(spec: KVSpec, chain: list[BlockKey]) -> list[BlockKey] | None:
    """The keys of ``chain`` a resume at its end needs, which a pin then protects, for a
    windowed group (``spec``); None for a full or MLA group's chain (all of it)."""
    if spec.max_tokens is None:
        return None
    return [chain[i] for r in needed_blocks(spec, len(chain)) for i in r]


@dataclass(slots=True)
class Session:
    """A named chat: the chain of keys it saved in each namespace, and the protection it asked
    for."""

    id: str
    chains: dict[str, list[BlockKey]] = field(default_factory=dict)  # namespace hex -> chain
    pinned: bool = False
    pinned_keys: set[BlockKey] = field(default_factory=set)  # keys whose pin this session holds
    expires: float | None = None  # wall-clock deadline (time.time()) set by a TTL; None: no TTL
    # Chain -> the keys of it a pin protects, where that is not all of them: a windowed
    # group's window at the chain's end. Not persisted: a restart derives it again from the
    # chain and its namespace's spec on the disk tier (``window``).
    windows: dict[str, list[BlockKey]] = field(default_factory=dict)

    @property
    def keys(self) -> list[BlockKey]:
        """Every key the session names, chain after chain."""
        return [k for chain in self.chains.values() for k in chain]

    @property
    def protected(self) -> list[BlockKey]:
        """The keys a pin of the session protects: its chains, of a windowed one its window."""
        return [k for name, chain in self.chains.items() for k in self.windows.get(name, chain)]

    def stored_runs(
        self, index: Index, spec_of: Callable[[str], KVSpec | None] = lambda name: None
    ) -> list[BlockKey]:
        """What a prefetch of the session reads: of each chain, the run of stored blocks from
        its first stored one; of a windowed group's (``spec_of`` its namespace's spec), the
        stored runs of the blocks a resume at its end needs: its window and sink blocks,
        not older windows left over, nor the sinks alone."""
        out: list[BlockKey] = []
        for name, chain in self.chains.items():
            spec = spec_of(name)
            if spec is not None and spec.max_tokens is not None:
                for r in needed_blocks(spec, len(chain)):
                    out += [e.key for e in index.prefix(chain[r.start : r.stop])]
                continue
            start = next((i for i, k in enumerate(chain) if k in index), len(chain))
            out += [e.key for e in index.prefix(chain[start:])]
        return out


class Sessions:
    """The sessions of one cache, by id; pins are counted on the index."""

    def __init__(self, index: Index, disk: DiskTier | None, stats: Stats) -> None:
        self._index = index
        self._disk = disk
        self._stats = stats
        self._by_id: dict[str, Session] = {}
        self.next_expiry = math.inf  # earliest TTL deadline (time.time())

    def __contains__(self, sid: object) -> bool:
        return sid in self._by_id

    def __getitem__(self, sid: str) -> Session:
        return self._by_id[sid]

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_id.values()))

    def get(self, sid: str) -> Session:
        sess = self._by_id.get(sid)
        if sess is None:
            raise UnknownSession(f"unknown session {sid!r}")
        return sess

    async def restore(self) -> None:
        """Read the sessions persisted on the disk tier (at start)."""
        if self._disk is None:
            return
        for rec in await self._disk.load_sessions():
            keys, chains = list(rec["keys"]), {}
            for name, n in rec.get("chains", [["", len(keys)]]):
                chains[name], keys = keys[:n], keys[n:]
            sess = Session(rec["id"], chains, pinned=rec["pinned"], expires=rec["expires"])
            for name, chain in chains.items():
                # Else a pin would cover the whole chain, and hold the windows a save left
                # over (another process's, which remembers no previous save) until the next.
                spec = self._disk.spec(f"ns/{name}") if name else None
                if spec is not None and (kept := window(spec, chain)) is not None:
                    sess.windows[name] = kept
            self._by_id[sess.id] = sess
            if sess.pinned:
                self.pin_keys(sess)
            if sess.expires is not None:
                self.next_expiry = min(self.next_expiry, sess.expires)

    async def extend(
        self,
        sid: str,
        keys: list[BlockKey],
        chain: str = "",
        window: list[BlockKey] | None = None,
    ) -> Session:
        """The session ``sid``, its chain in namespace ``chain`` (a hex id) extended to ``keys``
        (a longer or new chain replaces it; the record is persisted when it changed).

        ``window``: the keys of ``keys`` a resume at its end needs, for a windowed group. A
        pin then protects those only (``pin_keys``, at the save's commit), and lets go of the
        window the chain ended in before, which can then be evicted (``tiercache.groups``)."""
        sess = self._by_id.get(sid)
        if sess is None:
            sess = self._by_id[sid] = Session(sid)
        old = sess.chains.get(chain, [])
        if len(keys) >= len(old) and keys != old:
            sess.chains[chain] = keys
            if window is None:
                sess.windows.pop(chain, None)
            else:
                sess.windows[chain] = window
            # A pin follows the chains, as a restart rebuilds it from them: the keys a
            # replaced chain named and no chain names now lose this session's pin (a
            # windowed chain's previous window goes at the commit: ``pin_keys``).
            self._unpin_keys(sess, sess.pinned_keys.difference(sess.keys))
            await self.persist(sess)
        return sess

    async def persist(self, sess: Session) -> None:
        """Write a session's record to the disk tier, so pins and TTLs survive a restart."""
        if self._disk is None:
            return
        try:
            await self._disk.put_session(sess.id, sess.chains, sess.pinned, sess.expires)
        except OSError as e:
            self._stats.error("session_write")
            log.warning("could not persist session record: %s", e)

    async def pin(self, sid: str) -> int | None:
        """Pin ``sid``; returns how many of its stored blocks it pins (None: it already was)."""
        sess = self.get(sid)
        if sess.pinned:
            return None
        sess.pinned = True
        n = self.pin_keys(sess)
        await self.persist(sess)
        return n

    async def unpin(self, sid: str) -> int:
        """Unpin ``sid``; returns how many of its stored blocks lost the pin (0: it was not pinned)."""
        sess = self.get(sid)
        if not sess.pinned:
            return 0
        sess.pinned = False
        n = self._unpin_keys(sess)
        await self.persist(sess)
        return n

    def pin_keys(self, sess: Session) -> int:
        """Pin every key ``sess`` protects not yet pinned by it, and unpin those it no longer
        protects (a windowed chain's older window); returns how many it pinned are stored."""
        want = sess.protected
        self._unpin_keys(sess, sess.pinned_keys - set(want))
        n = 0
        for k in want:
            if k not in sess.pinned_keys:
                self._index.pin(k)
                sess.pinned_keys.add(k)
                n += k in self._index
        return n

    def _unpin_keys(self, sess: Session, keys: set[BlockKey] | None = None) -> int:
        """Drop ``sess``'s pin of ``keys`` (default: all it holds); returns how many are stored."""
        n = 0
        for k in list(sess.pinned_keys if keys is None else keys):
            self._index.unpin(k)
            n += k in self._index
            sess.pinned_keys.discard(k)
        return n

    async def set_ttl(self, sid: str, seconds: float | None) -> None:
        """After ``seconds`` the session is forgotten and its blocks evicted (None clears it)."""
        if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
            # nan is a deadline never due, inf one never reached: None is how to have no TTL
            raise ValueError(f"ttl must be positive finite seconds, got {seconds}")
        sess = self.get(sid)
        sess.expires = None if seconds is None else time.time() + seconds
        if sess.expires is not None:
            self.next_expiry = min(self.next_expiry, sess.expires)
        await self.persist(sess)

    def due(self, now: float) -> list[str]:
        """The sessions whose TTL has passed at ``now``; moves ``next_expiry`` past them."""
        deadlines = [s.expires for s in self._by_id.values() if s.expires is not None]
        self.next_expiry = min((d for d in deadlines if d > now), default=math.inf)
        return [s.id for s in self._by_id.values() if s.expires is not None and s.expires <= now]

    async def forget(self, sid: str, *, force: bool = False) -> list[BlockKey]:
        """Forget ``sid`` (a pinned one needs ``force``: TTL expiry); returns its keys that no
        other session names (the blocks to evict with it)."""
        sess = self.get(sid)
        if sess.pinned and not force:
            raise SessionPinned(f"session {sid!r} is pinned; unpin it first")
        self._unpin_keys(sess)
        del self._by_id[sid]
        if self._disk is not None:
            try:
                await self._disk.delete_session(sid)
            except OSError as err:
                self._stats.error("session_write")
                log.warning("could not delete the session record: %s", err)
        shared = {k for s in self._by_id.values() for k in s.keys}
        return [k for k in sess.keys if k not in shared]

    def pinned_blocks(self) -> int:
        """Stored blocks some pinned session protects."""
        return sum(1 for k, n in list(self._index.pins.items()) if n > 0 and k in self._index)
