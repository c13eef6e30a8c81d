"""Graph capture: replay equals eager execution; host-side calls during capture are refused."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TypeVar

from sagellm_backend.errors import CapabilityError, GraphCaptureError
from sagellm_backend.kv import KVBlock
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.check import (
    Area,
    Check,
    CheckContext,
    ConformanceFailure,
    claims,
    expect_refusal,
    lacks,
)
from sagellm_backend.testing.checks.common import (
    assert_unchanged,
    first_kv_dtype,
    read_now,
    snapshot,
)

__all__ = ["CHECKS"]

T = TypeVar("T")


def _chain(provider: BackendProvider[T], blocks: list[KVBlock]) -> None:
    """The sequence under test: copy each block into the next."""
    for src, dst in itertools.pairwise(blocks):
        provider.kv_block_copy(src, dst)


def _replay(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    tokens = 2 * p.kv_layout.tokens_per_block
    captured = p.kv_blocks_alloc([tokens] * 3, first_kv_dtype(ctx))
    eager = p.kv_blocks_alloc([tokens] * 3, first_kv_dtype(ctx))
    for block in captured + eager:
        ctx.fill(p, block)
    p.synchronize()
    stream = p.create_stream()
    with p.capture_graph(stream) as graph, stream:
        _chain(p, captured)
    for attempt in range(2):
        data = ctx.fill(p, captured[0])
        p.kv_block_write(eager[0], data)
        p.synchronize()
        graph.replay()
        _chain(p, eager)
        stream.synchronize()
        replayed = [read_now(p, b) for b in captured]
        expected = [read_now(p, b) for b in eager]
        if replayed != expected or expected[-1] != data:
            raise ConformanceFailure(
                f"replay {attempt + 1} of a captured sequence does not give the result of "
                "running it eagerly"
            )


def _host_ops_refused(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    dtype = first_kv_dtype(ctx)
    block = p.kv_block_alloc(1, dtype)
    ctx.fill(p, block)
    start, end = p.create_event(), p.create_event()
    start.record()
    end.record()
    p.synchronize()
    before = snapshot(p, [block])
    host_ops: dict[str, Callable[[], object]] = {
        "kv_block_alloc": lambda: p.kv_block_alloc(1, dtype),
        "kv_block_free": lambda: p.kv_block_free(block),
        "kv_blocks_alloc": lambda: p.kv_blocks_alloc([1], dtype),
        "synchronize": p.synchronize,
        "elapsed_ms": lambda: end.elapsed_ms(start),
        "kv_block_read": lambda: p.kv_block_read(block),
    }
    stream = p.create_stream()
    with p.capture_graph(stream), stream:
        for name, op in host_ops.items():
            expect_refusal(
                f"the host-side call {name} during graph capture is refused",
                GraphCaptureError,
                op,
            )
    assert_unchanged(p, before, "a host-side call refused during capture")


def _refused(ctx: CheckContext[T]) -> None:
    p = ctx.provider

    def capture() -> None:
        with p.capture_graph():
            pass

    expect_refusal("graph capture without has_graph_exec is refused", CapabilityError, capture)


CHECKS = (
    Check(
        "graph.replay",
        Area.GRAPH,
        "replaying a captured sequence gives the same result as running it eagerly",
        _replay,
        claims("has_graph_exec", "has_kv_block_copy"),
    ),
    Check(
        "graph.host_ops_refused",
        Area.GRAPH,
        "host-side calls during capture are refused with graph_capture_violation and change "
        "nothing",
        _host_ops_refused,
        claims("has_graph_exec", "has_event"),
    ),
    Check(
        "graph.refused",
        Area.GRAPH,
        "without has_graph_exec, graph capture is refused with CapabilityError",
        _refused,
        lacks("has_graph_exec"),
    ),
)
