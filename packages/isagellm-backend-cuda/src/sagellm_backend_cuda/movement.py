"""TritonPageMover: the cuda backend's batched KV page movement, plugged into the torch pool.

Every batch between the device pool and itself or the pinned host pool is one launch of
:func:`~sagellm_backend_cuda.kernels.copy_pages` on the current stream, over all layers: block
copy (prefix sharing, beam search), swap out and swap in (preemption, offload). The page indices
cross to the device as one pinned, asynchronous copy, so issuing a batch never waits for the GPU.
Moves it does not accelerate (host to host, one GPU to another) are left to the pool's
reference path.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from sagellm_backend.torch_backend.pool import DevicePages
from sagellm_backend_cuda.kernels import copy_pages

__all__ = ["TritonPageMover"]


class TritonPageMover:
    """One-launch page copies within a GPU's pool and between it and pinned host memory."""

    def __init__(self) -> None:
        self._kept: list[torch.Tensor] | None = None

    def move_pages(
        self,
        source: DevicePages,
        target: DevicePages,
        src_pages: Sequence[int],
        dst_pages: Sequence[int],
    ) -> bool:
        devices = {p.device for p in (source, target) if p.device.type == "cuda"}
        if len(devices) != 1 or any(
            p.device.type != "cuda" and not p.pinned for p in (source, target)
        ):
            return False
        device = devices.pop()
        ids = array("i", src_pages)
        ids.extend(dst_pages)
        host = torch.frombuffer(ids, dtype=torch.int32).view(2, len(src_pages)).pin_memory()
        with torch.cuda.device(device):
            pages = host.to(device, non_blocking=True)
            copy_pages(source.tensor, target.tensor, pages)
        if self._kept is not None:
            self._kept.append(host)
        return True

    @contextmanager
    def keeping(self, kept: list[torch.Tensor]) -> Iterator[None]:
        """Inside the block, keep the pinned index buffers alive in ``kept`` (for a graph,
        whose replays read them again)."""
        self._kept = kept
        try:
            yield
        finally:
            self._kept = None
