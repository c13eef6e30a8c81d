"""MockBatchMetadata: a batch's metadata in persistent MockTensors, planned on the host.

The host side is the shared :class:`~sagellm_backend.batch.BatchPlanner`, writing into a host
staging buffer. The upload to the mock device is queued on the current stream and runs when
something waits for it, like any of the mock's device work: until then the buffers hold the
previous step's values. It copies what the plan wrote when it is queued, as a copy from
pageable memory does. Each property is the same MockTensor every step; once the upload has run,
it holds the planned part of its array (``block_tables`` row-major, ``num_seqs *
max_pages_per_seq`` values).

MockTensor has no integer dtype wider than int8, so the buffers are fp32, which holds every
integer up to 2**24 exactly: a plan whose slots would go beyond is refused.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from sagellm_backend.batch import BatchPlanner, BatchSections, Plan, PlannedSizes, Section
from sagellm_backend.blocks import BlockTable
from sagellm_backend.dtypes import DType
from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.kv import KVBlock, KVLayout
from sagellm_backend.mock.streams import StreamScheduler
from sagellm_backend.mock.tensor import MockTensor

__all__ = ["EXACT_LIMIT", "MockBatchMetadata"]

EXACT_LIMIT = 1 << 24
"""Integers of magnitude up to this are exact in fp32, the dtype of the mock's index buffers."""

_NAMES = (
    "seq_lens",
    "query_start_loc",
    "positions",
    "slot_mapping",
    "last_token_indices",
    "block_tables",
)


class MockBatchMetadata(PlannedSizes):
    """``BatchMetadata[MockTensor]`` of a mock provider."""

    def __init__(
        self,
        streams: StreamScheduler,
        *,
        table: BlockTable,
        layout: KVLayout,
        device: str,
        max_seqs: int,
        max_tokens: int,
        max_pages_per_seq: int,
    ) -> None:
        sections = BatchSections.for_sizes(max_seqs, max_tokens, max_pages_per_seq)
        self._streams = streams
        self._tokens_per_block = layout.tokens_per_block
        self._sections = sections
        self._staging = bytearray(sections.nbytes)
        self._planner = BatchPlanner(
            sections,
            memoryview(self._staging),
            table=table,
            layout=layout,
            device=device,
            check=self._check_exact,
        )
        self._lock = threading.Lock()
        self._buffers = {name: MockTensor((), DType.FP32) for name in _NAMES}

    def __repr__(self) -> str:
        s = self._sections
        return (
            f"MockBatchMetadata(max {s.max_seqs} seqs, {s.max_tokens} tokens, "
            f"{s.max_pages_per_seq} pages per seq)"
        )

    @property
    def block_tables(self) -> MockTensor:
        return self._buffers["block_tables"]

    @property
    def seq_lens(self) -> MockTensor:
        return self._buffers["seq_lens"]

    @property
    def query_start_loc(self) -> MockTensor:
        return self._buffers["query_start_loc"]

    @property
    def positions(self) -> MockTensor:
        return self._buffers["positions"]

    @property
    def slot_mapping(self) -> MockTensor:
        return self._buffers["slot_mapping"]

    @property
    def last_token_indices(self) -> MockTensor:
        return self._buffers["last_token_indices"]

    def plan(
        self,
        blocks: Sequence[KVBlock],
        seq_lens: Sequence[int],
        query_lens: Sequence[int] | None = None,
    ) -> None:
        """Validate and write a step; its upload is queued on the current stream."""
        self._streams.check_host("BatchMetadata.plan")
        with self._lock:
            planned = self._planner.plan(blocks, seq_lens, query_lens)
            snapshot = bytes(self._staging[: self._sections.used(planned.num_seqs)])
            self._streams.current().launch(lambda: self._upload(snapshot, planned))

    def _check_exact(self, block_pages: list[tuple[int, ...]]) -> None:
        pages = [page for block in block_pages for page in block]
        if (max(pages) + 1) * self._tokens_per_block > EXACT_LIMIT:
            raise InvalidArgumentError(
                f"a slot of page {max(pages)} is beyond 2**24, the mock's exact fp32 range",
                hint="free and reallocate blocks (the mock never reuses page ids), or use a "
                "torch backend",
            )

    def _upload(self, snapshot: bytes, planned: Plan) -> None:
        s, data, buffers = self._sections, memoryview(snapshot), self._buffers
        counts = {
            "seq_lens": planned.num_seqs,
            "query_start_loc": planned.num_seqs + 1,
            "positions": planned.num_tokens,
            "slot_mapping": planned.num_tokens,
            "last_token_indices": planned.num_seqs,
            "block_tables": planned.num_seqs * s.max_pages_per_seq,
        }
        for name in _NAMES:
            section: Section = getattr(s, name)
            buffers[name].assign_(_read(data, section, counts[name]))


def _read(data: memoryview, section: Section, length: int) -> list[int]:
    end = section.offset + length * section.itemsize
    return data[section.offset : end].cast(section.typecode).tolist()
