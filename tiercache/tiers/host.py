"""Host tier: one preallocated arena of fixed-size slots.

The arena is allocated (and its pages faulted in) once at start and carved into ``capacity // slot_bytes``
slots; a free list (a deque of slot ids) makes allocate and free O(1), and the
byte budget can never be exceeded because nothing is ever allocated after
start. When CUDA is present the whole arena is registered with
``cudaHostRegister`` once (page-locked), so host<->device copies are DMA
without a per-block registration; on a CPU-only machine that step is skipped.

With ``shared=True`` the arena is a file in ``/dev/shm`` (mode 0600) that a CPU
engine in another process maps by name and copies its KV into and out of
directly: block bytes never travel through the control socket. Python's
``multiprocessing.shared_memory`` was rejected because before 3.13 its
resource tracker unlinks the segment when *any* attaching process exits.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")


def _runs(slots: Sequence[int], rows: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """(first slot, first row, length) of each run where slots and rows both go up by one."""
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1 or rows[i] != rows[i - 1] + 1:
            yield slots[start], rows[start], i - start
            start = i


def shm_free(shm_dir: Path = SHM_DIR) -> int:
    """Bytes an unprivileged process can still put in ``shm_dir`` (a tmpfs)."""
    st = os.statvfs(shm_dir)
    return st.f_bavail * st.f_frsize


def stale_arenas(shm_dir: Path = SHM_DIR) -> list[tuple[Path, int]]:
    """Shared arenas whose daemon died without closing them (kill -9), with the bytes each
    holds.

    Arena files are named ``tiercache-<owner pid>-<random>``: one whose owner
    no longer exists is garbage, and would otherwise hold its memory until reboot.
    """
    stale: list[tuple[Path, int]] = []
    for path in shm_dir.glob("tiercache-*-*"):
        m = re.fullmatch(r"tiercache-(\d+)-[0-9a-f]+", path.name)
        if m is None:
            continue
        try:
            os.kill(int(m[1]), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                stale.append((path, path.stat().st_blocks * 512))
        except PermissionError:
            pass  # alive, another user's
    return stale


def reap_stale_arenas(shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove the arenas ``stale_arenas`` finds; returns their names."""
    gone: list[str] = []
    for path, _ in stale_arenas(shm_dir):
        path.unlink(missing_ok=True)
        gone.append(path.name)
    return gone


# The most slots an arena is carved into. Each slot costs ~40 B of bookkeeping (its free-list
# entry and used flag now, its index entry once filled), carved all at once: a block of a few
# bytes (a hand-made spec) made a 1 GiB arena 256 M slots, ~10 GiB of the daemon's memory and
# seconds of its event loop, and left every real model's block refused as too big. 2**24 is
# 1 TiB of 64 KiB blocks, smaller than any real model's.
MAX_SLOTS = 2**24


def slot_count(budget_bytes: int, slot_bytes: int) -> int:
    """How many slots of ``slot_bytes`` an arena of ``budget_bytes`` is carved into; a
    ValueError saying why it cannot be (checked before anything is carved)."""
    if slot_bytes <= 0:
        raise ValueError(f"host arena slot size must be positive, got {slot_bytes}")
    if budget_bytes < slot_bytes:
        raise ValueError(
            f"host tier budget ({budget_bytes} B) is smaller than one block "
            f"({slot_bytes} B); raise [tiers.host] bytes"
        )
    n = budget_bytes // slot_bytes
    if n > MAX_SLOTS:
        raise ValueError(
            f"a {slot_bytes} B block would carve the {budget_bytes} B host tier into {n} slots, "
            f"more than the {MAX_SLOTS} it keeps track of; host slots are sized by the first "
            "namespace registered: register the real model first or set [tiers.host] "
            f"slot_bytes to at least {-(-budget_bytes // MAX_SLOTS)}"
        )
    return n


class ArenaFull(RuntimeError):
    """No free slot in the host arena (the caller evicts, then retries)."""


class Slots:
    """Copying in and out of fixed-size slots of a uint8 ``buffer`` ``[num_slots, slot_bytes]``:
    the daemon's arena and a client's mapping of it share this."""

    buffer: torch.Tensor
    slot_bytes: int
    num_slots: int

    def view(self, slot: int, nbytes: int | None = None) -> torch.Tensor:
        return self.buffer[slot, : self.slot_bytes if nbytes is None else nbytes]

    def write(
        self,
        slots: Sequence[int],
        src: torch.Tensor,
        rows: Sequence[int] | None = None,
        *,
        non_blocking: bool = False,
    ) -> None:
        """Copy ``src[rows[i]]`` (uint8 ``[*, nbytes]``; rows default to 0..n-1) into ``slots[i]``,
        one ``copy_`` per run of consecutive slots and rows: a run is a plain memcpy, where
        ``index_copy_`` measured at a sixth of memcpy speed and a copy per block pays a
        torch dispatch each (as much as 64 KiB of memcpy). ``non_blocking``: from a GPU, queue
        the copies on the current stream (DMA into the pinned arena) instead of waiting."""
        nbytes = src.shape[1]
        for slot, row, n in _runs(slots, rows if rows is not None else range(len(slots))):
            self.buffer[slot : slot + n, :nbytes].copy_(
                src[row : row + n], non_blocking=non_blocking
            )

    def runs(self, slots: Sequence[int], nbytes: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Each run of consecutive ``slots`` as ``(its index in slots, a view [n, nbytes] of
        the run in place)``: what ``read`` copies, for a caller that copies it elsewhere."""
        for slot, row, n in _runs(slots, range(len(slots))):
            yield row, self.buffer[slot : slot + n, :nbytes]

    def read(
        self,
        slots: Sequence[int],
        out: torch.Tensor,
        rows: Sequence[int] | None = None,
        *,
        non_blocking: bool = False,
    ) -> None:
        """Copy ``slots[i]`` into ``out[rows[i]]`` (rows default to 0..n-1), one ``copy_`` per run;
        ``non_blocking`` as for ``write``."""
        nbytes = out.shape[1]
        for slot, row, n in _runs(slots, rows if rows is not None else range(len(slots))):
            out[row : row + n].copy_(
                self.buffer[slot : slot + n, :nbytes], non_blocking=non_blocking
            )


class HostArena(Slots):
    """Fixed-size slots in one buffer; ``view(slot)`` is a uint8 tensor of ``slot_bytes``."""

    def __init__(
        self,
        slot_bytes: int | None,
        capacity_bytes: int,
        *,
        shared: bool = False,
        name: str | None = None,
        pin: bool | None = None,
    ) -> None:
        """Allocate (and fault in) ``capacity_bytes`` now; carve slots now if ``slot_bytes`` is
        given, else on ``format`` (the daemon learns its block size from the first engine)."""
        if capacity_bytes <= 0:
            raise ValueError(f"host tier budget must be positive, got {capacity_bytes} B")
        self.budget_bytes = capacity_bytes  # allocated; usable capacity is whole slots of it
        self.capacity_bytes = capacity_bytes
        self.shared = shared
        self.name = name or f"tiercache-{os.getpid()}-{secrets.token_hex(4)}"
        self._path: Path | None = None  # the /dev/shm file of a shared arena
        if shared:
            free = shm_free()
            if free < capacity_bytes:
                # Touching pages past a tmpfs's size kills the process with SIGBUS:
                # refuse up front instead.
                raise ValueError(
                    f"{SHM_DIR} has {free} B free, less than the {capacity_bytes} B host tier; "
                    "lower [tiers.host] bytes or enlarge /dev/shm"
                )
            self._path = SHM_DIR / self.name
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, capacity_bytes)
                self._mmap = mmap.mmap(fd, capacity_bytes)
            finally:
                os.close(fd)
        else:
            self._mmap = mmap.mmap(-1, capacity_bytes)
        self._raw = torch.frombuffer(self._mmap, dtype=torch.uint8)
        # Fault every page in now: the budget is really held from the start, and
        # no save pays page faults (which would halve the first copy into a slot).
        self._raw.zero_()
        self.slot_bytes = 0
        self.num_slots = 0
        self.buffer = self._raw[:0].view(0, 0)
        # The free list; _used[slot] mirrors it so a double free is caught.
        self._free: deque[int] = deque()
        self._used = bytearray()
        self.pinned = False
        if pin is None:
            pin = torch.cuda.is_available()
        if pin:
            self._pin()
        if slot_bytes is not None:
            self.format(slot_bytes)

    @property
    def path(self) -> Path | None:
        """The /dev/shm file a shared arena lives in (engines map it by ``name``)."""
        return self._path

    @property
    def formatted(self) -> bool:
        return self.slot_bytes > 0

    def format(self, slot_bytes: int) -> None:
        """Carve the arena into ``capacity // slot_bytes`` slots (once)."""
        if self.formatted:
            raise ValueError(f"host arena already has {self.slot_bytes}-byte slots")
        self.num_slots = slot_count(self.budget_bytes, slot_bytes)
        self.slot_bytes = slot_bytes
        self.capacity_bytes = self.num_slots * slot_bytes
        self.buffer = self._raw[: self.capacity_bytes].view(self.num_slots, slot_bytes)
        self._free = deque(range(self.num_slots))
        self._used = bytearray(self.num_slots)

    def _pin(self) -> None:
        ptr = self._raw.data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(  # type: ignore[no-untyped-call]
            ptr, self.budget_bytes, 0
        )
        if int(err) != 0:
            log.warning(
                "cudaHostRegister of the %d-byte host arena failed (%s); "
                "host<->device copies will be pageable",
                self.budget_bytes,
                err,
            )
        else:
            self.pinned = True

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_bytes(self) -> int:
        return (self.num_slots - len(self._free)) * self.slot_bytes

    def allocate(self) -> int:
        if not self._free:
            raise ArenaFull(f"all {self.num_slots} host slots are in use")
        slot = self._free.popleft()
        self._used[slot] = 1
        return slot

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or not self._used[slot]:
            raise ValueError(f"host slot {slot} is not allocated")
        self._used[slot] = 0
        self._free.append(slot)

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(  # type: ignore[no-untyped-call]
                self._raw.data_ptr()
            )
            self.pinned = False
        del self.buffer, self._raw
        try:
            self._mmap.close()
        except BufferError:
            # A tensor view handed out earlier is still alive; the mapping goes with it.
            log.debug("host arena %s still referenced at close", self.name)
        if self._path is not None:
            self._path.unlink(missing_ok=True)


class MappedArena(Slots):
    """A client's view of a daemon's shared arena (``HostArena(shared=True)``)."""

    def __init__(self, name: str, slot_bytes: int, num_slots: int) -> None:
        path = SHM_DIR / name
        size = slot_bytes * num_slots
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:  # the same type (a lost daemon to the vLLM link), saying why
            raise type(e)(
                e.errno,
                f"cannot map the tiercache daemon's shared arena {path} ({e.strerror}): a CPU "
                "engine must see the daemon's /dev/shm (the same machine or container, or a "
                "shared /dev/shm mount) and, as another user, be in its [daemon] socket_group",
            ) from None
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise ValueError(
                    f"shared arena {path} is {actual} B, smaller than {num_slots} x {slot_bytes} B"
                )
            # The file is the whole budget; the slots are its first num_slots * slot_bytes.
            self._mmap = mmap.mmap(fd, actual)
        finally:
            os.close(fd)
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.buffer = torch.frombuffer(self._mmap, dtype=torch.uint8)[:size].view(
            num_slots, slot_bytes
        )

    def close(self) -> None:
        del self.buffer
        with contextlib.suppress(BufferError):
            self._mmap.close()
