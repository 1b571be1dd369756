"""The read path: copying leased blocks out of their fastest tier, verified.

A load reads each block from the fastest tier holding a complete copy (device, host, then
disk, checksummed on every read); the result counts the leading blocks that verified, so
a load is always a contiguous prefix. Called with the cache lock free: the entries are
leased, so nothing moves them meanwhile.
"""

from __future__ import annotations

import time

import torch

from tiercache.errors import BlockShapeError
from tiercache.index import DEVICE, DISK, HOST, Entry
from tiercache.keys import Namespace
from tiercache.results import check_into, record_rows
from tiercache.stats import Stats
from tiercache.tiers.device import DeviceTier
from tiercache.tiers.disk import DiskRecord, DiskTier
from tiercache.tiers.host import HostArena


def output_rows(out: torch.Tensor | None, n: int, nbytes: int, pin: bool) -> torch.Tensor:
    """``out`` checked to hold ``n`` blocks of ``nbytes`` (uint8 rows), or a new one."""
    if out is None:
        return torch.empty((n, nbytes), dtype=torch.uint8, pin_memory=pin)
    if out.dtype != torch.uint8 or out.dim() != 2 or out.shape[0] < n or out.shape[1] != nbytes:
        raise BlockShapeError(
            f"out must be uint8 [>= {n}, {nbytes}], got {out.dtype} {list(out.shape)}"
        )
    return out


def load_rows(
    ns: Namespace, n: int, out: torch.Tensor | None, into: torch.Tensor | None, pin: bool
) -> torch.Tensor:
    """Where a load of ``n`` blocks of ``ns`` reads their stored records: ``out`` (uint8 rows,
    checked) or new rows (pinned with ``pin``: a device tier's copy to host is then an async
    DMA). With ``into`` instead, the engine's blocks to fill (``[>= n,
    *block_shape]`` of the KV dtype, contiguous, CPU: ``check_into``): ``into``'s own bytes
    (``record_rows``: an exact record is its block, a quantized one is read into its block's
    tail and ``LoadResult.land`` decodes it in place; no staging rows, no copy after).
    Rows past the verified ones are unspecified: a block read after one that failed its
    checksum is in ``into`` (raw, if quantized) but not served."""
    if into is None:
        return output_rows(out, n, ns.block_nbytes, pin)
    if out is not None:
        raise BlockShapeError("load takes out (stored records) or into (engine blocks), not both")
    check_into(ns, n, into)
    rows = record_rows(ns, into[:n])
    return rows if rows is not None else output_rows(None, n, ns.block_nbytes, False)


async def read_entries(
    entries: list[Entry],
    out: torch.Tensor,
    device: DeviceTier | None,
    host: HostArena,
    disk: DiskTier | None,
    stats: Stats,
) -> tuple[list[str], int, list[tuple[int, Entry]], list[tuple[Entry, DiskRecord]]]:
    """Copy the leased ``entries`` into ``out`` from their fastest tier: the tiers read,
    how many leading blocks are verified, the rows read from disk, the disk copies that
    failed verification."""
    rows: dict[str, list[int]] = {DEVICE: [], HOST: [], DISK: []}
    tiers: list[str] = []
    for i, e in enumerate(entries):
        tier = e.best_tier
        assert tier is not None
        rows[tier].append(i)
        tiers.append(tier)
    width = out.shape[1]
    if rows[DEVICE]:
        assert device is not None
        t0 = time.perf_counter()
        await device.read([entries[i].key for i in rows[DEVICE]], out, rows[DEVICE])
        stats.transfer(DEVICE, "client", len(rows[DEVICE]) * width, time.perf_counter() - t0)
    if rows[HOST]:
        t0 = time.perf_counter()
        slots = [s for i in rows[HOST] if (s := entries[i].host_slot) is not None]
        host.read(slots, out, rows[HOST])
        stats.transfer(HOST, "client", len(rows[HOST]) * width, time.perf_counter() - t0)
    from_disk: list[tuple[int, Entry]] = []
    failed: list[tuple[Entry, DiskRecord]] = []
    if not rows[DISK]:
        return tiers, len(entries), from_disk, failed
    assert disk is not None
    t0 = time.perf_counter()
    recs = [(i, entries[i], rec) for i in rows[DISK] if (rec := entries[i].disk) is not None]
    oks = await disk.get_many([rec for _, _, rec in recs], [out[i] for i, _, _ in recs])
    good = len(entries)
    for (i, e, rec), ok in zip(recs, oks, strict=True):
        if ok:
            from_disk.append((i, e))
        else:
            failed.append((e, rec))
            good = min(good, i)
    served = sum(e.nbytes for i, e in from_disk if i < good)
    stats.transfer(DISK, "client", served, time.perf_counter() - t0)
    return tiers, good, from_disk, failed


def usage(
    device: DeviceTier | None,
    host: HostArena,
    disk: DiskTier | None,
    host_kv_bytes: int | None = None,
) -> dict[str, dict[str, int]]:
    """Capacity, bytes used and blocks of each tier, for ``stats`` and the metrics; and, given
    ``host_kv_bytes``, the bytes of KV the host's blocks hold (``kv_bytes``, the disk's too):
    a host slot is taken whole by a smaller block, so ``used_bytes`` alone overstates it."""
    out: dict[str, dict[str, int]] = {}
    if device is not None:
        out[DEVICE] = {
            "capacity_bytes": device.capacity_bytes,
            "used_bytes": device.used_bytes,
            "blocks": len(device),
        }
    out[HOST] = {
        "capacity_bytes": host.capacity_bytes,
        "used_bytes": host.used_bytes,
        "blocks": host.num_slots - host.free_slots,
    }
    if host_kv_bytes is not None:
        out[HOST]["kv_bytes"] = host_kv_bytes
    if disk is not None:
        out[DISK] = {
            "capacity_bytes": disk.capacity_bytes,
            "used_bytes": disk.used_bytes,
            "blocks": disk.num_blocks,
        }
        if host_kv_bytes is not None:
            out[DISK]["kv_bytes"] = disk.used_bytes  # each block at its own size
    return out
