"""RMS normalisation, alone and fused with the residual add that precedes it in a decoder."""

from __future__ import annotations

import torch

from sagellm_backend.torch_backend.arguments import (
    fail,
    number_arg,
    same_device,
    tensor_arg,
    written_arg,
)

__all__ = ["fused_add_norm_args", "fused_add_rms_norm", "norm_args", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x ** 2) + eps) * weight`` over the last dimension, accumulated in fp32
    (float64 for float64), a new tensor of ``x``'s dtype."""
    rows, w, epsilon = norm_args("rms_norm", x, weight, eps)
    return _normed(rows, w, epsilon)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x``, then ``x = rms_norm(residual, weight, eps)``, both in place."""
    rows, res, w, epsilon = fused_add_norm_args(x, residual, weight, eps)
    res.add_(rows)
    rows.copy_(_normed(res, w, epsilon))
    return x, residual


def fused_add_norm_args(
    x: object, residual: object, weight: object, eps: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``fused_add_rms_norm``'s ``x``, ``residual``, ``weight`` and ``eps`` checked, the two it
    writes apart in memory (a device wheel's kernels share it)."""
    op = "fused_add_rms_norm"
    rows, w, epsilon = norm_args(op, x, weight, eps)
    res = tensor_arg(op, "residual", residual, "[..., h]")
    same_device(op, rows, residual=res)
    if res.shape != rows.shape or res.dtype != rows.dtype:
        fail(
            op,
            f"residual is {tuple(res.shape)} {res.dtype}, x {tuple(rows.shape)} {rows.dtype}",
            "pass the residual stream shaped and typed like x",
        )
    written_arg(op, "residual", res, rows)
    written_arg(op, "x", rows)
    return rows, res, w, epsilon


def norm_args(
    op: str, x: object, weight: object, eps: object
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``x[..., h]``, ``weight[h]`` and ``eps`` checked (a device wheel's kernels share it)."""
    rows = tensor_arg(op, "x", x, "[..., h]")
    w = tensor_arg(op, "weight", weight, "[h]")
    same_device(op, rows, weight=w)
    if w.shape[0] != rows.shape[-1] or rows.shape[-1] == 0:
        fail(
            op,
            f"weight has {w.shape[0]} features, x {rows.shape[-1]}",
            "pass the norm's weight for x's hidden size",
        )
    return rows, w, number_arg(op, "eps", eps, minimum=0.0)


def _normed(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    wide = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    scaled = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (scaled * weight.to(wide.dtype)).to(x.dtype)
