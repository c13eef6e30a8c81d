"""The Triton kernels against their references, on fresh random data.

On a machine with a GPU they run there; without one, under Triton's interpreter on the CPU
(``TRITON_INTERPRET=1`` is set before the kernels are imported), so kernel logic is tested in CI.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch", reason="the kernels need torch")
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported
pytest.importorskip("triton", reason="the kernels need triton")

from sagellm_backend.dtypes import DType  # noqa: E402
from sagellm_backend.errors import InvalidArgumentError  # noqa: E402
from sagellm_backend.torch_backend import kernels as reference  # noqa: E402
from sagellm_backend.torch_backend.references import rms_norm_reference  # noqa: E402
from sagellm_backend_cuda.kernels import copy_pages, rms_norm  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random_pool(g: torch.Generator, pages: int, dtype: torch.dtype) -> torch.Tensor:
    """A pool of random bit patterns (NaN payloads included): a copy must keep every bit."""
    shape = (3, pages, 2, 4, 2, 16)
    words = torch.randint(
        -(2**15),
        2**15,
        (*shape[:-1], shape[-1] * dtype.itemsize // 2),
        generator=g,
        dtype=torch.int16,
    )
    return words.view(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_copy_pages_moves_every_byte_of_random_pages(dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    src = _random_pool(g, 40, dtype)
    dst = _random_pool(g, 24, dtype)
    count = int(torch.randint(1, 24, (1,), generator=g))
    src_pages = torch.randperm(40, generator=g)[:count]
    dst_pages = torch.randperm(24, generator=g)[:count]
    expected = dst.clone()
    for s, d in zip(src_pages.tolist(), dst_pages.tolist(), strict=True):
        expected[:, d] = src[:, s]
    before = src.clone()
    pages = torch.stack([src_pages, dst_pages]).to(dtype=torch.int32, device=DEVICE)
    copy_pages(src, dst, pages)
    assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(src.view(torch.uint8), before.view(torch.uint8))


def test_copy_pages_within_one_pool_and_of_nothing() -> None:
    g = torch.Generator().manual_seed(7)
    pool = _random_pool(g, 8, torch.float16)
    expected = pool.clone()
    expected[:, 5], expected[:, 6] = pool[:, 1], pool[:, 2]
    copy_pages(pool, pool, torch.tensor([[1, 2], [5, 6]], dtype=torch.int32, device=DEVICE))
    assert torch.equal(pool.view(torch.uint8), expected.view(torch.uint8))
    copy_pages(pool, pool, torch.empty((2, 0), dtype=torch.int32, device=DEVICE))
    assert torch.equal(pool.view(torch.uint8), expected.view(torch.uint8))


def test_copy_pages_refuses_mismatched_pools_and_indices() -> None:
    a = torch.zeros(2, 4, 2, 4, 2, 8, dtype=torch.float16, device=DEVICE)
    index = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="pools differ"):
        copy_pages(a, a.float(), index)
    with pytest.raises(InvalidArgumentError, match="pools differ"):
        copy_pages(a, a[:1].clone(), index)
    with pytest.raises(InvalidArgumentError, match=r"\[2, n\] int32"):
        copy_pages(a, a, index.long())
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        copy_pages(a.transpose(2, 3), a.transpose(2, 3), index)


@pytest.mark.parametrize("dtype", [DType.FP32, DType.FP16, DType.BF16], ids=str)
@pytest.mark.parametrize("shape", [(7, 96), (3, 5, 4096), (1, 1), (2, 1000)])
def test_rms_norm_matches_the_float64_reference(dtype: DType, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    torch_dtype = {DType.FP32: torch.float32, DType.FP16: torch.float16, DType.BF16: torch.bfloat16}
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(torch_dtype[dtype]).to(DEVICE)
    w = torch.randn(shape[-1], generator=g, dtype=torch.float64).to(x.dtype).to(DEVICE)
    result = rms_norm(x, w, 1e-5)
    assert result.shape == x.shape and result.dtype == x.dtype
    reference.compare(result.cpu(), rms_norm_reference(x.cpu(), w.cpu(), 1e-5), dtype)


def test_rms_norm_passes_the_kernel_spec_check() -> None:
    from sagellm_backend.kernels import KernelTable

    table = KernelTable()
    reference.register_reference_kernels(table, DEVICE)
    spec = table.spec("rms_norm")
    table.register(
        "rms_norm",
        rms_norm,
        kind=spec.kind,
        dtypes=spec.dtypes,
        reference=spec.reference,
        make_inputs=spec.make_inputs,
        compare=spec.compare,
        override=True,
    )
    for dtype in sorted(spec.dtypes):
        for seed in range(4):
            table.spec("rms_norm").check(seed, dtype)


def test_rms_norm_refuses_bad_shapes() -> None:
    x = torch.ones(4, 8, device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="hidden"):
        rms_norm(torch.ones(2, 1 << 17, device=DEVICE), torch.ones(1 << 17, device=DEVICE))
