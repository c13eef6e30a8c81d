"""The torch page pool as block storage: batches over several devices, all or nothing."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")

from sagellm_backend import DType, KVLayout, ResourceExhaustedError  # noqa: E402
from sagellm_backend.torch_backend.pool import DevicePages, KVPagePool  # noqa: E402

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_size=4, tokens_per_block=2, dtype=DType.FP32)


def make_pool() -> KVPagePool:
    pages = {
        name: DevicePages(LAYOUT, 6, torch.float32, torch.device("cpu"), pin=False)
        for name in ("cpu:0", "host")
    }
    return KVPagePool(LAYOUT, pages)


def test_a_batch_over_two_devices_keeps_request_order_and_distinct_pages() -> None:
    pool = make_pool()
    requests = [("host", DType.FP32, 2), ("cpu:0", DType.FP32, 1), ("host", DType.FP32, 3)]
    allocations = pool.allocate(requests)
    assert [(run.device, len(pages)) for pages, run in allocations] == [
        ("host", 2), ("cpu:0", 1), ("host", 3),
    ]  # fmt: skip
    host_pages = [p for pages, run in allocations if run.device == "host" for p in pages]
    assert len(set(host_pages)) == 5
    assert (pool.pages_in_use("host"), pool.blocks_in_use("host")) == (5, 2)
    pool.release([run for _, run in allocations])
    assert (pool.pages_in_use("host"), pool.pages_in_use("cpu:0")) == (0, 0)
    assert (pool.blocks_in_use("host"), pool.blocks_in_use("cpu:0")) == (0, 0)


def test_a_batch_that_does_not_fit_allocates_nothing() -> None:
    pool = make_pool()
    with pytest.raises(ResourceExhaustedError, match="host is out of KV pages"):
        pool.allocate([("cpu:0", DType.FP32, 1), ("host", DType.FP32, 7)])
    assert (pool.pages_in_use("host"), pool.pages_in_use("cpu:0")) == (0, 0)
