"""``sagellm-backend bench cpu``: the same tables on the torch layer, with its own baselines."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")

from sagellm_backend.bench import baselines_for, run_benchmarks
from sagellm_backend.torch_backend.bench_baselines import TorchBaselines
from sagellm_backend.torch_backend.cpu import create_cpu_backend
from sagellm_backend.torch_backend.cpu_device import HostEvent, HostStream
from sagellm_backend.torch_backend.provider import TorchBackendProvider


def test_cpu_runs_every_case_against_torch_baselines() -> None:
    provider: TorchBackendProvider[HostStream, HostEvent] = create_cpu_backend(
        num_blocks=64, host_num_blocks=32, validate_collectives=False
    )
    try:
        assert isinstance(baselines_for(provider), TorchBaselines)
        report = run_benchmarks(provider, blocks=16, repeats=2, batch=(4, 8), host_batch=16)
        stats = provider.memory_stats()
        assert (stats.kv_blocks_in_use, stats.kv_pages_in_use) == (0, 0)
    finally:
        provider.close()
    assert len(report.rows) == 10 and not report.skipped
    assert report.rows[5].case == "batch metadata per decode step, 4 seqs x 8 pages"
    copy = next(r for r in report.rows if r.case == "kv_blocks_copy, 16 blocks")
    assert copy.baseline == "plain indexed copy of the same pages" and copy.ours_s > 0
    assert all(r.ours_s > 0 and r.baseline_s > 0 for r in report.rows)
    swap = [r for r in report.rows if r.case == "kv swap"]
    assert swap[0].nbytes == 2 * 16 * provider.kv_layout.page_bytes("fp16")


def test_the_plain_baselines_move_the_same_pages_as_the_provider() -> None:
    import torch

    provider: TorchBackendProvider[HostStream, HostEvent] = create_cpu_backend(
        num_blocks=8, host_num_blocks=8, validate_collectives=False
    )
    try:
        baselines = TorchBaselines(provider)
        pool, host = provider.kv_pool(), provider.kv_pool("host")
        pool.copy_(torch.randn(pool.shape, dtype=torch.float64).to(pool.dtype))
        before = pool.clone()
        baselines.paged_copy([1, 5], [6, 2])()
        assert torch.equal(pool[:, [6, 2]], before[:, [1, 5]])
        assert torch.equal(pool[:, [0, 1, 3, 4, 5, 7]], before[:, [0, 1, 3, 4, 5, 7]])
        host.fill_(float("nan"))
        moved = pool.clone()
        baselines.paged_swap([3, 4])()
        assert torch.equal(pool, moved) and torch.equal(host[:, :2], moved[:, [3, 4]])
    finally:
        provider.close()
