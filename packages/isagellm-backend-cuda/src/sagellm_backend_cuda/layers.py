# Triton kernels take untyped parameters (Triton reads their annotations itself) and triton.jit
# is untyped, so these two checks cannot apply to the kernel bodies in this module.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Triton kernels of a transformer layer's small ops: norms, rotary embedding, gated activation.

Each computes in fp32 whatever the storage dtype (fp32, fp16, bf16), reads its inputs once and
writes its outputs once, and has the contract of the standard op of the same name
(:mod:`sagellm_backend.protocols.ops`). Arguments are checked before anything is queued. They
run on the GPU and, for development without one, under Triton's interpreter
(``TRITON_INTERPRET=1``, set before this module is imported) on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.torch_backend.arguments import number_arg, written_arg
from sagellm_backend_cuda.arguments import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    dtype_name,
    require_dtype,
    require_same_device,
    require_shape,
    rows_of,
)

__all__ = ["fused_add_rms_norm", "rms_norm", "rotary_embedding", "silu_and_mul"]

_MAX_HIDDEN = 1 << 16
_TILE = 4096
"""Elements one program of a row-wise kernel aims to hold: a few 16-byte vectors a thread."""


def _power_of_2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _warps(elements: int) -> int:
    return min(16, int(triton.next_power_of_2(max(1, elements // 512))))


# Norms.


@triton.jit
def _rms_norm_kernel(
    x,
    x_stride,
    residual,
    residual_stride,
    weight,
    out,
    out_stride,
    rows,
    hidden,
    eps,
    ADD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # ROWS rows of BLOCK >= hidden columns a program; with ADD, residual += x first (rounded to
    # the storage dtype, as the in-place add stores it) and the norm is of the new residual.
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    column = tl.arange(0, BLOCK)[None, :]
    mask = (row < rows) & (column < hidden)
    values = tl.load(x + row * x_stride + column, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        summed = values + tl.load(
            residual + row * residual_stride + column, mask=mask, other=0.0
        ).to(tl.float32)
        stored = summed.to(residual.dtype.element_ty)
        tl.store(residual + row * residual_stride + column, stored, mask=mask)
        values = stored.to(tl.float32)
    scale = tl.rsqrt(tl.sum(values * values, axis=1) / hidden + eps)
    w = tl.load(weight + column, mask=column < hidden, other=0.0).to(tl.float32)
    result = values * scale[:, None] * w
    tl.store(out + row * out_stride + column, result.to(out.dtype.element_ty), mask=mask)


def _check_norm(op: str, x: torch.Tensor, weight: torch.Tensor, eps: object) -> int:
    number_arg(op, "eps", eps, minimum=0.0)
    require_dtype(op, "x", x, FLOAT_DTYPES)
    require_dtype(op, "weight", weight, FLOAT_DTYPES)
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise InvalidArgumentError(
            f"{op} needs x[..., hidden] and weight[hidden], got {list(x.shape)} and "
            f"{list(weight.shape)}",
            hint="pass the layer's norm weight, one value per feature",
        )
    hidden = x.shape[-1]
    if not 0 < hidden <= _MAX_HIDDEN:
        raise InvalidArgumentError(
            f"{op} supports hidden sizes 1..{_MAX_HIDDEN}, got {hidden}",
            hint="use the torch layer's reference kernel for wider rows",
        )
    return hidden


def _launch_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    out: torch.Tensor,
    eps: float,
) -> None:
    rows, hidden = x.shape
    if rows == 0:
        return
    block = triton.next_power_of_2(hidden)
    per_program = max(1, min(_TILE // block, triton.next_power_of_2(rows)))
    _rms_norm_kernel[(triton.cdiv(rows, per_program),)](
        x,
        x.stride(0),
        x if residual is None else residual,
        x.stride(0) if residual is None else residual.stride(0),
        weight,
        out,
        out.stride(0),
        rows,
        hidden,
        eps,
        ADD=residual is not None,
        ROWS=per_program,
        BLOCK=block,
        num_warps=_warps(per_program * block),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dimension, in fp32, one launch.

    ``x[..., hidden]`` and ``weight[hidden]`` on one device; the result is a new tensor in
    ``x``'s dtype.
    """
    hidden = _check_norm("rms_norm", x, weight, eps)
    require_same_device("rms_norm", x=x, weight=weight)
    rows = x.reshape(-1, hidden)
    if hidden > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_norm(rows, None, weight.contiguous(), out.view(-1, hidden), eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x``, then ``x = rms_norm(residual, weight, eps)``, both in place, one launch.

    ``x`` and ``residual`` have one shape and dtype, their features contiguous; the norm is of
    the residual as stored (rounded to its dtype). Returns ``(x, residual)``.
    """
    op = "fused_add_rms_norm"
    _check_norm(op, x, weight, eps)
    require_dtype(op, "residual", residual, FLOAT_DTYPES)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise InvalidArgumentError(
            f"{op}: residual is {list(residual.shape)} {dtype_name(residual.dtype)}, x is "
            f"{list(x.shape)} {dtype_name(x.dtype)}",
            hint="pass the residual stream of the same shape and dtype as x",
        )
    require_same_device(op, x=x, residual=residual, weight=weight)
    x_rows, residual_rows = rows_of(op, "x", x), rows_of(op, "residual", residual)
    if x_rows.shape[0] and x_rows.data_ptr() == residual_rows.data_ptr():
        raise InvalidArgumentError(
            f"{op}: x and residual are the same memory", hint="pass two separate tensors"
        )
    _launch_norm(x_rows, residual_rows, weight.contiguous(), x_rows, eps)
    return x, residual


# Rotary embedding.


@triton.jit
def _rotate_heads(
    x,
    token_stride,
    head_stride,
    token,
    live,
    cos,
    sin,
    TOKENS: tl.constexpr,
    HEADS: tl.constexpr,
    HEADS_P2: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P2: tl.constexpr,
    NEOX: tl.constexpr,
):
    # Rotates features [0, 2 * HALF) of every head of TOKENS tokens; cos and sin are
    # [TOKENS, HALF_P2] in fp32. Each side is read and written as whole vectors: NeoX halves
    # directly, interleaved pairs as one contiguous run split into its even and odd features.
    head = tl.arange(0, HEADS_P2)[None, :, None]
    base = x + token[:, None, None] * token_stride + head * head_stride
    rows = live[:, None, None] & (head < HEADS)
    c = cos[:, None, :]
    s = sin[:, None, :]
    if NEOX:
        pair = tl.arange(0, HALF_P2)[None, None, :]
        mask = rows & (pair < HALF)
        x1 = tl.load(base + pair, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + pair, mask=mask, other=0.0).to(tl.float32)
        tl.store(base + pair, (x1 * c - x2 * s).to(x.dtype.element_ty), mask=mask)
        tl.store(base + HALF + pair, (x2 * c + x1 * s).to(x.dtype.element_ty), mask=mask)
    else:
        feature = tl.arange(0, 2 * HALF_P2)[None, None, :]
        mask = rows & (feature < 2 * HALF)
        run = tl.load(base + feature, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(run, [TOKENS, HEADS_P2, HALF_P2, 2]))
        turned = tl.join(x1 * c - x2 * s, x2 * c + x1 * s)
        turned = tl.reshape(turned, [TOKENS, HEADS_P2, 2 * HALF_P2])
        tl.store(base + feature, turned.to(x.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions,
    query,
    query_token_stride,
    query_head_stride,
    key,
    key_token_stride,
    key_head_stride,
    cos_sin,
    cos_sin_stride,
    tokens,
    max_position,
    QUERY_HEADS: tl.constexpr,
    QUERY_HEADS_P2: tl.constexpr,
    KEY_HEADS: tl.constexpr,
    KEY_HEADS_P2: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P2: tl.constexpr,
    NEOX: tl.constexpr,
    TOKENS: tl.constexpr,
):
    token = (tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)).to(tl.int64)
    position = tl.load(positions + token, mask=token < tokens, other=0).to(tl.int64)
    live = (token < tokens) & (position >= 0) & (position < max_position)
    pair = tl.arange(0, HALF_P2)
    angle_mask = live[:, None] & (pair < HALF)[None, :]
    row = cos_sin + position[:, None] * cos_sin_stride + pair[None, :]
    cos = tl.load(row, mask=angle_mask, other=1.0).to(tl.float32)
    sin = tl.load(row + HALF, mask=angle_mask, other=0.0).to(tl.float32)
    _rotate_heads(
        query,
        query_token_stride,
        query_head_stride,
        token,
        live,
        cos,
        sin,
        TOKENS,
        QUERY_HEADS,
        QUERY_HEADS_P2,
        HALF,
        HALF_P2,
        NEOX,
    )
    _rotate_heads(
        key,
        key_token_stride,
        key_head_stride,
        token,
        live,
        cos,
        sin,
        TOKENS,
        KEY_HEADS,
        KEY_HEADS_P2,
        HALF,
        HALF_P2,
        NEOX,
    )


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rotary_dim`` features of every head of ``query`` and ``key`` in place.

    ``positions[n]`` (int32 or int64), ``query[n, heads, d]`` and ``key[n, kv_heads, d]`` of one
    float dtype with contiguous features (other strides free, e.g. views of a fused QKV output),
    ``cos_sin_cache[max_position, rotary_dim]`` (any float dtype; cosines then sines, as
    ``rotary_cos_sin_cache`` builds it), ``rotary_dim`` even and at most ``d``. NeoX style
    rotates feature ``i`` with ``i + rotary_dim / 2``, interleaved style ``2i`` with ``2i + 1``.
    Features past ``rotary_dim`` are not touched, nor are tokens whose position is outside the
    cache (the op does not read past it). Returns ``(query, key)``.
    """
    op = "rotary_embedding"
    require_dtype(op, "positions", positions, INDEX_DTYPES)
    require_dtype(op, "key", key, FLOAT_DTYPES)
    require_dtype(op, "query", query, FLOAT_DTYPES)
    require_dtype(op, "cos_sin_cache", cos_sin_cache, FLOAT_DTYPES)
    if query.dim() != 3:
        raise InvalidArgumentError(
            f"{op}: query has shape {list(query.shape)}, expected [n, heads, head_size]",
            hint="view query as [tokens, heads, head_size]",
        )
    n, heads, head_size = query.shape
    require_shape(op, "positions", positions, (n,))
    require_shape(op, "key", key, (n, -1, head_size))
    if key.dtype != query.dtype:
        raise InvalidArgumentError(
            f"{op}: key is {dtype_name(key.dtype)}, query is {dtype_name(query.dtype)}",
            hint="pass query and key of one dtype",
        )
    if cos_sin_cache.dim() != 2:
        raise InvalidArgumentError(
            f"{op}: cos_sin_cache has shape {list(cos_sin_cache.shape)}, expected "
            "[max_position, rotary_dim]",
            hint="build it with the rotary_cos_sin_cache op",
        )
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or not 0 < rotary_dim <= head_size:
        raise InvalidArgumentError(
            f"{op}: rotary_dim {rotary_dim} must be even and in 2..head_size ({head_size})",
            hint="build the cache with rotary_cos_sin_cache(max_position, rotary_dim)",
        )
    require_same_device(op, positions=positions, query=query, key=key, cache=cos_sin_cache)
    for name, tensor in (("query", query), ("key", key), ("cos_sin_cache", cos_sin_cache)):
        if tensor.stride(-1) != 1:
            raise InvalidArgumentError(
                f"{op}: {name}'s last dimension is not contiguous",
                hint=f"pass {name}.contiguous()",
            )
    if not isinstance(is_neox, bool):
        raise InvalidArgumentError(
            f"{op}: is_neox must be a bool, got {is_neox!r}", hint="pass is_neox=True or False"
        )
    written_arg(op, "query", query)
    written_arg(op, "key", key)
    if n == 0:
        return query, key
    half = rotary_dim // 2
    query_heads_p2 = triton.next_power_of_2(heads)
    key_heads_p2 = triton.next_power_of_2(key.shape[1])
    per_token = (query_heads_p2 + key_heads_p2) * triton.next_power_of_2(half)
    tokens = min(_power_of_2_at_most(_TILE // per_token), triton.next_power_of_2(n))
    _rotary_kernel[(triton.cdiv(n, tokens),)](
        positions.contiguous(),  # read as one run of positions
        query,
        query.stride(0),
        query.stride(1),
        key,
        key.stride(0),
        key.stride(1),
        cos_sin_cache,
        cos_sin_cache.stride(0),
        n,
        cos_sin_cache.shape[0],
        QUERY_HEADS=heads,
        QUERY_HEADS_P2=query_heads_p2,
        KEY_HEADS=key.shape[1],
        KEY_HEADS_P2=key_heads_p2,
        HALF=half,
        HALF_P2=triton.next_power_of_2(half),
        NEOX=is_neox,
        TOKENS=tokens,
        num_warps=_warps(tokens * per_token),
    )
    return query, key


# Gated activation.


@triton.jit
def _silu_and_mul_kernel(x, x_stride, out, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    column = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = column < width
    gate = tl.load(x + row * x_stride + column, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + row * x_stride + width + column, mask=mask, other=0.0).to(tl.float32)
    result = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out + row * width + column, result.to(out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x[..., 2 * d]``, in fp32, as a new tensor."""
    op = "silu_and_mul"
    require_dtype(op, "x", x, FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] % 2 or not x.shape[-1]:
        raise InvalidArgumentError(
            f"{op}: x has shape {list(x.shape)}; its last dimension must be even ([gate, up])",
            hint="pass the fused gate/up projection's output",
        )
    width = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    out = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)
    if rows.shape[0] and width:
        block = min(2048, triton.next_power_of_2(width))
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(width, block))](
            rows, rows.stride(0), out, width, BLOCK=block, num_warps=_warps(block)
        )
    return out
