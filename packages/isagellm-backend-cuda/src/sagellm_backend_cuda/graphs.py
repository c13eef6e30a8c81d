"""CUDA graph capture of the backend's device operations (capability ``has_graph_exec``).

Inside ``provider.capture_graph(stream)`` the backend's device operations (KV copies and swaps,
kernels, collectives) are captured with ``torch.cuda.CUDAGraph`` instead of run; ``replay()``
queues them again on the capture stream. Host-side calls are refused with GraphCaptureError
for the whole capture: the provider refuses allocation, freeing and reads, the adapter every
call that would wait for the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from sagellm_backend.errors import GraphCaptureError
from sagellm_backend.protocols import Graph
from sagellm_backend_cuda.adapter import CudaAdapter
from sagellm_backend_cuda.movement import TritonPageMover

__all__ = ["CudaGraph", "CudaGraphs"]


class CudaGraph:
    """A captured sequence; it holds what its replays read (pinned page indices)."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.stream = stream
        self.kept: list[torch.Tensor] = []
        self.captured = False

    def replay(self) -> None:
        """Queue the captured operations on the stream they were captured on."""
        if not self.captured:
            raise GraphCaptureError(
                "this graph's capture has not finished", hint="replay after the capture block"
            )
        with torch.cuda.stream(self.stream):
            self.graph.replay()


class CudaGraphs:
    """The torch layer's graph hook for CUDA."""

    def __init__(self, adapter: CudaAdapter, mover: TritonPageMover) -> None:
        self._adapter = adapter
        self._mover = mover

    def capture(self, stream: torch.cuda.Stream | None) -> AbstractContextManager[Graph]:
        """Capture on ``stream``; None takes a side stream (CUDA cannot capture the default)."""
        return self._capture(
            stream if stream is not None else self._adapter.new_stream(torch.cuda.current_device())
        )

    @contextmanager
    def _capture(self, stream: torch.cuda.Stream) -> Iterator[Graph]:
        handle = CudaGraph(stream)
        # An empty capture is a valid (no-op) graph here, not the mistake torch warns about.
        # "relaxed": the pinned page-index buffers a captured KV move allocates are allowed;
        # calls that would wait for the device are refused by the adapter before they reach CUDA.
        with (
            warnings.catch_warnings(),
            self._mover.keeping(handle.kept),
            torch.cuda.graph(handle.graph, stream=stream, capture_error_mode="relaxed"),
        ):
            warnings.filterwarnings("ignore", message="The CUDA Graph is empty")
            with self._adapter.captures.scope():
                yield handle
        handle.captured = True
