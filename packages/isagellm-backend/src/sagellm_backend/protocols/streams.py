"""Streams, events and graphs: the ordering primitives of one device."""

from __future__ import annotations

from contextlib import AbstractContextManager
from types import TracebackType
from typing import Protocol, runtime_checkable

from sagellm_backend.device import MemoryStats

__all__ = ["Event", "Graph", "GraphCapture", "Stream", "StreamOps"]


@runtime_checkable
class Event(Protocol):
    """A marker in a stream's work; optionally timestamped."""

    @property
    def enable_timing(self) -> bool: ...

    def record(self, stream: Stream | None = None) -> None:
        """Mark the point reached by ``stream`` (default: the current stream)."""

    def query(self) -> bool:
        """True once all work before the recorded point has completed (or never recorded)."""
        ...

    def synchronize(self) -> None:
        """Block the host until the recorded point is reached."""

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from ``start`` to this event; both recorded, both with timing enabled."""
        ...


@runtime_checkable
class Stream(Protocol):
    """An ordered queue of device work. Usable as the current stream in a ``with`` block."""

    def record_event(self, event: Event | None = None) -> Event:
        """Record ``event`` (a new timing event if None) at the current end of this stream."""
        ...

    def wait_event(self, event: Event) -> None:
        """Make later work on this stream wait for ``event``; the host does not wait."""

    def wait_stream(self, other: Stream) -> None:
        """Make later work on this stream wait for all work queued on ``other`` so far."""

    def query(self) -> bool:
        """True if all work queued so far has completed."""
        ...

    def synchronize(self) -> None:
        """Block the host until all work queued so far has completed."""

    def __enter__(self) -> Stream: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class StreamOps(Protocol):
    """Streams, events, synchronisation and memory of one device."""

    def create_stream(self) -> Stream: ...

    def create_event(self, enable_timing: bool = True) -> Event: ...

    def current_stream(self) -> Stream: ...

    def synchronize(self) -> None:
        """Block the host until all work on every stream of this device has completed."""

    def memory_stats(self) -> MemoryStats: ...


@runtime_checkable
class Graph(Protocol):
    """A captured sequence of device operations."""

    def replay(self) -> None:
        """Queue the captured operations again, on the stream they were captured on."""


@runtime_checkable
class GraphCapture(Protocol):
    """Graph capture (capability ``has_graph_exec``). Host-side calls during capture are refused."""

    def capture_graph(self, stream: Stream | None = None) -> AbstractContextManager[Graph]:
        """Capture the device operations issued inside the ``with`` block into a Graph."""
        ...
