"""The part of ``torch.npu`` (``torch_npu.npu``) this backend uses, as typed protocols.

torch has no type information for ``torch.npu``: it exists only once torch_npu registers it.
These protocols name exactly the calls the adapter makes, so mypy checks them and a stand-in
module for tests has a precise surface to provide.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

__all__ = [
    "NpuDeviceProperties",
    "NpuEvent",
    "NpuGraph",
    "NpuGraphModule",
    "NpuModule",
    "NpuStream",
]


class NpuEvent(Protocol):
    """``torch.npu.Event``."""

    def record(self, stream: NpuStream | None = None) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...

    def elapsed_time(self, end_event: NpuEvent) -> float: ...


class NpuStream(Protocol):
    """``torch.npu.Stream``."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...

    def wait_event(self, event: NpuEvent) -> None: ...

    def wait_stream(self, stream: NpuStream) -> None: ...


class NpuDeviceProperties(Protocol):
    """``torch.npu.get_device_properties(i)``."""

    @property
    def name(self) -> str: ...

    @property
    def total_memory(self) -> int: ...

    @property
    def cube_core_num(self) -> int: ...

    @property
    def vector_core_num(self) -> int: ...


class NpuModule(Protocol):
    """``torch.npu``: device selection, streams, events, memory."""

    def Stream(self, device: int) -> NpuStream: ...

    def Event(self, enable_timing: bool = False) -> NpuEvent: ...

    def device_count(self) -> int: ...

    def set_device(self, device: int) -> None: ...

    def default_stream(self, device: int) -> NpuStream: ...

    def current_stream(self, device: int) -> NpuStream: ...

    def stream(self, stream: NpuStream) -> AbstractContextManager[object]: ...

    def synchronize(self, device: int) -> None: ...

    def mem_get_info(self, device: int) -> tuple[int, int]: ...

    def get_device_properties(self, device: int) -> NpuDeviceProperties: ...


class NpuGraph(Protocol):
    """``torch.npu.NPUGraph``: a captured sequence of NPU work."""

    def replay(self) -> None: ...


class NpuGraphModule(Protocol):
    """The graph capture of ``torch.npu``, where the installed torch_npu has it."""

    def NPUGraph(self) -> NpuGraph: ...

    def default_stream(self, device: int) -> NpuStream: ...

    def graph(
        self,
        npu_graph: NpuGraph,
        pool: tuple[int, int] | None = None,
        stream: NpuStream | None = None,
    ) -> AbstractContextManager[object]: ...
