"""The cuda backend on a real GPU: KV movement byte for byte, swaps on a side stream, graphs,
events, device selection and fork safety of the probe."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

pytest.importorskip("torch", reason="the cuda backend needs torch")
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU here: these tests run on one", allow_module_level=True)

from sagellm_backend.device import HOST
from sagellm_backend.errors import (
    EventStateError,
    GraphCaptureError,
    InvalidArgumentError,
)
from sagellm_backend.kv import KVBlock
from sagellm_backend.torch_backend.provider import TorchBackendProvider
from sagellm_backend_cuda import create_cuda_backend
from sagellm_backend_cuda.adapter import PooledEvent

LAYOUT = {"num_layers": 4, "num_kv_heads": 8, "head_size": 128, "tokens_per_block": 16}
Provider = TorchBackendProvider[torch.cuda.Stream, PooledEvent]


@pytest.fixture
def provider() -> Iterator[Provider]:
    made: Provider = create_cuda_backend(
        None, kv_dtype="bf16", num_blocks=256, host_num_blocks=256, **LAYOUT
    )
    yield made
    made.close()


def _random_bytes(g: torch.Generator, size: int) -> bytes:
    return bytes(torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8).tolist())


def _poison(provider: Provider, device: str) -> None:
    provider.kv_pool(device).view(torch.int16).fill_(0x7FC1)  # a NaN pattern


def _filled(provider: Provider, g: torch.Generator, blocks: list[KVBlock]) -> list[bytes]:
    size = provider.kv_layout.page_bytes("bf16")
    data = []
    for block in blocks:
        payload = _random_bytes(g, size * provider.kv_block_info(block).num_pages)
        provider.kv_block_write(block, payload)
        data.append(payload)
    return data


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_copy_matches_every_byte(provider: Provider, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    _poison(provider, provider.device)
    blocks = provider.kv_blocks_alloc([16] * 200, "bf16")
    order = torch.randperm(200, generator=g).tolist()
    sources = [blocks[i] for i in order[:100]]
    targets = [blocks[i] for i in order[100:]]
    data = _filled(provider, g, sources)
    event = provider.kv_blocks_copy(list(zip(sources, targets, strict=True)))
    event.synchronize()
    for src, dst, payload in zip(sources, targets, data, strict=True):
        assert provider.kv_block_read(dst) == payload
        assert provider.kv_block_read(src) == payload


def test_multi_page_blocks_copy(provider: Provider) -> None:
    g = torch.Generator().manual_seed(5)
    sources = provider.kv_blocks_alloc([40, 17, 1], "bf16")
    targets = provider.kv_blocks_alloc([33, 20, 5], "bf16")
    data = _filled(provider, g, sources)
    provider.kv_blocks_copy(list(zip(sources, targets, strict=True))).synchronize()
    assert [provider.kv_block_read(b) for b in targets] == data


@pytest.mark.parametrize("seed", [0, 1])
def test_swap_out_and_in_on_a_side_stream_while_compute_runs(provider: Provider, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    _poison(provider, HOST)
    blocks = provider.kv_blocks_alloc([16] * 120, "bf16")
    chosen = [blocks[i] for i in torch.randperm(120, generator=g)[:64].tolist()]
    data = _filled(provider, g, chosen)
    provider.synchronize()
    side = provider.create_stream()
    a = torch.randn(2048, 2048, device=provider.torch_device)
    product = a @ a  # compute on the current stream while the swap runs on the side stream
    side.wait_stream(provider.current_stream())
    out, done = provider.kv_blocks_migrate(chosen, HOST, stream=side)
    done.synchronize()
    assert all(provider.kv_block_info(b).device == HOST for b in out)
    _poison(provider, provider.device)
    side.wait_stream(provider.current_stream())
    back, done = provider.kv_blocks_migrate(out, provider.device, stream=side)
    provider.current_stream().wait_event(done)
    assert [provider.kv_block_read(b) for b in back] == data
    assert torch.isfinite(product).all()


def test_graph_replay_equals_eager(provider: Provider) -> None:
    g = torch.Generator().manual_seed(11)
    captured = provider.kv_blocks_alloc([32] * 4, "bf16")
    eager = provider.kv_blocks_alloc([32] * 4, "bf16")
    x = torch.randn(64, 1024, device=provider.torch_device, dtype=torch.bfloat16)
    w = torch.randn(1024, device=provider.torch_device, dtype=torch.bfloat16)
    rms = provider.get_kernel("rms_norm")
    stream = provider.create_stream()
    provider.synchronize()
    with provider.capture_graph(stream) as graph:
        for src, dst in itertools.pairwise(captured):
            provider.kv_block_copy(src, dst)
        normed = rms(x, w)
    for attempt in range(3):
        payload = _filled(provider, g, [captured[0]])[0]
        provider.kv_block_write(eager[0], payload)
        x.normal_()
        provider.synchronize()
        graph.replay()
        for src, dst in itertools.pairwise(eager):
            provider.kv_block_copy(src, dst)
        expected = rms(x, w)
        provider.synchronize()
        assert [provider.kv_block_read(b) for b in captured] == [payload] * 4, attempt
        assert [provider.kv_block_read(b) for b in eager] == [payload] * 4, attempt
        assert torch.equal(normed, expected), attempt


def test_host_side_calls_are_refused_during_capture(provider: Provider) -> None:
    block = provider.kv_block_alloc(16, "bf16")
    stream = provider.create_stream()
    with provider.capture_graph(stream):
        for call in (
            lambda: provider.kv_block_alloc(16, "bf16"),
            lambda: provider.kv_block_free(block),
            provider.synchronize,
            lambda: provider.kv_block_read(block),
            lambda: provider.kv_blocks_migrate([block], HOST),
            lambda: provider.all_reduce(torch.ones(4, device=provider.torch_device)),
        ):
            with pytest.raises(GraphCaptureError):
                call()
    assert provider.memory_stats().kv_blocks_in_use == 1


def test_elapsed_ms_follows_cudas_rules(provider: Provider) -> None:
    start, end = provider.create_event(), provider.create_event()
    a = torch.randn(4096, 4096, device=provider.torch_device)
    start.record()
    for _ in range(50):
        a = torch.tanh(a @ a)
    end.record()
    with pytest.raises(EventStateError, match="synchronize"):
        end.elapsed_ms(start)
    end.synchronize()
    assert end.elapsed_ms(start) > 0.0


def test_events_are_pooled(provider: Provider) -> None:
    event = provider.create_event()
    event.record()
    event.synchronize()
    raw = event.raw.event
    del event
    again = provider.create_event()
    assert again.raw.event is raw


def test_kv_alloc_allocates_no_device_memory(provider: Provider) -> None:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(10):
        provider.kv_blocks_free(provider.kv_blocks_alloc([16] * 200, "bf16"))
    assert torch.cuda.memory_allocated() == before


def test_capability_is_read_from_the_device(provider: Provider) -> None:
    cap = provider.capability()
    props = torch.cuda.get_device_properties(0)
    assert cap.device_name == props.name
    assert cap.compute_capability == f"{props.major}.{props.minor}"
    assert cap.total_memory_bytes == torch.cuda.mem_get_info(0)[1]
    assert cap.has_graph_exec and cap.has_collective and cap.has_stream
    assert "bf16" in cap.extra["compute_dtypes"].split(",")
    assert ("fp8" in cap.extra["compute_dtypes"]) == ((props.major, props.minor) >= (8, 9))
    assert cap.extra["dist_backend"] == "nccl"
    assert {op.value for op in cap.supported_reduce_ops} == {"sum", "prod", "min", "max", "avg"}


def test_device_index_out_of_range_names_the_visible_count() -> None:
    count = torch.cuda.device_count()
    with pytest.raises(InvalidArgumentError, match=f"{count} CUDA device"):
        create_cuda_backend(type("C", (), {"device": f"cuda:{count}", "device_ids": None})())


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_probe_and_listing_leave_the_gpu_usable_in_a_forked_child() -> None:
    out = _run(
        """
        import os, torch
        from sagellm_backend import list_backends
        from sagellm_backend_cuda import create_cuda_backend
        assert create_cuda_backend.unavailable_reason() is None
        records = {r.kind: r for r in list_backends(probe=True)}
        assert "cuda" in records, sorted(records)
        assert not torch.cuda.is_initialized()
        pid = os.fork()
        if pid == 0:
            x = torch.arange(1024, device="cuda", dtype=torch.float32)
            os._exit(0 if float(x.sum()) == 1023 * 1024 / 2 else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """
    )
    assert out.returncode == 0, out.stderr
    assert "child 0" in out.stdout


def test_cuda_visible_devices_hiding_every_gpu_makes_it_unavailable() -> None:
    out = _run(
        """
        from sagellm_backend.errors import BackendUnavailableError
        from sagellm_backend_cuda import create_cuda_backend
        try:
            create_cuda_backend()
        except BackendUnavailableError as exc:
            print(exc)
        """,
        CUDA_VISIBLE_DEVICES="",
    )
    assert out.returncode == 0, out.stderr
    assert "CUDA_VISIBLE_DEVICES=''" in out.stdout


def test_local_rank_binds_the_device() -> None:
    out = _run(
        """
        import torch
        from sagellm_backend_cuda import create_cuda_backend
        p = create_cuda_backend(num_blocks=4, host_num_blocks=4)
        print(p.device, torch.cuda.current_device())
        p.close()
        """,
        LOCAL_RANK="0",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cuda:0", "0"]
    count = torch.cuda.device_count()
    out = _run(
        """
        from sagellm_backend.errors import InvalidArgumentError
        from sagellm_backend_cuda import create_cuda_backend
        try:
            create_cuda_backend(num_blocks=4, host_num_blocks=4)
        except InvalidArgumentError as exc:
            print(exc)
        """,
        LOCAL_RANK=str(count),
    )
    assert out.returncode == 0, out.stderr
    assert f"LOCAL_RANK={count} has no GPU" in out.stdout
