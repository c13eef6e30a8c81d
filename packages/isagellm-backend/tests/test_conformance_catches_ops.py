"""The kit's op checks catch real mistakes: a cpu provider with one standard kernel replaced by a
plausible broken version fails that op's check, and the faithful provider passes every op check
in every dtype it computes in."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")

import torch

from sagellm_backend import DType
from sagellm_backend.ops import KERNEL_OPS
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing import Outcome, run_conformance
from sagellm_backend.torch_backend.attention import paged_attention_decode
from sagellm_backend.torch_backend.conformance import CpuTarget
from sagellm_backend.torch_backend.norms import rms_norm
from sagellm_backend.torch_backend.rotary import rotary_cos_sin_cache, rotary_embedding
from sagellm_backend.torch_backend.sampling import sample

OPTIONS: dict[str, Any] = {"world_sizes": (1,), "num_blocks": 8, "host_num_blocks": 8}


# Broken kernels, each a mistake a kernel author could make.


def writes_padding(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Slot -1 wraps around to the cache's last slot instead of being skipped."""
    tokens = kv_cache.shape[2]
    slots = slot_mapping.long() % (kv_cache.shape[0] * tokens)
    kv_cache[:, 0].index_put_((slots // tokens, slots % tokens), key)
    kv_cache[:, 1].index_put_((slots // tokens, slots % tokens), value)


def reads_whole_rows(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gathers every page of each row (padding included) and zeroes masked weights, so a NaN
    past a length or in a padding page leaks through ``0 * NaN``."""
    batch, heads, d = query.shape
    tokens, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    pages = kv_cache[block_tables.long()]
    span = pages.shape[1] * tokens
    keys = pages[:, :, 0].reshape(batch, span, kv_heads, d).repeat_interleave(heads // kv_heads, 2)
    values = pages[:, :, 1].reshape(batch, span, kv_heads, d)
    values = values.repeat_interleave(heads // kv_heads, 2)
    scores = torch.einsum("bhd,bshd->bhs", query.float(), keys.float()) * scale
    live = torch.arange(span)[None, :] < seq_lens[:, None]
    weights = scores.masked_fill(~live[:, None, :], float("-inf")).softmax(-1)
    result = torch.einsum("bhs,bshd->bhd", weights, values.float()).to(query.dtype)
    return result if out is None else out.copy_(result)


def sees_the_future(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every new token attends to all of its sequence, later new tokens included."""
    result = torch.zeros_like(query) if out is None else out.zero_()
    starts = query_start_loc.tolist()
    for i in range(block_tables.shape[0]):
        start, end = starts[i], starts[i + 1]
        if end > start:
            tables = block_tables[i : i + 1].expand(end - start, -1)
            lens = seq_lens[i : i + 1].expand(end - start)
            result[start:end] = paged_attention_decode(
                query[start:end], kv_cache, tables, lens, scale
            )
    return result


def ignores_base(
    max_position: int, rotary_dim: int, base: float = 10000.0, *, dtype: Any = "fp32"
) -> torch.Tensor:
    return rotary_cos_sin_cache(max_position, rotary_dim, dtype=dtype)


def always_neox(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary_embedding(positions, query, key, cos_sin_cache)


def centres_like_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    return rms_norm(x - x.mean(dim=-1, keepdim=True), weight, eps)


def leaves_the_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    x.copy_(rms_norm(x + residual, weight, eps))
    return x, residual


def swaps_gate_and_up(x: torch.Tensor) -> torch.Tensor:
    up, gate = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def ignores_top_k(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
) -> torch.Tensor:
    return sample(logits, temperature, torch.zeros_like(top_k), top_p, seeds)


def draws_its_own_noise(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
) -> torch.Tensor:
    return sample(logits, temperature, top_k, top_p, seeds + 1)


class WithBrokenOp(CpuTarget):
    """cpu providers whose kernel ``op`` is ``impl``, registered over the reference."""

    def __init__(self, op: str, impl: Callable[..., Any]) -> None:
        super().__init__(kv_dtype="fp32", **OPTIONS)
        self.op, self.impl = op, impl

    def make_provider(self) -> BackendProvider[torch.Tensor]:
        provider = super().make_provider()
        spec = provider.kernel_spec(self.op)
        provider.register_kernel(
            self.op,
            self.impl,
            kind=spec.kind,
            dtypes=spec.dtypes,
            reference=spec.reference,
            make_inputs=spec.make_inputs,
            compare=spec.compare,
            override=True,
        )
        return provider


@dataclass(frozen=True)
class Fault:
    op: str
    impl: Callable[..., Any]


FAULTS = [
    Fault("kv_cache_write", writes_padding),
    Fault("paged_attention_decode", reads_whole_rows),
    Fault("paged_attention_prefill", sees_the_future),
    Fault("rotary_cos_sin_cache", ignores_base),
    Fault("rotary_embedding", always_neox),
    Fault("rms_norm", centres_like_layer_norm),
    Fault("fused_add_rms_norm", leaves_the_residual),
    Fault("silu_and_mul", swaps_gate_and_up),
    Fault("sample", ignores_top_k),
    Fault("sample", draws_its_own_noise),
]


def test_every_kernel_op_has_a_fault() -> None:
    assert {f.op for f in FAULTS} == {op.name for op in KERNEL_OPS}


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.impl.__name__)
def test_the_op_check_fails_a_broken_kernel(fault: Fault, reliability_counts: Counter[str]) -> None:
    check = f"ops.{fault.op}"
    report = run_conformance(WithBrokenOp(fault.op, fault.impl), select=[check], seed=7)
    result = report.result(check)
    reliability_counts["faults injected into providers"] += 1
    assert result.outcome is Outcome.FAILED, report.format_table()
    assert result.message.startswith(f"broken promise: {result.check.promise}")
    assert f"{fault.op} does not match its float64 reference in fp32" in result.message


@pytest.mark.parametrize("check", ["ops.lookup", *(f"ops.{op.name}" for op in KERNEL_OPS)])
def test_the_faithful_cpu_provider_passes_each_op_check_in_every_dtype(check: str) -> None:
    report = run_conformance(CpuTarget(**OPTIONS), select=[check], seed=7)
    result = report.result(check)
    assert result.outcome is Outcome.PASSED, report.format_table()
    assert report.capability.supported_dtypes == (DType.FP32, DType.FP16, DType.BF16)
    if check != "ops.lookup":
        assert "3 dtypes x 4 seeds" in result.message
