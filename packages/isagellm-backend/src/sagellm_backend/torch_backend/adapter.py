"""DeviceAdapter: what a torch device wheel supplies, and all that differs between devices.

The shared layer never calls ``torch.cuda`` or ``torch.npu``; it asks the adapter. An adapter is
generic in its raw stream type ``S`` and raw event type ``E`` (``torch.cuda.Stream`` and
``torch.cuda.Event`` for CUDA; host-side stand-ins for the CPU), and every operation on them goes
through it, so a device that cannot be had here can be faked in full.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

import torch

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.protocols import Graph
from sagellm_backend.torch_backend.collectives import CommSpec

__all__ = ["DeviceAdapter", "GraphHook"]

S = TypeVar("S")
E = TypeVar("E")
S_contra = TypeVar("S_contra", contravariant=True)


class DeviceAdapter(Protocol[S, E]):
    """One device type's streams, events, memory, placement and communication backend."""

    @property
    def kind(self) -> str:
        """Backend kind and device-name prefix, such as "cpu" or "cuda"."""
        ...

    @property
    def comm(self) -> CommSpec:
        """The torch.distributed backend of this device and what it can do."""
        ...

    @property
    def pins_host_memory(self) -> bool:
        """True if host pools are pinned, so host <-> device copies run asynchronously."""
        ...

    def device_count(self) -> int: ...

    def torch_device(self, index: int) -> torch.device:
        """Where tensors of device ``index`` live; all tensor placement goes through it."""
        ...

    def bind(self, environ: Mapping[str, str]) -> int | None:
        """The device index a launcher assigned this process (from LOCAL_RANK), made current.

        None when no launcher set one.
        """
        ...

    def capability(self, index: int) -> CapabilityDescriptor:
        """What device ``index`` is and offers (name, memory, kernels); the detection hook."""
        ...

    def mem_get_info(self, index: int) -> tuple[int, int]:
        """(free, total) bytes of device ``index``."""
        ...

    def synchronize(self, index: int) -> None:
        """Block the host until all work on every stream of device ``index`` has completed."""

    # Streams.

    def new_stream(self, index: int) -> S: ...

    def default_stream(self, index: int) -> S:
        """The device's default stream, current where no other was made current."""
        ...

    def current_stream(self, index: int) -> S:
        """This thread's current stream on device ``index``."""
        ...

    def use_stream(self, stream: S) -> AbstractContextManager[object]:
        """Make ``stream`` this thread's current stream inside a ``with`` block."""
        ...

    def stream_query(self, stream: S) -> bool: ...

    def stream_synchronize(self, stream: S) -> None: ...

    def stream_wait_event(self, stream: S, event: E) -> None: ...

    def stream_wait_stream(self, stream: S, other: S) -> None: ...

    # Events.

    def new_event(self, enable_timing: bool) -> E: ...

    def event_record(self, event: E, stream: S) -> None: ...

    def event_query(self, event: E) -> bool: ...

    def event_synchronize(self, event: E) -> None: ...

    def event_elapsed_ms(self, start: E, end: E) -> float:
        """Milliseconds from ``start`` to ``end``, both recorded with timing enabled."""
        ...


class GraphHook(Protocol[S_contra]):
    """Graph capture of a device that has it; a provider given one claims has_graph_exec."""

    def capture(self, stream: S_contra | None) -> AbstractContextManager[Graph]:
        """Capture the device work issued inside the block on ``stream`` (None: a side stream);
        the provider refuses its host-side calls meanwhile."""
        ...
