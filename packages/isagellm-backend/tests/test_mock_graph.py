"""Mock graph capture: replay equals eager execution; host-side operations are refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sagellm_backend import (
    BlockNotFoundError,
    CapabilityError,
    DType,
    ErrorCode,
    Graph,
    GraphCaptureError,
    KVBlock,
    MockBackendProvider,
    MockTensor,
)
from sagellm_backend.mock.pool import POISON


def page_bytes(p: MockBackendProvider, byte: int) -> bytes:
    return bytes([byte]) * p.kv_layout.page_bytes(DType.FP16)


def workload(p: MockBackendProvider, a: KVBlock, b: KVBlock, c: KVBlock) -> None:
    p.kv_block_write(a, page_bytes(p, 5))
    p.kv_block_copy(a, b)
    p.kv_blocks_copy([(b, c)])


def test_replay_gives_the_same_result_as_running_eagerly() -> None:
    eager = MockBackendProvider(has_graph_exec=True)
    blocks = eager.kv_blocks_alloc([16, 16, 16], DType.FP16)
    workload(eager, *blocks)
    expected = [eager.kv_block_read(b) for b in blocks]

    p = MockBackendProvider(has_graph_exec=True)
    a, b, c = p.kv_blocks_alloc([16, 16, 16], DType.FP16)
    with p.capture_graph() as graph:
        workload(p, a, b, c)
    assert isinstance(graph, Graph)
    assert [p.kv_block_read(x) for x in (a, b, c)] == [page_bytes(p, POISON)] * 3, (
        "captured, not run"
    )
    graph.replay()
    assert [p.kv_block_read(x) for x in (a, b, c)] == expected
    p.kv_block_write(c, page_bytes(p, 9))
    graph.replay()
    assert p.kv_block_read(c) == expected[2], "a replay runs the whole sequence again"


def test_capture_on_a_side_stream_replays_there() -> None:
    p = MockBackendProvider(has_graph_exec=True)
    a, b = p.kv_blocks_alloc([16, 16], DType.FP16)
    side = p.create_stream()
    with p.capture_graph(side) as graph, side:
        p.kv_block_write(a, page_bytes(p, 3))
        p.kv_block_copy(a, b)
    graph.replay()
    assert p.kv_block_read(b) == page_bytes(p, POISON), (
        "replayed on the side stream, not waited for"
    )
    side.synchronize()
    assert p.kv_block_read(b) == page_bytes(p, 3)


def test_host_side_operations_during_capture_are_refused_and_change_nothing() -> None:
    p = MockBackendProvider(has_graph_exec=True)
    a, b = p.kv_blocks_alloc([16, 16], DType.FP16)
    start, end = p.create_event(), p.create_event()
    start.record()
    end.record()
    p.synchronize()
    before = p.memory_stats(), p.live_blocks()
    refused: list[Callable[[], object]] = [
        lambda: p.kv_block_alloc(16, DType.FP16),
        lambda: p.kv_blocks_alloc([16], DType.FP16),
        lambda: p.kv_block_free(a),
        lambda: p.kv_blocks_free([a]),
        lambda: p.kv_block_migrate(a, "host"),
        lambda: p.kv_block_grow(a, 64),
        lambda: p.kv_blocks_grow([a, b], [64, 64]),
        lambda: p.synchronize(),
        lambda: p.current_stream().synchronize(),
        lambda: end.elapsed_ms(start),
        lambda: p.kv_block_read(a),
        lambda: p.all_reduce(MockTensor([1.0], DType.FP16)),
        lambda: p.current_stream().wait_stream(p.create_stream()),
    ]
    with p.capture_graph():
        for call in refused:
            with pytest.raises(GraphCaptureError) as info:
                call()
            assert info.value.code is ErrorCode.GRAPH_CAPTURE_VIOLATION and info.value.hint
    assert (p.memory_stats(), p.live_blocks()) == before
    assert p.kv_block_read(b) == page_bytes(p, POISON)


def test_capture_needs_the_capability() -> None:
    p = MockBackendProvider()
    with pytest.raises(CapabilityError, match="has_graph_exec"):
        p.capture_graph()


def test_captures_do_not_nest_and_failed_captures_do_not_replay() -> None:
    p = MockBackendProvider(has_graph_exec=True)
    with p.capture_graph(), pytest.raises(GraphCaptureError, match="already being captured"):
        p.capture_graph().__enter__()
    with pytest.raises(RuntimeError, match="boom"), p.capture_graph() as graph:
        raise RuntimeError("boom")
    with pytest.raises(GraphCaptureError, match="failed"):
        graph.replay()
    p.kv_block_alloc(16, DType.FP16)


def test_side_stream_copies_during_a_capture_are_taken_alike_and_tracked() -> None:
    p = MockBackendProvider(has_graph_exec=True)
    a, b, c = p.kv_blocks_alloc([16, 16, 16], DType.FP16)
    p.kv_block_write(a, page_bytes(p, 1))
    side, capturing = p.create_stream(), p.create_stream()
    with p.capture_graph(capturing):
        first = p.kv_blocks_copy([(a, b)], stream=side)
        second = p.kv_blocks_copy([(a, c)], stream=side)  # the events of the first not asked
    side.synchronize()
    assert first.query() and second.query()
    assert p.kv_block_read(b) == p.kv_block_read(c) == page_bytes(p, 1)


def test_replay_refuses_a_graph_whose_blocks_were_freed() -> None:
    p = MockBackendProvider(has_graph_exec=True)
    a, b = p.kv_blocks_alloc([16, 16], DType.FP16)
    with p.capture_graph() as graph:
        p.kv_block_copy(a, b)
    p.kv_block_free(b)
    queued = p.current_stream().queued
    with pytest.raises(BlockNotFoundError):
        graph.replay()
    assert p.current_stream().queued == queued
