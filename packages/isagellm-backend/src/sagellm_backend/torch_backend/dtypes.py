"""DType <-> torch.dtype, for the dtypes a torch pool can hold."""

from __future__ import annotations

import torch

from sagellm_backend.dtypes import DType, coerce
from sagellm_backend.errors import CapabilityError

__all__ = ["KV_DTYPES", "from_torch_dtype", "to_torch_dtype"]

KV_DTYPES: dict[DType, torch.dtype] = {
    DType.FP32: torch.float32,
    DType.FP16: torch.float16,
    DType.BF16: torch.bfloat16,
}
"""DTypes a torch KV pool can hold; fp8, int8 and int4 KV need device kernels we do not ship."""


def to_torch_dtype(dtype: DType | str) -> torch.dtype:
    member = coerce(DType, dtype, "dtype")
    try:
        return KV_DTYPES[member]
    except KeyError:
        raise CapabilityError(
            f"the torch layer has no KV pool of dtype {member.value}",
            hint=f"use one of {', '.join(d.value for d in KV_DTYPES)}",
        ) from None


def from_torch_dtype(dtype: torch.dtype) -> DType:
    for member, value in KV_DTYPES.items():
        if value == dtype:
            return member
    raise CapabilityError(
        f"torch dtype {dtype} has no KV pool dtype",
        hint=f"use one of {', '.join(str(v) for v in KV_DTYPES.values())}",
    )
