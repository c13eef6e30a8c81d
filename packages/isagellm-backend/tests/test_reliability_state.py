"""Stateful property tests of KV-block bookkeeping on the mock, against a simple model.

Random sequences of alloc, free, write, read, copy, migrate, grow and their batched forms, with
refused calls mixed in (stale, foreign and malformed handles, bad sizes, full devices). After
every step: no block lost, none handed out twice, every block where and as large as the model
says (``kv_block_info``), bytes as the model says, accounting exact; every refused call leaves
the state as it was.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sagellm_backend import (
    HOST,
    BlockNotFoundError,
    DType,
    ErrorCode,
    InvalidArgumentError,
    InvalidBlockError,
    KVBlock,
    MockBackendProvider,
    ResourceExhaustedError,
)
from sagellm_backend.mock.pool import POISON

DEVICE, OTHER = "mock:0", "mock:1"
TOKENS = st.sampled_from([1, 3, 4, 5, 8, 256, 512, 1024])
DTYPES = st.sampled_from([DType.FP16, DType.FP32])
INDEX = st.integers(min_value=0, max_value=1 << 16)
PROFILE = settings(max_examples=150, stateful_step_count=50)


@dataclass
class Known:
    """What the model knows of a live block: where it is, its size and its bytes (a block
    nothing wrote reads as poison)."""

    block: KVBlock
    device: str
    dtype: DType
    num_pages: int
    data: bytes


class BlockMachine(RuleBasedStateMachine):
    counts: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        options = {
            "supported_dtypes": ["fp16", "fp32"],
            "max_memory_mb": 1,
            "num_layers": 1,
            "num_kv_heads": 1,
            "head_size": 64,
            "tokens_per_block": 4,
            "num_devices": 2,
        }
        self.provider = MockBackendProvider(**options)  # type: ignore[arg-type]
        self.other = MockBackendProvider(**options)  # type: ignore[arg-type]
        self.foreign = self.other.kv_block_alloc(4, "fp16")
        self.capacity = 1 << 20
        self.live: dict[int, Known] = {}
        self.dead: list[Known] = []
        self.handles_seen: set[int] = set()
        self.counts["sequences"] += 1

    def teardown(self) -> None:
        self.provider.close()
        self.other.close()

    # The model.

    def nbytes(self, known: Known) -> int:
        return self.provider.kv_layout.page_bytes(known.dtype) * known.num_pages

    def used(self, device: str) -> int:
        return sum(self.nbytes(k) for k in self.live.values() if k.device == device)

    def fits(self, device: str, nbytes: int) -> bool:
        return device == HOST or self.used(device) + nbytes <= self.capacity

    def pick(self, index: int) -> Known:
        ordered = sorted(self.live)
        return self.live[ordered[index % len(ordered)]]

    def adopt(self, known: Known) -> None:
        block = known.block
        assert type(block) is int, "a handle is an int"
        assert block not in self.handles_seen, "a handle was handed out twice"
        self.handles_seen.add(block)
        self.live[block] = known

    def retire(self, known: Known) -> None:
        del self.live[known.block]
        self.dead.append(known)

    def refused(
        self, error: type[Exception], call: object, *args: object, code: ErrorCode | None = None
    ) -> None:
        """``call(*args)`` must raise ``error`` (exactly that class, with ``code`` if given)
        and change nothing."""
        before = self.provider.memory_stats(), self.provider.live_blocks()
        assert callable(call)
        with pytest.raises(error) as info:
            call(*args)
        assert type(info.value) is error, f"{type(info.value).__name__}, not {error.__name__}"
        if code is not None:
            assert getattr(info.value, "code", None) is code
        assert (self.provider.memory_stats(), self.provider.live_blocks()) == before
        self.provider.synchronize()
        for known in self.live.values():
            assert self.provider.kv_block_read(known.block) == known.data, "bytes changed"
        self.counts[f"refused with {error.__name__}"] += 1

    def step(self) -> None:
        self.counts["steps"] += 1

    def distinct(self, index: int, count: int) -> list[Known]:
        return list(
            {self.pick(index + i).block: self.pick(index + i) for i in range(count)}.values()
        )

    # Rules.

    @rule(tokens=st.lists(TOKENS, min_size=1, max_size=3), dtype=DTYPES, batched=st.booleans())
    def alloc(self, tokens: list[int], dtype: DType, batched: bool) -> None:
        self.step()
        layout = self.provider.kv_layout
        if not batched:
            tokens = tokens[:1]
        need = sum(layout.page_bytes(dtype) * layout.pages_for(n) for n in tokens)
        if not self.fits(DEVICE, need):
            call = self.provider.kv_blocks_alloc if batched else self.provider.kv_block_alloc
            self.refused(ResourceExhaustedError, call, tokens if batched else tokens[0], dtype)
            return
        if batched:
            blocks = self.provider.kv_blocks_alloc(tokens, dtype)
        else:
            blocks = [self.provider.kv_block_alloc(tokens[0], dtype.value)]
        for n, block in zip(tokens, blocks, strict=True):
            info = self.provider.kv_block_info(block)
            assert (info.block, info.dtype, info.device) == (block, dtype, DEVICE)
            assert info.num_pages == layout.pages_for(n)
            known = Known(block, DEVICE, dtype, info.num_pages, b"")
            known.data = bytes([POISON]) * self.nbytes(known)
            self.adopt(known)

    @precondition(lambda self: self.live)
    @rule(index=INDEX, count=st.integers(1, 3))
    def free(self, index: int, count: int) -> None:
        self.step()
        chosen = self.distinct(index, count)
        if len(chosen) == 1:
            self.provider.kv_block_free(chosen[0].block)
        else:
            self.provider.kv_blocks_free([k.block for k in chosen])
        for known in chosen:
            self.retire(known)

    @precondition(lambda self: self.live)
    @rule(index=INDEX, seed=st.integers(0, 1 << 30))
    def write(self, index: int, seed: int) -> None:
        self.step()
        known = self.pick(index)
        data = random.Random(seed).randbytes(self.nbytes(known))
        self.provider.kv_block_write(known.block, data)
        known.data = data

    @precondition(lambda self: self.live)
    @rule(index=INDEX)
    def read(self, index: int) -> None:
        self.step()
        known = self.pick(index)
        self.provider.synchronize()
        assert self.provider.kv_block_read(known.block) == known.data, "bytes changed"

    @precondition(lambda self: len(self.live) > 1)
    @rule(pairs=st.lists(st.tuples(INDEX, INDEX), min_size=1, max_size=3))
    def copy(self, pairs: list[tuple[int, int]]) -> None:
        self.step()
        chosen: list[tuple[Known, Known]] = []
        used: set[int] = set()
        for i, j in pairs:
            src, dst = self.pick(i), self.pick(j)
            handles = {src.block, dst.block}
            if len(handles) == 2 and not handles & used:
                chosen.append((src, dst))
                used |= handles
        if not chosen:
            return
        matching = all(s.dtype == d.dtype and s.num_pages == d.num_pages for s, d in chosen)
        blocks = [(s.block, d.block) for s, d in chosen]
        if not matching:
            mismatch = ErrorCode.KV_BLOCK_MISMATCH
            if len(blocks) == 1:
                self.refused(
                    InvalidBlockError, self.provider.kv_block_copy, *blocks[0], code=mismatch
                )
            else:
                self.refused(InvalidBlockError, self.provider.kv_blocks_copy, blocks, code=mismatch)
            return
        if len(blocks) == 1:
            self.provider.kv_block_copy(*blocks[0])
        else:
            self.provider.kv_blocks_copy(blocks).synchronize()
        for src, dst in chosen:
            dst.data = src.data

    @precondition(lambda self: self.live)
    @rule(index=INDEX, count=st.integers(1, 3), device=st.sampled_from([DEVICE, OTHER, HOST]))
    def migrate(self, index: int, count: int, device: str) -> None:
        self.step()
        chosen = self.distinct(index, count)
        blocks = [k.block for k in chosen]
        if any(k.device == device for k in chosen):
            self.refused(InvalidArgumentError, self.provider.kv_blocks_migrate, blocks, device)
            return
        if not self.fits(device, sum(self.nbytes(k) for k in chosen)):
            self.refused(ResourceExhaustedError, self.provider.kv_blocks_migrate, blocks, device)
            return
        if len(chosen) == 1:
            moved = [self.provider.kv_block_migrate(blocks[0], device)]
        else:
            moved, done = self.provider.kv_blocks_migrate(blocks, device)
            done.synchronize()
        for old, new in zip(chosen, moved, strict=True):
            self.retire(old)
            info = self.provider.kv_block_info(new)
            assert (info.device, info.dtype, info.num_pages) == (device, old.dtype, old.num_pages)
            self.adopt(Known(new, device, old.dtype, old.num_pages, old.data))

    @precondition(lambda self: self.live)
    @rule(index=INDEX, tokens=st.lists(TOKENS, min_size=1, max_size=3))
    def grow(self, index: int, tokens: list[int]) -> None:
        self.step()
        chosen = self.distinct(index, len(tokens))
        tokens = tokens[: len(chosen)]
        blocks = [k.block for k in chosen]
        layout = self.provider.kv_layout
        pages = [max(k.num_pages, layout.pages_for(n)) for k, n in zip(chosen, tokens, strict=True)]
        extra: Counter[str] = Counter()
        for k, n in zip(chosen, pages, strict=True):
            extra[k.device] += (n - k.num_pages) * layout.page_bytes(k.dtype)
        if not all(self.fits(device, nbytes) for device, nbytes in extra.items()):
            call = self.provider.kv_blocks_grow
            self.refused(ResourceExhaustedError, call, blocks, tokens)
            return
        if len(chosen) == 1:
            assert self.provider.kv_block_grow(blocks[0], tokens[0]) == blocks[0]
        else:
            assert self.provider.kv_blocks_grow(blocks, tokens) == blocks, "the same handles"
        for k, n in zip(chosen, pages, strict=True):
            before = self.provider.kv_block_info(k.block).pages
            assert len(before) == n
            k.data += bytes([POISON]) * ((n - k.num_pages) * layout.page_bytes(k.dtype))
            k.num_pages = n
            self.counts["grown" if len(k.data) > 0 else "unchanged"] += 1

    @precondition(lambda self: self.dead)
    @rule(
        index=INDEX,
        op=st.sampled_from(["free", "read", "write", "copy", "migrate", "info", "grow", "batch"]),
    )
    def use_a_dead_block(self, index: int, op: str) -> None:
        self.step()
        dead = self.dead[index % len(self.dead)]
        stale = dead.block
        p = self.provider
        missing = ErrorCode.BLOCK_NOT_FOUND
        if op == "free":
            self.refused(BlockNotFoundError, p.kv_block_free, stale, code=missing)
        elif op == "read":
            self.refused(BlockNotFoundError, p.kv_block_read, stale, code=missing)
        elif op == "write":
            data = b"\1" * self.nbytes(dead)
            self.refused(BlockNotFoundError, p.kv_block_write, stale, data, code=missing)
        elif op == "copy":
            self.refused(BlockNotFoundError, p.kv_block_copy, stale, stale, code=missing)
        elif op == "migrate":
            self.refused(BlockNotFoundError, p.kv_block_migrate, stale, HOST, code=missing)
        elif op == "info":
            self.refused(BlockNotFoundError, p.kv_block_info, stale, code=missing)
        elif op == "grow":
            self.refused(BlockNotFoundError, p.kv_block_grow, stale, 1 << 10, code=missing)
        elif self.live:
            live = self.pick(index).block
            self.refused(BlockNotFoundError, p.kv_blocks_free, [live, stale], code=missing)

    @rule(
        index=INDEX,
        op=st.sampled_from(["free", "read", "write", "copy", "migrate", "info", "grow"]),
    )
    def use_a_foreign_block(self, index: int, op: str) -> None:
        self.step()
        p, theirs = self.provider, self.foreign
        mine = [self.pick(index).block] if self.live else []
        foreign = ErrorCode.FOREIGN_BLOCK
        if op == "free":
            self.refused(InvalidBlockError, p.kv_blocks_free, [*mine, theirs], code=foreign)
        elif op == "read":
            self.refused(InvalidBlockError, p.kv_block_read, theirs, code=foreign)
        elif op == "write":
            data = bytes(p.kv_layout.page_bytes(DType.FP16))
            self.refused(InvalidBlockError, p.kv_block_write, theirs, data, code=foreign)
        elif op == "copy":
            pair = [(mine[0], theirs)] if mine else [(theirs, theirs)]
            self.refused(InvalidBlockError, p.kv_blocks_copy, pair, code=foreign)
        elif op == "migrate":
            self.refused(
                InvalidBlockError, p.kv_blocks_migrate, [*mine, theirs], HOST, code=foreign
            )
        elif op == "info":
            self.refused(InvalidBlockError, p.kv_block_info, theirs, code=foreign)
        else:
            tokens = [4] * (len(mine) + 1)
            self.refused(InvalidBlockError, p.kv_blocks_grow, [*mine, theirs], tokens, code=foreign)
        assert self.other.kv_block_info(theirs).num_pages == 1, "still the other provider's"

    @rule(bad=st.sampled_from([True, 1.5, "4", None, (1,)]), op=st.sampled_from(["free", "info"]))
    def use_a_handle_that_is_not_an_int(self, bad: object, op: str) -> None:
        self.step()
        p = self.provider
        invalid = ErrorCode.INVALID_ARGUMENT
        if op == "free":
            mine = [self.pick(0).block] if self.live else []
            self.refused(InvalidArgumentError, p.kv_blocks_free, [*mine, bad], code=invalid)
        else:
            self.refused(InvalidArgumentError, p.kv_block_info, bad, code=invalid)

    @rule(tokens=st.sampled_from([0, -4, 1 << 30]), batched=st.booleans())
    def bad_alloc(self, tokens: int, batched: bool) -> None:
        self.step()
        if batched:
            self.refused(InvalidArgumentError, self.provider.kv_blocks_alloc, [4, tokens], "fp16")
        else:
            self.refused(InvalidArgumentError, self.provider.kv_block_alloc, tokens, "fp16")

    # Invariants.

    @invariant()
    def accounting_is_exact(self) -> None:
        infos = self.provider.live_blocks()
        assert {i.block: (i.device, i.dtype, i.num_pages) for i in infos} == {
            h: (k.device, k.dtype, k.num_pages) for h, k in self.live.items()
        }, "every block where and as large as the model says"
        assert [i.block for i in infos] == sorted(self.live), "oldest handle first"
        for device in (DEVICE, OTHER, HOST):
            for dtype in (DType.FP16, DType.FP32):
                pages = [
                    p for i in infos if (i.device, i.dtype) == (device, dtype) for p in i.pages
                ]
                assert len(pages) == len(set(pages)), f"a page of {device} is in two live blocks"
        stats = self.provider.memory_stats()
        on_device = [k for k in self.live.values() if k.device == DEVICE]
        assert stats.kv_blocks_in_use == len(on_device)
        assert stats.kv_pages_in_use == sum(k.num_pages for k in on_device)
        assert stats.used_bytes == self.used(DEVICE)


def test_block_bookkeeping_matches_the_model(reliability_counts: Counter[str]) -> None:
    BlockMachine.counts = Counter()
    run_state_machine_as_test(BlockMachine, settings=PROFILE)
    for name, value in BlockMachine.counts.items():
        reliability_counts[f"state machine {name}"] += value
    assert BlockMachine.counts["steps"] > 0
