"""The CPU as a torch device: the adapter the ``cpu`` backend runs on.

Work on the CPU runs when it is issued, on the calling thread. So the CPU's streams are honest
stand-ins: a :class:`HostStream` is always idle (``query`` is True, waits have nothing to wait
for), and a :class:`HostEvent` takes a host timestamp (``time.perf_counter_ns``) when recorded,
which is when all work issued before it has finished. Host memory is not pinned: the device pool
and the host pool are both CPU memory, and a migrate between them is one indexed copy.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

import torch

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.dtypes import DType
from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.factory import DeviceSelection, OptionValue
from sagellm_backend.torch_backend.collectives import GLOO, CommSpec
from sagellm_backend.torch_backend.provider import TorchBackendProvider, create_torch_provider

__all__ = ["CpuAdapter", "HostEvent", "HostStream", "create_cpu_provider"]


class HostStream:
    """A CPU stream: work issued on it has already run."""

    def __repr__(self) -> str:
        return f"HostStream(0x{id(self):x})"


class HostEvent:
    """A CPU event: the host time at which it was recorded."""

    def __init__(self, enable_timing: bool) -> None:
        self.enable_timing = enable_timing
        self.recorded_ns: int | None = None


class CpuAdapter:
    """The CPU device: one device, gloo, host streams and events."""

    def __init__(self) -> None:
        self._default = HostStream()
        self._current = threading.local()

    @property
    def kind(self) -> str:
        return "cpu"

    @property
    def comm(self) -> CommSpec:
        return GLOO

    @property
    def pins_host_memory(self) -> bool:
        return False

    def device_count(self) -> int:
        return 1

    def torch_device(self, index: int) -> torch.device:
        self._check(index)
        return torch.device("cpu")

    def bind(self, environ: Mapping[str, str]) -> int | None:
        """Every local rank shares the one CPU device."""
        return 0 if environ.get("LOCAL_RANK") else None

    def capability(self, index: int) -> CapabilityDescriptor:
        free, total = self.mem_get_info(index)
        return CapabilityDescriptor(
            supported_dtypes=(DType.FP32, DType.FP16, DType.BF16),
            device_name=platform.processor() or platform.machine() or "cpu",
            device_type="cpu",
            total_memory_bytes=total,
            available_memory_bytes=free,
            has_stream=True,
            has_event=True,
            extra={
                "streams": "synchronous: work runs when issued",
                "events": "host timestamps (time.perf_counter_ns)",
                "torch": torch.__version__,
                "threads": str(torch.get_num_threads()),
            },
        )

    def mem_get_info(self, index: int) -> tuple[int, int]:
        """(available, total) host memory, from /proc/meminfo where there is one."""
        self._check(index)
        try:
            kib: dict[str, int] = {}
            with open("/proc/meminfo", encoding="ascii") as fh:
                for line in fh:  # the two fields come first; stop once both are read
                    name, _, value = line.partition(":")
                    if name in ("MemTotal", "MemAvailable"):
                        kib[name] = int(value.split()[0]) * 1024
                        if len(kib) == 2:
                            break
            return kib["MemAvailable"], kib["MemTotal"]
        except (OSError, KeyError, ValueError):
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return total, total

    def synchronize(self, index: int) -> None:
        self._check(index)

    # Streams: work has run by the time a call returns, so there is never anything to wait for.

    def new_stream(self, index: int) -> HostStream:
        self._check(index)
        return HostStream()

    def default_stream(self, index: int) -> HostStream:
        self._check(index)
        return self._default

    def current_stream(self, index: int) -> HostStream:
        self._check(index)
        stack: list[HostStream] = self._current.__dict__.setdefault("stack", [])
        return stack[-1] if stack else self._default

    def use_stream(self, stream: HostStream) -> AbstractContextManager[object]:
        return self._using(stream)

    @contextmanager
    def _using(self, stream: HostStream) -> Iterator[HostStream]:
        stack: list[HostStream] = self._current.__dict__.setdefault("stack", [])
        stack.append(stream)
        try:
            yield stream
        finally:
            stack.pop()

    def stream_query(self, stream: HostStream) -> bool:
        return True

    def stream_synchronize(self, stream: HostStream) -> None:
        return None

    def stream_wait_event(self, stream: HostStream, event: HostEvent) -> None:
        return None

    def stream_wait_stream(self, stream: HostStream, other: HostStream) -> None:
        return None

    # Events.

    def new_event(self, enable_timing: bool) -> HostEvent:
        return HostEvent(enable_timing)

    def event_record(self, event: HostEvent, stream: HostStream) -> None:
        event.recorded_ns = time.perf_counter_ns()

    def event_query(self, event: HostEvent) -> bool:
        return True

    def event_synchronize(self, event: HostEvent) -> None:
        return None

    def event_elapsed_ms(self, start: HostEvent, end: HostEvent) -> float:
        assert start.recorded_ns is not None and end.recorded_ns is not None
        return (end.recorded_ns - start.recorded_ns) / 1e6

    def _check(self, index: int) -> None:
        if index != 0:
            raise InvalidArgumentError(
                f"cpu:{index} does not exist; the CPU is one device", hint="use cpu:0"
            )


CPU = CpuAdapter()
"""The process's CPU device; every cpu provider shares it (and so its current stream)."""


def create_cpu_provider(
    device: DeviceSelection, **options: OptionValue
) -> TorchBackendProvider[HostStream, HostEvent]:
    """The ``cpu`` factory's target: a provider on the CPU from validated options."""
    return create_torch_provider(CPU, device, options)
