"""The ``cuda`` factory's target: the shared torch provider on a GPU, with the CUDA parts.

What the cuda backend adds to the torch layer, and nothing else: the :class:`CudaAdapter`, the
one-launch KV page movement (:class:`TritonPageMover`), CUDA graph capture
(:class:`CudaGraphs`) and the Triton kernels registered over the reference kernels of the same
names (``rms_norm``, ``paged_attention_decode``, ``paged_attention_prefill``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from sagellm_backend.dtypes import DType
from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.factory import DeviceSelection, OptionValue
from sagellm_backend.ops import STANDARD_OPS
from sagellm_backend.torch_backend.provider import TorchBackendProvider, create_torch_provider
from sagellm_backend_cuda.adapter import CudaAdapter, PooledEvent, visible_devices_text
from sagellm_backend_cuda.attention import paged_attention_decode, paged_attention_prefill
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
    for name, impl in KERNELS:
        _register_over_reference(provider, name, impl)
    return provider


KERNELS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("rms_norm", rms_norm),
    ("paged_attention_decode", paged_attention_decode),
    ("paged_attention_prefill", paged_attention_prefill),
)
"""The Triton kernels, each registered under the name of the reference kernel it replaces."""


def _register_over_reference(
    provider: TorchBackendProvider[torch.cuda.Stream, PooledEvent],
    name: str,
    impl: Callable[..., Any],
) -> None:
    """Register ``impl`` with the reference, inputs and tolerance of the kernel it replaces;
    a standard op the torch layer has no reference for is registered bare."""
    known = {spec.name: spec for spec in provider.list_kernels()}
    reference = known.get(name)
    if reference is None:
        provider.register_kernel(
            name, impl, kind=STANDARD_OPS[name].kind, dtypes=(DType.FP32, DType.FP16, DType.BF16)
        )
        return
    provider.register_kernel(
        name,
        impl,
        kind=reference.kind,
        dtypes=reference.dtypes,
        reference=reference.reference,
        make_inputs=reference.make_inputs,
        compare=reference.compare,
        override=True,
    )
