"""sagellm_backend_cuda: the ``cuda`` backend of sageLLM, on NVIDIA GPUs through PyTorch.

Importing this package imports no torch and touches no GPU: the entry point is a
:class:`~sagellm_backend.factory.BackendFactory` whose probe reads the torch build from its files
and counts devices through NVML (no CUDA context, so processes forked later can still use the
GPU). Creating a backend imports torch and builds the shared torch layer's provider on a
:class:`~sagellm_backend_cuda.adapter.CudaAdapter`, with one-launch Triton kernels for KV-cache
movement and a CUDA-graph capture.

Device selection: ``cuda:N`` is device N among those ``CUDA_VISIBLE_DEVICES`` leaves visible;
``cuda`` is the device of ``LOCAL_RANK`` under a launcher such as torchrun, else device 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagellm_backend.factory import BackendFactory
from sagellm_backend.torch_backend.options import torch_options

if TYPE_CHECKING:
    import torch

    from sagellm_backend.torch_backend.provider import TorchBackendProvider
    from sagellm_backend_cuda.adapter import PooledEvent

__all__ = ["create_cuda_backend"]

CUDA_KV_MEMORY_MB = 1024
"""Default device KV pool: 1 GiB; set ``num_blocks`` or ``kv_memory_mb`` for a real model."""
CUDA_HOST_KV_MEMORY_MB = 1024
"""Default pinned host KV pool (the swap target): 1 GiB."""

create_cuda_backend: BackendFactory[TorchBackendProvider[torch.cuda.Stream, PooledEvent]] = (
    BackendFactory(
        "cuda",
        "sagellm_backend_cuda.provider:create_cuda_provider",
        options=torch_options(
            kv_memory_mb=CUDA_KV_MEMORY_MB, host_kv_memory_mb=CUDA_HOST_KV_MEMORY_MB
        ),
        probe="sagellm_backend_cuda.probe:probe",
        priority=100,
        description="NVIDIA GPUs through PyTorch: KV pool in device memory, Triton KV movement, "
        "NCCL collectives, CUDA graphs",
    )
)
