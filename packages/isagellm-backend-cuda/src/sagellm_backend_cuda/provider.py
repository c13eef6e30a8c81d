"""The ``cuda`` factory's target: the shared torch provider on a GPU, with the CUDA parts.

What the cuda backend adds to the torch layer, and nothing else: the :class:`CudaAdapter`, the
one-launch KV page movement (:class:`TritonPageMover`), CUDA graph capture
(:class:`CudaGraphs`) and the Triton kernels of the standard ops (:data:`KERNELS`), registered
over the torch layer's reference kernels of the same names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from sagellm_backend.errors import BackendUnavailableError, InvalidArgumentError
from sagellm_backend.factory import DeviceSelection, OptionValue
from sagellm_backend.ops import STANDARD_OPS
from sagellm_backend.torch_backend.kernels import KERNEL_DTYPES
from sagellm_backend.torch_backend.provider import TorchBackendProvider, create_torch_provider
from sagellm_backend_cuda.adapter import CudaAdapter, PooledEvent, visible_devices_text
from sagellm_backend_cuda.attention import paged_attention_decode, paged_attention_prefill
from sagellm_backend_cuda.graphs import CudaGraphs
from sagellm_backend_cuda.kv_write import kv_cache_write
from sagellm_backend_cuda.layers import fused_add_rms_norm, rms_norm, rotary_embedding, silu_and_mul
from sagellm_backend_cuda.movement import TritonPageMover
from sagellm_backend_cuda.sampling import sample

__all__ = ["CUDA", "KERNELS", "create_cuda_provider", "register_triton_kernels"]

CUDA = CudaAdapter()
"""The process's GPUs; every cuda provider shares it (and so its event pool)."""


def create_cuda_provider(
    device: DeviceSelection, **options: OptionValue
) -> TorchBackendProvider[torch.cuda.Stream, PooledEvent]:
    """A provider on ``cuda:N`` (N asked for, else LOCAL_RANK's device, else 0)."""
    count = CUDA.device_count()
    if not count:  # the probe saw devices that CUDA does not (e.g. an unknown UUID)
        raise BackendUnavailableError(
            f"no CUDA device is usable: {visible_devices_text(count)}",
            hint="set CUDA_VISIBLE_DEVICES to devices of this machine (nvidia-smi -L lists them)",
        )
    if device.index is not None and device.index >= count:
        raise InvalidArgumentError(
            f"cuda:{device.index} is out of range: {visible_devices_text(count)}",
            hint=f"use cuda:0..cuda:{count - 1}; indices count the visible devices only",
        )
    mover = TritonPageMover()
    provider = create_torch_provider(
        CUDA, device, options, os.environ, mover=mover, graphs=CudaGraphs(CUDA, mover)
    )
    register_triton_kernels(provider)
    return provider


KERNELS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("kv_cache_write", kv_cache_write),
    ("paged_attention_decode", paged_attention_decode),
    ("paged_attention_prefill", paged_attention_prefill),
    ("rotary_embedding", rotary_embedding),
    ("rms_norm", rms_norm),
    ("fused_add_rms_norm", fused_add_rms_norm),
    ("silu_and_mul", silu_and_mul),
    ("sample", sample),
)
"""The Triton kernels, each registered under the name of the reference kernel it replaces."""


def register_triton_kernels(provider: TorchBackendProvider[Any, Any]) -> None:
    """Register :data:`KERNELS` over the provider's reference kernels of the same names.

    Each keeps its reference's checks (reference, input generator, tolerance), so
    ``kernel_spec(name).check(seed, dtype)`` compares the Triton kernel with the reference; a
    standard op the torch layer has no reference for is registered bare.
    """
    known = {spec.name: spec for spec in provider.list_kernels()}
    for name, impl in KERNELS:
        reference = known.get(name)
        if reference is None:
            provider.register_kernel(name, impl, kind=STANDARD_OPS[name].kind, dtypes=KERNEL_DTYPES)
            continue
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
