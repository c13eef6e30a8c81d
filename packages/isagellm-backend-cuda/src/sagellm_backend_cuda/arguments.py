"""Argument checks the cuda backend's kernels run before they queue anything.

Each raises InvalidArgumentError naming the argument, what it got and what the kernel accepts,
so a bad call fails on the host and changes no tensor.
"""

from __future__ import annotations

import torch

from sagellm_backend.errors import InvalidArgumentError

__all__ = [
    "FLOAT_DTYPES",
    "INDEX_DTYPES",
    "dtype_name",
    "require_dtype",
    "require_same_device",
    "require_shape",
    "rows_of",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16`` for ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")


def require_dtype(
    op: str, name: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...]
) -> None:
    """``tensor`` is a tensor whose dtype is one of ``dtypes``."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgumentError(
            f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}",
            hint=f"pass {name} as a tensor on the GPU",
        )
    if tensor.dtype not in dtypes:
        accepted = ", ".join(dtype_name(d) for d in dtypes)
        raise InvalidArgumentError(
            f"{op}: {name} is {dtype_name(tensor.dtype)}, not one of {accepted}",
            hint=f"convert {name} with .to() before calling {op}",
        )


def require_shape(op: str, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    """``tensor`` has exactly ``shape`` (-1 matches any size)."""
    if tensor.dim() != len(shape) or any(
        want not in (-1, got) for want, got in zip(shape, tensor.shape, strict=True)
    ):
        wanted = ", ".join("*" if s == -1 else str(s) for s in shape)
        raise InvalidArgumentError(
            f"{op}: {name} has shape {list(tensor.shape)}, expected [{wanted}]",
            hint=f"pass {name} shaped as the op's signature says (sagellm_backend.ops)",
        )


def require_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """Every tensor is on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        where = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise InvalidArgumentError(
            f"{op}: tensors are on different devices ({where})",
            hint="move every argument to the backend's device before the call",
        )
    return first


def rows_of(op: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor[..., width]`` as a ``[rows, width]`` view of the same memory, last dim contiguous.

    In-place kernels write through this view, so a tensor whose rows cannot be viewed without a
    copy, or whose rows overlap, is refused rather than silently copied.
    """
    if tensor.dim() == 0:
        raise InvalidArgumentError(
            f"{op}: {name} is a scalar", hint=f"pass {name} as [..., features]"
        )
    width = tensor.shape[-1]
    try:
        rows = tensor.view(-1, width) if tensor.dim() != 2 else tensor
    except RuntimeError:
        rows = None
    if (
        rows is None
        or (width > 1 and rows.stride(1) != 1)
        or (rows.shape[0] > 1 and rows.stride(0) < width)
    ):
        raise InvalidArgumentError(
            f"{op}: {name} with shape {list(tensor.shape)} and strides {list(tensor.stride())} "
            "is not a set of separate rows with contiguous features",
            hint=f"pass {name}.contiguous() (its features must be adjacent in memory)",
        )
    return rows
