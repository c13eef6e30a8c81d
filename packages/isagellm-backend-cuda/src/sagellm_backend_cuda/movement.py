"""TritonPageMover: the cuda backend's batched KV page movement, plugged into the torch pool.

Every batch between the device pool and itself or the pinned host pool is one launch of
:func:`~sagellm_backend_cuda.kernels.copy_pages` on the current stream, over all layers: block
copy (prefix sharing, beam search), swap out and swap in (preemption, offload). The page ids
cross to the device as one pinned, asynchronous copy (the kernel takes each pool's base off), so
issuing a batch never waits for the GPU.
Moves it does not accelerate (host to host, one GPU to another) are left to the pool's
reference path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from sagellm_backend.torch_backend.pool import DevicePages, int64s
from sagellm_backend_cuda.kernels import PageCopier

__all__ = ["TritonPageMover"]

_Launch = tuple[PageCopier, torch.device]


class TritonPageMover:
    """One-launch page copies within a GPU's pool and between it and pinned host memory."""

    def __init__(self) -> None:
        self._kept: list[torch.Tensor] | None = None
        self._copiers: dict[tuple[DevicePages, DevicePages], _Launch | None] = {}
        """By pair of pools: the copier and its GPU, or None for a pair left to the reference."""

    def move_pages(
        self,
        source: DevicePages,
        target: DevicePages,
        src_pages: Sequence[int],
        dst_pages: Sequence[int],
    ) -> bool:
        try:
            launch = self._copiers[source, target]
        except KeyError:
            launch = self._copiers[source, target] = _launch(source, target)
        if launch is None:
            return False
        copier, device = launch
        host = int64s(src_pages, dst_pages).view(2, len(src_pages)).pin_memory()
        with torch.cuda.device(device):
            copier(host.to(device, non_blocking=True), (source.base or 0, target.base or 0))
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


def _launch(source: DevicePages, target: DevicePages) -> _Launch | None:
    """The copier of a pair of pools on one GPU, or pinned host memory and one GPU; else None."""
    devices = {p.device for p in (source, target) if p.device.type == "cuda"}
    if len(devices) != 1 or any(p.device.type != "cuda" and not p.pinned for p in (source, target)):
        return None
    return PageCopier(source.tensor, target.tensor), devices.pop()
