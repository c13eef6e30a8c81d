"""torch.npu.NPUGraph and torch.npu.graph, with torch_npu's checks and error messages.

Capture records the work pushed to the capturing stream instead of queueing it; ``replay()``
queues the recording on the current stream, as ``aclmdlRIExecuteAsync`` does. The checks of
``NPUGraph::capture_begin``, ``capture_end`` and ``replay`` and their texts are torch_npu's
(``torch_npu/csrc/core/npu/NPUGraph.cpp``); a capture that a wait for its stream invalidated
fails at ``capture_end`` with ACL_ERROR_RT_STREAM_CAPTURE_INVALIDATED (507903).
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from torch_npu._C import _device
from torch_npu.npu.streams import Stream

_CAPTURE_MODES = ("global", "thread_local", "relaxed")


class NPUGraph:
    """A captured sequence of NPU work (``torch.npu.NPUGraph()``)."""

    def __init__(self) -> None:
        self._stream: _device.FakeStream | None = None
        self._work: list[Callable[[], object]] | None = None

    def capture_begin(
        self, pool: tuple[int, int] | None = None, capture_error_mode: str = "global"
    ) -> None:
        if capture_error_mode not in _CAPTURE_MODES:
            raise RuntimeError(
                "Unknown capture error mode. Expected `global`, `thread_local`, or `relaxed`, "
                f"got {capture_error_mode}" + _device.pta_error("ERR00001", "invalid parameter")
            )
        if self._work is not None:
            raise RuntimeError(
                "This NPUGraph instance already owns a captured graph. To capture a new graph, "
                "create a new instance."
            )
        index = _device.current_index()
        stream = _device.current_stream(index)
        if stream is _device.DEVICES[index].default_stream():
            raise RuntimeError(
                "NPU graphs must be captured on a non-default stream. (However, after capture, "
                "it's ok to replay them on the default stream.)"
            )
        with _device.LOCK:
            stream.recording = []
            stream.invalidated = False
        self._stream = stream

    def capture_end(self) -> None:
        stream = self._stream
        if stream is None or _device.current_stream(stream.index) is not stream:
            raise RuntimeError("Capture must end on the same stream it began on.")
        with _device.LOCK:
            work, stream.recording = stream.recording, None
        if stream.invalidated:
            raise RuntimeError(
                "NPU function error: c10_npu::acl::AclmdlRICaptureEnd(capture_stream_, "
                "&model_ri), error code is 507903"
                + _device.pta_error("ERR00100", "call acl api failed")
            )
        self._work = work

    def replay(self) -> None:
        if self._work is None or self._stream is None:
            raise RuntimeError("Called NPUGraph::replay without a preceding successful capture.")
        target = _device.current_stream(self._stream.index)
        for item in self._work:
            target.push(item)

    def reset(self) -> None:
        self._work = None

    def pool(self) -> tuple[int, int]:
        if self._work is None:
            raise RuntimeError("Called NPUGraph::pool() without a preceding successful capture.")
        return (id(self), 0)


class graph:
    """Capture the NPU work of a ``with`` block into ``npu_graph``, on ``stream`` or a side
    stream (``torch.npu.graph``)."""

    default_capture_stream: Stream | None = None

    def __init__(
        self,
        npu_graph: NPUGraph,
        pool: tuple[int, int] | None = None,
        stream: Stream | None = None,
        auto_dispatch_capture: bool = False,
        capture_error_mode: str = "global",
    ) -> None:
        if graph.default_capture_stream is None:
            graph.default_capture_stream = Stream()
        self.pool = pool
        self.capture_stream = stream if stream is not None else graph.default_capture_stream
        self.npu_graph = npu_graph
        self.capture_error_mode = capture_error_mode
        self._context = _device.using_stream(self.capture_stream._stream)

    def __enter__(self) -> None:
        _device.DEVICES[_device.current_index()].synchronize()
        self._context.__enter__()
        self.npu_graph.capture_begin(self.pool, capture_error_mode=self.capture_error_mode)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.npu_graph.capture_end()
        finally:
            self._context.__exit__(exc_type, exc, tb)


def is_current_stream_capturing() -> bool:
    """True while a graph captures this thread's current stream."""
    return _device.current_stream(_device.current_index()).recording is not None


__all__ = ["NPUGraph", "graph", "is_current_stream_capturing"]
