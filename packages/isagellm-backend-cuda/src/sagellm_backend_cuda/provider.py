"""The ``cuda`` factory's target: the shared torch provider on a GPU, with the CUDA parts.

What the cuda backend adds to the torch layer, and nothing else: the :class:`CudaAdapter`, the
one-launch KV page movement (:class:`TritonPageMover`), CUDA graph capture
(:class:`CudaGraphs`) and the Triton ``rms_norm`` registered over the reference kernel.
"""

from __future__ import annotations

import os

import torch

from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.factory import DeviceSelection, OptionValue
from sagellm_backend.torch_backend.provider import TorchBackendProvider, create_torch_provider
from sagellm_backend_cuda.adapter import CudaAdapter, PooledEvent, visible_devices_text
from sagellm_backend_cuda.graphs import CudaGraphs
from sagellm_backend_cuda.kernels import rms_norm
from sagellm_backend_cuda.movement import TritonPageMover

__all__ = ["CUDA", "create_cuda_provider"]

CUDA = CudaAdapter()
"""The process's GPUs; every cuda provider shares it (and so its event pool)."""


def create_cuda_provider(
    device: DeviceSelection, **options: OptionValue
) -> TorchBackendProvider[torch.cuda.Stream, PooledEvent]:
    """A provider on ``cuda:N`` (N asked for, else LOCAL_RANK's device, else 0)."""
    count = CUDA.device_count()
    if device.index is not None and device.index >= count:
        raise InvalidArgumentError(
            f"cuda:{device.index} is out of range: {visible_devices_text(count)}",
            hint=f"use cuda:0..cuda:{count - 1}; indices count the visible devices only",
        )
    mover = TritonPageMover()
    provider = create_torch_provider(
        CUDA, device, options, os.environ, mover=mover, graphs=CudaGraphs(CUDA, mover)
    )
    reference = provider.kernel_spec("rms_norm")
    provider.register_kernel(
        "rms_norm",
        rms_norm,
        kind=reference.kind,
        dtypes=reference.dtypes,
        reference=reference.reference,
        make_inputs=reference.make_inputs,
        compare=reference.compare,
        override=True,
    )
    return provider
