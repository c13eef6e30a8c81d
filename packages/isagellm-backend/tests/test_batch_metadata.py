"""Batch metadata on the mock and the cpu backend: what a plan writes, what it refuses, and that
a refused plan leaves the buffers as they were.

Every expected value is recomputed here token by token with ``KVLayout.slot``, independently of
the planner's per-sequence and per-page arithmetic.
"""

from __future__ import annotations

import operator
import pickle
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from sagellm_backend import (
    HOST,
    BackendError,
    BackendUnavailableError,
    BlockNotFoundError,
    CapabilityError,
    DType,
    ErrorCode,
    GraphCaptureError,
    InvalidArgumentError,
    InvalidBlockError,
    KVBlock,
)
from sagellm_backend.mock import MockBackendProvider, MockOptions, MockTensor
from sagellm_backend.mock.batch import EXACT_LIMIT

TOKENS = 4
LAYOUT: MockOptions = {
    "num_layers": 1,
    "num_kv_heads": 1,
    "head_size": 4,
    "tokens_per_block": TOKENS,
}
FIELDS = (
    "block_tables",
    "seq_lens",
    "query_start_loc",
    "positions",
    "slot_mapping",
    "last_token_indices",
)


def _cpu() -> Any:
    pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")
    from sagellm_backend.torch_backend.cpu import create_cpu_backend

    return create_cpu_backend(num_blocks=256, host_num_blocks=16, **LAYOUT)


@pytest.fixture(params=["mock", "cpu"])
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    provider = MockBackendProvider(**LAYOUT) if request.param == "mock" else _cpu()
    yield provider
    provider.close()


def dtype_of(p: Any) -> DType:
    return p.capability().kv_dtypes[0]  # type: ignore[no-any-return]


def read(p: Any, tensor: Any) -> list[int]:
    """A buffer's values, flattened, once the device work queued so far has run."""
    if isinstance(tensor, MockTensor):
        p.synchronize()
        return [int(v) for v in tensor.tolist()]
    return [int(v) for v in tensor.reshape(-1).tolist()]


def pages(p: Any, block: KVBlock) -> tuple[int, ...]:
    """The block's pages, as ``kv_block_info`` gives them."""
    return p.kv_block_info(block).pages  # type: ignore[no-any-return]


def capacity(p: Any, block: KVBlock) -> int:
    """Tokens the block's pages hold."""
    return len(pages(p, block)) * TOKENS


def state(p: Any, md: Any) -> dict[str, list[int]]:
    return {name: read(p, getattr(md, name)) for name in FIELDS}


def expected(
    p: Any, blocks: Sequence[KVBlock], seq_lens: Sequence[int], query_lens: Sequence[int]
) -> dict[str, list[int]]:
    layout = p.kv_layout
    positions = [t for s, q in zip(seq_lens, query_lens, strict=True) for t in range(s - q, s)]
    owners = [pages(p, b) for b, q in zip(blocks, query_lens, strict=True) for _ in range(q)]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return {
        "seq_lens": list(seq_lens),
        "query_start_loc": starts,
        "positions": positions,
        "slot_mapping": [layout.slot(o, t) for o, t in zip(owners, positions, strict=True)],
        "last_token_indices": [end - 1 for end in starts[1:]],
    }


def check_plan(
    p: Any,
    md: Any,
    blocks: Sequence[KVBlock],
    seq_lens: Sequence[int],
    query_lens: Sequence[int] | None = None,
) -> None:
    md.plan(blocks, seq_lens, query_lens)
    queries = [1] * len(blocks) if query_lens is None else list(query_lens)
    got = state(p, md)
    want = expected(p, blocks, seq_lens, queries)
    for name, values in want.items():
        assert got[name] == values, name
    width = md.max_pages_per_seq
    for i, block in enumerate(blocks):
        row = got["block_tables"][i * width : (i + 1) * width]
        held = pages(p, block)
        assert row[: len(held)] == list(held)
    assert (md.num_seqs, md.num_tokens, md.max_query_len) == (
        len(blocks),
        sum(queries),
        max(queries),
    )
    assert len(got["block_tables"]) == len(blocks) * width


def random_blocks(p: Any, rng: random.Random, count: int, most_pages: int) -> list[KVBlock]:
    sizes = [rng.randint(1, most_pages * TOKENS) for _ in range(count)]
    return p.kv_blocks_alloc(sizes, dtype_of(p))  # type: ignore[no-any-return]


@pytest.mark.parametrize("seed", range(3))
def test_decode_and_prefill_plans_write_every_array(backend: Any, seed: int) -> None:
    rng = random.Random(seed)
    md = backend.create_batch_metadata(8, 64, 6)
    blocks = random_blocks(backend, rng, 8, 6)
    capacities = [capacity(backend, b) for b in blocks]
    for _ in range(3):  # decode steps of random lengths
        lens = [rng.randint(1, c) for c in capacities]
        check_plan(backend, md, blocks, lens)
    count = rng.randint(1, 8)
    chosen = rng.sample(blocks, count)
    lens = [rng.randint(1, capacity(backend, b)) for b in chosen]
    queries = [rng.randint(1, min(s, 64 // count)) for s in lens]
    check_plan(backend, md, chosen, lens, queries)  # prefill and chunked prefill
    check_plan(backend, md, chosen, lens, [1] * count)  # decode, spelled out


def test_rows_follow_their_blocks_through_growth_and_reordering(backend: Any) -> None:
    rng = random.Random(7)
    md = backend.create_batch_metadata(4, 16, 8)
    blocks = random_blocks(backend, rng, 4, 4)
    check_plan(backend, md, blocks, [capacity(backend, b) for b in blocks])
    # Row 1's block grown in place: the same handle, more pages; the row follows.
    before = pages(backend, blocks[1])
    assert backend.kv_block_grow(blocks[1], 8 * TOKENS) == blocks[1]
    assert pages(backend, blocks[1])[: len(before)] == before
    check_plan(backend, md, blocks, [1, 8 * TOKENS, 1, 1], [1, TOKENS + 3, 1, 1])
    check_plan(backend, md, blocks, [capacity(backend, b) for b in blocks])
    # Another block in row 2, then the rows in another order.
    longer = backend.kv_block_alloc(6 * TOKENS, dtype_of(backend))
    backend.kv_block_free(blocks[2])
    blocks[2] = longer
    check_plan(backend, md, blocks, [capacity(backend, b) for b in blocks])
    blocks.reverse()
    check_plan(backend, md, blocks, [TOKENS] * 4, [2, 1, 3, 1])
    # Equal handles that are not the same objects (as after pickling) are accepted too.
    copies = [pickle.loads(pickle.dumps(b)) for b in blocks]
    assert copies == blocks and not any(map(operator.is_, copies, blocks))
    check_plan(backend, md, copies, [1] * 4)


def test_the_buffers_stay_the_same_memory() -> None:
    torch = pytest.importorskip("torch")
    p = _cpu()
    try:
        md = p.create_batch_metadata(4, 8, 4)
        blocks = p.kv_blocks_alloc([TOKENS * 4] * 4, dtype_of(p))
        md.plan(blocks, [5, 6, 7, 8])
        views = {name: getattr(md, name) for name in FIELDS}
        pointers = {name: view.data_ptr() for name, view in views.items()}
        md.plan(blocks[::-1], [9, 10, 11, 12])
        for name, pointer in pointers.items():
            assert getattr(md, name).data_ptr() == pointer
        # A view taken before the plan sees its values, as a captured graph would.
        assert views["seq_lens"].tolist() == [9, 10, 11, 12]
        assert torch.equal(views["block_tables"][0, :4], torch.tensor(pages(p, blocks[3])).int())
        assert views["positions"].dtype == torch.int64 and views["seq_lens"].dtype == torch.int32
    finally:
        p.close()


def _refusals(blocks: list[KVBlock]) -> list[tuple[str, tuple[Any, ...], type[Exception]]]:
    """Plans that must be refused; ``blocks`` are [2 pages, 1 page, 3 pages, freed, on host]."""
    good, too_wide, freed, moved = blocks[:2], blocks[2], blocks[3], blocks[4]
    stranger = MockBackendProvider(**LAYOUT)
    foreign = stranger.kv_block_alloc(8, "fp16")
    stranger.close()
    return [
        ("freed", ([good[0], freed], [1, 1]), BlockNotFoundError),
        ("foreign", ([good[0], foreign], [1, 1]), InvalidBlockError),
        ("on host", ([good[0], moved], [1, 1]), InvalidArgumentError),
        ("beyond the pages", (good, [2 * TOKENS + 1, 1]), InvalidArgumentError),
        ("empty sequence", (good, [0, 1]), InvalidArgumentError),
        ("no new token", (good, [2, 2], [0, 1]), InvalidArgumentError),
        ("more new tokens than tokens", (good, [2, 2], [3, 1]), InvalidArgumentError),
        ("too many tokens", (good, [8, 4], [4, 4]), InvalidArgumentError),
        ("too many sequences", ([good[0]] * 5, [1] * 5), InvalidArgumentError),
        ("no sequence", ([], []), InvalidArgumentError),
        ("row too narrow", ([too_wide], [1]), InvalidArgumentError),
        ("lengths mismatch", (good, [1]), InvalidArgumentError),
        ("bool length", (good, [True, 1]), InvalidArgumentError),
        ("float length", (good, [1.0, 1]), InvalidArgumentError),
        ("not a block", ([good[0], "block"], [1, 1]), InvalidArgumentError),
        ("one block", (good[0], [1]), InvalidArgumentError),
        ("text lengths", (good, "12"), InvalidArgumentError),
    ]


def test_a_refused_plan_changes_nothing(backend: Any) -> None:
    dtype = dtype_of(backend)
    md = backend.create_batch_metadata(4, 6, 2)
    blocks = backend.kv_blocks_alloc([2 * TOKENS, TOKENS, 3 * TOKENS, TOKENS, 5], dtype)
    backend.kv_block_free(blocks[3])
    blocks[4] = backend.kv_block_migrate(blocks[4], HOST)
    check_plan(backend, md, blocks[:2], [TOKENS + 1, 3], [2, 3])
    before = state(backend, md)
    sizes = (md.num_seqs, md.num_tokens, md.max_query_len)
    for what, args, error in _refusals(blocks):
        with pytest.raises(error) as info:
            md.plan(*args)
        assert isinstance(info.value, BackendError) and info.value.hint, what
        assert state(backend, md) == before, what
        assert (md.num_seqs, md.num_tokens, md.max_query_len) == sizes, what


@pytest.mark.parametrize(
    "sizes", [(0, 1, 1), (1, 0, 1), (1, 1, 0), (True, 1, 1), (1, 1.5, 1), (2**16, 1, 2**15)]
)
def test_bad_sizes_are_refused(backend: Any, sizes: tuple[Any, ...]) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        backend.create_batch_metadata(*sizes)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT and info.value.hint


def test_a_closed_provider_refuses_plans(backend: Any) -> None:
    md = backend.create_batch_metadata(2, 2, 2)
    block = backend.kv_block_alloc(3, dtype_of(backend))
    backend.close()
    with pytest.raises(BackendUnavailableError):
        md.plan([block], [3])
    with pytest.raises(BackendUnavailableError):
        backend.create_batch_metadata(2, 2, 2)


def test_a_torch_provider_refuses_plans_during_a_capture() -> None:
    pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")
    from sagellm_backend.factory import DeviceSelection
    from sagellm_backend.protocols import Graph
    from sagellm_backend.torch_backend.cpu import create_cpu_backend
    from sagellm_backend.torch_backend.cpu_device import CPU
    from sagellm_backend.torch_backend.provider import create_torch_provider

    class Nothing:
        def replay(self) -> None:
            """Nothing was captured."""

    class Captures:
        """A device's graph capture that records nothing (the refusal is the provider's)."""

        @contextmanager
        def capture(self, stream: object) -> Iterator[Graph]:
            yield Nothing()

    options = create_cpu_backend.validate_options({"num_blocks": 16, **LAYOUT})
    p = create_torch_provider(CPU, DeviceSelection(index=0), options, {}, graphs=Captures())
    try:
        md = p.create_batch_metadata(2, 4, 2)
        block = p.kv_block_alloc(5, "fp16")
        before = {name: getattr(md, name).clone() for name in FIELDS}
        with p.capture_graph(), pytest.raises(GraphCaptureError, match=r"BatchMetadata\.plan"):
            md.plan([block], [5])
        assert all(getattr(md, name).equal(before[name]) for name in FIELDS)
        md.plan([block], [5])
        assert md.seq_lens.tolist()[:1] == [5]
    finally:
        p.close()


def test_the_mock_uploads_on_the_stream() -> None:
    p = MockBackendProvider(**LAYOUT)
    md = p.create_batch_metadata(2, 4, 2)
    blocks = p.kv_blocks_alloc([5, 8], "fp16")
    md.plan(blocks, [5, 8])
    assert md.num_seqs == 2 and md.seq_lens.tolist() == []  # queued, not yet run
    p.synchronize()
    assert md.seq_lens.tolist() == [5.0, 8.0]
    first = md.seq_lens
    md.plan(blocks[:1], [4])
    assert md.seq_lens.tolist() == [5.0, 8.0]  # the previous step's values until it runs
    last_slots = [pages(p, blocks[0])[1] * TOKENS, pages(p, blocks[1])[1] * TOKENS + 3]
    assert md.slot_mapping.tolist() == last_slots
    p.current_stream().synchronize()
    assert md.seq_lens is first and first.tolist() == [4.0]
    p.close()


def test_the_mock_refuses_plans_during_a_capture_and_when_not_claimed() -> None:
    options: MockOptions = {**LAYOUT, "has_graph_exec": True}
    p = MockBackendProvider(**options)
    md = p.create_batch_metadata(2, 4, 2)
    block = p.kv_block_alloc(5, "fp16")
    stream = p.create_stream()
    with p.capture_graph(stream), pytest.raises(GraphCaptureError):
        md.plan([block], [5])
    p.close()
    plain = MockBackendProvider(supported_ops=["sample"])
    with pytest.raises(CapabilityError) as info:
        plain.create_batch_metadata(2, 4, 2)
    assert "batch_metadata" in str(info.value)
    plain.close()


def test_the_mock_refuses_slots_beyond_exact_fp32() -> None:
    huge = EXACT_LIMIT // 16
    p = MockBackendProvider(
        supported_dtypes=["fp8"], num_layers=1, num_kv_heads=1, head_size=1, tokens_per_block=huge
    )
    md = p.create_batch_metadata(1, 1, 1)
    held = p.kv_blocks_alloc([1] * 15, "fp8")  # pages 0 to 14: page 15 is the last exact one
    last = p.kv_block_alloc(1, "fp8")
    assert pages(p, last) == (15,) and len(held) == 15
    md.plan([last], [huge])
    p.synchronize()
    assert md.slot_mapping.tolist() == [EXACT_LIMIT - 1]
    beyond = p.kv_block_alloc(1, "fp8")
    with pytest.raises(InvalidArgumentError, match="2\\*\\*24"):
        md.plan([beyond], [1])
    assert md.num_seqs == 1 and md.slot_mapping.tolist() == [EXACT_LIMIT - 1]
    p.close()
