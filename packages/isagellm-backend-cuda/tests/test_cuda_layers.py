"""The Triton layer kernels and KV slot write against float64 references, on fresh random data.

Without a GPU the kernels run under Triton's interpreter on the CPU (``TRITON_INTERPRET=1`` is
set before Triton is imported), on small shapes. In-place outputs live inside larger buffers
poisoned with NaN, which must stay untouched; new outputs are allocated over memory poisoned
with NaN where the allocator reuses it (the GPU's caching allocator), and every element must
match the reference.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytest

pytest.importorskip("torch", reason="the kernels need torch")
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported
pytest.importorskip("triton", reason="the kernels need triton")

from sagellm_backend.dtypes import DType  # noqa: E402
from sagellm_backend.errors import InvalidArgumentError  # noqa: E402
from sagellm_backend.torch_backend.kernels import compare  # noqa: E402
from sagellm_backend.torch_backend.provider import TorchBackendProvider  # noqa: E402
from sagellm_backend.torch_backend.rotary import rotary_cos_sin_cache  # noqa: E402
from sagellm_backend_cuda.kv_write import kv_cache_write  # noqa: E402
from sagellm_backend_cuda.layers import (  # noqa: E402
    fused_add_rms_norm,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
)
from sagellm_backend_cuda.provider import KERNELS, register_triton_kernels  # noqa: E402
from sagellm_backend_cuda.sampling import sample  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = {DType.FP32: torch.float32, DType.FP16: torch.float16, DType.BF16: torch.bfloat16}
ALL_DTYPES = pytest.mark.parametrize("dtype", list(DTYPES), ids=str)


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def poison_free_memory(numel: int, dtype: torch.dtype) -> None:
    """Leave NaN in the block the caching allocator hands out next for this size (GPU only)."""
    if ON_GPU:
        torch.full((numel,), float("nan"), dtype=dtype, device=DEVICE)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, so NaN poison compares equal to itself."""
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


# Norms.


def rms_norm_f64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    wide = x.double().cpu()
    mean_square = (wide * wide).sum(-1, keepdim=True) / wide.shape[-1]
    return wide / torch.sqrt(mean_square + eps) * weight.double().cpu()


@ALL_DTYPES
@pytest.mark.parametrize("shape", [(7, 96), (3, 5, 64), (1, 1), (2, 1000), (4, 4096)])
def test_rms_norm_matches_float64(dtype: DType, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x, w = randn(g, *shape, dtype=DTYPES[dtype]), randn(g, shape[-1], dtype=DTYPES[dtype])
    poison_free_memory(x.numel(), x.dtype)
    result = rms_norm(x, w, 1e-5)
    assert result.shape == x.shape and result.dtype == x.dtype
    compare(result.cpu(), rms_norm_f64(x, w, 1e-5).to(x.dtype), dtype)


@ALL_DTYPES
@pytest.mark.parametrize("hidden", [64, 96, 4096])
def test_fused_add_rms_norm_in_place_inside_poisoned_buffers(dtype: DType, hidden: int) -> None:
    g = torch.Generator().manual_seed(hidden)
    torch_dtype = DTYPES[dtype]
    rows = 6
    # x and residual are row-strided views into NaN-poisoned buffers.
    x_buffer = torch.full((rows, hidden + 8), float("nan"), dtype=torch_dtype, device=DEVICE)
    r_buffer = torch.full((rows, hidden + 24), float("nan"), dtype=torch_dtype, device=DEVICE)
    x, residual = x_buffer[:, 3 : 3 + hidden], r_buffer[:, 16 : 16 + hidden]
    x.copy_(randn(g, rows, hidden, dtype=torch_dtype))
    residual.copy_(randn(g, rows, hidden, dtype=torch_dtype))
    w = randn(g, hidden, dtype=torch_dtype)
    x_before, r_before = x_buffer.clone(), r_buffer.clone()
    expected_residual = (x.double() + residual.double()).to(torch_dtype)
    expected_x = rms_norm_f64(expected_residual, w, 1e-6).to(torch_dtype)
    out_x, out_residual = fused_add_rms_norm(x, residual, w)
    assert out_x is x and out_residual is residual
    if ON_GPU or dtype != DType.BF16:
        assert same_bits(residual, expected_residual), "residual += x is one rounding of the sum"
    else:  # Triton's interpreter truncates fp32 -> bf16 casts; the GPU rounds to nearest
        compare(residual.cpu(), expected_residual.cpu(), dtype)
    compare(x.cpu(), expected_x, dtype)
    x_before[:, 3 : 3 + hidden], r_before[:, 16 : 16 + hidden] = x, residual
    assert same_bits(x_buffer, x_before) and same_bits(r_buffer, r_before), "poison overwritten"


def test_norms_refuse_bad_arguments() -> None:
    x = torch.ones(4, 8, device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="hidden sizes"):
        rms_norm(torch.ones(2, 1 << 17, device=DEVICE), torch.ones(1 << 17, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="x is int64"):
        rms_norm(x.long(), torch.ones(8, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="residual is"):
        fused_add_rms_norm(x, x.half(), torch.ones(8, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="same memory"):
        fused_add_rms_norm(x, x, torch.ones(8, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="contiguous features"):
        fused_add_rms_norm(x.t(), x.t().clone(), torch.ones(4, device=DEVICE))
    before = x.clone()
    with pytest.raises(InvalidArgumentError, match="weight"):
        fused_add_rms_norm(x, x.clone(), torch.ones(3, device=DEVICE))
    for eps in (-1.0, math.inf, torch.tensor(1e-6), "1e-6"):
        with pytest.raises(InvalidArgumentError, match="eps"):
            rms_norm(x, torch.ones(8, device=DEVICE), eps)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="eps"):
            fused_add_rms_norm(x, x.clone(), torch.ones(8, device=DEVICE), eps)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="residual must be a torch"):
        fused_add_rms_norm(x, [1.0] * 8, torch.ones(8, device=DEVICE))  # type: ignore[arg-type]
    assert torch.equal(x, before), "a refused call changed its arguments"


# Rotary embedding.


def rotary_f64(
    positions: torch.Tensor, x: torch.Tensor, cache: torch.Tensor, neox: bool
) -> torch.Tensor:
    """Rotate x's first rotary_dim features of every head, in float64, by complex products."""
    rotary_dim = cache.shape[1]
    half = rotary_dim // 2
    out = x.double().cpu().clone()
    cos, sin = cache.double().cpu()[positions.cpu()].chunk(2, dim=-1)
    turn = torch.complex(cos, sin).unsqueeze(1)  # [n, 1, half]
    part = out[..., :rotary_dim]
    if neox:
        z = torch.complex(part[..., :half], part[..., half:]) * turn
        out[..., :rotary_dim] = torch.cat([z.real, z.imag], dim=-1)
    else:
        z = torch.complex(part[..., 0::2], part[..., 1::2]) * turn
        out[..., :rotary_dim] = torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    return out


@ALL_DTYPES
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
def test_rotary_in_place_on_fused_qkv_views(
    dtype: DType, head_size: int, rotary_fraction: float, neox: bool
) -> None:
    g = torch.Generator().manual_seed(head_size + int(rotary_fraction * 10) + neox)
    torch_dtype = DTYPES[dtype]
    n, heads, kv_heads, max_position = 5, 6, 2, 64  # 6 heads: a masked tile of 8
    rotary_dim = int(head_size * rotary_fraction)
    # One fused QKV buffer with NaN padding between rows: q and k are strided views of it.
    width = (heads + 2 * kv_heads) * head_size + 8
    qkv = torch.full((n, width), float("nan"), dtype=torch_dtype, device=DEVICE)
    q = qkv[:, : heads * head_size].view(n, heads, head_size)
    k = qkv[:, heads * head_size : (heads + kv_heads) * head_size].view(n, kv_heads, head_size)
    q.copy_(randn(g, n, heads, head_size, dtype=torch_dtype))
    k.copy_(randn(g, n, kv_heads, head_size, dtype=torch_dtype))
    positions = torch.randint(0, max_position, (n,), generator=g).to(DEVICE)
    positions[-1] = max_position + 3  # outside the cache: left as it is
    cache = rotary_cos_sin_cache(max_position, rotary_dim, device=DEVICE)
    before = qkv.clone()
    inside = positions.cpu() < max_position
    expected_q = rotary_f64(positions.cpu()[inside], q.cpu()[inside], cache, neox)
    expected_k = rotary_f64(positions.cpu()[inside], k.cpu()[inside], cache, neox)
    out_q, out_k = rotary_embedding(positions, q, k, cache, is_neox=neox)
    assert out_q is q and out_k is k
    compare(q.cpu()[inside], expected_q.to(torch_dtype), dtype)
    compare(k.cpu()[inside], expected_k.to(torch_dtype), dtype)
    assert same_bits(
        q[..., rotary_dim:], before[:, : heads * head_size].view(q.shape)[..., rotary_dim:]
    )
    assert same_bits(
        q[~inside.to(DEVICE)], before[:, : heads * head_size].view(q.shape)[~inside.to(DEVICE)]
    )
    rest = (heads + kv_heads) * head_size
    assert same_bits(qkv[:, rest:], before[:, rest:]), "value part or padding overwritten"


def test_rotary_refuses_bad_arguments() -> None:
    q, k = torch.ones(3, 4, 64, device=DEVICE), torch.ones(3, 2, 64, device=DEVICE)
    positions = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    cache = rotary_cos_sin_cache(16, 64, device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="rotary_dim 66"):
        rotary_embedding(positions, q, k, rotary_cos_sin_cache(16, 66, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="positions has shape"):
        rotary_embedding(positions[:2], q, k, cache)
    with pytest.raises(InvalidArgumentError, match="key is"):
        rotary_embedding(positions, q, k.half(), cache)
    with pytest.raises(InvalidArgumentError, match="positions is float32"):
        rotary_embedding(positions.float(), q, k, cache)
    with pytest.raises(InvalidArgumentError, match="not contiguous"):
        rotary_embedding(positions, q.transpose(1, 2).contiguous().transpose(1, 2), k, cache)
    with pytest.raises(InvalidArgumentError, match="is_neox must be a bool"):
        rotary_embedding(positions, q, k, cache, is_neox="no")  # type: ignore[arg-type]
    shared = torch.ones(1, 4, 64, device=DEVICE).expand(3, 4, 64)
    with pytest.raises(InvalidArgumentError, match="query is written in place"):
        rotary_embedding(positions, shared, k, cache)
    with pytest.raises(InvalidArgumentError, match="key must be a torch"):
        rotary_embedding(positions, q, None, cache)  # type: ignore[arg-type]
    assert q.eq(1).all() and k.eq(1).all()


def test_rotary_reads_strided_positions_as_their_values() -> None:
    g = torch.Generator().manual_seed(5)
    table = rotary_cos_sin_cache(64, 32, device=DEVICE)
    q, k = randn(g, 4, 2, 32, dtype=torch.float32), randn(g, 4, 1, 32, dtype=torch.float32)
    pairs = torch.tensor([[3, 0], [7, 0], [11, 0], [40, 0]], device=DEVICE)
    positions = pairs[:, 0]
    assert not positions.is_contiguous()
    expected_q = rotary_f64(positions.cpu(), q.cpu(), table, True)
    expected_k = rotary_f64(positions.cpu(), k.cpu(), table, True)
    rotary_embedding(positions, q, k, table)
    compare(q.cpu(), expected_q.float(), DType.FP32)
    compare(k.cpu(), expected_k.float(), DType.FP32)


# Gated activation.


@ALL_DTYPES
@pytest.mark.parametrize("shape", [(5, 192), (2, 3, 128), (1, 2), (3, 8192)])
def test_silu_and_mul_matches_float64(dtype: DType, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = randn(g, *shape, dtype=DTYPES[dtype])
    poison_free_memory(x.numel() // 2, x.dtype)
    result = silu_and_mul(x)
    half = shape[-1] // 2
    gate, up = x.double().cpu()[..., :half], x.double().cpu()[..., half:]
    expected = gate / (1 + torch.exp(-gate)) * up
    assert result.shape == (*shape[:-1], half)
    compare(result.cpu(), expected.to(x.dtype), dtype)


def test_silu_and_mul_refuses_odd_and_empty_widths() -> None:
    for width in (7, 0):
        with pytest.raises(InvalidArgumentError, match="must be even"):
            silu_and_mul(torch.ones(2, width, device=DEVICE))


# KV slot write.


@ALL_DTYPES
@pytest.mark.parametrize("tokens_per_block", [16, 32])
@pytest.mark.parametrize("head_size", [64, 128])
def test_kv_cache_write_fills_exactly_the_given_slots(
    dtype: DType, tokens_per_block: int, head_size: int
) -> None:
    g = torch.Generator().manual_seed(tokens_per_block + head_size)
    torch_dtype = DTYPES[dtype]
    num_pages, kv_heads, n = 5, 3, 23  # 3 heads: a masked tile of 4
    cache = torch.full(
        (num_pages, 2, tokens_per_block, kv_heads, head_size),
        float("nan"),
        dtype=torch_dtype,
        device=DEVICE,
    )
    # K and V as strided views of a fused QKV output.
    qkv = randn(g, n, (2 + 2 * kv_heads) * head_size + 8, dtype=torch_dtype)
    key = qkv[:, 2 * head_size : (2 + kv_heads) * head_size].view(n, kv_heads, head_size)
    value = qkv[:, (2 + kv_heads) * head_size : -8].view(n, kv_heads, head_size)
    slots = torch.randperm(num_pages * tokens_per_block, generator=g)[:n]
    slots[::5] = -1  # padding
    slots[3] = num_pages * tokens_per_block  # out of range: never written
    slots[4] = 10**9
    expected = cache.cpu().clone()
    for i, slot in enumerate(slots.tolist()):
        if 0 <= slot < num_pages * tokens_per_block:
            page, offset = divmod(slot, tokens_per_block)
            expected[page, 0, offset] = key[i].cpu()
            expected[page, 1, offset] = value[i].cpu()
    for index_dtype in (torch.int64, torch.int32):
        kv_cache_write(key, value, cache, slots.to(index_dtype).to(DEVICE))
        assert same_bits(cache.cpu(), expected), "wrong slots written, or poison overwritten"


def test_kv_cache_write_refuses_bad_arguments() -> None:
    cache = torch.full((2, 2, 16, 2, 64), float("nan"), dtype=torch.float16, device=DEVICE)
    key = torch.ones(3, 2, 64, dtype=torch.float16, device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    before = cache.clone()
    with pytest.raises(InvalidArgumentError, match="key is float32"):
        kv_cache_write(key.float(), key, cache, slots)
    with pytest.raises(InvalidArgumentError, match="value has shape"):
        kv_cache_write(key, key[:2], cache, slots)
    with pytest.raises(InvalidArgumentError, match="slot_mapping is float32"):
        kv_cache_write(key, key, cache, slots.float())
    with pytest.raises(InvalidArgumentError, match=r"kv_cache has shape"):
        kv_cache_write(key, key, cache[0], slots)
    with pytest.raises(InvalidArgumentError, match="not contiguous"):
        kv_cache_write(key, key, cache.transpose(2, 3).contiguous().transpose(2, 3), slots)
    with pytest.raises(InvalidArgumentError, match="key has shape"):
        kv_cache_write(key[:, :1], key, cache, slots)
    assert same_bits(cache, before)
    kv_cache_write(key[:0], key[:0], cache, slots[:0])
    assert same_bits(cache, before)
    with pytest.raises(InvalidArgumentError, match="key must be a torch"):
        kv_cache_write(None, key, cache, slots)  # type: ignore[arg-type]


def test_kv_cache_write_reads_a_strided_slot_mapping_as_its_values() -> None:
    cache = torch.full((2, 2, 16, 1, 64), float("nan"), dtype=torch.float16, device=DEVICE)
    key = torch.arange(3 * 64, dtype=torch.float16, device=DEVICE).view(3, 1, 64)
    slots = torch.tensor([5, 100, 9, 101, 14, 102], device=DEVICE)[::2]  # 5, 9 and 14
    assert not slots.is_contiguous()
    kv_cache_write(key, -key, cache, slots)
    for i, slot in enumerate((5, 9, 14)):
        assert torch.equal(cache[0, 0, slot], key[i]) and torch.equal(cache[0, 1, slot], -key[i])
    assert int(cache.isnan().sum()) == cache.numel() - 2 * 3 * 64, "only those slots written"


# Registration.


def test_the_triton_kernels_register_over_the_references() -> None:
    """On a torch provider (the CPU one here, the GPU's in the GPU run), each Triton kernel takes
    its standard name, and those of this suite with a reference pass the reference's check."""
    provider: TorchBackendProvider[Any, Any]
    if ON_GPU:
        from sagellm_backend_cuda import create_cuda_backend

        provider = create_cuda_backend(None, validate_collectives=False)
    else:
        from sagellm_backend.torch_backend.cpu import create_cpu_backend

        provider = create_cpu_backend(None, validate_collectives=False)
    ours = {kv_cache_write, fused_add_rms_norm, rms_norm, rotary_embedding, silu_and_mul, sample}
    try:
        register_triton_kernels(provider)
        for name, impl in KERNELS:
            spec = provider.kernel_spec(name)
            assert spec.impl is impl
            if impl in ours and spec.checkable:
                for dtype in sorted(spec.dtypes):
                    spec.check(seed=1, dtype=dtype)
    finally:
        provider.close()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (ran in the interpreter)")
@pytest.mark.parametrize("tokens_per_block", [16, 32])
def test_model_shapes_on_the_gpu(tokens_per_block: int) -> None:
    """The benchmark's shapes (hidden 4096, 32/8 heads of 128, bf16) on a slice of tokens."""
    g = torch.Generator().manual_seed(tokens_per_block)
    n, hidden, heads, kv_heads, head_size = 512, 4096, 32, 8, 128
    x, residual = (
        randn(g, n, hidden, dtype=torch.bfloat16),
        randn(g, n, hidden, dtype=torch.bfloat16),
    )
    w = randn(g, hidden, dtype=torch.bfloat16)
    expected_residual = (x.double() + residual.double()).to(torch.bfloat16)
    expected = rms_norm_f64(expected_residual, w, 1e-6).to(torch.bfloat16)
    fused_add_rms_norm(x, residual, w)
    assert same_bits(residual, expected_residual)
    compare(x.cpu(), expected, DType.BF16)
    q = randn(g, n, heads, head_size, dtype=torch.bfloat16)
    k = randn(g, n, kv_heads, head_size, dtype=torch.bfloat16)
    positions = torch.randint(0, 8192, (n,), generator=g).to(DEVICE)
    cache = rotary_cos_sin_cache(8192, head_size, device=DEVICE)
    expected_q = rotary_f64(positions, q, cache, True).to(torch.bfloat16)
    rotary_embedding(positions, q, k, cache)
    compare(q.cpu(), expected_q, DType.BF16)
    pages = 2 * n // tokens_per_block
    kv = torch.full(
        (pages, 2, tokens_per_block, kv_heads, head_size), float("nan"), dtype=torch.bfloat16
    ).to(DEVICE)
    slots = torch.randperm(pages * tokens_per_block, generator=g)[:n].to(DEVICE)
    kv_cache_write(k, q[:, :kv_heads], kv, slots)
    flat = (
        kv.view(pages, 2, tokens_per_block, -1).transpose(1, 2).reshape(-1, 2, kv_heads * head_size)
    )
    assert same_bits(flat[slots, 0], k.reshape(n, -1))
    assert same_bits(flat[slots, 1], q[:, :kv_heads].reshape(n, -1))
    assert int(torch.isnan(flat[:, 0]).all(dim=-1).sum()) == pages * tokens_per_block - n
