"""Freed KV pages are reused only after the GPU work that still reads or writes them.

Each test holds work back on one stream with ``torch.cuda._sleep`` (the GPU spins for a number of
cycles), frees the pages that work uses, hands them out again and writes them on another
stream, then checks the bytes the held-back work read or wrote.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("torch", reason="the cuda backend needs torch")
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU here: these tests run on one", allow_module_level=True)

from sagellm_backend.device import HOST
from sagellm_backend.kv import KVBlock
from sagellm_backend.torch_backend.provider import TorchBackendProvider
from sagellm_backend_cuda import create_cuda_backend
from sagellm_backend_cuda.adapter import PooledEvent

pytestmark = pytest.mark.gpu

LAYOUT = {"num_layers": 2, "num_kv_heads": 4, "head_size": 64, "tokens_per_block": 16}
HOLD = 200_000_000
"""GPU cycles a held-back stream spins for: about 0.1 s on an H200, long beside the host."""
Provider = TorchBackendProvider[torch.cuda.Stream, PooledEvent]


@pytest.fixture
def provider() -> Iterator[Provider]:
    made: Provider = create_cuda_backend(
        None, kv_dtype="bf16", num_blocks=8, host_num_blocks=8, **LAYOUT
    )
    # Compile the movement kernels first: a compile inside a test outlasts the held-back work.
    a, b = made.kv_blocks_alloc([16, 16], "bf16")
    made.kv_blocks_copy([(a, b)])
    (c,), _ = made.kv_blocks_migrate([a], HOST)
    made.kv_blocks_free([b, c])
    made.synchronize()
    yield made
    made.close()


def fill(p: Provider, block: KVBlock, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    info = p.kv_block_info(block)
    size = p.kv_layout.page_bytes(info.dtype) * info.num_pages
    data = bytes(torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8).tolist())
    p.kv_block_write(block, data)
    return data


def hold(stream: torch.cuda.Stream) -> None:
    with torch.cuda.stream(stream):
        torch.cuda._sleep(HOLD)  # type: ignore[no-untyped-call]  # unannotated in torch


def test_a_delayed_side_stream_copy_reads_its_source_before_the_page_is_reused(
    provider: Provider,
) -> None:
    src, dst = provider.kv_blocks_alloc([16, 16], "bf16")
    data = fill(provider, src, 1)
    torch.cuda.synchronize()
    side = provider.create_stream()
    hold(side.raw)
    done = provider.kv_blocks_copy([(src, dst)], stream=side)
    provider.kv_block_free(src)
    other = provider.create_stream()
    with other:
        reused = provider.kv_block_alloc(16, "bf16")
        fill(provider, reused, 2)
    assert not done.query(), "the copy is still held back"
    done.synchronize()
    torch.cuda.synchronize()
    assert provider.kv_block_read(dst) == data


def test_a_short_pool_waits_for_the_copy_before_handing_its_source_out(
    provider: Provider,
) -> None:
    blocks = provider.kv_blocks_alloc([16] * 8, "bf16")
    freed = provider.kv_block_info(blocks[0]).pages
    data = fill(provider, blocks[0], 3)
    torch.cuda.synchronize()
    side = provider.create_stream()
    hold(side.raw)
    done = provider.kv_blocks_copy([(blocks[0], blocks[1])], stream=side)
    provider.kv_block_free(blocks[0])
    other = provider.create_stream()
    with other:
        reused = provider.kv_block_alloc(16, "bf16")  # the only page: waits for the copy
        assert done.query(), "the allocation waited for the copy that reads the page"
        assert provider.kv_block_info(reused).pages == freed
        fill(provider, reused, 4)
    torch.cuda.synchronize()
    assert provider.kv_block_read(blocks[1]) == data


def test_a_free_after_the_engines_event_keeps_the_page_for_its_kernel(
    provider: Provider,
) -> None:
    block = provider.kv_block_alloc(16, "bf16")
    data = fill(provider, block, 5)
    torch.cuda.synchronize()
    engine = provider.create_stream()
    cache = provider.kv_pool()
    (page,) = provider.kv_block_info(block).pages
    hold(engine.raw)
    with engine:
        kept = cache[:, page].clone()  # the engine's own read of the page
    provider.kv_blocks_free([block], after=engine.record_event())
    other = provider.create_stream()
    with other:
        for reused in provider.kv_blocks_alloc([16] * 8, "bf16"):  # every page: waits
            fill(provider, reused, 6)
    torch.cuda.synchronize()
    as_bytes = kept.contiguous().view(torch.uint8).flatten().cpu().numpy().tobytes()
    assert as_bytes == data


def test_a_swap_in_on_a_side_stream_lands_after_the_old_owners_queued_write(
    provider: Provider,
) -> None:
    on_host = provider.kv_block_migrate(provider.kv_block_alloc(16, "bf16"), HOST)
    data = fill(provider, on_host, 7)
    old = provider.kv_block_alloc(16, "bf16")
    torch.cuda.synchronize()
    current = torch.cuda.current_stream()
    hold(current)
    old_pages = provider.kv_block_info(old).pages
    provider.kv_pool()[:, old_pages[0]].fill_(3.0)  # queued behind the hold
    provider.kv_block_free(old)
    side = provider.create_stream()
    (swapped,), done = provider.kv_blocks_migrate([on_host], provider.device, stream=side)
    assert provider.kv_block_info(swapped).pages == old_pages
    done.synchronize()
    torch.cuda.synchronize()
    assert provider.kv_block_read(swapped) == data


def test_a_copy_inside_a_with_stream_block_reads_its_source_before_the_page_is_reused(
    provider: Provider,
) -> None:
    src, dst, *_ = provider.kv_blocks_alloc([16] * 8, "bf16")  # the whole pool
    data = fill(provider, src, 3)
    torch.cuda.synchronize()
    side = provider.create_stream()
    hold(side.raw)
    with side:
        provider.kv_block_copy(src, dst)  # on the held-back stream, no stream= given
    pages = provider.kv_block_info(src).pages
    provider.kv_block_free(src)  # from the default stream
    reused = provider.kv_block_alloc(16, "bf16")  # waits for the copy: no other page is free
    assert provider.kv_block_info(reused).pages == pages
    fill(provider, reused, 4)
    torch.cuda.synchronize()
    assert provider.kv_block_read(dst) == data
