"""Batch metadata on a real GPU: values, a captured graph replaying over the buffers, uploads
that stay correct while the host runs ahead of a busy GPU, and the host cost of a decode step."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterator, Sequence

import pytest

pytest.importorskip("torch", reason="the cuda backend needs torch")
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU here: these tests run on one", allow_module_level=True)

from sagellm_backend.errors import GraphCaptureError
from sagellm_backend.kv import KVBlock
from sagellm_backend.torch_backend.provider import TorchBackendProvider
from sagellm_backend_cuda import create_cuda_backend
from sagellm_backend_cuda.adapter import PooledEvent

TOKENS = 16
LAYOUT = {"num_layers": 1, "num_kv_heads": 1, "head_size": 64, "tokens_per_block": TOKENS}
Provider = TorchBackendProvider[torch.cuda.Stream, PooledEvent]


@pytest.fixture
def provider() -> Iterator[Provider]:
    made: Provider = create_cuda_backend(
        None, kv_dtype="bf16", num_blocks=64 * 128 + 64, host_num_blocks=16, **LAYOUT
    )
    yield made
    made.close()


def _pages(p: Provider, block: KVBlock) -> tuple[int, ...]:
    info = p.kv_block_info(block)
    assert info.device == p.device
    return info.pages


def _slots(p: Provider, blocks: Sequence[KVBlock], lens: Sequence[int]) -> list[int]:
    return [p.kv_layout.slot(_pages(p, b), s - 1) for b, s in zip(blocks, lens, strict=True)]


def test_plans_reach_the_device(provider: Provider) -> None:
    rng = random.Random(3)
    md = provider.create_batch_metadata(16, 64, 8)
    blocks = provider.kv_blocks_alloc([rng.randint(1, 8 * TOKENS) for _ in range(16)], "bf16")
    for _ in range(3):
        lens = [rng.randint(1, len(_pages(provider, b)) * TOKENS) for b in blocks]
        md.plan(blocks, lens)
        assert md.seq_lens.device.type == "cuda"
        assert md.seq_lens.tolist() == lens
        assert md.positions.tolist() == [s - 1 for s in lens]
        assert md.slot_mapping.tolist() == _slots(provider, blocks, lens)
        for i, block in enumerate(blocks):
            pages = _pages(provider, block)
            assert md.block_tables[i, : len(pages)].tolist() == list(pages)


def test_a_captured_graph_replays_over_the_planned_buffers(provider: Provider) -> None:
    md = provider.create_batch_metadata(8, 8, 4)
    blocks = provider.kv_blocks_alloc([4 * TOKENS] * 8, "bf16")
    md.plan(blocks, [1] * 8)
    out = torch.zeros(3, dtype=torch.int64, device=provider.torch_device)
    stream = provider.create_stream()
    provider.synchronize()
    with provider.capture_graph(stream) as graph:
        out[0] = md.seq_lens.sum()
        out[1] = md.slot_mapping.sum()
        out[2] = md.block_tables.sum()
        with pytest.raises(GraphCaptureError):
            md.plan(blocks, [2] * 8)
    rng = random.Random(5)
    for _ in range(3):
        order = rng.sample(blocks, 8)
        lens = [rng.randint(1, 4 * TOKENS) for _ in range(8)]
        md.plan(order, lens)
        graph.replay()
        provider.synchronize()
        table = sum(sum(_pages(provider, b)) for b in order)
        assert out.tolist() == [sum(lens), sum(_slots(provider, order, lens)), table]


def test_uploads_stay_correct_while_the_host_runs_ahead(provider: Provider) -> None:
    md = provider.create_batch_metadata(64, 64, 4)
    blocks = provider.kv_blocks_alloc([4 * TOKENS] * 64, "bf16")
    steps = 20
    seen = torch.zeros(steps, 64, dtype=torch.int32, device=provider.torch_device)
    plans = [[(i * 7 + k) % (4 * TOKENS) + 1 for i in range(64)] for k in range(steps)]
    busy = torch.randn(8192, 8192, device=provider.torch_device)
    for _ in range(8):  # keep the GPU busy while every step is issued
        busy = busy @ busy / 100.0
    for k, lens in enumerate(plans):
        md.plan(blocks, lens)
        seen[k].copy_(md.seq_lens)
    provider.synchronize()
    assert seen.tolist() == plans


def test_a_decode_step_costs_at_most_100_us_of_host_time(provider: Provider) -> None:
    md = provider.create_batch_metadata(64, 64, 128)
    blocks = provider.kv_blocks_alloc([128 * TOKENS] * 64, "bf16")
    rng = random.Random(0)
    start = [rng.randrange(128 * TOKENS - 300) + 1 for _ in range(64)]
    steps = [[s + k for s in start] for k in range(200)]
    for lens in steps[:20]:
        md.plan(blocks, lens)
    times = []
    for lens in steps:
        begin = time.perf_counter()
        md.plan(blocks, lens)
        times.append(time.perf_counter() - begin)
    provider.synchronize()
    median = statistics.median(times)
    print(f"batch metadata plan, 64 x 128 pages: median {median * 1e6:.1f} us of host time")
    assert median <= 100e-6
