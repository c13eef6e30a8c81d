"""Reference kernels: float64 results against independent formulas, on fresh random inputs."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")

import torch

from sagellm_backend import DType, KernelExistsError
from sagellm_backend.kernels import KernelTable
from sagellm_backend.torch_backend.cpu import create_cpu_backend
from sagellm_backend.torch_backend.cpu_device import HostEvent, HostStream
from sagellm_backend.torch_backend.kernels import (
    paged_attention_decode,
    register_reference_kernels,
    rms_norm,
    rotary_cos_sin_cache,
    rotary_embedding,
    silu_and_mul,
)
from sagellm_backend.torch_backend.provider import TorchBackendProvider

SEEDS = (11, 12, 13)
TIGHT = 1e-12


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", SEEDS)
def test_rms_norm_in_float64(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, w = randn(g, 5, 64), randn(g, 64)
    expected = torch.empty_like(x)
    for i in range(x.shape[0]):
        rms = math.sqrt(sum(float(v) ** 2 for v in x[i]) / 64 + 1e-6)
        expected[i] = torch.tensor(
            [float(x[i, j]) / rms * float(w[j]) for j in range(64)], dtype=torch.float64
        )
    torch.testing.assert_close(rms_norm(x, w, 1e-6), expected, rtol=TIGHT, atol=TIGHT)


@pytest.mark.parametrize("seed", SEEDS)
def test_silu_and_mul_in_float64(seed: int) -> None:
    x = randn(torch.Generator().manual_seed(seed), 4, 2 * 16)
    expected = torch.tensor(
        [
            [
                float(x[i, j]) / (1 + math.exp(-float(x[i, j]))) * float(x[i, 16 + j])
                for j in range(16)
            ]
            for i in range(4)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(silu_and_mul(x), expected, rtol=TIGHT, atol=TIGHT)


@pytest.mark.parametrize("seed", SEEDS)
def test_rotary_embedding_in_float64(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rot, base = 16, 10000.0
    positions = torch.randint(0, 100, (6,), generator=g)
    query, key = randn(g, 6, 3, rot), randn(g, 6, 1, rot)
    cache = rotary_cos_sin_cache(100, rot, base, dtype=torch.float64)
    got_q, got_k = rotary_embedding(positions, query, key, cache)
    half = rot // 2
    for x, got in ((query, got_q), (key, got_k)):
        expected = torch.empty_like(x)
        for t, pos in enumerate(positions.tolist()):
            for i in range(half):
                angle = pos * base ** (-2 * i / rot)
                a, b = x[t, :, i], x[t, :, half + i]
                expected[t, :, i] = a * math.cos(angle) - b * math.sin(angle)
                expected[t, :, half + i] = b * math.cos(angle) + a * math.sin(angle)
        torch.testing.assert_close(got, expected, rtol=TIGHT, atol=TIGHT)


@pytest.mark.parametrize("seed", SEEDS)
def test_paged_attention_reads_the_pool_through_block_tables(seed: int) -> None:
    """K and V written into real blocks; dense softmax attention over them as the reference."""
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_size, tokens = 4, 2, 16, 4
    p: TorchBackendProvider[HostStream, HostEvent] = create_cpu_backend(
        num_layers=2,
        num_kv_heads=kv_heads,
        head_size=head_size,
        tokens_per_block=tokens,
        kv_dtype="fp32",
        num_blocks=32,
        host_num_blocks=4,
    )
    try:
        p.kv_block_alloc(7, "fp32")  # so the sequences' pages do not start at 0
        lengths = [int(n) for n in torch.randint(1, 6 * tokens, (3,), generator=g)]
        blocks = p.kv_blocks_alloc(lengths, "fp32")
        dense = []
        for block, length in zip(blocks, lengths, strict=True):
            k, v = randn(g, length, kv_heads, head_size), randn(g, length, kv_heads, head_size)
            dense.append((k, v))
            layer = p.kv_cache_layer(1)
            for t in range(length):
                page, slot = block.pages[t // tokens], t % tokens
                layer[page, 0, slot], layer[page, 1, slot] = k[t], v[t]
        query = randn(g, 3, heads, head_size).float()
        scale = head_size**-0.5
        got = paged_attention_decode(
            query,
            p.kv_cache_layer(1),
            p.block_table(blocks),
            torch.tensor(lengths, dtype=torch.int32),
            scale,
        )
    finally:
        p.close()
    for b, (k, v) in enumerate(dense):
        for h in range(heads):
            kv_head = h // (heads // kv_heads)
            keys, values = k[:, kv_head].float().double(), v[:, kv_head].float().double()
            logits = keys @ query[b, h].double() * scale
            weights = torch.softmax(logits, dim=0)
            torch.testing.assert_close(got[b, h].double(), weights @ values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [DType.FP32, DType.FP16, DType.BF16])
def test_every_registered_kernel_matches_its_reference(dtype: DType) -> None:
    table = KernelTable()
    register_reference_kernels(table, torch.device("cpu"))
    names = [spec.name for spec in table.list()]
    assert names == ["paged_attention_decode", "rms_norm", "rotary_embedding", "silu_and_mul"]
    for spec in table.list():
        assert spec.make_inputs is not None and spec.reference is not None
        assert dtype in spec.dtypes
        for seed in SEEDS:
            args, _ = spec.make_inputs(seed, dtype)
            floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            assert floats and all(a.dtype is not torch.float64 for a in floats)
            assert all(bool(a.ne(0).any()) for a in floats), "inputs must never be all zeros"
            spec.check(seed, dtype)


def test_a_wrong_kernel_fails_its_check_and_device_overrides_need_a_flag() -> None:
    table = KernelTable()
    register_reference_kernels(table, torch.device("cpu"))
    with pytest.raises(KernelExistsError):
        register_reference_kernels(table, torch.device("cpu"))
    reference = table.spec("rms_norm")
    table.register(
        "rms_norm",
        lambda x, weight, eps=1e-6: x * weight,
        kind=reference.kind,
        dtypes=reference.dtypes,
        reference=reference.reference,
        make_inputs=reference.make_inputs,
        compare=reference.compare,
        override=True,
    )
    with pytest.raises(AssertionError):
        table.spec("rms_norm").check(1, DType.FP32)
