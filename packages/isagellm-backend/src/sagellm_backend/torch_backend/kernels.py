"""The torch layer's standard kernels, registered from one table; device wheels override them.

Each row is a standard op (:mod:`sagellm_backend.ops`): the implementation (in the module of
its family: :mod:`.attention`, :mod:`.kv_write`, :mod:`.rotary`, :mod:`.norms`,
:mod:`.activations`, :mod:`.sampling`), its float64 reference computed another way
(:mod:`.references`), its input generator (:mod:`.op_inputs`) and :func:`compare`, so
``KernelSpec.check`` compares two independent computations. A device wheel replaces a kernel
with ``register_kernel(name, fast_impl, ..., override=True)``, passing the same reference,
input generator and comparator (``kernel_spec(name)`` holds them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from sagellm_backend.dtypes import DType
from sagellm_backend.kernels import InputMaker, KernelTable
from sagellm_backend.ops import STANDARD_OPS
from sagellm_backend.protocols.ops import (
    FusedAddRmsNorm,
    KVCacheWrite,
    PagedAttentionDecode,
    PagedAttentionPrefill,
    RmsNorm,
    RotaryCosSinCache,
    RotaryEmbedding,
    Sample,
    SiluAndMul,
)
from sagellm_backend.torch_backend import references as ref
from sagellm_backend.torch_backend.activations import silu_and_mul
from sagellm_backend.torch_backend.attention import (
    paged_attention_decode,
    paged_attention_prefill,
)
from sagellm_backend.torch_backend.dtypes import to_torch_dtype
from sagellm_backend.torch_backend.kv_write import kv_cache_write
from sagellm_backend.torch_backend.norms import fused_add_rms_norm, rms_norm
from sagellm_backend.torch_backend.op_inputs import OpInputs
from sagellm_backend.torch_backend.rotary import CosSinCache, rotary_embedding
from sagellm_backend.torch_backend.sampling import sample

__all__ = ["KERNEL_DTYPES", "compare", "register_reference_kernels", "standard_kernels"]

KERNEL_DTYPES = (DType.FP32, DType.FP16, DType.BF16)

_TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

Row = tuple[Callable[..., Any], Callable[..., Any], InputMaker]
"""A kernel, its reference and its input generator."""


def compare(result: object, expected: object, dtype: DType) -> None:
    """AssertionError unless ``result`` matches ``expected`` within ``dtype``'s tolerance.

    NaN matches NaN only where the reference has one too: in memory an op must not touch.
    """
    rtol, atol = _TOLERANCES[to_torch_dtype(dtype)]
    torch.testing.assert_close(_wide(result), _wide(expected), rtol=rtol, atol=atol, equal_nan=True)


def _wide(value: object) -> object:
    """Floating tensors in float64 (torch compares half types slowly on the CPU)."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_wide(v) for v in value)
    return value


def standard_kernels(device: torch.device) -> dict[str, Row]:
    """Every standard kernel of the torch layer, with inputs made on ``device``.

    The typed names check, statically, that each kernel has its protocol's signature.
    """
    inputs = OpInputs(device)
    kv_write: KVCacheWrite[torch.Tensor] = kv_cache_write
    decode: PagedAttentionDecode[torch.Tensor] = paged_attention_decode
    prefill: PagedAttentionPrefill[torch.Tensor] = paged_attention_prefill
    cos_sin: RotaryCosSinCache[torch.Tensor] = CosSinCache(device)
    rotary: RotaryEmbedding[torch.Tensor] = rotary_embedding
    norm: RmsNorm[torch.Tensor] = rms_norm
    add_norm: FusedAddRmsNorm[torch.Tensor] = fused_add_rms_norm
    gated: SiluAndMul[torch.Tensor] = silu_and_mul
    draw: Sample[torch.Tensor] = sample
    return {
        "kv_cache_write": (kv_write, ref.kv_cache_write_reference, inputs.kv_cache_write),
        "paged_attention_decode": (
            decode,
            ref.paged_attention_decode_reference,
            inputs.paged_attention_decode,
        ),
        "paged_attention_prefill": (
            prefill,
            ref.paged_attention_prefill_reference,
            inputs.paged_attention_prefill,
        ),
        "rotary_cos_sin_cache": (
            cos_sin,
            ref.CosSinCacheReference(device),
            inputs.rotary_cos_sin_cache,
        ),
        "rotary_embedding": (rotary, ref.rotary_embedding_reference, inputs.rotary_embedding),
        "rms_norm": (norm, ref.rms_norm_reference, inputs.rms_norm),
        "fused_add_rms_norm": (
            add_norm,
            ref.fused_add_rms_norm_reference,
            inputs.fused_add_rms_norm,
        ),
        "silu_and_mul": (gated, ref.silu_and_mul_reference, inputs.silu_and_mul),
        "sample": (draw, ref.sample_reference, inputs.sample),
    }


def register_reference_kernels(
    table: KernelTable,
    device: torch.device,
    *,
    dtypes: Iterable[DType] = KERNEL_DTYPES,
    override: bool = False,
) -> None:
    """Register every standard kernel for ``dtypes`` (those of KERNEL_DTYPES the device
    computes in), with inputs generated on ``device``."""
    listed = tuple(dtypes)
    for name, (impl, reference, make_inputs) in standard_kernels(device).items():
        table.register(
            name,
            impl,
            kind=STANDARD_OPS[name].kind,
            reference=reference,
            make_inputs=make_inputs,
            dtypes=listed,
            compare=compare,
            override=override,
        )
