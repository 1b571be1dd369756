"""What a CUDA IPC handle must look like before the daemon maps anything: every malformed field
is refused with its name (tests/test_ipc_gpu.py maps real ones between two processes)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import SPEC
from tiercache.engine_kv import EngineKV
from tiercache.ipc import HANDLE_BYTES, IpcError, TensorHandle, export_tensor, open_event
from tiercache.spec import KVSpec

GOOD: dict[str, Any] = {
    "handle": bytes(range(HANDLE_BYTES)),
    "offset": 512,
    "shape": [2, 10, 4, 2, 8],
    "stride": [640, 64, 16, 8, 1],
    "dtype": "bfloat16",
    "device": "GPU-0f0e0d0c",
}


def test_a_well_formed_handle_round_trips_and_knows_its_extent() -> None:
    h = TensorHandle.from_wire(dict(GOOD))

    assert TensorHandle.from_wire(h.to_wire()) == h
    # last element at 1*640 + 9*64 + 3*16 + 1*8 + 7 = 1279, two bytes each
    assert h.extent == 1280 * 2


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("handle", b"short", "'handle' must be 64 bytes"),
        ("handle", None, "'handle' must be 64 bytes"),
        ("offset", -1, "'offset' must be a non-negative integer"),
        ("offset", True, "'offset' must be a non-negative integer"),
        ("shape", [], "'shape' must be 1 to 8"),
        ("shape", [2, -1, 4, 2, 8], "'shape' must be 1 to 8"),
        ("stride", [640, 64, 16, 8], "differ in length"),
        ("shape", [2, 0, 4, 2, 8], "empty tensor"),
        ("dtype", "bfloat17", "not a torch dtype"),
        ("dtype", 7, "must be strings"),
        ("device", None, "must be strings"),
    ],
)
def test_each_malformed_field_is_named(field: str, value: Any, message: str) -> None:
    with pytest.raises(IpcError, match=message):
        TensorHandle.from_wire({**GOOD, field: value}, "layer 3")


def test_a_handle_must_be_a_map() -> None:
    with pytest.raises(IpcError, match="layer 0: a tensor handle must be a map"):
        TensorHandle.from_wire([1, 2], "layer 0")


def test_only_cuda_tensors_and_event_handles_of_the_right_size_are_shared() -> None:
    with pytest.raises(IpcError, match="only CUDA tensors"):
        export_tensor(torch.zeros(4))
    with pytest.raises(IpcError, match="64-byte cudaIpcEventHandle_t"):
        open_event(b"x", torch.device("cuda", 0))


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (None, "'layers' must list the 2 layers"),
        ([[GOOD]], "'layers' must list the 2 layers"),
        ([[GOOD], [GOOD, GOOD]], "layer 1: the vllm layout of a full spec sends 1 tensor handle"),
        ([[GOOD], [{**GOOD, "offset": "0"}]], "layer 1: 'offset'"),
    ],
)
def test_an_attach_with_the_wrong_layers_is_refused_before_anything_is_mapped(
    layers: Any, message: str
) -> None:
    with pytest.raises(IpcError, match=message):
        EngineKV.attach(SPEC, layers, bytes(HANDLE_BYTES))


@pytest.mark.parametrize(
    ("kind", "heads", "message"),
    [
        ("full", 2, "layer 0: the hf layout of a full spec sends 2 tensor handle"),
        # an MLA latent in the hf layout is one tensor a layer, as the kernels take it
        ("mla", 1, "layer 1: the hf layout of a mla spec sends 1 tensor handle"),
    ],
)
def test_the_hf_layout_sends_one_handle_a_plane(kind: str, heads: int, message: str) -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=heads, head_dim=8, layout="hf", kind=kind)

    with pytest.raises(IpcError, match=message):
        EngineKV.attach(spec, [[GOOD], [GOOD, GOOD]], bytes(HANDLE_BYTES))
