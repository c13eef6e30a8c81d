"""The Triton KV page movement against a reference copy, on fresh random data.

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

from sagellm_backend.errors import InvalidArgumentError  # noqa: E402
from sagellm_backend_cuda.kernels import copy_pages  # noqa: E402

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


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_copy_pages_takes_page_ids_off_each_pools_base(index_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(11)
    src, dst = _random_pool(g, 12, torch.bfloat16), _random_pool(g, 6, torch.bfloat16)
    expected = dst.clone()
    src_base, dst_base = (3 << 40, 1 << 20) if index_dtype is torch.int64 else (1000, 7)
    pairs = [(11, 0), (4, 5), (4, 2)]
    for s, d in pairs:
        expected[:, d] = src[:, s]
    ids = [[s + src_base for s, _ in pairs], [d + dst_base for _, d in pairs]]
    copy_pages(src, dst, torch.tensor(ids, dtype=index_dtype, device=DEVICE), (src_base, dst_base))
    assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8))


def test_copy_pages_refuses_mismatched_pools_and_indices() -> None:
    a = torch.zeros(2, 4, 2, 4, 2, 8, dtype=torch.float16, device=DEVICE)
    index = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="pools differ"):
        copy_pages(a, a.float(), index)
    with pytest.raises(InvalidArgumentError, match="pools differ"):
        copy_pages(a, a[:1].clone(), index)
    for wrong in (index.float(), index[0], torch.zeros(3, 1, dtype=torch.int32, device=DEVICE)):
        with pytest.raises(InvalidArgumentError, match=r"\[2, n\] int32 or int64"):
            copy_pages(a, a, wrong)
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        copy_pages(a.transpose(2, 3), a.transpose(2, 3), index)
    with pytest.raises(InvalidArgumentError, match="pools differ"):
        copy_pages(a, a[0, 0, 0, 0], index)
    with pytest.raises(InvalidArgumentError, match="hold no pages"):
        copy_pages(a[:, :0], a, index[:, :0])


def test_copy_pages_reads_a_strided_index_as_its_values() -> None:
    g = torch.Generator().manual_seed(3)
    src, dst = _random_pool(g, 6, torch.float16), _random_pool(g, 6, torch.float16)
    expected = dst.clone()
    expected[:, 4], expected[:, 0] = src[:, 1], src[:, 3]
    pages = torch.tensor([[1, 4], [3, 0]], dtype=torch.int32, device=DEVICE).t()  # 1->4, 3->0
    assert not pages.is_contiguous()
    copy_pages(src, dst, pages)
    assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8))
