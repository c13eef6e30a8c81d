"""TorchStream and TorchEvent: the protocols' Stream and Event over a device adapter.

The wrappers add what the protocols promise beyond the raw objects: the ``with stream:`` current
stream (nestable, per thread), typed refusals (an event of another device, elapsed_ms on an event
that was never recorded or has no timing) and the event's recorded state. The semantics of the
work itself are the device's: on CUDA, streams are asynchronous; on the CPU, work runs when it is
issued, so streams are always idle and events take host timestamps.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Generic, TypeVar

from sagellm_backend.errors import EventStateError, InvalidArgumentError
from sagellm_backend.protocols import Event, Stream
from sagellm_backend.torch_backend.adapter import DeviceAdapter

__all__ = ["TorchEvent", "TorchStream"]

S = TypeVar("S")
E = TypeVar("E")


class TorchStream(Generic[S, E]):
    """A stream of one device. Two wrappers of the same raw stream are equal."""

    def __init__(self, adapter: DeviceAdapter[S, E], index: int, raw: S) -> None:
        self._adapter = adapter
        self._index = index
        self.raw = raw
        self._entered = threading.local()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TorchStream) and other.raw is self.raw

    def __hash__(self) -> int:
        return id(self.raw)

    def __repr__(self) -> str:
        return f"TorchStream({self._adapter.kind}:{self._index})"

    def record_event(self, event: Event | None = None) -> TorchEvent[S, E]:
        target = (
            TorchEvent(self._adapter, self._index, enable_timing=True)
            if event is None
            else own_event(self._adapter, event)
        )
        target.record(self)
        return target

    def wait_event(self, event: Event) -> None:
        mine = own_event(self._adapter, event)
        if mine.recorded:
            self._adapter.stream_wait_event(self.raw, mine.raw)

    def wait_stream(self, other: Stream) -> None:
        self._adapter.stream_wait_stream(self.raw, own_stream(self._adapter, other).raw)

    def query(self) -> bool:
        return self._adapter.stream_query(self.raw)

    def synchronize(self) -> None:
        self._adapter.stream_synchronize(self.raw)

    def __enter__(self) -> TorchStream[S, E]:
        context = self._adapter.use_stream(self.raw)
        context.__enter__()
        stack: list[AbstractContextManager[object]] = self._entered.__dict__.setdefault("s", [])
        stack.append(context)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        current = self._adapter.current_stream(self._index)
        stack: list[AbstractContextManager[object]] = self._entered.__dict__.get("s", [])
        if not stack or not (current is self.raw or current == self.raw):
            raise InvalidArgumentError(
                f"{self!r} is not this thread's current stream",
                hint="leave nested `with stream:` blocks in the order they were entered",
            )
        stack.pop().__exit__(exc_type, exc, tb)


class TorchEvent(Generic[S, E]):
    """An event of one device; timed events measure device time between two records."""

    def __init__(self, adapter: DeviceAdapter[S, E], index: int, *, enable_timing: bool) -> None:
        if not isinstance(enable_timing, bool):
            raise InvalidArgumentError(
                f"enable_timing must be a bool, got {enable_timing!r}",
                hint="pass enable_timing=True or enable_timing=False",
            )
        self._adapter = adapter
        self._index = index
        self._enable_timing = enable_timing
        self.raw = adapter.new_event(enable_timing)
        self.recorded = False

    def __repr__(self) -> str:
        state = "recorded" if self.recorded else "unrecorded"
        return f"TorchEvent({self._adapter.kind}:{self._index}, {state})"

    @property
    def enable_timing(self) -> bool:
        return self._enable_timing

    def record(self, stream: Stream | None = None) -> None:
        self.record_raw(
            self._adapter.current_stream(self._index)
            if stream is None
            else own_stream(self._adapter, stream).raw
        )

    def record_raw(self, stream: S) -> None:
        """Record on ``stream``, a stream object of the device itself."""
        self._adapter.event_record(self.raw, stream)
        self.recorded = True

    def query(self) -> bool:
        return not self.recorded or self._adapter.event_query(self.raw)

    def synchronize(self) -> None:
        if self.recorded:
            self._adapter.event_synchronize(self.raw)

    def elapsed_ms(self, start: Event) -> float:
        begin = own_event(self._adapter, start)
        for which, event in (("start", begin), ("end", self)):
            if not event.enable_timing:
                raise EventStateError(
                    f"the {which} event was created without timing",
                    hint="create both events with enable_timing=True",
                )
            if not event.recorded:
                raise EventStateError(
                    f"the {which} event was never recorded",
                    hint="record both events on a stream before asking for elapsed_ms",
                )
        return self._adapter.event_elapsed_ms(begin.raw, self.raw)


def own_stream(adapter: DeviceAdapter[S, E], stream: object) -> TorchStream[S, E]:
    """``stream`` if it is a stream of ``adapter``'s device, else InvalidArgumentError."""
    if isinstance(stream, TorchStream) and stream._adapter is adapter:
        return stream
    raise InvalidArgumentError(
        f"{stream!r} is not a stream of this {adapter.kind} backend",
        hint="use streams from this provider's create_stream() or current_stream()",
    )


def own_event(adapter: DeviceAdapter[S, E], event: object) -> TorchEvent[S, E]:
    """``event`` if it is an event of ``adapter``'s device, else InvalidArgumentError."""
    if isinstance(event, TorchEvent) and event._adapter is adapter:
        return event
    raise InvalidArgumentError(
        f"{event!r} is not an event of this {adapter.kind} backend",
        hint="use events from this provider's create_event() or record_event()",
    )
