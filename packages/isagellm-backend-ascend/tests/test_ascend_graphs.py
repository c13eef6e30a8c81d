"""NPU graph capture on the torch_npu stand-in: a replay gives what eager execution gives,
host-side calls during a capture are refused and change nothing, and a torch_npu without
NPUGraph leaves has_graph_exec unclaimed."""

from __future__ import annotations

import itertools
import random
import subprocess
from collections.abc import Callable, Iterator

import pytest

pytest.importorskip("torch", reason="needs torch: pip install isagellm-backend-ascend")

from sagellm_backend.dtypes import DType
from sagellm_backend.errors import GraphCaptureError, InvalidArgumentError
from sagellm_backend.kv import KVBlock
from sagellm_backend.torch_backend.provider import TorchBackendProvider
from sagellm_backend_ascend import create_ascend_backend
from sagellm_backend_ascend.runtime import NpuEvent, NpuStream

torch_npu = pytest.importorskip("torch_npu", reason="the stand-in is on sys.path (conftest)")

Provider = TorchBackendProvider[NpuStream, NpuEvent]

RunPython = Callable[..., "subprocess.CompletedProcess[str]"]
"""The ``run_python`` fixture (conftest.py): a snippet in a fresh interpreter."""


@pytest.fixture
def backend() -> Iterator[Provider]:
    provider = create_ascend_backend(num_blocks=32, host_num_blocks=8, pin_host_memory=False)
    yield provider
    provider.close()


def _chain(provider: Provider, blocks: list[KVBlock]) -> None:
    for src, dst in itertools.pairwise(blocks):
        provider.kv_block_copy(src, dst)


def _fill(provider: Provider, blocks: list[KVBlock], rng: random.Random) -> None:
    for block in blocks:
        size = provider.kv_layout.page_bytes(DType.FP16) * provider.kv_block_info(block).num_pages
        provider.kv_block_write(block, rng.randbytes(size))
    provider.synchronize()


def test_replay_gives_the_result_of_eager_execution(backend: Provider) -> None:
    rng = random.Random(7)
    tokens = 2 * backend.kv_layout.tokens_per_block
    captured = backend.kv_blocks_alloc([tokens] * 3, DType.FP16)
    eager = backend.kv_blocks_alloc([tokens] * 3, DType.FP16)
    _fill(backend, captured + eager, rng)
    before = [backend.kv_block_read(b) for b in captured]
    stream = backend.create_stream()
    with backend.capture_graph(stream) as graph, stream:
        _chain(backend, captured)
    backend.synchronize()
    assert [backend.kv_block_read(b) for b in captured] == before  # recorded, not run
    size = len(before[0])
    for _ in range(2):
        data = rng.randbytes(size)
        backend.kv_block_write(captured[0], data)
        backend.kv_block_write(eager[0], data)
        backend.synchronize()
        graph.replay()
        _chain(backend, eager)
        stream.synchronize()
        replayed = [backend.kv_block_read(b) for b in captured]
        assert replayed == [backend.kv_block_read(b) for b in eager]
        assert replayed[-1] == data


def test_host_side_calls_during_capture_are_refused_and_change_nothing(
    backend: Provider,
) -> None:
    rng = random.Random(3)
    src, dst = backend.kv_blocks_alloc([1, 1], DType.FP16)
    _fill(backend, [src, dst], rng)
    data = [backend.kv_block_read(b) for b in (src, dst)]
    start, end = backend.create_event(), backend.create_event()
    start.record()
    end.record()
    backend.synchronize()
    stats = backend.memory_stats()
    stream = backend.create_stream()
    refused: dict[str, Callable[[], object]] = {
        "synchronize": backend.synchronize,
        "stream synchronize": stream.synchronize,
        "stream query": stream.query,
        "event synchronize": end.synchronize,
        "event query": end.query,
        "elapsed_ms": lambda: end.elapsed_ms(start),
        "kv_block_read": lambda: backend.kv_block_read(src),
        "kv_block_write": lambda: backend.kv_block_write(src, data[1]),
        "kv_block_alloc": lambda: backend.kv_block_alloc(1, DType.FP16),
        "kv_block_free": lambda: backend.kv_block_free(dst),
        "kv_block_migrate": lambda: backend.kv_block_migrate(src, "host"),
    }
    with backend.capture_graph(stream) as graph, stream:
        for name, call in refused.items():
            with pytest.raises(GraphCaptureError) as err:
                call()
            assert err.value.code == "graph_capture_violation", name
        backend.kv_block_copy(src, dst)
    # None of the refused calls reached torch_npu: a wait would have invalidated the capture.
    assert [backend.kv_block_read(b) for b in (src, dst)] == data
    assert backend.memory_stats() == stats
    graph.replay()
    stream.synchronize()
    assert backend.kv_block_read(dst) == data[0]


def test_the_default_stream_cannot_capture(backend: Provider) -> None:
    with pytest.raises(InvalidArgumentError, match="cannot be captured on the default stream"):
        backend.capture_graph(backend.current_stream())
    assert not torch_npu.npu.is_current_stream_capturing()
    with backend.capture_graph() as graph:  # a side stream of its own
        pass
    graph.replay()


def test_a_graph_replays_only_after_its_capture(backend: Provider) -> None:
    with (
        backend.capture_graph() as graph,
        pytest.raises(GraphCaptureError, match="capture has not finished"),
    ):
        graph.replay()


def test_has_graph_exec_follows_the_installed_torch_npu(
    backend: Provider, run_python: RunPython
) -> None:
    assert backend.capability().has_graph_exec
    code = (
        "import torch_npu\n"
        "from sagellm_backend.errors import CapabilityError\n"
        "from sagellm_backend_ascend import create_ascend_backend\n"
        "p = create_ascend_backend(num_blocks=8, host_num_blocks=8, pin_host_memory=False)\n"
        "print(hasattr(torch_npu.npu, 'NPUGraph'), p.capability().has_graph_exec)\n"
        "try:\n"
        "    p.capture_graph()\n"
        "except CapabilityError as exc:\n"
        "    print(exc.code)\n"
        "p.close()\n"
    )
    result = run_python(code, FAKE_TORCH_NPU_GRAPHS="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "not_implemented"]
