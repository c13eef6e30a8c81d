"""Streams and events: in-order execution, cross-stream waits, timing, query and synchronize.

Every event check also records its event again after more work and waits for it again: the
second recording must replace the first.

The wait checks fail with a no-op wait: the waiting stream reads data that only the awaited
stream writes. On a device that runs work eagerly, a burst of copies queued before the write
makes the race wide enough to observe.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

from sagellm_backend.errors import CapabilityError
from sagellm_backend.kv import KVBlock
from sagellm_backend.protocols import BackendProvider, Event, Stream
from sagellm_backend.testing.check import (
    Area,
    Check,
    CheckContext,
    ConformanceFailure,
    block_nbytes,
    claims,
    expect_refusal,
    lacks,
)
from sagellm_backend.testing.checks.common import first_kv_dtype

__all__ = ["CHECKS"]

T = TypeVar("T")

_BUSY_PAGES = 64
_WAIT_ATTEMPTS = 3


def _busy_work(ctx: CheckContext[T], provider: BackendProvider[T], rounds: int) -> list[KVBlock]:
    """Queue ``rounds`` large device operations on the current stream; returns blocks to free."""
    dtype = first_kv_dtype(ctx)
    tokens = _BUSY_PAGES * provider.kv_layout.tokens_per_block
    src = provider.kv_block_alloc(tokens, dtype)
    dst = provider.kv_block_alloc(tokens, dtype)
    if ctx.capability.has_kv_block_copy:
        ctx.fill(provider, src)
        for _ in range(rounds):
            provider.kv_block_copy(src, dst)
    else:
        data = ctx.random_bytes(block_nbytes(provider, src))
        for _ in range(rounds):
            provider.kv_block_write(dst, data)
    return [src, dst]


def _in_order(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    tokens = p.kv_layout.tokens_per_block
    a = p.kv_block_alloc(tokens, first_kv_dtype(ctx))
    b = p.kv_block_alloc(tokens, first_kv_dtype(ctx))
    stream = p.create_stream()
    with stream:
        first = ctx.fill(p, a)
        if ctx.capability.has_kv_block_copy:
            p.kv_block_copy(a, b)
        second = ctx.fill(p, a)
        got_a = p.kv_block_read(a)
        got_b = p.kv_block_read(b) if ctx.capability.has_kv_block_copy else first
    if got_a != second:
        raise ConformanceFailure(
            "two writes queued on one stream did not apply in order: the block does not "
            "hold the second write"
        )
    if got_b != first:
        raise ConformanceFailure(
            "a copy queued between two writes did not see the first write: work on a stream "
            "ran out of order"
        )


def _cross_stream(ctx: CheckContext[T], how: str) -> None:
    """Three rounds on one pair of streams; with ``wait_event`` one event is recorded in each
    (through the stream twice, then through the event)."""
    p = ctx.provider
    dtype = first_kv_dtype(ctx)
    tokens = p.kv_layout.tokens_per_block
    a = p.kv_block_alloc(tokens, dtype)
    b = p.kv_block_alloc(tokens, dtype)
    old = ctx.fill(p, a)
    ctx.fill(p, b)
    p.synchronize()
    producer, consumer = p.create_stream(), p.create_stream()
    event = p.create_event(enable_timing=False) if how == "wait_event" else None
    for round_ in ("first", "second", "third"):
        with producer:
            scratch = _busy_work(ctx, p, 8)
            new = ctx.fill(p, a)
            if event is not None and round_ == "third":
                event.record(producer)
            elif event is not None:
                producer.record_event(event)
        with consumer:
            if event is not None:
                consumer.wait_event(event)
            else:
                consumer.wait_stream(producer)
            if ctx.capability.has_kv_block_copy:
                p.kv_block_copy(a, b)
                got = p.kv_block_read(b)
            else:
                got = p.kv_block_read(a)
        recorded = " (the event recorded again)" if round_ != "first" and event else ""
        if got == old:
            raise ConformanceFailure(
                f"{how} did not order work in the {round_} round{recorded}: the waiting stream "
                "ran before the awaited work and saw the old bytes"
            )
        if got != new:
            raise ConformanceFailure(
                f"{how}: the waiting stream saw bytes nobody wrote in the {round_} round{recorded}"
            )
        old = new
        p.synchronize()
        p.kv_blocks_free(scratch)
    p.kv_blocks_free([a, b])


def _wait_event(ctx: CheckContext[T]) -> None:
    _cross_stream(ctx, "wait_event")


def _wait_stream(ctx: CheckContext[T]) -> None:
    _cross_stream(ctx, "wait_stream")


def _elapsed(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    light_heavy: list[tuple[float, float]] = []
    for _ in range(_WAIT_ATTEMPTS):
        stream = p.create_stream()
        marks = [p.create_event(enable_timing=True) for _ in range(3)]
        with stream:
            marks[0].record()
            scratch = _busy_work(ctx, p, 1)
            marks[1].record()
            scratch += _busy_work(ctx, p, 32)
            marks[2].record()
        marks[2].synchronize()
        light = marks[1].elapsed_ms(marks[0])
        heavy = marks[2].elapsed_ms(marks[1])
        total = marks[2].elapsed_ms(marks[0])
        p.kv_blocks_free(scratch)
        for name, value in (("light", light), ("heavy", heavy), ("total", total)):
            if not value >= 0.0:
                raise ConformanceFailure(
                    f"elapsed_ms returned {value!r} for the {name} span; it must be non-negative"
                )
        if total + 1e-6 < max(light, heavy):
            raise ConformanceFailure(
                f"elapsed_ms is not additive: the whole span took {total} ms, less than a "
                f"part of it ({max(light, heavy)} ms)"
            )
        light_heavy.append((light, heavy))
        with stream:  # the end mark recorded again after more work must move later
            scratch = _busy_work(ctx, p, 8)
            marks[2].record()
        marks[2].synchronize()
        again = marks[2].elapsed_ms(marks[0])
        p.kv_blocks_free(scratch)
        if not again > total:
            raise ConformanceFailure(
                f"an event recorded again after more work measured {again} ms from the start, "
                f"not more than the {total} ms of its first recording"
            )
        if heavy > light:
            ctx.note(f"2 ops: {light:.3f} ms, 33 ops: {heavy:.3f} ms")
            return
    raise ConformanceFailure(
        "elapsed_ms does not grow with real work: 33 queued operations measured no longer "
        f"than 2 in {_WAIT_ATTEMPTS} attempts (light, heavy ms: {light_heavy})"
    )


def _query_synchronize(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    a = p.kv_block_alloc(p.kv_layout.tokens_per_block, first_kv_dtype(ctx))
    ctx.fill(p, a)
    p.synchronize()
    if not p.create_event().query():
        raise ConformanceFailure("query() of an event that was never recorded must be True")
    stream = p.create_stream()
    with stream:
        new = ctx.fill(p, a)
        event = stream.record_event()
    _await(event, "an event")
    if p.kv_block_read(a) != new:
        raise ConformanceFailure(
            "event.query() returned True before the recorded work had completed: another "
            "stream still saw the old bytes"
        )
    event = p.create_event()
    with stream:
        ctx.fill(p, a)
        stream.record_event(event)
    event.synchronize()
    if not event.query():
        raise ConformanceFailure("event.query() is False right after event.synchronize()")
    for how in ("stream.record_event(event)", "event.record(stream)"):
        with stream:
            newer = ctx.fill(p, a)
            if how == "event.record(stream)":
                event.record(stream)
            else:
                stream.record_event(event)
        event.synchronize()
        if p.kv_block_read(a) != newer:
            raise ConformanceFailure(
                f"an event recorded again ({how}) and synchronized did not wait for the work "
                "queued before its new recording: another stream still saw the older bytes"
            )
        with stream:
            newer = ctx.fill(p, a)
            if how == "event.record(stream)":
                event.record(stream)
            else:
                stream.record_event(event)
        _await(event, f"an event recorded again ({how})")
        if p.kv_block_read(a) != newer:
            raise ConformanceFailure(
                f"event.query() of an event recorded again ({how}) returned True before the "
                "work queued before its new recording had completed"
            )
    stream.synchronize()
    _require_idle(stream, "stream.synchronize()")
    other = p.create_stream()
    for s in (stream, other):
        with s:
            ctx.fill(p, a)
    p.synchronize()
    _require_idle(stream, "the device's synchronize()")
    _require_idle(other, "the device's synchronize()")


def _await(event: Event, what: str) -> None:
    """Poll ``event.query()`` until it is True (at most 10 s)."""
    deadline = time.monotonic() + 10.0
    while not event.query():
        if time.monotonic() > deadline:
            raise ConformanceFailure(f"query() of {what} stayed False for 10 s after the work")
        time.sleep(0.001)


def _require_idle(stream: Stream, after: str) -> None:
    if not stream.query():
        raise ConformanceFailure(f"stream.query() is False right after {after}")


def _streams_refused(ctx: CheckContext[Any]) -> None:
    expect_refusal(
        "create_stream() without has_stream is refused", CapabilityError, ctx.provider.create_stream
    )


def _events_refused(ctx: CheckContext[Any]) -> None:
    expect_refusal(
        "create_event() without has_event is refused", CapabilityError, ctx.provider.create_event
    )


CHECKS = (
    Check(
        "streams.in_order",
        Area.STREAMS,
        "work queued on one stream completes in the order it was queued",
        _in_order,
        claims("has_stream"),
    ),
    Check(
        "streams.wait_event",
        Area.STREAMS,
        "wait_event makes later work on a stream wait for an event of another stream",
        _wait_event,
        claims("has_stream", "has_event"),
    ),
    Check(
        "streams.wait_stream",
        Area.STREAMS,
        "wait_stream makes later work on a stream wait for work queued on another",
        _wait_stream,
        claims("has_stream"),
    ),
    Check(
        "streams.elapsed_ms",
        Area.STREAMS,
        "elapsed_ms is non-negative, additive, and grows with real work",
        _elapsed,
        claims("has_stream", "has_event"),
    ),
    Check(
        "streams.query_synchronize",
        Area.STREAMS,
        "query() and synchronize() agree: True only once the work has completed",
        _query_synchronize,
        claims("has_stream", "has_event"),
    ),
    Check(
        "streams.refused",
        Area.STREAMS,
        "without has_stream, creating a stream is refused with CapabilityError",
        _streams_refused,
        lacks("has_stream"),
    ),
    Check(
        "streams.events_refused",
        Area.STREAMS,
        "without has_event, creating an event is refused with CapabilityError",
        _events_refused,
        lacks("has_event"),
    ),
)
