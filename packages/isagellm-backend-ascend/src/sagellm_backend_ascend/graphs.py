"""NPU graph capture of the backend's device operations (capability ``has_graph_exec``).

Inside ``provider.capture_graph(stream)`` the backend's device operations (KV copies, kernels,
collectives) are captured with ``torch.npu.NPUGraph`` through ``torch.npu.graph`` instead of
run; ``replay()`` queues them again on the capture stream. torch_npu has both since its 2.5.1
release (Ascend Extension for PyTorch 7.0.0, on CANN 8.1.RC1's ``aclmdlRI`` capture);
:func:`graph_module` finds them on the installed torch_npu, and without them the backend claims
no graph capture. Host-side calls are refused with GraphCaptureError for the whole capture: the
provider refuses allocation, freeing and reads, the adapter every call that would wait for the
device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from types import ModuleType
from typing import cast

from sagellm_backend.errors import GraphCaptureError, InvalidArgumentError
from sagellm_backend.protocols import Graph
from sagellm_backend_ascend.device import NpuAdapter
from sagellm_backend_ascend.runtime import NpuGraph, NpuGraphModule, NpuStream

__all__ = ["CapturedNpuGraph", "NpuGraphs", "graph_module"]


def graph_module(torch_npu: ModuleType) -> NpuGraphModule | None:
    """``torch.npu`` as a graph module where the installed torch_npu can capture, else None."""
    npu = torch_npu.npu
    if hasattr(npu, "NPUGraph") and hasattr(npu, "graph"):
        return cast(NpuGraphModule, npu)
    return None


class CapturedNpuGraph:
    """A captured sequence, replayed on the stream it was captured on."""

    def __init__(self, graph: NpuGraph, stream: NpuStream, adapter: NpuAdapter) -> None:
        self.graph = graph
        self.stream = stream
        self.captured = False
        self._adapter = adapter

    def replay(self) -> None:
        """Queue the captured operations on the stream they were captured on."""
        if not self.captured:
            raise GraphCaptureError(
                "this graph's capture has not finished", hint="replay after the capture block"
            )
        with self._adapter.use_stream(self.stream):
            self.graph.replay()


class NpuGraphs:
    """The torch layer's graph hook for the NPU ``index`` of ``adapter``."""

    def __init__(self, adapter: NpuAdapter, graphs: NpuGraphModule, index: int) -> None:
        self._adapter = adapter
        self._graphs = graphs
        self._index = index

    def capture(self, stream: NpuStream | None) -> AbstractContextManager[Graph]:
        """Capture on ``stream``; None takes a side stream (the default stream cannot capture)."""
        if stream is None:
            return self._capture(self._adapter.new_stream(self._index))
        if stream == self._graphs.default_stream(self._index):
            raise InvalidArgumentError(
                "NPU graphs cannot be captured on the default stream",
                hint="capture on a stream from create_stream(), or pass no stream for a side "
                "stream; the graph may be replayed on any stream",
            )
        return self._capture(stream)

    @contextmanager
    def _capture(self, stream: NpuStream) -> Iterator[Graph]:
        handle = CapturedNpuGraph(self._graphs.NPUGraph(), stream, self._adapter)
        with self._graphs.graph(handle.graph, stream=stream), self._adapter.captures.scope():
            yield handle
        handle.captured = True
