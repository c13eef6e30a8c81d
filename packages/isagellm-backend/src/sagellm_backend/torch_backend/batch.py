"""TorchBatchMetadata: a batch's metadata in persistent device tensors, planned on the host.

One device tensor of bytes, allocated once at the maximum sizes, holds every array (the layout
is :class:`~sagellm_backend.batch.BatchSections`); the properties are typed views of it, so a
graph captured over them replays with each step's values. A plan is written into one host
staging tensor, pinned where the adapter pins host memory, and moved with one ``non_blocking``
copy of the bytes the plan uses, queued on the current stream. A copy from pinned memory reads
the staging tensor when the stream reaches it, so before it writes the staging tensor again, a
plan waits for the previous copy to have run (an event recorded after the copy): the host runs
at most one upload ahead of the device. (From pageable memory the copy reads the host bytes when
it is issued, and stays in stream order.) On the CPU the device tensor is host memory: the plan
is written into it directly, with no copy.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

from sagellm_backend.batch import BatchPlanner, BatchSections, PlannedSizes, Section
from sagellm_backend.blocks import BlockTable
from sagellm_backend.kv import KVBlock, KVLayout
from sagellm_backend.torch_backend.adapter import DeviceAdapter

__all__ = ["TorchBatchMetadata"]

S = TypeVar("S")
E = TypeVar("E")

_DTYPES = {"i": torch.int32, "q": torch.int64}
_CACHED_VIEWS = 256


class TorchBatchMetadata(PlannedSizes, Generic[S, E]):
    """``BatchMetadata[torch.Tensor]`` on one device of a torch provider.

    ``check(operation)`` is the provider's guard: it refuses a plan on a closed provider or
    during a graph capture.
    """

    def __init__(
        self,
        adapter: DeviceAdapter[S, E],
        index: int,
        *,
        table: BlockTable,
        layout: KVLayout,
        device: str,
        max_seqs: int,
        max_tokens: int,
        max_pages_per_seq: int,
        check: Callable[[str], None],
    ) -> None:
        sections = BatchSections.for_sizes(max_seqs, max_tokens, max_pages_per_seq)
        where = adapter.torch_device(index)
        self._adapter = adapter
        self._index = index
        self._check = check
        self._lock = threading.Lock()
        self._buffer = torch.zeros(sections.nbytes, dtype=torch.uint8, device=where)
        self._upload: E | None = None
        if where.type == "cpu":
            self._staging = self._buffer
        else:
            pinned = adapter.pins_host_memory
            self._staging = torch.zeros(sections.nbytes, dtype=torch.uint8, pin_memory=pinned)
            self._upload = adapter.new_event(False)
        self._uploaded = False
        self._planner = BatchPlanner(
            sections, _host_bytes(self._staging), table=table, layout=layout, device=device
        )
        self._sections = sections
        self._full = {
            name: self._typed(getattr(sections, name))
            for name in (
                "seq_lens",
                "query_start_loc",
                "positions",
                "slot_mapping",
                "last_token_indices",
                "block_tables",
            )
        }
        self._full["block_tables"] = self._full["block_tables"].view(max_seqs, max_pages_per_seq)
        self._by_seqs: dict[int, tuple[torch.Tensor, ...]] = {}
        self._by_tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        s = self._sections
        return (
            f"TorchBatchMetadata({self._buffer.device}, max {s.max_seqs} seqs, "
            f"{s.max_tokens} tokens, {s.max_pages_per_seq} pages per seq)"
        )

    # Views of the planned part of each buffer.

    @property
    def block_tables(self) -> torch.Tensor:
        return self._seq_views()[0]

    @property
    def seq_lens(self) -> torch.Tensor:
        return self._seq_views()[1]

    @property
    def query_start_loc(self) -> torch.Tensor:
        return self._seq_views()[2]

    @property
    def last_token_indices(self) -> torch.Tensor:
        return self._seq_views()[3]

    @property
    def positions(self) -> torch.Tensor:
        return self._token_views()[0]

    @property
    def slot_mapping(self) -> torch.Tensor:
        return self._token_views()[1]

    # Planning.

    def plan(
        self,
        blocks: Sequence[KVBlock],
        seq_lens: Sequence[int],
        query_lens: Sequence[int] | None = None,
    ) -> None:
        """Validate and write a step; its upload is queued on the current stream."""
        self._check("BatchMetadata.plan")
        adapter = self._adapter
        with self._lock:
            if self._upload is not None and self._uploaded:
                adapter.event_synchronize(self._upload)
            planned = self._planner.plan(blocks, seq_lens, query_lens)
            if self._upload is not None:
                used = self._sections.used(planned.num_seqs)
                self._buffer[:used].copy_(self._staging[:used], non_blocking=True)
                adapter.event_record(self._upload, adapter.current_stream(self._index))
                self._uploaded = True

    def _typed(self, section: Section) -> torch.Tensor:
        raw = self._buffer[section.offset : section.offset + section.nbytes]
        return raw.view(_DTYPES[section.typecode])

    def _seq_views(self) -> tuple[torch.Tensor, ...]:
        n = self._planner.plan_state.num_seqs
        views = self._by_seqs.get(n)
        if views is None:
            full = self._full
            views = (
                full["block_tables"][:n],
                full["seq_lens"][:n],
                full["query_start_loc"][: n + 1],
                full["last_token_indices"][:n],
            )
            self._by_seqs[n] = views
        return views

    def _token_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self._planner.plan_state.num_tokens
        views = self._by_tokens.get(n)
        if views is None:
            if len(self._by_tokens) >= _CACHED_VIEWS:
                self._by_tokens.clear()
            views = (self._full["positions"][:n], self._full["slot_mapping"][:n])
            self._by_tokens[n] = views
        return views


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes (kept alive by its owner)."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")
