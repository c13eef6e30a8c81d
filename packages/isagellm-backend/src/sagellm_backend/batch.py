"""Host-side planning of a batch's metadata, shared by every backend's ``BatchMetadata``.

A :class:`BatchPlanner` validates a step (blocks, sequence lengths, new tokens) and writes its
int arrays into one flat host buffer laid out by :class:`BatchSections`; the backend then moves
that buffer (or the part a plan uses) to its device buffers in one copy. The sections, in
order, each aligned to 64 bytes:

====================== ======= ==========================================
``seq_lens``           int32   ``[max_seqs]``
``query_start_loc``    int32   ``[max_seqs + 1]``
``positions``          int64   ``[max_tokens]``
``slot_mapping``       int64   ``[max_tokens]``
``last_token_indices`` int64   ``[max_seqs]``
``block_tables``       int32   ``[max_seqs, max_pages_per_seq]``, last, so a plan of ``n``
                               sequences uses only the buffer's first :meth:`BatchSections.used`
                               bytes
====================== ======= ==========================================

Host cost is what an engine pays every step, so a plan does as little Python work per item as
it can: a block-table row is rewritten only when its sequence's pages differ from what the row
holds (a decode step of unchanged blocks writes no row), arrays are written with C-level
``array`` and ``memoryview`` copies, and a decode step's positions and slots take one
expression per sequence. Every check runs before the first write, so a refused plan leaves the
buffer as it was.
"""

from __future__ import annotations

import itertools
import operator
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from sagellm_backend.blocks import BlockTable
from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.kv import KVBlock, KVLayout

__all__ = [
    "BatchPlanner",
    "BatchSections",
    "BlockCheck",
    "Plan",
    "PlannedSizes",
    "Section",
    "Typecode",
]

_ALIGN = 64
_INT32 = 4
_INT64 = 8


Typecode = Literal["i", "q"]
"""``array`` typecodes of the sections: int32 and int64."""

BlockCheck = Callable[[list[tuple[int, ...]]], None]


class Section(NamedTuple):
    """One array of the flat buffer: its byte offset, element count and ``array`` typecode."""

    offset: int
    length: int
    typecode: Typecode

    @property
    def itemsize(self) -> int:
        return _INT32 if self.typecode == "i" else _INT64

    @property
    def nbytes(self) -> int:
        return self.length * self.itemsize


@dataclass(frozen=True)
class BatchSections:
    """Where each array of a batch lives in the flat buffer, for the given maximum sizes."""

    max_seqs: int
    max_tokens: int
    max_pages_per_seq: int
    seq_lens: Section
    query_start_loc: Section
    positions: Section
    slot_mapping: Section
    last_token_indices: Section
    block_tables: Section
    nbytes: int

    @classmethod
    def for_sizes(cls, max_seqs: int, max_tokens: int, max_pages_per_seq: int) -> BatchSections:
        """The layout for these maxima; each must be a positive int."""
        for name, value in (
            ("max_seqs", max_seqs),
            ("max_tokens", max_tokens),
            ("max_pages_per_seq", max_pages_per_seq),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(
                    f"{name} must be a positive int, got {value!r}",
                    hint="pass the largest batch the engine will plan, such as 256",
                )
        if max_seqs * max_pages_per_seq >= 2**31 or max_tokens >= 2**31:
            raise InvalidArgumentError(
                f"batch metadata of {max_seqs} x {max_pages_per_seq} pages and {max_tokens} "
                "tokens is beyond int32 indexing",
                hint="create smaller metadata buffers",
            )
        offset = 0

        def place(length: int, typecode: Typecode) -> Section:
            nonlocal offset
            section = Section(offset, length, typecode)
            offset += -(-section.nbytes // _ALIGN) * _ALIGN
            return section

        return cls(
            max_seqs,
            max_tokens,
            max_pages_per_seq,
            seq_lens=place(max_seqs, "i"),
            query_start_loc=place(max_seqs + 1, "i"),
            positions=place(max_tokens, "q"),
            slot_mapping=place(max_tokens, "q"),
            last_token_indices=place(max_seqs, "q"),
            block_tables=place(max_seqs * max_pages_per_seq, "i"),
            nbytes=offset,
        )

    def used(self, num_seqs: int) -> int:
        """Bytes from the start of the buffer that a plan of ``num_seqs`` sequences writes."""
        return self.block_tables.offset + num_seqs * self.max_pages_per_seq * _INT32


class Plan(NamedTuple):
    """The sizes of a planned step."""

    num_seqs: int
    num_tokens: int
    max_query_len: int


class BatchPlanner:
    """Validates steps and writes their arrays into ``buffer`` (``sections.nbytes`` bytes).

    ``table`` is the provider's block table: every block of a plan must be live in it and on
    ``device``; ``check`` is the backend's own check of the blocks' pages, if it has one, run
    after these. Not thread-safe: its owner serialises plans, together with their upload.
    """

    def __init__(
        self,
        sections: BatchSections,
        buffer: memoryview,
        *,
        table: BlockTable,
        layout: KVLayout,
        device: str,
        check: BlockCheck | None = None,
    ) -> None:
        if buffer.nbytes < sections.nbytes or buffer.readonly:
            raise InvalidArgumentError(
                f"a writable buffer of {sections.nbytes} bytes is needed, got {buffer.nbytes}",
                hint="allocate the host buffer with sections.nbytes bytes",
            )
        raw = buffer.cast("B")
        self.sections = sections
        self._table = table
        self._tokens_per_block = layout.tokens_per_block
        self._device = device
        self._check = check
        s = sections
        self._seq_lens = _view(raw, s.seq_lens)
        self._query_start_loc = _view(raw, s.query_start_loc)
        self._positions = _view(raw, s.positions)
        self._slot_mapping = _view(raw, s.slot_mapping)
        self._last_token_indices = _view(raw, s.last_token_indices)
        self._block_tables = _view(raw, s.block_tables)
        self._iota32 = memoryview(array("i", range(s.max_seqs + 1)))
        self._iota64 = memoryview(array("q", range(s.max_seqs)))
        self._rows: list[tuple[int, ...] | None] = [None] * s.max_seqs
        self.plan_state = Plan(0, 0, 0)

    def plan(
        self,
        blocks: Sequence[KVBlock],
        seq_lens: Sequence[int],
        query_lens: Sequence[int] | None = None,
    ) -> Plan:
        """Validate a step in full, then write it into the buffer; see ``BatchMetadata.plan``."""
        s = self.sections
        t = self._tokens_per_block
        if isinstance(blocks, int) or not isinstance(blocks, Sequence):
            raise InvalidArgumentError(
                f"blocks must be a sequence of KVBlock, got {type(blocks).__name__}",
                hint="pass a list with one block per sequence",
            )
        n = len(blocks)
        if not 1 <= n <= s.max_seqs:
            raise InvalidArgumentError(
                f"a plan needs 1 to {s.max_seqs} sequences, got {n}",
                hint="split the batch, or create the metadata with a larger max_seqs",
            )
        lens = _int32s(seq_lens, "seq_lens", n)
        pages = self._table.pages_on(blocks, self._device)
        if self._check is not None:
            self._check(pages)
        widest = max(map(len, pages))
        if widest > s.max_pages_per_seq:
            i = next(i for i, p in enumerate(pages) if len(p) > s.max_pages_per_seq)
            raise InvalidArgumentError(
                f"KV block {blocks[i]:#x} has {widest} pages, more than the "
                f"{s.max_pages_per_seq} of a block-table row",
                hint="create the metadata with a larger max_pages_per_seq",
            )
        qlens = None if query_lens is None else _int32s(query_lens, "query_lens", n)
        if min(lens) < 1:
            raise InvalidArgumentError(
                f"seq_lens must be at least 1, got {min(lens)}",
                hint="count the tokens in the cache after this step's writes",
            )
        if qlens is None or max(qlens) == 1:
            if qlens is not None and min(qlens) < 1:
                raise _query_len_error(qlens, lens)
            if n > s.max_tokens:
                raise _tokens_error(n, s.max_tokens)
            positions: Sequence[int] = [length - 1 for length in lens]
            try:
                slots: Sequence[int] = [
                    p[q // t] * t + q % t for p, q in zip(pages, positions, strict=True)
                ]
            except IndexError:
                raise self._capacity_error(blocks, pages, lens) from None
            planned = Plan(n, n, 1)
        else:
            if min(qlens) < 1 or any(map(operator.gt, qlens, lens)):
                raise _query_len_error(qlens, lens)
            capacities = [len(p) * t for p in pages]
            if any(map(operator.gt, lens, capacities)):
                raise self._capacity_error(blocks, pages, lens)
            starts = array("i", itertools.accumulate(qlens, initial=0))
            if starts[-1] > s.max_tokens:
                raise _tokens_error(starts[-1], s.max_tokens)
            positions, slots = _prefill_positions_and_slots(pages, lens, qlens, t)
            planned = Plan(n, starts[-1], max(qlens))
        # Every check passed: write.
        rows = self._rows
        if not all(map(operator.is_, rows[:n], pages)):
            table, width = self._block_tables, s.max_pages_per_seq
            for i, (old, new) in enumerate(zip(rows, pages, strict=False)):
                if old is not new and old != new:
                    table[i * width : i * width + len(new)] = array("i", new)
                    rows[i] = new
        self._seq_lens[:n] = lens
        self._positions[: planned.num_tokens] = array("q", positions)
        self._slot_mapping[: planned.num_tokens] = array("q", slots)
        if qlens is None or planned.max_query_len == 1:
            self._query_start_loc[: n + 1] = self._iota32[: n + 1]
            self._last_token_indices[:n] = self._iota64[:n]
        else:
            self._query_start_loc[: n + 1] = starts
            self._last_token_indices[:n] = array("q", [end - 1 for end in starts[1:]])
        self.plan_state = planned
        return planned

    def _capacity_error(
        self, blocks: Sequence[KVBlock], pages: list[tuple[int, ...]], lens: array[int]
    ) -> Exception:
        t = self._tokens_per_block
        i = next(i for i, p in enumerate(pages) if lens[i] > len(p) * t)
        return InvalidArgumentError(
            f"seq_lens[{i}] is {lens[i]} but KV block {blocks[i]:#x} has {len(pages[i])} "
            f"pages ({len(pages[i]) * t} tokens)",
            hint="grow the block first (kv_blocks_grow) so that it holds every token",
        )


def _view(raw: memoryview, section: Section) -> memoryview[int]:
    return raw[section.offset : section.offset + section.nbytes].cast(section.typecode)


def _int32s(values: Sequence[int], what: str, n: int) -> array[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, array)):
        raise InvalidArgumentError(
            f"{what} must be a sequence of ints, got {type(values).__name__}",
            hint="pass a list with one length per sequence",
        )
    try:
        out = array("i", values)
    except (TypeError, OverflowError) as exc:
        raise InvalidArgumentError(
            f"{what} must hold ints in the int32 range: {exc}",
            hint="pass token counts such as [17, 5]",
        ) from None
    if bool in set(map(type, values)):
        raise InvalidArgumentError(f"{what} must hold ints, not bools", hint="pass token counts")
    if len(out) != n:
        raise InvalidArgumentError(
            f"{what} has {len(out)} entries for {n} blocks",
            hint="pass one entry per sequence, in the order of blocks",
        )
    return out


def _query_len_error(qlens: array[int], lens: array[int]) -> Exception:
    i = next(i for i, (q, s) in enumerate(zip(qlens, lens, strict=True)) if not 1 <= q <= s)
    return InvalidArgumentError(
        f"query_lens[{i}] is {qlens[i]}, outside 1..seq_lens[{i}] ({lens[i]})",
        hint="pass the number of new tokens of each sequence, at least 1 and at most its length",
    )


def _tokens_error(num_tokens: int, max_tokens: int) -> Exception:
    return InvalidArgumentError(
        f"the plan has {num_tokens} new tokens, more than max_tokens ({max_tokens})",
        hint="split the step (chunked prefill), or create the metadata with a larger max_tokens",
    )


def _prefill_positions_and_slots(
    pages: list[tuple[int, ...]], lens: array[int], qlens: array[int], t: int
) -> tuple[array[int], array[int]]:
    """Positions and slots of every new token: one range per sequence and per page it spans."""
    positions: array[int] = array("q")
    slots: array[int] = array("q")
    for p, end, q in zip(pages, lens, qlens, strict=True):
        first = end - q
        positions.extend(range(first, end))
        for k in range(first // t, (end - 1) // t + 1):
            base = p[k] * t - k * t
            slots.extend(range(base + max(first, k * t), base + min(end, k * t + t)))
    return positions, slots


class PlannedSizes:
    """The size properties of a ``BatchMetadata``: its maxima and what the last plan held."""

    _sections: BatchSections
    _planner: BatchPlanner

    @property
    def max_seqs(self) -> int:
        return self._sections.max_seqs

    @property
    def max_tokens(self) -> int:
        return self._sections.max_tokens

    @property
    def max_pages_per_seq(self) -> int:
        return self._sections.max_pages_per_seq

    @property
    def num_seqs(self) -> int:
        return self._planner.plan_state.num_seqs

    @property
    def num_tokens(self) -> int:
        return self._planner.plan_state.num_tokens

    @property
    def max_query_len(self) -> int:
        return self._planner.plan_state.max_query_len
