"""torch_npu's fused cache and attention operators, registered where the installed torch_npu
has them; otherwise the reference kernels serve.

- ``paged_attention_decode`` (the torch layer's reference kernel, same signature) is served by
  ``torch_npu.npu_fused_infer_attention_score`` with a block table.
- ``reshape_and_cache(key[n, kv_heads, d], value[n, kv_heads, d], kv_layer[pages, 2, tokens,
  kv_heads, d], slots[n]) -> kv_layer`` writes each new token's K and V into its slot
  (``page * tokens + offset``) of a pool layer; ``torch_npu._npu_reshape_and_cache`` serves it
  where it exists, a reference index_put otherwise.

The fused operators serve fp16 and bf16; other dtypes run the reference implementations. Both
kernels are checked against independent references by ``KernelSpec.check``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import TypeVar

import torch

from sagellm_backend.dtypes import DType, KernelKind
from sagellm_backend.kernels import KernelInputs
from sagellm_backend.torch_backend.dtypes import to_torch_dtype
from sagellm_backend.torch_backend.kernels import KERNEL_DTYPES, compare
from sagellm_backend.torch_backend.provider import TorchBackendProvider

__all__ = ["FUSED_ATTENTION", "FUSED_CACHE", "register_npu_kernels", "reshape_and_cache"]

FUSED_ATTENTION = "npu_fused_infer_attention_score"
FUSED_CACHE = "_npu_reshape_and_cache"

_FUSED_DTYPES = (torch.float16, torch.bfloat16)

S = TypeVar("S")
E = TypeVar("E")


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_layer: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """Write ``key[i]`` and ``value[i]`` to slot ``slots[i]`` of ``kv_layer``; returns it."""
    tokens = kv_layer.shape[2]
    index = slots.long()
    pages, offsets = index // tokens, index % tokens
    kv_layer[:, 0].index_put_((pages, offsets), key)
    kv_layer[:, 1].index_put_((pages, offsets), value)
    return kv_layer


def _reshape_and_cache_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_layer: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    tokens = kv_layer.shape[2]
    out = kv_layer.cpu().clone()
    for i, slot in enumerate(slots.tolist()):
        out[slot // tokens, 0, slot % tokens] = key[i].cpu()
        out[slot // tokens, 1, slot % tokens] = value[i].cpu()
    return out.to(kv_layer.device)


def _fused_reshape_and_cache(
    op: Callable[..., None],
    key: torch.Tensor,
    value: torch.Tensor,
    kv_layer: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    if key.dtype not in _FUSED_DTYPES:
        return reshape_and_cache(key, value, kv_layer, slots)
    op(key, value, kv_layer[:, 0], kv_layer[:, 1], slots.to(torch.int32))
    return kv_layer


def _fused_decode(
    op: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    fallback: Callable[..., torch.Tensor],
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    if query.dtype not in _FUSED_DTYPES:
        return fallback(query, kv_layer, block_tables, seq_lens, scale, out=out)
    pages, _, tokens, kv_heads, head_size = kv_layer.shape
    key = kv_layer[:, 0].reshape(pages, tokens, kv_heads * head_size)
    value = kv_layer[:, 1].reshape(pages, tokens, kv_heads * head_size)
    fused, _ = op(
        query.unsqueeze(2),
        key,
        value,
        block_table=block_tables.to(torch.int32),
        actual_seq_lengths_kv=[int(n) for n in seq_lens.tolist()],
        num_heads=query.shape[1],
        num_key_value_heads=kv_heads,
        scale=scale,
        input_layout="BNSD",
        block_size=tokens,
    )
    result = torch.where((seq_lens == 0)[:, None, None], 0.0, fused.squeeze(2)).to(query.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


class _CacheInputs:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, seed: int, dtype: DType) -> KernelInputs:
        g = torch.Generator().manual_seed(seed)
        num_pages, tokens, kv_heads, head_size, new = 12, 8, 2, 32, 21
        element = to_torch_dtype(dtype)

        def randn(*shape: int) -> torch.Tensor:
            values = torch.randn(shape, generator=g, dtype=torch.float64)
            return values.to(dtype=element, device=self.device)

        kv_layer = randn(num_pages, 2, tokens, kv_heads, head_size)
        key, value = randn(new, kv_heads, head_size), randn(new, kv_heads, head_size)
        slots = torch.randperm(num_pages * tokens, generator=g)[:new].to(self.device)
        return (key, value, kv_layer, slots), {}


def register_npu_kernels(
    provider: TorchBackendProvider[S, E], torch_npu: ModuleType
) -> tuple[str, ...]:
    """Register the NPU kernels; returns the names of the fused operators used."""
    used: list[str] = []
    attention = provider.kernel_spec("paged_attention_decode")
    if hasattr(torch_npu, FUSED_ATTENTION):
        provider.register_kernel(
            "paged_attention_decode",
            partial(_fused_decode, getattr(torch_npu, FUSED_ATTENTION), attention.impl),
            kind=attention.kind,
            dtypes=attention.dtypes,
            reference=attention.reference,
            make_inputs=attention.make_inputs,
            compare=attention.compare,
            override=True,
        )
        used.append(FUSED_ATTENTION)
    cache_impl: Callable[..., torch.Tensor] = reshape_and_cache
    if hasattr(torch_npu, FUSED_CACHE):
        cache_impl = partial(_fused_reshape_and_cache, getattr(torch_npu, FUSED_CACHE))
        used.append(FUSED_CACHE)
    provider.register_kernel(
        "reshape_and_cache",
        cache_impl,
        kind=KernelKind.ATTENTION,
        dtypes=KERNEL_DTYPES,
        reference=_reshape_and_cache_reference,
        make_inputs=_CacheInputs(provider.torch_device),
        compare=compare,
    )
    return tuple(used)
