"""torch_npu.npu, registered as torch.npu: devices, streams, events, memory, graphs.

Only names the real module has are defined here; anything else raises AttributeError. The
graph names (``NPUGraph``, ``graph``, ``is_current_stream_capturing``) are left out with
``FAKE_TORCH_NPU_GRAPHS=0``, as in a torch_npu older than graph capture.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from torch_npu._C import _device
from torch_npu.npu.streams import Event, Stream, _as_index

__all__ = [
    "Event",
    "Stream",
    "current_device",
    "current_stream",
    "default_stream",
    "device_count",
    "get_device_name",
    "get_device_properties",
    "get_soc_version",
    "is_available",
    "is_bf16_supported",
    "is_initialized",
    "max_memory_allocated",
    "mem_get_info",
    "memory_allocated",
    "set_device",
    "set_stream",
    "stream",
    "synchronize",
]

if os.environ.get("FAKE_TORCH_NPU_GRAPHS", "1") != "0":
    from torch_npu.npu.graphs import NPUGraph, graph, is_current_stream_capturing

    __all__ += ["NPUGraph", "graph", "is_current_stream_capturing"]

_SOC_VERSIONS = {"Ascend310P3": 202, "Ascend910B3": 222, "Ascend910_9391": 250}
"""SoC name -> the number torch_npu's get_soc_version() reports (values of CANN's SocVersion)."""

_CORES = {"310P": (8, 8), "910B": (20, 40), "910_93": (24, 48), "950": (32, 64)}


@dataclass(frozen=True)
class _NPUDeviceProperties:
    name: str
    total_memory: int
    cube_core_num: int
    vector_core_num: int
    L2_cache_size: int


def _soc_name() -> str:
    return os.environ.get("FAKE_TORCH_NPU_SOC", "Ascend910B3")


def is_available() -> bool:
    return len(_device.DEVICES) > 0


def is_initialized() -> bool:
    return True


def device_count() -> int:
    return len(_device.DEVICES)


def set_device(device: int | str | torch.device) -> None:
    _device.set_current_index(_as_index(device))


def current_device() -> int:
    return _device.current_index()


def synchronize(device: int | str | torch.device | None = None) -> None:
    index = _device.current_index() if device is None else _as_index(device)
    _device.DEVICES[_device.check_index(index)].synchronize()


def current_stream(device: int | str | torch.device | None = None) -> Stream:
    index = _device.current_index() if device is None else _as_index(device)
    return Stream._wrap(_device.current_stream(_device.check_index(index)))


def default_stream(device: int | str | torch.device | None = None) -> Stream:
    index = _device.current_index() if device is None else _as_index(device)
    return Stream._wrap(_device.DEVICES[_device.check_index(index)].default_stream())


def set_stream(stream: Stream) -> None:
    _device.set_current_stream(stream._stream)


@contextmanager
def stream(stream: Stream | None) -> Iterator[None]:
    """Make ``stream`` (and its device) current inside the block (StreamContext)."""
    if stream is None:
        yield
        return
    with _device.using_stream(stream._stream):
        yield


def mem_get_info(device: int | str | torch.device | None = None) -> tuple[int, int]:
    index = _device.current_index() if device is None else _as_index(device)
    state = _device.DEVICES[_device.check_index(index)]
    return state.total_bytes - state.allocated, state.total_bytes


def memory_allocated(device: int | str | torch.device | None = None) -> int:
    index = _device.current_index() if device is None else _as_index(device)
    return _device.DEVICES[_device.check_index(index)].allocated


def max_memory_allocated(device: int | str | torch.device | None = None) -> int:
    index = _device.current_index() if device is None else _as_index(device)
    return _device.DEVICES[_device.check_index(index)].peak


def get_device_name(device: int | str | torch.device | None = None) -> str:
    return get_device_properties(device).name


def get_device_properties(
    device: int | str | torch.device | None = None,
) -> _NPUDeviceProperties:
    index = _device.current_index() if device is None else _as_index(device)
    state = _device.DEVICES[_device.check_index(index)]
    name = _soc_name()
    family = next((f for f in _CORES if name.startswith(f"Ascend{f}")), "910B")
    cube, vector = _CORES[family]
    return _NPUDeviceProperties(name, state.total_bytes, cube, vector, 192 << 20)


def get_soc_version() -> int:
    return _SOC_VERSIONS.get(_soc_name(), 0)


def is_bf16_supported() -> bool:
    """310P has no bf16; the 910 families and the 950 do."""
    return not _soc_name().startswith("Ascend310P")
