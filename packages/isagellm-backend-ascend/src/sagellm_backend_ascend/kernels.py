"""torch_npu's fused operators, registered over the torch layer's reference kernels under the
standard op names, where the installed torch_npu has them and the SoC runs them.

==========================  ======================================  =====================
standard op                 torch_npu operator                      SoC families
==========================  ======================================  =====================
``rms_norm``                ``npu_rms_norm``                        all
``fused_add_rms_norm``      ``npu_add_rms_norm``                    Atlas A2, A3
``silu_and_mul``            ``npu_swiglu``                          Atlas A2, A3
``rotary_embedding``        ``npu_rotary_mul`` (NeoX style)         all
``kv_cache_write``          ``_npu_reshape_and_cache``              Atlas A2, A3, 310P
``paged_attention_decode``  ``npu_fused_infer_attention_score``     Atlas A2, A3
==========================  ======================================  =====================

Each replacement keeps the reference's spec (reference, inputs, tolerance), so the conformance
kit checks it. It checks its arguments first, with the torch layer's InvalidArgumentError, and
calls the reference itself for what the operator cannot take (another dtype, an interleaved
rotary, a non-contiguous input), which the reference serves or refuses; a refused call changes
nothing. The fused ops read nothing on the host, so a rotary position outside the table is not
refused: that token is left as it is. Attention is the exception: the operator takes the
sequence lengths as a host list (read once, with the check of the block table), and so does the
reference, so under a graph capture it is refused with GraphCaptureError.
An op whose reference the torch layer does not register is left alone.

The cache is one tensor per layer, ``[pages, 2, tokens, kv_heads, head_size]``; viewed as
``[2 * pages, tokens, ...]``, page ``p``'s K is row ``2p`` and its V row ``2p + 1``. So the
contiguous views ``rows[:-1]`` and ``rows[1:]`` are a K cache and a V cache that page ``2p``
addresses: the paged operators take them with slots and block tables doubled, and no copy of
the cache is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any, TypeVar

import torch

from sagellm_backend.errors import GraphCaptureError, KernelNotFoundError
from sagellm_backend.protocols.ops import (
    FusedAddRmsNorm,
    KVCacheWrite,
    PagedAttentionDecode,
    RmsNorm,
    RotaryEmbedding,
    SiluAndMul,
)
from sagellm_backend.torch_backend.arguments import (
    cache_arg,
    fail,
    number_arg,
    same_device,
    tensor_arg,
)
from sagellm_backend.torch_backend.norms import fused_add_norm_args, norm_args
from sagellm_backend.torch_backend.provider import TorchBackendProvider
from sagellm_backend.torch_backend.rotary import rotary_args
from sagellm_backend_ascend.soc import SocFamily

__all__ = ["FUSED_OPS", "FusedOp", "register_npu_kernels"]

S = TypeVar("S")
E = TypeVar("E")

Kernel = Callable[..., Any]
Tensor = torch.Tensor
Op = Callable[..., Tensor]
PairOp = Callable[..., tuple[Tensor, Tensor]]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_HALVES = (torch.float16, torch.bfloat16)
_MAX_ROTARY = 896


def _rms_norm(
    op: PairOp, reference: RmsNorm[Tensor], x: Tensor, weight: Tensor, eps: float = 1e-6
) -> Tensor:
    x, weight, eps = norm_args("rms_norm", x, weight, eps)
    if x.dtype not in _FLOATS or weight.dtype != x.dtype or x.dim() > 8:
        return reference(x, weight, eps)
    y, _ = op(x, weight, eps)
    return y


def _fused_add_rms_norm(
    op: Callable[..., tuple[Tensor, Tensor, Tensor]],
    reference: FusedAddRmsNorm[Tensor],
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    x, residual, weight, eps = fused_add_norm_args(x, residual, weight, eps)
    if x.dtype not in _FLOATS or weight.dtype != x.dtype or x.dim() > 8:
        return reference(x, residual, weight, eps)
    y, _, total = op(x, residual, weight, eps)
    residual.copy_(total)
    x.copy_(y)
    return x, residual


def _silu_and_mul(op: Op, reference: SiluAndMul[Tensor], x: Tensor) -> Tensor:
    x = tensor_arg("silu_and_mul", "x", x, "[..., 2 * d]")
    if x.dtype not in _FLOATS or not x.is_contiguous() or x.shape[-1] % 2 or not x.shape[-1]:
        return reference(x)
    return op(x, -1)


def _rotary_embedding(
    op: Op,
    reference: RotaryEmbedding[Tensor],
    positions: Tensor,
    query: Tensor,
    key: Tensor,
    cos_sin_cache: Tensor,
    *,
    is_neox: bool = True,
) -> tuple[Tensor, Tensor]:
    positions, query, key, table = rotary_args(positions, query, key, cos_sin_cache, is_neox)
    rows, rotary = table.shape
    if (
        not is_neox
        or query.dtype not in _FLOATS
        or key.dtype != query.dtype
        or rotary % 2
        or not 0 < rotary < _MAX_ROTARY
        or rotary > min(query.shape[2], key.shape[2])
        or max(query.shape[1], key.shape[1]) >= 1000
        or rows == 0
    ):
        return reference(positions, query, key, table, is_neox=is_neox)
    # Tokens whose position is outside the table turn by the identity (cos 1, sin 0).
    inside = ((positions >= 0) & (positions < rows))[:, None]
    cos, sin = table[positions.clamp(0, rows - 1).long()].to(query.dtype).chunk(2, dim=-1)
    cos, sin = cos.masked_fill(~inside, 1.0), sin.masked_fill(~inside, 0.0)
    r1 = torch.cat([cos, cos], dim=-1)[None, :, None, :]  # [1, n, 1, rotary]: layout BS1D
    r2 = torch.cat([sin, sin], dim=-1)[None, :, None, :]
    for x in (query, key):
        part = x[..., :rotary]
        part.copy_(op(part.unsqueeze(0).contiguous(), r1, r2)[0])
    return query, key


def _kv_cache_write(
    op: Callable[..., None],
    reference: KVCacheWrite[Tensor],
    key: Tensor,
    value: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
) -> None:
    name = "kv_cache_write"
    cache = cache_arg(name, kv_cache)
    key = tensor_arg(name, "key", key, "[n, kv_heads, d]")
    value = tensor_arg(name, "value", value, "[n, kv_heads, d]")
    slots = tensor_arg(name, "slot_mapping", slot_mapping, "[n]", index=True, leading=len(key))
    same_device(name, cache, key=key, value=value, slot_mapping=slots)
    if (
        key.dtype not in _HALVES
        or not cache.is_contiguous()
        or any(
            x.shape != (len(key), *cache.shape[3:]) or x.dtype != cache.dtype for x in (key, value)
        )
    ):
        reference(key, value, cache, slots)  # fp32; the reference refuses mismatched tensors
        return
    pages, _, tokens = cache.shape[:3]
    rows = cache.view(2 * pages, *cache.shape[2:])
    slots = slots.long()
    valid = (slots >= 0) & (slots < pages * tokens)
    doubled = torch.where(
        valid, slots + torch.div(slots, tokens, rounding_mode="floor") * tokens, -1
    )
    op(key.contiguous(), value.contiguous(), rows[:-1], rows[1:], doubled.to(torch.int32))


def _paged_attention_decode(
    op: PairOp,
    reference: PagedAttentionDecode[Tensor],
    capturing: Callable[[], bool],
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    *,
    out: Tensor | None = None,
) -> Tensor:
    name = "paged_attention_decode"
    if capturing():
        raise GraphCaptureError(
            f"{name} reads the sequence lengths on the host, which a graph capture cannot contain",
            hint="run attention outside the captured region",
        )
    query = tensor_arg(name, "query", query, "[b, heads, d]")
    cache = cache_arg(name, kv_cache, query.shape[2])
    tables = tensor_arg(
        name, "block_tables", block_tables, "[b, w]", index=True, leading=len(query)
    )
    lengths = tensor_arg(name, "seq_lens", seq_lens, "[b]", index=True, leading=len(query))
    if out is not None:
        out = tensor_arg(name, "out", out, "[b, heads, d]")
    same_device(name, query, kv_cache=cache, block_tables=tables, seq_lens=lengths, out=out)
    scale = number_arg(name, "scale", scale)
    pages, _, tokens, kv_heads, head_size = cache.shape
    if (
        query.dtype not in _HALVES
        or cache.dtype != query.dtype
        or not cache.is_contiguous()
        or not kv_heads
        or query.shape[1] % kv_heads
        or (out is not None and (out.shape != query.shape or out.dtype != query.dtype))
    ):
        return reference(
            query, cache, tables, lengths, scale, out=out
        )  # fp32; the reference refuses mismatches
    # One host read: the lengths, and whether a row's pages within its length are in the cache.
    width = tables.shape[1]
    read = torch.arange(width, device=tables.device) * tokens < lengths[:, None]
    outside = (read & ((tables < 0) | (tables >= pages))).any(dim=1)
    lens, bad = torch.stack([lengths.long(), outside.long()]).tolist()
    for i, (length, wrong) in enumerate(zip(lens, bad, strict=True)):
        if not 0 <= length <= width * tokens:
            fail(
                name,
                f"seq_lens[{i}] is {length}; a row of {width} pages holds 0..{width * tokens}",
                "pass each sequence's token count, within its block table row",
            )
        if wrong:
            fail(
                name,
                f"block_tables[{i}] names pages outside the cache's 0..{pages - 1} within its "
                f"{length} tokens",
                "fill each row with the pages of its sequence's block",
            )
    rows = cache.view(2 * pages, tokens, kv_heads * head_size)
    result, _ = op(
        query.contiguous().unsqueeze(2),
        rows[:-1],
        rows[1:],
        block_table=(tables.contiguous() * 2).to(torch.int32),
        actual_seq_lengths_kv=lens,
        num_heads=query.shape[1],
        num_key_value_heads=kv_heads,
        scale=scale,
        input_layout="BNSD",
        block_size=tokens,
    )
    if out is None:
        return result.squeeze(2)
    out.copy_(result.squeeze(2))
    return out


def _capturing(torch_npu: ModuleType) -> Callable[[], bool]:
    """Whether the current stream is being captured; never, in a torch_npu without graphs."""
    query: Callable[[], bool] | None = getattr(torch_npu.npu, "is_current_stream_capturing", None)
    return (lambda: False) if query is None else query


@dataclass(frozen=True)
class FusedOp:
    """A standard op a torch_npu operator serves, and the SoC families that run it."""

    name: str
    operator: str
    families: frozenset[SocFamily]
    wrap: Callable[[Kernel, Kernel, ModuleType], Kernel]
    """``wrap(operator, reference, torch_npu)``: the op's implementation."""


_ALL = frozenset(SocFamily)
_A2_A3 = frozenset({SocFamily.A2, SocFamily.A3})

FUSED_OPS: tuple[FusedOp, ...] = (
    FusedOp("rms_norm", "npu_rms_norm", _ALL, lambda op, ref, _: partial(_rms_norm, op, ref)),
    FusedOp(
        "fused_add_rms_norm",
        "npu_add_rms_norm",
        _A2_A3,
        lambda op, ref, _: partial(_fused_add_rms_norm, op, ref),
    ),
    FusedOp(
        "silu_and_mul", "npu_swiglu", _A2_A3, lambda op, ref, _: partial(_silu_and_mul, op, ref)
    ),
    FusedOp(
        "rotary_embedding",
        "npu_rotary_mul",
        _ALL,
        lambda op, ref, _: partial(_rotary_embedding, op, ref),
    ),
    FusedOp(
        "kv_cache_write",
        "_npu_reshape_and_cache",
        _A2_A3 | {SocFamily.P310},
        lambda op, ref, _: partial(_kv_cache_write, op, ref),
    ),
    FusedOp(
        "paged_attention_decode",
        "npu_fused_infer_attention_score",
        _A2_A3,
        lambda op, ref, npu: partial(_paged_attention_decode, op, ref, _capturing(npu)),
    ),
)
"""Every fused operator this wheel uses, by standard op name."""


def register_npu_kernels(
    provider: TorchBackendProvider[S, E], torch_npu: ModuleType, family: SocFamily
) -> tuple[str, ...]:
    """Register the fused operators over the references; returns the operators used."""
    used = []
    for fused in FUSED_OPS:
        operator = getattr(torch_npu, fused.operator, None)
        if operator is None or family not in fused.families:
            continue
        try:
            spec = provider.kernel_spec(fused.name)
        except KernelNotFoundError:
            continue
        provider.register_kernel(
            fused.name,
            fused.wrap(operator, spec.impl, torch_npu),
            kind=spec.kind,
            dtypes=spec.dtypes,
            reference=spec.reference,
            make_inputs=spec.make_inputs,
            compare=spec.compare,
            override=True,
        )
        used.append(fused.operator)
    return tuple(used)
