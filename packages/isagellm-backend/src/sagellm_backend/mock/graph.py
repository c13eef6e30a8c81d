"""Graph capture and replay on the mock device.

Inside ``with provider.capture_graph() as graph:``, device operations issued on the capturing
stream (KV writes and copies, event records, replays of other graphs) are recorded instead of
queued; ``graph.replay()`` issues them again on that stream. Host-side operations (alloc, free,
migrate, synchronize, query, elapsed_ms, kv_block_read, collectives) are refused with
GraphCaptureError while a capture is in progress on the provider, from any thread, as CUDA's
global capture mode does. Cross-stream waits on the capturing stream are refused too: the mock
does not model graphs that fork into other streams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType

from sagellm_backend.errors import GraphCaptureError
from sagellm_backend.kv import KVBlock
from sagellm_backend.mock.streams import Capture, Captured, MockStream

__all__ = ["GraphCaptureContext", "MockGraph"]


class MockGraph:
    """A captured sequence of device operations, replayable on the stream it was captured on."""

    def __init__(self, stream: MockStream, check_live: Callable[[Sequence[KVBlock]], None]):
        self._stream = stream
        self._check_live = check_live
        self._recorded: list[Captured] = []
        self._state = "capturing"

    def __repr__(self) -> str:
        return f"MockGraph({self._stream}, {len(self._recorded)} ops, {self._state})"

    @property
    def num_ops(self) -> int:
        return len(self._recorded)

    def replay(self) -> None:
        """Queue the captured operations again, in order, on the capturing stream.

        Every KV block the graph touches must still be live; otherwise nothing is queued.
        """
        if self._state != "ready":
            raise GraphCaptureError(
                f"cannot replay a graph whose capture is {self._state}",
                hint="replay a graph after its `with capture_graph()` block ended without error",
            )
        self._check_live([b for op in self._recorded for b in op.blocks])
        for op in self._recorded:
            self._stream.issue(op.issue, op.blocks)

    def _finish(self, recorded: list[Captured], ok: bool) -> None:
        self._recorded = recorded
        self._state = "ready" if ok else "failed"


class GraphCaptureContext:
    """Context manager returned by ``capture_graph()``; yields the MockGraph being captured."""

    def __init__(self, graph: MockGraph, stream: MockStream) -> None:
        self._graph = graph
        self._stream = stream
        self._entered = False

    def __enter__(self) -> MockGraph:
        scheduler = self._stream.scheduler
        with scheduler.lock:
            scheduler.check_open()
            if self._entered:
                raise GraphCaptureError(
                    "this capture context was already used", hint="call capture_graph() again"
                )
            if scheduler.capture is not None:
                raise GraphCaptureError(
                    f"a graph is already being captured on {scheduler.capture.stream}",
                    hint="finish that capture first; captures do not nest",
                )
            self._entered = True
            scheduler.capture = Capture(self._stream)
        return self._graph

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scheduler = self._stream.scheduler
        with scheduler.lock:
            capture = scheduler.capture
            scheduler.capture = None
        recorded = capture.recorded if capture is not None else []
        self._graph._finish(recorded, ok=exc_type is None)
