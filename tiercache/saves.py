"""The host side of a save: reserve host slots for the blocks a cache lacks, commit them
visible once filled, or abort them unfilled.

One save transaction (``tiercache.transaction.save_rounds``) is these three steps, whoever
fills the slots: the embedded cache (a copy), a socket client (through the shared arena) or
the daemon's kernels (an attached engine). It is part of the ``TierManager`` (it works on
the manager's index, rooms and sessions under the manager's lock, ``tiercache.lock``), kept
in a module of its own as the write path.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tiercache.errors import BlockShapeError, Draining
from tiercache.index import HOST, Entry
from tiercache.keys import Namespace, Tokens, keys_of
from tiercache.results import Reservation, SaveResult
from tiercache.sessions import window
from tiercache.storage_format import check_records, parse_format
from tiercache.transaction import abort_later

if TYPE_CHECKING:
    import torch

    from tiercache.manager import TierManager
    from tiercache.tiers.host import HostArena


def fill_slots(host: HostArena, r: Reservation, data: torch.Tensor, done: int) -> None:
    """An embedded save's fill: rows ``done + r.rows`` of ``data`` copied into ``r``'s slots,
    the copy timed (``Reservation.fill_seconds``) for the commit's transfer sample."""
    t0 = time.perf_counter()
    host.write(r.slots, data, [done + row for row in r.rows])
    r.fill_seconds = time.perf_counter() - t0


class HostSaves:
    def __init__(self, manager: TierManager) -> None:
        self._m = manager

    async def reserve(
        self,
        ns: Namespace,
        tokens: Tokens,
        first_block: int = 0,
        count: int | None = None,
        session: str | None = None,
    ) -> Reservation:
        """Host slots for the blocks ``first_block .. first_block+count`` the cache lacks.

        The slots are the caller's to fill until ``commit`` makes them visible (or ``abort``
        frees them); nothing else can see or evict them. When the host tier runs out of
        evictable room the reservation stops early: ``walked`` says how many blocks it
        covered, and the caller commits and asks again for the rest.
        """
        m = self._m
        if m.draining:
            raise Draining("the cache is draining: saves are not taken (reads are served)")
        await m._expire_due()
        array = ns.array if ns.array in m.namespaces else await m.register(ns)
        keys = keys_of(ns, tokens)
        n = len(keys) - first_block if count is None else count
        if first_block < 0 or n < 0 or first_block + n > len(keys):
            raise BlockShapeError(
                f"{n} blocks from block {first_block} do not fit the "
                f"{len(keys)} full blocks of the sequence"
            )
        r = Reservation(ns, array, keys, session, first_block)
        async with m._lock:
            try:
                return await self._reserve_locked(r, n)
            except BaseException:  # cancelled or failed mid-walk: no slot may stay taken
                self._free(r)
                raise

    async def _reserve_locked(self, r: Reservation, n: int) -> Reservation:
        m, keys, first_block, nbytes = self._m, r.keys, r.first_block, r.ns.block_nbytes
        m._check_open()
        # Room for the blocks it lacks in one go (when the free slots may not do); with an
        # admission threshold only admitted blocks make room, one by one.
        if m.admission.threshold == 1 and n > m.host.free_slots:
            await m.host_room.make_room(
                sum(1 for k in keys[first_block : first_block + n] if k not in m.index)
            )
        if r.session:  # of a windowed group's chain, a pin protects its window
            await m.sessions.extend(r.session, keys, r.ns.hex, window(r.ns.spec, keys))
        for i in range(n):
            key = keys[first_block + i]
            entry = m.index.get(key)
            if entry is not None:
                r.present += 1
                m._touch([entry])
            elif not m.admission.admit(key):
                r.rejected += 1
            else:
                try:
                    slot = await m.host_room.slot_or_none()  # may write back: may be cancelled
                except BaseException:
                    m.admission.refund(key)  # admitted, never stored: its next offer still is
                    raise
                if slot is None:
                    m.admission.refund(key)  # its next offer (the caller's next round) stores it
                    if not r.entries:
                        r.rejected += n - i
                        r.walked = n
                        m.stats.error("host_full")
                    return r
                r.entries.append(Entry(key, r.array, nbytes, at={HOST: slot}))
                r.rows.append(i)
            r.walked = i + 1
        return r

    async def commit(self, r: Reservation) -> SaveResult:
        """Make a filled reservation's blocks visible (and write them through to disk). A
        commit cancelled before it took the blocks (waiting for the lock: a client that went
        away, a caller that gave up) gives their slots back instead."""
        try:
            self._check_records(r)
            return await self._commit(r)
        except BaseException:
            if r.entries:
                abort_later(self.abort(r))
            raise

    def _check_records(self, r: Reservation) -> None:
        """Quantized records as the saver wrote them into the slots (a socket client encodes
        its own): a scale or code ``encode`` never writes is refused, naming the block, before
        the blocks become visible."""
        fmt = parse_format(r.ns.store_dtype)
        if fmt != "exact":
            blocks = [r.first_block + row for row in r.rows]
            check_records(r.ns.spec, self._m.host.buffer, fmt, r.slots, blocks)

    async def _commit(self, r: Reservation) -> SaveResult:
        m = self._m
        async with m._lock:
            # From here the entries are the index's: an abort (after a cancel or a failed
            # write-through below) must not free their slots, so the reservation lets go now.
            reserved, r.entries = r.entries, []
            entries: list[Entry] = []
            present = r.present
            now = time.monotonic()
            # A windowed group's block is used without the blocks before it (a window starts
            # anywhere): it hangs from no parent, else retiring the previous window would
            # make the new one's first block an orphan, evicted before anything else.
            chained = r.ns.spec.max_tokens is None
            for e, row in zip(reserved, r.rows, strict=True):
                if e.key in m.index:
                    # Committed since the reserve (another save of the same blocks, or the
                    # key twice in this chain): the held block stays, this copy's slot goes
                    # back. Replacing the entry would orphan the held one's slot for good.
                    slot = e.host_slot
                    assert slot is not None
                    m.host.free(slot)
                    present += 1
                    continue
                entries.append(e)
                e.last_use = now
                m.index.add(e)
                i = r.first_block + row  # the block's place in its chain: its parent, position
                parent = r.keys[i - 1] if i and chained else None
                m.host_room.place(e, None, parent, i * r.ns.spec.block_size)
            sess = m.sessions[r.session] if r.session and r.session in m.sessions else None
            if sess is not None and sess.pinned:
                m.sessions.pin_keys(sess)
            if m.shared is not None:
                m.shared.saved(entries, sess.keys if sess is not None and sess.pinned else [])
            nbytes = len(entries) * r.ns.block_nbytes
            # Timed by the copy, where this process made it; never by this bookkeeping.
            m.stats.transfer("client", HOST, nbytes, r.fill_seconds if entries else None)
            pinned = sess is not None and sess.pinned
            if (m.write.write_on_save or pinned) and m.disk_room is not None and entries:
                # A disk write under the lock (tiercache.lock): write-through means the save's
                # reply says the blocks are on disk. Write-back (the default) avoids it, but
                # for a pinned session, whose pin must outlive a crash (TierManager.pin).
                await m.disk_room.write(entries, m.host)
        return SaveResult(len(entries), present, r.rejected)

    async def abort(self, r: Reservation) -> None:
        """Give back a reservation's slots unfilled (a client that died or gave up)."""
        async with self._m._lock:
            self._free(r)

    def _free(self, r: Reservation) -> None:
        """Under the lock: the reservation's slots back to the arena (once: then it is empty).
        Its blocks were admitted but are not stored: their next offer admits them."""
        for e in r.entries:
            self._m.admission.refund(e.key)
        for slot in r.slots:
            self._m.host.free(slot)
        r.entries = []
