"""Mock streams and events: deferred in-order work, cross-stream waits, timestamps."""

from __future__ import annotations

import threading

import pytest

from sagellm_backend import (
    CapabilityError,
    DType,
    ErrorCode,
    Event,
    EventStateError,
    InvalidArgumentError,
    KVBlock,
    MockBackendProvider,
    Stream,
)
from sagellm_backend.mock.pool import POISON


def fill(provider: MockBackendProvider, block: KVBlock, byte: int) -> bytes:
    info = provider.kv_block_info(block)
    data = bytes([byte]) * (info.num_pages * provider.kv_layout.page_bytes(info.dtype))
    provider.kv_block_write(block, data)
    return data


@pytest.fixture
def p() -> MockBackendProvider:
    return MockBackendProvider()


def test_streams_and_events_satisfy_the_protocols(p: MockBackendProvider) -> None:
    assert isinstance(p.create_stream(), Stream)
    assert isinstance(p.create_event(), Event)


def test_work_runs_only_when_waited_for(p: MockBackendProvider) -> None:
    block = p.kv_block_alloc(16, DType.FP16)
    side = p.create_stream()
    with side:
        data = fill(p, block, 7)
    assert side.queued > 0 and side.done == 0, "issuing does not run the work"
    assert p.kv_block_read(block) == bytes([POISON]) * len(data), (
        "stale: the read waits for its own stream"
    )
    assert side.query() is True and side.done == side.queued
    assert p.kv_block_read(block) == data


def test_missing_synchronisation_reads_stale_and_synchronize_fixes_it(
    p: MockBackendProvider,
) -> None:
    block = p.kv_block_alloc(16, DType.FP16)
    side = p.create_stream()
    with side:
        data = fill(p, block, 1)
    assert p.kv_block_read(block) != data
    p.synchronize()
    assert p.kv_block_read(block) == data


def test_work_on_one_stream_runs_in_issue_order(p: MockBackendProvider) -> None:
    a, b = p.kv_blocks_alloc([16, 16], DType.FP16)
    fill(p, a, 1)
    p.kv_block_copy(a, b)
    second = fill(p, a, 2)
    assert p.kv_block_read(b) == bytes([1]) * len(second)
    assert p.kv_block_read(a) == second


def test_wait_event_orders_work_across_streams_up_to_the_recorded_point(
    p: MockBackendProvider,
) -> None:
    a, b = p.kv_blocks_alloc([16, 16], DType.FP16)
    side = p.create_stream()
    with side:
        first = fill(p, a, 1)
        ready = side.record_event()
        fill(p, a, 2)
    p.current_stream().wait_event(ready)
    p.kv_block_copy(a, b)
    assert p.kv_block_read(b) == first, "the copy ran after the first write and before the second"
    side.synchronize()
    assert p.kv_block_read(a) == bytes([2]) * len(first)


def test_without_wait_event_the_copy_reads_the_old_data(p: MockBackendProvider) -> None:
    a, b = p.kv_blocks_alloc([16, 16], DType.FP16)
    side = p.create_stream()
    with side:
        data = fill(p, a, 1)
        side.record_event()
    p.kv_block_copy(a, b)
    assert p.kv_block_read(b) == bytes([POISON]) * len(data)


def test_wait_stream_waits_for_work_queued_so_far(p: MockBackendProvider) -> None:
    a, b = p.kv_blocks_alloc([16, 16], DType.FP16)
    side = p.create_stream()
    with side:
        data = fill(p, a, 3)
    main = p.current_stream()
    main.wait_stream(side)
    p.kv_block_copy(a, b)
    assert p.kv_block_read(b) == data


def test_batched_copy_on_a_side_stream_completes_with_its_event(p: MockBackendProvider) -> None:
    a, b = p.kv_blocks_alloc([16, 16], DType.FP16)
    data = fill(p, a, 4)
    side = p.create_stream()
    side.wait_stream(p.current_stream())
    done = p.kv_blocks_copy([(a, b)], stream=side)
    assert p.kv_block_read(b) != data
    p.current_stream().wait_event(done)
    assert p.kv_block_read(b) == data


def test_current_stream_is_per_thread_and_nests(p: MockBackendProvider) -> None:
    s1, s2 = p.create_stream(), p.create_stream()
    default = p.current_stream()
    seen: list[Stream] = []
    with s1:
        assert p.current_stream() is s1
        with s2:
            assert p.current_stream() is s2
            thread = threading.Thread(target=lambda: seen.append(p.current_stream()))
            thread.start()
            thread.join()
        assert p.current_stream() is s1
    assert p.current_stream() is default
    assert seen == [default]


def test_streams_left_out_of_order_are_refused_and_stay_current(
    p: MockBackendProvider,
) -> None:
    outer, inner = p.create_stream(), p.create_stream()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(InvalidArgumentError, match="order they were entered"):
        outer.__exit__(None, None, None)
    assert p.current_stream() is inner
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)
    assert p.current_stream() not in (outer, inner)


def test_without_has_event_no_event_is_made() -> None:
    plain = MockBackendProvider(has_event=False)
    for make in (plain.create_event, plain.current_stream().record_event):
        with pytest.raises(CapabilityError, match="has_event"):
            make()


def timed(p: MockBackendProvider, copies: int) -> float:
    a, b = p.kv_blocks_alloc([1024, 1024], DType.FP16)
    start, end = p.create_event(), p.create_event()
    start.record()
    for _ in range(copies):
        p.kv_block_copy(a, b)
    end.record()
    end.synchronize()
    p.kv_blocks_free([a, b])
    return end.elapsed_ms(start)


def test_elapsed_ms_is_non_negative_and_grows_with_work(p: MockBackendProvider) -> None:
    little = timed(p, 1)
    much = timed(p, 200)
    assert 0 <= little < much


def test_elapsed_ms_refuses_events_it_cannot_time(p: MockBackendProvider) -> None:
    timing, plain, never = p.create_event(), p.create_event(enable_timing=False), p.create_event()
    timing.record()
    plain.record()
    p.synchronize()
    for end, start, match in (
        (timing, never, "never recorded"),
        (never, timing, "never recorded"),
        (timing, plain, "without timing"),
        (plain, timing, "without timing"),
    ):
        with pytest.raises(EventStateError, match=match) as info:
            end.elapsed_ms(start)
        assert info.value.code is ErrorCode.INVALID_EVENT_STATE and info.value.hint
    pending = p.create_event()
    pending.record()
    with pytest.raises(EventStateError, match="not reached"):
        pending.elapsed_ms(timing)
    pending.synchronize()
    assert pending.elapsed_ms(timing) >= 0


def test_query_and_synchronize_of_an_unrecorded_event_return_at_once(
    p: MockBackendProvider,
) -> None:
    event = p.create_event()
    assert event.query() is True
    event.synchronize()


def test_streams_and_events_of_another_provider_are_refused(p: MockBackendProvider) -> None:
    other = MockBackendProvider()
    foreign_stream, foreign_event = other.create_stream(), other.create_event()
    foreign_event.record()
    main = p.current_stream()
    queued = main.queued
    with pytest.raises(InvalidArgumentError, match="not an event of"):
        main.wait_event(foreign_event)
    with pytest.raises(InvalidArgumentError, match="not a stream of"):
        main.wait_stream(foreign_stream)
    with pytest.raises(InvalidArgumentError, match="not a stream of"):
        p.create_event().record(foreign_stream)
    with pytest.raises(InvalidArgumentError, match="not a stream of"):
        p.kv_blocks_copy([], stream=foreign_stream)
    assert main.queued == queued
