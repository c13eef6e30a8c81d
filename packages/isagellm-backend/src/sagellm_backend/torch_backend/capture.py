"""CaptureGuard: a device adapter refuses to wait for the device while a graph is captured.

Waiting (synchronize, query, reading device memory) during a capture either fails inside the
vendor runtime or invalidates the capture; the guard refuses it first with GraphCaptureError.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sagellm_backend.errors import GraphCaptureError

__all__ = ["CaptureGuard"]


class CaptureGuard:
    """Counts the graph captures in progress on one adapter."""

    def __init__(self, graph_name: str) -> None:
        self._graph_name = graph_name
        self._lock = threading.Lock()
        self._count = 0

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Mark a capture in progress for the duration of the ``with`` block."""
        with self._lock:
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1

    def check(self, operation: str) -> None:
        """Raise GraphCaptureError if a capture is in progress."""
        if self._count:
            raise GraphCaptureError(
                f"{operation} waits for the device, which is not allowed while "
                f"{self._graph_name} is being captured",
                hint="finish the capture (leave the capture_graph block) first",
            )
