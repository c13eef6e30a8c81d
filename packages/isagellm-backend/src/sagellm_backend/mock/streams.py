"""Streams and events of the mock device: deferred, in-order execution, as on a real device.

Work queued on a :class:`MockStream` does not run when it is issued. It runs, in issue order, only
when something waits for it: ``stream.synchronize()`` or ``stream.query()``, ``event.synchronize()``
or ``event.query()``, a read back to the host, or, when a waiting stream's own work runs, the
``wait_event`` / ``wait_stream`` dependency it carries (which first runs the other stream up to
the awaited point). So a missing synchronisation shows up as stale data, not as luck.

A :class:`StreamScheduler` holds one provider's streams: the default stream, the per-thread
current stream set by ``with stream:``, and the graph being captured, if any. One reentrant lock
serialises the execution of queued work, which is the mock's device.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType

from sagellm_backend.errors import (
    BackendUnavailableError,
    EventStateError,
    GraphCaptureError,
    InvalidArgumentError,
)
from sagellm_backend.kv import KVBlock
from sagellm_backend.protocols import Event, Stream

__all__ = ["Capture", "Captured", "Issue", "MockEvent", "MockStream", "StreamScheduler"]

Work = Callable[[], None]
Issue = Callable[["MockStream"], None]
"""Puts one operation on a stream; what a graph records and replays."""


class Captured:
    """One operation recorded by a graph capture, with the blocks it touches."""

    __slots__ = ("blocks", "issue")

    def __init__(self, issue: Issue, blocks: tuple[KVBlock, ...]) -> None:
        self.issue = issue
        self.blocks = blocks


class Capture:
    """The capture in progress: the stream it records and what it recorded so far."""

    __slots__ = ("recorded", "stream")

    def __init__(self, stream: MockStream) -> None:
        self.stream = stream
        self.recorded: list[Captured] = []


class StreamScheduler:
    """The streams of one provider and the lock that runs their work."""

    def __init__(self, name: str, require: Callable[[str, str], None] | None = None) -> None:
        self.name = name
        self.require = require or (lambda flag, operation: None)
        """Refuses an operation whose capability flag is off (CapabilityError)."""
        self.lock = threading.RLock()
        self.capture: Capture | None = None
        self.closed = False
        self._local = threading.local()
        self._streams: list[MockStream] = []
        self.default_stream = self.new_stream()

    def new_stream(self) -> MockStream:
        with self.lock:
            stream = MockStream(self, len(self._streams))
            self._streams.append(stream)
        return stream

    def current(self) -> MockStream:
        stack: list[MockStream] = getattr(self._local, "stack", [])
        return stack[-1] if stack else self.default_stream

    def push(self, stream: MockStream) -> None:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        self._local.stack.append(stream)

    def pop(self, stream: MockStream) -> None:
        stack: list[MockStream] = getattr(self._local, "stack", [])
        if not stack or stack[-1] is not stream:
            raise InvalidArgumentError(
                f"stream {stream} is not the current stream of this thread",
                hint="leave nested `with stream:` blocks in the order they were entered",
            )
        stack.pop()

    def check_open(self) -> None:
        if self.closed:
            raise BackendUnavailableError(
                f"provider {self.name} is closed", hint="create a new provider"
            )

    def check_host(self, operation: str) -> None:
        """Refuse a host-side operation while a graph is being captured (and after close)."""
        self.check_open()
        if self.capture is not None:
            raise GraphCaptureError(
                f"{operation} is a host-side operation and cannot run while a graph is being "
                f"captured on {self.capture.stream}",
                hint="do it before or after the `with capture_graph()` block",
            )

    def own_stream(self, stream: object) -> MockStream:
        """``stream`` if it is a stream of this provider."""
        if not isinstance(stream, MockStream) or stream.scheduler is not self:
            raise InvalidArgumentError(
                f"{stream!r} is not a stream of {self.name}",
                hint="use a stream created by this provider's create_stream()",
            )
        return stream

    def own_event(self, event: object) -> MockEvent:
        """``event`` if it is an event of this provider."""
        if not isinstance(event, MockEvent) or event.scheduler is not self:
            raise InvalidArgumentError(
                f"{event!r} is not an event of {self.name}",
                hint="use an event created by this provider's create_event()",
            )
        return event

    def synchronize(self) -> None:
        """Run all queued work on every stream."""
        self.check_host("synchronize")
        with self.lock:
            for stream in list(self._streams):
                stream.run_to(stream.queued)


class MockStream:
    """An ordered queue of deferred device work. Usable as the current stream in ``with``."""

    def __init__(self, scheduler: StreamScheduler, index: int) -> None:
        self.scheduler = scheduler
        self.index = index
        self.queued = 0
        self.done = 0
        self._pending: deque[Work] = deque()

    def __repr__(self) -> str:
        return f"MockStream({self.scheduler.name}, {self.index})"

    # Issuing work.

    def launch(self, work: Work, blocks: Sequence[KVBlock] = ()) -> None:
        """Issue ``work`` on this stream (or record it, while this stream is being captured)."""

        def issue(stream: MockStream) -> None:
            stream.enqueue(work)

        self.issue(issue, blocks)

    def issue(self, op: Issue, blocks: Sequence[KVBlock] = ()) -> None:
        """Run ``op`` to put work on this stream, or record it while this stream is captured."""
        scheduler = self.scheduler
        scheduler.check_open()
        with scheduler.lock:
            capture = scheduler.capture
            if capture is not None and capture.stream is self:
                capture.recorded.append(Captured(op, tuple(blocks)))
            else:
                op(self)

    def enqueue(self, work: Work) -> int:
        """Queue ``work`` now; returns its position on this stream."""
        with self.scheduler.lock:
            self._pending.append(work)
            self.queued += 1
            return self.queued

    def run_to(self, position: int) -> None:
        """Run queued work up to and including ``position``."""
        with self.scheduler.lock:
            while self.done < position:
                work = self._pending.popleft()
                self.done += 1
                work()

    # The Stream protocol.

    def record_event(self, event: Event | None = None) -> MockEvent:
        if event is None:
            self.scheduler.require("has_event", "record_event")
        target = MockEvent(self.scheduler) if event is None else self.scheduler.own_event(event)
        target.record(self)
        return target

    def wait_event(self, event: Event) -> None:
        """Later work on this stream waits for ``event`` as recorded now (unrecorded: no wait)."""
        mark = self.scheduler.own_event(event).mark
        self._refuse_in_capture("wait_event")
        if mark is not None:
            self.launch(lambda: mark.stream.run_to(mark.position))

    def wait_stream(self, other: Stream) -> None:
        """Later work on this stream waits for all work queued on ``other`` so far."""
        source = self.scheduler.own_stream(other)
        self._refuse_in_capture("wait_stream")
        if source is not self:
            position = source.queued
            self.launch(lambda: source.run_to(position))

    def query(self) -> bool:
        self.scheduler.check_host("stream.query")
        self.run_to(self.queued)
        return True

    def synchronize(self) -> None:
        self.scheduler.check_host("stream.synchronize")
        self.run_to(self.queued)

    def __enter__(self) -> MockStream:
        self.scheduler.check_open()
        self.scheduler.push(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.scheduler.pop(self)

    def _refuse_in_capture(self, operation: str) -> None:
        capture = self.scheduler.capture
        if capture is not None and capture.stream is self:
            raise GraphCaptureError(
                f"{operation} on the capturing stream cannot be captured by the mock",
                hint="order streams before or after the `with capture_graph()` block",
            )


class _Mark:
    """One recording of an event: where it sits and, once reached, when."""

    __slots__ = ("position", "stream", "time_ns")

    def __init__(self, stream: MockStream, position: int = 0, time_ns: int | None = None) -> None:
        self.stream = stream
        self.position = position
        self.time_ns = time_ns


class MockEvent:
    """A marker in a stream's work, stamped with ``time.perf_counter_ns()`` when it is reached."""

    def __init__(self, scheduler: StreamScheduler, enable_timing: bool = True) -> None:
        if not isinstance(enable_timing, bool):
            raise InvalidArgumentError(
                f"enable_timing must be a bool, got {enable_timing!r}",
                hint="pass enable_timing=True or enable_timing=False",
            )
        self.scheduler = scheduler
        self._enable_timing = enable_timing
        self.mark: _Mark | None = None

    def __repr__(self) -> str:
        state = "unrecorded" if self.mark is None else f"on {self.mark.stream}"
        return f"MockEvent({self.scheduler.name}, {state})"

    @property
    def enable_timing(self) -> bool:
        return self._enable_timing

    def record(self, stream: Stream | None = None) -> None:
        """Mark the point reached by ``stream`` (default: the current stream)."""
        target = self.scheduler.current() if stream is None else self.scheduler.own_stream(stream)

        def issue(on: MockStream) -> None:
            mark = _Mark(on)
            mark.position = on.enqueue(lambda: _stamp(mark))
            self.mark = mark

        target.issue(issue)

    def query(self) -> bool:
        self.scheduler.check_host("event.query")
        self._reach()
        return True

    def synchronize(self) -> None:
        self.scheduler.check_host("event.synchronize")
        self._reach()

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from ``start`` to this event; both recorded with timing and completed."""
        self.scheduler.check_host("elapsed_ms")
        begin = self.scheduler.own_event(start)
        for which, event in (("start", begin), ("end", self)):
            if not event.enable_timing:
                raise EventStateError(
                    f"the {which} event was created without timing",
                    hint="create both events with enable_timing=True",
                )
            if event.mark is None:
                raise EventStateError(
                    f"the {which} event was never recorded",
                    hint="record both events on a stream before asking for elapsed time",
                )
        assert begin.mark is not None and self.mark is not None
        if begin.mark.time_ns is None or self.mark.time_ns is None:
            raise EventStateError(
                "an event has been recorded but not reached yet",
                hint="call synchronize() on the end event first",
            )
        return (self.mark.time_ns - begin.mark.time_ns) / 1e6

    def _reach(self) -> None:
        mark = self.mark
        if mark is not None:
            mark.stream.run_to(mark.position)


def _stamp(mark: _Mark) -> None:
    mark.time_ns = time.perf_counter_ns()
