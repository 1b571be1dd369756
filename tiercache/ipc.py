"""CUDA IPC: an engine's KV tensors opened in the daemon's process, and the events that order
the two processes' work on them.

An engine on a GPU does not copy its KV blocks through host memory for the daemon: it sends,
once, a handle per cache tensor (``export_tensor``) and the daemon maps the same device memory
(``open_tensor``); from then on the daemon's own kernels gather blocks out of the engine's
paged cache and scatter them in. Order across the two processes goes through interprocess
events (``interprocess_event`` / ``open_event``): the engine records its event behind the
forward pass that wrote the blocks before it asks for a save, and the daemon's copy stream
waits on it; the daemon records its event behind a scatter and the engine's stream waits on
it before attention reads the blocks. Neither side blocks its host thread for the other.

What travels (``TensorHandle``): the 64-byte ``cudaIpcMemHandle_t`` of the allocation that
holds the tensor, the tensor's byte offset inside it, its shape, strides and dtype, and the
GPU's UUID (the two processes may number their devices differently). torch's caching
allocator carves tensors out of larger allocations, and a handle always names an
allocation's base, so the offset comes from the driver (``cuMemGetAddressRange``).

Trust: the daemon checks that the tensor a handle describes lies inside the allocation it
opens, so a wrong or hostile description is an error, never a write past the engine's memory.
A handle opened twice in one process maps once (the driver returns the same address): the
mapping is reference-counted here and unmapped when its last tensor is closed.

Rejected: torch's own CUDA tensor sharing (``torch.multiprocessing``). It pickles a
``rebuild`` function with version-specific arguments (the engine and the daemon may run
different torch builds), and its producer-side reference counting keeps the engine's memory
alive on the daemon's behalf through a shared file; the engine owns its KV cache for its
whole life anyway. Rejected: caches made with ``expandable_segments`` (virtual memory
mappings), which ``cudaIpcGetMemHandle`` cannot export; ``export_tensor`` says so.

Everything here needs CuPy and a CUDA driver; the module imports anywhere (CI has neither).
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from typing import Any

import torch

from tiercache.kernels.cuda import _cupy

HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t) and sizeof(cudaIpcEventHandle_t)
MAX_DIMS = 8


class IpcError(ValueError):
    """A tensor or event that cannot be shared or opened; the message names what is wrong."""


@functools.cache
def _libcuda() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise IpcError(f"CUDA IPC needs the CUDA driver (libcuda.so.1): {e}") from None


def allocation_range(ptr: int, index: int) -> tuple[int, int]:
    """The base address and size of the allocation on device ``index`` that holds ``ptr``."""
    # A driver call needs a current context on this thread (a client's event-loop thread
    # has none yet): cudaSetDevice makes the device's primary context current, as the
    # runtime and torch use it.
    _cupy().cuda.runtime.setDevice(index)
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    rc = _libcuda().cuMemGetAddressRange_v2(
        ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)
    )
    if rc != 0:
        raise IpcError(f"address {ptr:#x} is not in any device allocation (CUresult {rc})")
    return base.value, size.value


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def device_index(uuid: str) -> int:
    """This process's index of the GPU with ``uuid``."""
    found = [device_uuid(i) for i in range(torch.cuda.device_count())]
    if uuid not in found:
        raise IpcError(
            f"GPU {uuid} is not visible to the tiercache daemon (it sees {found or 'none'}); "
            "run the daemon where CUDA_VISIBLE_DEVICES includes the engine's GPU"
        )
    return found.index(uuid)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise IpcError(f"'dtype' {name!r} is not a torch dtype")
    return dtype


@dataclass(frozen=True, slots=True)
class TensorHandle:
    """What the daemon needs to map one of an engine's CUDA tensors."""

    handle: bytes  # cudaIpcMemHandle_t of the allocation holding the tensor
    offset: int  # bytes from the allocation's base to the tensor's element 0
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements, like torch
    dtype: str  # a torch dtype's name: "bfloat16"
    device: str  # the GPU's UUID

    @property
    def extent(self) -> int:
        """Bytes from element 0 to one past the last element."""
        last = sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        return (last + 1) * _dtype(self.dtype).itemsize

    def to_wire(self) -> dict[str, Any]:
        return {
            "handle": self.handle, "offset": self.offset, "shape": list(self.shape),
            "stride": list(self.stride), "dtype": self.dtype, "device": self.device,
        }  # fmt: skip

    @classmethod
    def from_wire(cls, raw: Any, what: str = "tensor") -> TensorHandle:
        """A handle from a peer's message; anything malformed is an IpcError naming the field."""
        if not isinstance(raw, dict):
            raise IpcError(f"{what}: a tensor handle must be a map, got {type(raw).__name__}")
        handle, offset = raw.get("handle"), raw.get("offset")
        shape, stride = raw.get("shape"), raw.get("stride")
        dtype, device = raw.get("dtype"), raw.get("device")
        if not isinstance(handle, bytes) or len(handle) != HANDLE_BYTES:
            raise IpcError(f"{what}: 'handle' must be {HANDLE_BYTES} bytes (cudaIpcMemHandle_t)")
        if not _nonneg(offset):
            raise IpcError(f"{what}: 'offset' must be a non-negative integer, got {offset!r}")
        for name, dims in (("shape", shape), ("stride", stride)):
            if (
                not isinstance(dims, list)
                or not 1 <= len(dims) <= MAX_DIMS
                or not all(_nonneg(d) for d in dims)
            ):
                raise IpcError(
                    f"{what}: '{name}' must be 1 to {MAX_DIMS} non-negative integers, got {dims!r}"
                )
        assert isinstance(shape, list) and isinstance(stride, list)
        if len(shape) != len(stride):
            raise IpcError(f"{what}: 'shape' {shape} and 'stride' {stride} differ in length")
        if 0 in shape:
            raise IpcError(f"{what}: an empty tensor (shape {shape}) holds no KV blocks")
        if not isinstance(dtype, str) or not isinstance(device, str):
            raise IpcError(f"{what}: 'dtype' and 'device' (the GPU's UUID) must be strings")
        _dtype(dtype)
        assert isinstance(offset, int)
        return cls(handle, offset, tuple(shape), tuple(stride), dtype, device)


def _nonneg(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def export_tensor(t: torch.Tensor) -> TensorHandle:
    """A handle to CUDA tensor ``t`` for another process (call in the process that owns it)."""
    if t.device.type != "cuda":
        raise IpcError(f"only CUDA tensors can be shared by CUDA IPC, got one on {t.device}")
    if any(s < 0 for s in t.stride()) or t.numel() == 0:
        raise IpcError(f"cannot share a tensor of shape {list(t.shape)}, strides {t.stride()}")
    cp = _cupy()
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    base, _ = allocation_range(t.data_ptr(), index)
    with cp.cuda.Device(index):
        try:
            handle = bytes(cp.cuda.runtime.ipcGetMemHandle(base))
        except cp.cuda.runtime.CUDARuntimeError as e:
            raise IpcError(
                f"cudaIpcGetMemHandle refused this tensor's memory ({e}); caches allocated with "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True cannot be shared this way"
            ) from None
    dtype = str(t.dtype).removeprefix("torch.")
    return TensorHandle(
        handle, t.data_ptr() - base, tuple(t.shape), tuple(t.stride()), dtype, device_uuid(index)
    )


class _Mappings:
    """The IPC mappings this process holds: handle -> (address, users)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[bytes, tuple[int, int]] = {}

    def open(self, handle: bytes, index: int) -> int:
        cp = _cupy()
        with self._lock:
            ptr, users = self._open.get(handle, (0, 0))
            if not users:
                with cp.cuda.Device(index):
                    try:
                        ptr = int(
                            cp.cuda.runtime.ipcOpenMemHandle(
                                handle, cp.cuda.runtime.cudaIpcMemLazyEnablePeerAccess
                            )
                        )
                    except cp.cuda.runtime.CUDARuntimeError as e:
                        raise IpcError(
                            f"cudaIpcOpenMemHandle failed ({e}): the handle is not a live "
                            "allocation of another process on this GPU"
                        ) from None
            self._open[handle] = (ptr, users + 1)
            return ptr

    def close(self, handle: bytes) -> None:
        with self._lock:
            ptr, users = self._open.pop(handle, (0, 0))
            if users > 1:
                self._open[handle] = (ptr, users - 1)
            elif users == 1:
                _cupy().cuda.runtime.ipcCloseMemHandle(ptr)

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)


MAPPINGS = _Mappings()


class OpenedTensor:
    """A peer's tensor mapped into this process: ``tensor`` until ``close``."""

    def __init__(self, h: TensorHandle) -> None:
        cp = _cupy()
        self.handle = h.handle
        index = device_index(h.device)
        dtype = _dtype(h.dtype)
        extent = h.extent
        ptr = MAPPINGS.open(h.handle, index)
        try:
            _, size = allocation_range(ptr, index)
            if h.offset + extent > size:
                raise IpcError(
                    f"a tensor of shape {list(h.shape)}, strides {list(h.stride)} ({h.dtype}) at "
                    f"offset {h.offset} needs {h.offset + extent} B, but its allocation has {size}"
                )
            if (ptr + h.offset) % dtype.itemsize:
                raise IpcError(f"offset {h.offset} is not aligned to {h.dtype}")
            with cp.cuda.Device(index):
                mem = cp.cuda.UnownedMemory(ptr + h.offset, extent, None, index)
                raw = cp.ndarray((extent,), cp.uint8, cp.cuda.MemoryPointer(mem, 0))
                flat = torch.as_tensor(raw, device=torch.device("cuda", index))
        except BaseException:
            MAPPINGS.close(h.handle)
            raise
        self.tensor: torch.Tensor | None = flat.view(dtype).as_strided(h.shape, h.stride)

    def close(self) -> None:
        """Unmap (once): the tensor must not be used after this."""
        if self.tensor is not None:
            self.tensor = None
            MAPPINGS.close(self.handle)


def interprocess_event(device: torch.device) -> torch.cuda.Event:
    """An event another process can open (no timing: interprocess events cannot time)."""
    with torch.cuda.device(device):
        return torch.cuda.Event(interprocess=True)  # type: ignore[no-untyped-call]


def event_handle(event: torch.cuda.Event) -> bytes:
    return bytes(event.ipc_handle())  # type: ignore[no-untyped-call]


def open_event(handle: Any, device: torch.device, what: str = "event") -> torch.cuda.Event:
    """A peer's interprocess event, opened on ``device``."""
    if not isinstance(handle, bytes) or len(handle) != HANDLE_BYTES:
        raise IpcError(f"'{what}' must be a {HANDLE_BYTES}-byte cudaIpcEventHandle_t")
    try:
        event: torch.cuda.Event = torch.cuda.Event.from_ipc_handle(device, handle)  # type: ignore[no-untyped-call]
        return event
    except RuntimeError as e:
        raise IpcError(f"cudaIpcOpenEventHandle failed for '{what}': {e}") from None
