"""The gated activation of a Llama-style MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sagellm_backend.torch_backend.arguments import fail, tensor_arg

__all__ = ["silu_and_mul"]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x[..., 2 * d]``, a new tensor."""
    op = "silu_and_mul"
    gate_up = tensor_arg(op, "x", x, "[..., 2 * d]")
    width = gate_up.shape[-1]
    if width == 0 or width % 2:
        fail(op, f"x's last dimension must be even and non-zero, got {width}", "pass [gate, up]")
    half = width // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]
