"""torch.npu.Stream and torch.npu.Event, with torch_npu's semantics and error messages.

torch_npu's ``NPUEvent::elapsed_time`` checks only that both events were recorded ("Both events
must be recorded before calculating elapsed time."), synchronizes them, then calls
``aclrtEventElapsedTime``, which fails with an ACL error for an event created without timing.

Waiting for a stream that a graph is capturing (synchronize, query, an event of it) raises
torch_npu's ACL error 107027, "stream is captured" (see ``torch_npu.npu.graphs``).
"""

from __future__ import annotations

import time

import torch

from torch_npu._C import _device


class Stream:
    """An NPU stream (``torch.npu.Stream(device=None, priority=0)``)."""

    def __init__(self, device: int | str | torch.device | None = None, priority: int = 0) -> None:
        index = _device.current_index() if device is None else _as_index(device)
        self._stream = _device.FakeStream(_device.check_index(index))
        self.priority = priority

    @classmethod
    def _wrap(cls, stream: _device.FakeStream) -> Stream:
        wrapper = cls.__new__(cls)
        wrapper._stream = stream
        wrapper.priority = 0
        return wrapper

    @property
    def device(self) -> torch.device:
        return torch.device("npu", self._stream.index)

    @property
    def device_index(self) -> int:
        return self._stream.index

    @property
    def npu_stream(self) -> int:
        return id(self._stream)

    def wait_event(self, event: Event) -> None:
        event.wait(self)

    def wait_stream(self, stream: Stream) -> None:
        self.wait_event(stream.record_event())

    def record_event(self, event: Event | None = None) -> Event:
        event = Event() if event is None else event
        event.record(self)
        return event

    def query(self) -> bool:
        """True if all queued work has run; otherwise the device progresses and False."""
        with _device.LOCK:
            idle = not self._stream.pending
            self._stream.drain("aclrtQueryStreamStatus(stream(), &status)")
        return idle

    def synchronize(self) -> None:
        self._stream.drain()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stream) and other._stream is self._stream

    def __hash__(self) -> int:
        return hash(id(self._stream))

    def __repr__(self) -> str:
        stream = self._stream
        return f"<torch_npu.npu.Stream device=npu:{stream.index} npu_stream={id(stream):#x}>"


class Event:
    """An NPU event: ``torch.npu.Event(enable_timing, blocking, interprocess)``."""

    def __init__(
        self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False
    ) -> None:
        self.enable_timing = enable_timing
        self.blocking = blocking
        self._stream: _device.FakeStream | None = None
        self._seq = 0
        self._time_ns: int | None = None

    def record(self, stream: Stream | None = None) -> None:
        raw = _device.current_stream(_device.current_index()) if stream is None else stream._stream
        if self._stream is not None and self._stream.index != raw.index:
            raise RuntimeError(
                f"Event device {self._stream.index} does not match recording stream's device "
                f"{raw.index}." + _device.pta_error("ERR00001", "invalid parameter")
            )
        self._time_ns = None

        def mark() -> None:
            self._time_ns = time.perf_counter_ns()

        self._stream = raw
        self._seq = raw.push(mark)

    def wait(self, stream: Stream | None = None) -> None:
        if self._stream is None:
            return
        target = (
            _device.current_stream(_device.current_index()) if stream is None else stream._stream
        )
        source, seq = self._stream, self._seq
        target.push(lambda: source.run_until(seq))

    def query(self) -> bool:
        """True once the recorded work has run (or never recorded); otherwise progress, False."""
        if self._stream is None:
            return True
        with _device.LOCK:
            reached = self._stream.done >= self._seq
            self._stream.run_until(self._seq, "aclrtQueryEventStatus(event_, &status)")
        return reached

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.run_until(self._seq, "aclrtSynchronizeEvent(event_)")

    def elapsed_time(self, end_event: Event) -> float:
        if self._stream is None or end_event._stream is None:
            raise RuntimeError(
                "Both events must be recorded before calculating elapsed time."
                + _device.pta_error("ERR00004", "internal error")
            )
        self.synchronize()
        end_event.synchronize()
        if not (self.enable_timing and end_event.enable_timing):
            raise RuntimeError(
                "NPU function error: aclrtEventElapsedTime(&time_ms, event_, other.event_), "
                "error code is 107000" + _device.pta_error("ERR00100", "call acl api failed")
            )
        assert self._time_ns is not None and end_event._time_ns is not None
        return (end_event._time_ns - self._time_ns) / 1e6


def _as_index(device: int | str | torch.device) -> int:
    if isinstance(device, int):
        return device
    parsed = torch.device(device)
    if parsed.type != "npu":
        raise ValueError(f"Expected a npu device, but got: {device}")
    return _device.current_index() if parsed.index is None else parsed.index
