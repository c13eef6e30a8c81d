"""The kit's op checks catch real mistakes: a cpu provider with one standard kernel replaced by a
plausible broken version fails that op's check, also where the provider registers a reference
or inputs that agree with its bug (the kit checks against its own oracle), and the faithful
provider passes every op check in every dtype it computes in."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")

import torch

from sagellm_backend import DType
from sagellm_backend.kernels import InputMaker, KernelInputs
from sagellm_backend.ops import KERNEL_OPS
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing import ConformanceTarget, Outcome, run_conformance
from sagellm_backend.testing.spec_target import target_for_spec
from sagellm_backend.torch_backend.attention import paged_attention_decode
from sagellm_backend.torch_backend.conformance import CpuTarget, TorchTensors
from sagellm_backend.torch_backend.norms import rms_norm
from sagellm_backend.torch_backend.op_inputs import SHAPES
from sagellm_backend.torch_backend.rotary import rotary_cos_sin_cache, rotary_embedding
from sagellm_backend.torch_backend.sampling import sample

OPTIONS: dict[str, Any] = {"world_sizes": (1,), "num_blocks": 8, "host_num_blocks": 8}


# Broken kernels, each a mistake a kernel author could make.


def writes_padding(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Slot -1 wraps around to the cache's last slot instead of being skipped (the last padding
    token wins)."""
    tokens = kv_cache.shape[2]
    for i, slot in enumerate(slot_mapping.long() % (kv_cache.shape[0] * tokens)):
        kv_cache[slot // tokens, 0, slot % tokens] = key[i]
        kv_cache[slot // tokens, 1, slot % tokens] = value[i]


def reads_whole_rows(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gathers every page of each row (padding included) and zeroes masked weights (an empty
    row's too), so a NaN past a length or in a padding page leaks through ``0 * NaN``."""
    batch, heads, d = query.shape
    tokens, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    pages = kv_cache[block_tables.long()]
    span = pages.shape[1] * tokens
    keys = pages[:, :, 0].reshape(batch, span, kv_heads, d).repeat_interleave(heads // kv_heads, 2)
    values = pages[:, :, 1].reshape(batch, span, kv_heads, d)
    values = values.repeat_interleave(heads // kv_heads, 2)
    scores = torch.einsum("bhd,bshd->bhs", query.float(), keys.float()) * scale
    live = torch.arange(span)[None, :] < seq_lens[:, None]
    weights = scores.masked_fill(~live[:, None, :], float("-inf")).softmax(-1).nan_to_num()
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


def scores_on_64_dims(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A 64-wide head tile: the scores see only each head's first 64 dims."""
    tile = query.clone()
    tile[..., 64:] = 0
    return paged_attention_decode(tile, kv_cache, block_tables, seq_lens, scale, out=out)


# Inputs a backend could register that miss its bug.


def without_nan(make_inputs: InputMaker) -> InputMaker:
    """``make_inputs`` with every NaN (the unused slots and pages, ``out=``) zeroed."""

    def make(seed: int, dtype: DType) -> KernelInputs:
        args, kwargs = make_inputs(seed, dtype)
        clean = [torch.nan_to_num(a, nan=0.0) if isinstance(a, torch.Tensor) else a for a in args]
        return tuple(clean), {
            k: torch.nan_to_num(v, nan=0.0) if isinstance(v, torch.Tensor) else v
            for k, v in kwargs.items()
        }

    return make


def first_shape_only(make_inputs: InputMaker) -> InputMaker:
    """``make_inputs`` on seeds that all give the first shape (head size 64)."""
    return lambda seed, dtype: make_inputs(len(SHAPES) * seed, dtype)


class WithBrokenOp(CpuTarget):
    """cpu providers whose kernel ``op`` is ``impl``, registered with ``reference`` and the input
    generator ``inputs`` makes of the torch layer's (by default: those of the kernel replaced)."""

    def __init__(
        self,
        op: str,
        impl: Callable[..., Any],
        *,
        reference: Callable[..., Any] | None = None,
        inputs: Callable[[InputMaker], InputMaker] | None = None,
    ) -> None:
        super().__init__(kv_dtype="fp32", **OPTIONS)
        self.op, self.impl = op, impl
        self.reference, self.inputs = reference, inputs

    def make_provider(self) -> BackendProvider[torch.Tensor]:
        provider = super().make_provider()
        spec = provider.kernel_spec(self.op)
        assert spec.make_inputs is not None
        provider.register_kernel(
            self.op,
            self.impl,
            kind=spec.kind,
            dtypes=spec.dtypes,
            reference=self.reference or spec.reference,
            make_inputs=self.inputs(spec.make_inputs) if self.inputs else spec.make_inputs,
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
    assert f"{fault.op} does not match the kit's float64 reference in fp32" in result.message


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.impl.__name__)
def test_a_broken_kernel_fails_though_it_registers_itself_as_its_reference(
    fault: Fault, reliability_counts: Counter[str]
) -> None:
    target = WithBrokenOp(fault.op, fault.impl, reference=fault.impl)
    provider = target.make_provider()
    provider.kernel_spec(fault.op).check(7, DType.FP32)  # its own reference agrees with it
    provider.close()
    report = run_conformance(target, select=[f"ops.{fault.op}"], seed=7)
    result = report.result(f"ops.{fault.op}")
    reliability_counts["faults injected into providers"] += 1
    assert result.outcome is Outcome.FAILED, report.format_table()
    assert f"{fault.op} does not match the kit's float64 reference in fp32" in result.message


@pytest.mark.parametrize(
    ("op", "impl", "inputs"),
    [
        ("paged_attention_decode", reads_whole_rows, without_nan),
        ("paged_attention_decode", scores_on_64_dims, first_shape_only),
    ],
    ids=["no-nan-poisoning", "one-head-size"],
)
def test_a_broken_kernel_fails_though_its_registered_inputs_miss_the_bug(
    op: str,
    impl: Callable[..., Any],
    inputs: Callable[[InputMaker], InputMaker],
    reliability_counts: Counter[str],
) -> None:
    target = WithBrokenOp(op, impl, inputs=inputs)
    provider = target.make_provider()
    for seed in range(7, 7 + 8):
        provider.kernel_spec(op).check(seed, DType.FP32)  # its own check is blind to the bug
    provider.close()
    report = run_conformance(target, select=[f"ops.{op}"], seed=7)
    result = report.result(f"ops.{op}")
    reliability_counts["faults injected into providers"] += 1
    assert result.outcome is Outcome.FAILED, report.format_table()
    assert f"{op} does not match the kit's float64 reference in fp32" in result.message


def test_a_faithful_kernel_with_a_wrong_registered_reference_fails() -> None:
    target = WithBrokenOp("rms_norm", rms_norm, reference=centres_like_layer_norm)
    report = run_conformance(target, select=["ops.rms_norm"], seed=7)
    result = report.result("ops.rms_norm")
    assert result.outcome is Outcome.FAILED, report.format_table()
    assert (
        "rms_norm matches the kit's reference but not the reference kernel_spec('rms_norm') "
        "registers in fp32" in result.message
    )


class BareKernel(CpuTarget):
    """cpu providers whose ``rms_norm`` is registered without a reference or inputs."""

    def make_provider(self) -> BackendProvider[torch.Tensor]:
        provider = super().make_provider()
        provider.register_kernel("rms_norm", rms_norm, kind="layernorm", override=True)
        return provider


def test_a_kernel_registered_without_a_reference_is_checked_against_the_oracle() -> None:
    report = run_conformance(BareKernel(**OPTIONS), select=["ops.rms_norm"], seed=7)
    result = report.result("ops.rms_norm")
    assert result.outcome is Outcome.PASSED, report.format_table()
    assert result.message == "3 dtypes x 4 seeds"


class WithoutAdapter(ConformanceTarget[torch.Tensor]):
    """The providers ``make`` makes, with no tensor adapter (so no oracles)."""

    name = "cpu"

    def __init__(self, make: Callable[[], BackendProvider[torch.Tensor]]) -> None:
        self._make = make

    def make_provider(self) -> BackendProvider[torch.Tensor]:
        return self._make()


def test_without_an_oracle_the_report_says_only_the_own_reference_was_run() -> None:
    target = WithoutAdapter(CpuTarget(**OPTIONS).make_provider)
    report = run_conformance(target, select=["ops.rms_norm"], seed=7)
    result = report.result("ops.rms_norm")
    assert result.outcome is Outcome.PASSED, report.format_table()
    assert "against the backend's own reference only: target 'cpu' supplies no tensor adapter" in (
        result.message
    )
    bare = WithoutAdapter(BareKernel(**OPTIONS).make_provider)
    result = run_conformance(bare, select=["ops.rms_norm"], seed=7).result("ops.rms_norm")
    assert result.outcome is Outcome.FAILED
    assert "kernel_spec('rms_norm') carries no reference or input generator" in result.message


@pytest.mark.parametrize("check", ["ops.lookup", *(f"ops.{op.name}" for op in KERNEL_OPS)])
def test_the_faithful_cpu_provider_passes_each_op_check_in_every_dtype(check: str) -> None:
    report = run_conformance(CpuTarget(**OPTIONS), select=[check], seed=7)
    result = report.result(check)
    assert result.outcome is Outcome.PASSED, report.format_table()
    assert report.capability.supported_dtypes == (DType.FP32, DType.FP16, DType.BF16)
    if check != "ops.lookup":
        assert result.message.startswith("3 dtypes x 4 seeds; the registered reference agrees")


def test_check_cpu_runs_the_ops_against_the_torch_layers_oracles() -> None:
    target = target_for_spec("cpu?num_blocks=8&host_num_blocks=8")
    assert isinstance(target.tensors, TorchTensors)
    result = run_conformance(target, select=["ops.rms_norm"], seed=7).result("ops.rms_norm")
    assert result.outcome is Outcome.PASSED, result.message
    assert result.message.startswith("3 dtypes x 4 seeds; the registered reference agrees")
