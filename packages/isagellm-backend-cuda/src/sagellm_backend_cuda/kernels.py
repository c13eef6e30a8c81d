# Triton kernels take untyped parameters (Triton reads their annotations itself) and triton.jit
# is untyped, so these two checks cannot apply to the kernel bodies in this module.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Triton kernels of the cuda backend's KV page movement: every page pair in one launch.

They run on the GPU and, for development without one, under Triton's interpreter
(``TRITON_INTERPRET=1``, set before this module is imported) on CPU tensors.

:func:`copy_pages` moves whole pages between two page pools of the torch layer's layout
``[num_layers, num_pages, 2, tokens_per_block, num_kv_heads, head_size]``: every (layer, page
pair) chunk in one launch, each chunk contiguous in both pools. A pool in pinned host memory is
read or written in place through its device mapping (unified addressing), so a swap to or from
the host is one launch too, with no staging copy and no host-side scatter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagellm_backend.errors import InvalidArgumentError

__all__ = ["copy_pages"]

_WORDS_PER_PROGRAM = 4096
"""32-bit words one program copies: 16 KiB, four programs per 64 KiB Llama-sized chunk."""


@triton.jit
def _copy_pages_kernel(
    src,
    dst,
    pages,
    num_pairs,
    src_layer_stride,
    dst_layer_stride,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Program (pair, layer, part) copies words [part * BLOCK, (part + 1) * BLOCK) of one chunk.
    job = tl.program_id(0)
    part = tl.program_id(1)
    pair = job % num_pairs
    layer = (job // num_pairs).to(tl.int64)
    src_page = tl.load(pages + pair).to(tl.int64)
    dst_page = tl.load(pages + num_pairs + pair).to(tl.int64)
    offsets = part * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < CHUNK
    source = src + layer * src_layer_stride + src_page * CHUNK + offsets
    target = dst + layer * dst_layer_stride + dst_page * CHUNK + offsets
    tl.store(target, tl.load(source, mask=mask), mask=mask)


def copy_pages(src: torch.Tensor, dst: torch.Tensor, pages: torch.Tensor) -> None:
    """Copy page ``pages[0, i]`` of ``src`` to page ``pages[1, i]`` of ``dst`` in every layer.

    ``src`` and ``dst`` are contiguous pools ``[num_layers, num_pages, ...]`` of one dtype and
    page shape (their page counts may differ); ``pages`` is ``[2, n]`` int32 on the device that
    runs the kernel. Queued on the current stream; bytes are copied exactly.
    """
    if src.dtype != dst.dtype or src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:]:
        raise InvalidArgumentError(
            f"page pools differ: {tuple(src.shape)} {src.dtype} and {tuple(dst.shape)} {dst.dtype}",
            hint="copy between pools of one KV layout",
        )
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise InvalidArgumentError(
            "page pools must be contiguous tensors",
            hint="pass the pools kv_cache() returns, not a slice or view of them",
        )
    if pages.dim() != 2 or pages.shape[0] != 2 or pages.dtype != torch.int32:
        raise InvalidArgumentError(
            f"pages must be a [2, n] int32 tensor, got {tuple(pages.shape)} {pages.dtype}",
            hint="stack the source and destination page indices: torch.tensor([src, dst], "
            "dtype=torch.int32)",
        )
    num_layers, num_pairs = src.shape[0], pages.shape[1]
    if num_pairs == 0:
        return
    page_bytes = src[0, 0].numel() * src.element_size()
    if page_bytes % 4:
        raise InvalidArgumentError(
            f"a page of one layer is {page_bytes} bytes, not whole words",
            hint="use a KV layout whose page of one layer is a multiple of 4 bytes",
        )
    words = page_bytes // 4
    src_words, dst_words = _words(src), _words(dst)
    grid = (num_pairs * num_layers, triton.cdiv(words, _WORDS_PER_PROGRAM))
    _copy_pages_kernel[grid](
        src_words,
        dst_words,
        pages,
        num_pairs,
        src.shape[1] * words,
        dst.shape[1] * words,
        CHUNK=words,
        BLOCK=min(_WORDS_PER_PROGRAM, triton.next_power_of_2(words)),
        num_warps=4,
    )


def _words(pool: torch.Tensor) -> torch.Tensor:
    return pool.view(-1).view(torch.int32)
