"""Device tier: a pool of fixed-size block slots in one tensor on a torch device.

The hottest copies: blocks a prefetch promoted (disk -> host -> device), which a later load
finds here. It is a read cache over the lower tiers, never the only copy of a block: a block
enters from its host slot, so dropping a device copy (eviction, or the block leaving the
index) loses nothing and needs no write-back. On a GPU the pool lives on ``cuda:N``; with
``device="cpu"`` it is the CPU twin that CI tests, with the same bookkeeping, its copies
running in a worker thread.

The whole budget is allocated once at start (like the host arena) and carved into
``budget // slot_bytes`` slots when the first namespace gives the block size; nothing is
allocated afterwards, so the budget holds. Slots go free -> pending (being filled; invisible)
-> visible (in ``_slots``, in LRU order) -> free. A visible slot being read has a reader
count and is never evicted; a block discarded while it is read or filled keeps its slot
until the copy is done. So a store never overwrites a slot a load is reading, and a load
never sees a slot before its store completed: no torn block either way.

Copies run on the device's two streams (``tiercache.transfer``): host -> device on
``store``, device -> host on ``load``. The host side is the host arena, registered with
CUDA once when it is created (``tiers/host.py``), so these copies are DMA with no per-block
pinning.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tiercache.keys import BlockKey
from tiercache.tiers.host import _runs
from tiercache.transfer import CopyStreams


@dataclass(frozen=True, slots=True)
class PutResult:
    stored: int  # blocks now visible in the tier
    evicted: int  # blocks evicted to make room


def no_cuda(device: str | torch.device) -> str | None:
    """Why a device tier cannot live on ``device`` (a CUDA device torch cannot see), or None.
    Shared by the tier and the daemon's preflight (``daemon/config.preflight``)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"{device}, but torch sees no CUDA device"
    return None


class DeviceTier:
    def __init__(self, capacity_bytes: int, device: str | torch.device) -> None:
        if capacity_bytes <= 0:
            raise ValueError(
                f"device tier budget must be positive, got {capacity_bytes} B; "
                "set [tiers.device] bytes"
            )
        self.device = torch.device(device)
        if (missing := no_cuda(self.device)) is not None:
            raise ValueError(
                f"device tier on {missing}; set [tiers.device] devices or remove [tiers.device]"
            )
        self.budget_bytes = capacity_bytes
        self.capacity_bytes = capacity_bytes
        self._raw = torch.empty(capacity_bytes, dtype=torch.uint8, device=self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # allocated on the default stream; used on ours
        self.streams = CopyStreams(self.device)
        self.slot_bytes = 0
        self.num_slots = 0
        self.buffer = self._raw[:0].view(0, 0)
        self._free: deque[int] = deque()
        self._slots: OrderedDict[BlockKey, int] = OrderedDict()  # visible, least recent first
        self._pending: dict[BlockKey, int] = {}  # being filled by a put
        self._readers: Counter[int] = Counter()  # slot -> reads in flight
        self._orphans: set[int] = set()  # discarded while busy: freed when the copy is done
        # Told, at once, of every block this tier evicts on its own to make room (the index
        # keeps where each block lives: it must never name a copy that is gone).
        self.on_evict: Callable[[BlockKey], None] | None = None

    @property
    def formatted(self) -> bool:
        return self.slot_bytes > 0

    def format(self, slot_bytes: int) -> None:
        """Carve the pool into ``budget // slot_bytes`` slots (once)."""
        if self.formatted:
            raise ValueError(f"device tier already has {self.slot_bytes}-byte slots")
        if not 0 < slot_bytes <= self.budget_bytes:
            raise ValueError(
                f"device tier budget ({self.budget_bytes} B) holds no block of {slot_bytes} B; "
                "raise [tiers.device] bytes"
            )
        self.slot_bytes = slot_bytes
        self.num_slots = self.budget_bytes // slot_bytes
        self.capacity_bytes = self.num_slots * slot_bytes
        self.buffer = self._raw[: self.capacity_bytes].view(self.num_slots, slot_bytes)
        self._free = deque(range(self.num_slots))

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def used_bytes(self) -> int:
        return (self.num_slots - len(self._free)) * self.slot_bytes

    def _slot(self) -> tuple[int, bool] | None:
        """A free slot and whether a block was evicted for it; None when every slot is busy."""
        if self._free:
            return self._free.popleft(), False
        for key, slot in self._slots.items():
            if not self._readers[slot]:
                del self._slots[key]
                if self.on_evict is not None:
                    self.on_evict(key)
                return slot, True
        return None

    async def put(
        self, keys: Sequence[BlockKey], src: torch.Tensor, rows: Sequence[int]
    ) -> PutResult:
        """Copy ``src[rows[i]]`` (uint8 rows of at most ``slot_bytes``: host arena slots) into
        the tier as ``keys[i]``, evicting least recently used blocks for room. Keys already
        here or being stored are skipped; stops early when every slot is busy."""
        if not self.formatted:
            raise ValueError("device tier is not formatted: register a namespace first")
        if src.shape[1] > self.slot_bytes:
            raise ValueError(f"rows of {src.shape[1]} B do not fit {self.slot_bytes}-byte slots")
        _check_rows(rows, src, "src")
        mine: list[tuple[BlockKey, int, int]] = []  # key, slot, row
        evicted = 0
        for key, row in zip(keys, rows, strict=True):
            if key in self._slots or key in self._pending:
                continue
            got = self._slot()
            if got is None:
                break
            slot, was_evicted = got
            evicted += was_evicted
            self._pending[key] = slot
            mine.append((key, slot, row))
        if not mine:
            return PutResult(0, evicted)
        width = src.shape[1]
        slots, srcrows = [s for _, s, _ in mine], [r for _, _, r in mine]

        def copy() -> None:
            for slot, row, n in _runs(slots, srcrows):
                self.buffer[slot : slot + n, :width].copy_(src[row : row + n], non_blocking=True)

        copying = asyncio.ensure_future(self.streams.run("store", copy))
        try:
            await asyncio.shield(copying)
        except BaseException:
            # Failed or cancelled: the slots go back free, but a cancelled copy goes on (in a
            # worker thread, or queued on the store stream), so only once it has ended: a
            # slot freed before would take the next put's block and then this one's bytes.
            _when_done(copying, lambda: self._settle(mine, False))
            raise
        return PutResult(self._settle(mine, True), evicted)

    def _settle(self, mine: list[tuple[BlockKey, int, int]], ok: bool) -> int:
        """A put's slots once its copy has ended: visible only if the copy completed and the
        key was not discarded meanwhile; any other slot goes back to the free list."""
        stored = 0
        for key, slot, _ in mine:
            filled = self._pending.get(key) == slot
            if filled:
                del self._pending[key]
            if ok and filled and slot not in self._orphans:
                self._slots[key] = slot
                stored += 1
            else:
                self._orphans.discard(slot)
                self._free.append(slot)
        return stored

    def hold(self, keys: Sequence[BlockKey]) -> list[int]:
        """The slots of ``keys`` (all visible here: check with ``in``), held against eviction
        until ``unhold``, and marked most recently used. For a caller that queues its own
        copies out of ``buffer`` (the scatter into an engine's cache)."""
        slots = []
        for key in keys:
            slot = self._slots.get(key)
            if slot is None:
                raise KeyError(f"block {key.hex()[:16]} is not in the device tier")
            slots.append(slot)
        for key, slot in zip(keys, slots, strict=True):
            self._slots.move_to_end(key)
            self._readers[slot] += 1
        return slots

    def unhold(self, slots: Sequence[int]) -> None:
        """Give back ``hold``'s slots once the copies out of them have completed."""
        for slot in slots:
            self._readers[slot] -= 1
            if not self._readers[slot]:
                del self._readers[slot]
                if slot in self._orphans:
                    self._orphans.discard(slot)
                    self._free.append(slot)

    async def read(self, keys: Sequence[BlockKey], out: torch.Tensor, rows: Sequence[int]) -> None:
        """Copy blocks ``keys`` (all visible here: check with ``in``) into ``out[rows[i]]``,
        the first ``out.shape[1]`` bytes of each slot; marks them most recently used."""
        _check_rows(rows, out, "out")
        slots = self.hold(keys)
        width = out.shape[1]

        def copy() -> None:
            for slot, row, n in _runs(slots, rows):
                out[row : row + n].copy_(self.buffer[slot : slot + n, :width], non_blocking=True)

        try:
            # Cancelled, it raises once the copy has ended (``transfer.outlast_cancel``): the
            # copy reads the slots and writes the caller's ``out`` until then.
            await self.streams.run("load", copy)
        finally:
            self.unhold(slots)

    def discard(self, key: BlockKey) -> bool:
        """Forget ``key``'s copy; its slot is free at once, or when the copy using it is done."""
        slot = self._slots.pop(key, None)
        if slot is None:
            slot = self._pending.get(key)
            if slot is None:
                return False
            self._orphans.add(slot)  # the put that fills it frees it
            return True
        if self._readers[slot]:
            self._orphans.add(slot)
        else:
            self._free.append(slot)
        return True

    def close(self) -> None:
        self.streams.synchronize()
        self._slots.clear()
        del self.buffer, self._raw


def _check_rows(rows: Sequence[int], t: torch.Tensor, what: str) -> None:
    """Every row inside ``t``: a row past its end was cut off by the slicing, and a run cut to
    one row was broadcast over every slot of the run (a block stored as another's bytes)."""
    if rows and not 0 <= min(rows) <= max(rows) < t.shape[0]:
        bad = next(r for r in rows if not 0 <= r < t.shape[0])
        raise ValueError(f"row {bad} is out of range for {what} of {t.shape[0]} rows")


def _when_done(task: asyncio.Future[None], then: Callable[[], object]) -> None:
    """``then()`` now if ``task`` has ended, else when it does."""
    if task.done():
        then()
    else:
        task.add_done_callback(lambda _: then())
