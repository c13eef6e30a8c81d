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
        report = run_benchmarks(provider, blocks=16, repeats=2, batch=(4, 8))
        stats = provider.memory_stats()
        assert (stats.kv_blocks_in_use, stats.kv_pages_in_use) == (0, 0)
    finally:
        provider.close()
    assert len(report.rows) == 7 and not report.skipped
    assert report.rows[-1].case == "batch metadata per decode step, 4 seqs x 8 pages"
    assert all(r.ours_s > 0 and r.baseline_s > 0 for r in report.rows)
    swap = [r for r in report.rows if r.case == "kv swap"]
    assert swap[0].nbytes == 2 * 16 * provider.kv_layout.page_bytes("fp16")
