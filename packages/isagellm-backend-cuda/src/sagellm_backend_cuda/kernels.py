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

__all__ = ["PageCopier", "copy_pages"]

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
    src_base,
    dst_base,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Program (pair, layer, part) copies words [part * BLOCK, (part + 1) * BLOCK) of one chunk.
    job = tl.program_id(0)
    part = tl.program_id(1)
    pair = job % num_pairs
    layer = (job // num_pairs).to(tl.int64)
    src_page = tl.load(pages + pair).to(tl.int64) - src_base
    dst_page = tl.load(pages + num_pairs + pair).to(tl.int64) - dst_base
    offsets = part * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < CHUNK
    source = src + layer * src_layer_stride + src_page * CHUNK + offsets
    target = dst + layer * dst_layer_stride + dst_page * CHUNK + offsets
    tl.store(target, tl.load(source, mask=mask), mask=mask)


class PageCopier:
    """:func:`copy_pages` between two given pools: the pools are checked, and the launch's
    constants worked out, once."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if (
            src.dtype != dst.dtype
            or src.dim() < 2
            or src.dim() != dst.dim()
            or src.shape[0] != dst.shape[0]
            or src.shape[2:] != dst.shape[2:]
        ):
            raise InvalidArgumentError(
                f"page pools differ: {tuple(src.shape)} {src.dtype} and "
                f"{tuple(dst.shape)} {dst.dtype}",
                hint="copy between pools of one KV layout",
            )
        if not (src.is_contiguous() and dst.is_contiguous()):
            raise InvalidArgumentError(
                "page pools must be contiguous tensors",
                hint="pass the pools kv_cache() returns, not a slice or view of them",
            )
        if not (src.shape[0] and src.shape[1] and dst.shape[1]):
            raise InvalidArgumentError(
                f"page pools {tuple(src.shape)} and {tuple(dst.shape)} hold no pages",
                hint="copy between pools of at least one layer and one page",
            )
        page_bytes = src[0, 0].numel() * src.element_size()
        if page_bytes % 4:
            raise InvalidArgumentError(
                f"a page of one layer is {page_bytes} bytes, not whole words",
                hint="use a KV layout whose page of one layer is a multiple of 4 bytes",
            )
        words = page_bytes // 4
        self._src, self._dst = _words(src), _words(dst)
        self._layers = src.shape[0]
        self._strides = (src.shape[1] * words, dst.shape[1] * words)
        self._parts = triton.cdiv(words, _WORDS_PER_PROGRAM)
        self._chunk = words
        self._block = min(_WORDS_PER_PROGRAM, triton.next_power_of_2(words))

    def __call__(self, pages: torch.Tensor, bases: tuple[int, int] = (0, 0)) -> None:
        """Queue the copy of page ``pages[0, i] - bases[0]`` of the source to page
        ``pages[1, i] - bases[1]`` of the target, in every layer, on the current stream."""
        if pages.dim() != 2 or pages.shape[0] != 2 or pages.dtype not in _INDEX_DTYPES:
            raise InvalidArgumentError(
                f"pages must be a [2, n] int32 or int64 tensor, got {tuple(pages.shape)} "
                f"{pages.dtype}",
                hint="stack the source and destination page indices: torch.tensor([src, dst], "
                "dtype=torch.int32)",
            )
        num_pairs = pages.shape[1]
        if num_pairs == 0:
            return
        _copy_pages_kernel[(num_pairs * self._layers, self._parts)](
            self._src,
            self._dst,
            pages.contiguous(),  # read as the source run, then the target run
            num_pairs,
            *self._strides,
            *bases,
            CHUNK=self._chunk,
            BLOCK=self._block,
            num_warps=4,
        )


def copy_pages(
    src: torch.Tensor, dst: torch.Tensor, pages: torch.Tensor, bases: tuple[int, int] = (0, 0)
) -> None:
    """Copy page ``pages[0, i] - bases[0]`` of ``src`` to page ``pages[1, i] - bases[1]`` of
    ``dst`` in every layer.

    ``src`` and ``dst`` are contiguous pools ``[num_layers, num_pages, ...]`` of one dtype and
    page shape (their page counts may differ); ``pages`` is ``[2, n]`` int32 or int64 on the
    device that runs the kernel. Queued on the current stream; bytes are copied exactly.
    """
    PageCopier(src, dst)(pages, bases)


_INDEX_DTYPES = (torch.int32, torch.int64)


def _words(pool: torch.Tensor) -> torch.Tensor:
    return pool.view(-1).view(torch.int32)
