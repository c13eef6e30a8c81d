"""Batch metadata on the torch_npu stand-in, whose streams run lazily: each step's upload is
seen by the work queued after it, a graph replays over the buffers, and plans are refused
during a capture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("torch", reason="needs torch: pip install isagellm-backend-ascend")

import torch

from sagellm_backend.errors import GraphCaptureError
from sagellm_backend.torch_backend.provider import TorchBackendProvider
from sagellm_backend_ascend import create_ascend_backend
from sagellm_backend_ascend.runtime import NpuEvent, NpuStream

pytest.importorskip("torch_npu", reason="the stand-in is on sys.path (conftest)")

Provider = TorchBackendProvider[NpuStream, NpuEvent]
TOKENS = 4


@pytest.fixture
def backend() -> Iterator[Provider]:
    provider = create_ascend_backend(
        num_blocks=64, host_num_blocks=8, pin_host_memory=False, tokens_per_block=TOKENS
    )
    yield provider
    provider.close()


def test_queued_work_sees_each_steps_plan(backend: Provider) -> None:
    md = backend.create_batch_metadata(8, 8, 4)
    blocks = backend.kv_blocks_alloc([4 * TOKENS] * 8, "fp16")
    steps = [[(3 * i + k) % (4 * TOKENS) + 1 for i in range(8)] for k in range(5)]
    seen = torch.zeros(5, 2, 8, dtype=torch.int64, device=backend.torch_device)
    for k, lens in enumerate(steps):
        md.plan(blocks, lens)
        seen[k, 0].copy_(md.seq_lens)
        seen[k, 1].copy_(md.slot_mapping)
    backend.synchronize()
    layout = backend.kv_layout
    for k, lens in enumerate(steps):
        slots = [
            layout.slot(backend.kv_block_info(b).pages, s - 1)
            for b, s in zip(blocks, lens, strict=True)
        ]
        assert seen[k].cpu().tolist() == [lens, slots]


def test_a_graph_replays_over_the_buffers_and_plans_wait_outside_it(backend: Provider) -> None:
    md = backend.create_batch_metadata(4, 4, 4)
    blocks = backend.kv_blocks_alloc([4 * TOKENS] * 4, "fp16")
    md.plan(blocks, [1, 2, 3, 4])
    total = torch.zeros(1, dtype=torch.int64, device=backend.torch_device)
    backend.synchronize()
    side = backend.create_stream()
    with backend.capture_graph(side) as graph:
        total.copy_(md.seq_lens.sum(0, keepdim=True))
        with pytest.raises(GraphCaptureError):
            md.plan(blocks, [4, 3, 2, 1])
    for lens in ([5, 6, 7, 8], [16, 1, 1, 1]):
        with side:  # the upload and the replay on one stream, so in order
            md.plan(blocks[::-1], lens)
        graph.replay()
        backend.synchronize()
        assert total.cpu().tolist() == [sum(lens)]
