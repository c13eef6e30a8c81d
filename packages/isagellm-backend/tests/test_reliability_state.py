"""Stateful property tests of KV-block bookkeeping on the mock, against a simple model.

Random sequences of alloc, free, write, read, copy, migrate and their batched forms, with
refused calls mixed in. After every step: no block lost, none handed out twice, bytes as the
model says, accounting exact; every refused call leaves the state as it was.
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
    InvalidArgumentError,
    InvalidBlockError,
    KVBlock,
    MockBackendProvider,
    ResourceExhaustedError,
)

DEVICE, OTHER = "mock:0", "mock:1"
TOKENS = st.sampled_from([1, 3, 4, 5, 8, 256, 512, 1024])
DTYPES = st.sampled_from([DType.FP16, DType.FP32])
INDEX = st.integers(min_value=0, max_value=1 << 16)
PROFILE = settings(max_examples=150, stateful_step_count=50)


@dataclass
class Known:
    """What the model knows of a live block: where it is and its bytes (None: never written)."""

    block: KVBlock
    data: bytes | None


class BlockMachine(RuleBasedStateMachine):
    counts: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.provider = MockBackendProvider(
            supported_dtypes=["fp16", "fp32"],
            max_memory_mb=1,
            num_layers=1,
            num_kv_heads=1,
            head_size=64,
            tokens_per_block=4,
            num_devices=2,
        )
        self.capacity = 1 << 20
        self.live: dict[int, Known] = {}
        self.dead: list[KVBlock] = []
        self.handles_seen: set[int] = set()
        self.counts["sequences"] += 1

    def teardown(self) -> None:
        self.provider.close()

    # The model.

    def nbytes(self, block: KVBlock) -> int:
        layout = self.provider.kv_layout
        return layout.page_bytes(block.dtype) * layout.pages_for(block.num_tokens)

    def used(self, device: str) -> int:
        return sum(self.nbytes(k.block) for k in self.live.values() if k.block.device == device)

    def fits(self, device: str, nbytes: int) -> bool:
        return device == HOST or self.used(device) + nbytes <= self.capacity

    def pick(self, index: int) -> Known:
        ordered = sorted(self.live)
        return self.live[ordered[index % len(ordered)]]

    def adopt(self, block: KVBlock, data: bytes | None) -> None:
        assert block.handle not in self.handles_seen, "a handle was handed out twice"
        self.handles_seen.add(block.handle)
        self.live[block.handle] = Known(block, data)

    def retire(self, block: KVBlock) -> None:
        del self.live[block.handle]
        self.dead.append(block)

    def refused(self, error: type[Exception], call: object, *args: object) -> None:
        """``call(*args)`` must raise ``error`` and change nothing."""
        before = self.provider.memory_stats()
        assert callable(call)
        with pytest.raises(error):
            call(*args)
        assert self.provider.memory_stats() == before
        self.provider.synchronize()
        for known in self.live.values():
            if known.data is not None:
                assert self.provider.kv_block_read(known.block) == known.data, "bytes changed"
        self.counts[f"refused with {error.__name__}"] += 1

    def step(self) -> None:
        self.counts["steps"] += 1

    # Rules.

    @rule(tokens=st.lists(TOKENS, min_size=1, max_size=3), dtype=DTYPES, batched=st.booleans())
    def alloc(self, tokens: list[int], dtype: DType, batched: bool) -> None:
        self.step()
        layout = self.provider.kv_layout
        need = sum(layout.page_bytes(dtype) * layout.pages_for(n) for n in tokens)
        if not batched:
            tokens = tokens[:1]
            need = layout.page_bytes(dtype) * layout.pages_for(tokens[0])
        if not self.fits(DEVICE, need):
            call = self.provider.kv_blocks_alloc if batched else self.provider.kv_block_alloc
            self.refused(ResourceExhaustedError, call, tokens if batched else tokens[0], dtype)
            return
        if batched:
            blocks = self.provider.kv_blocks_alloc(tokens, dtype)
        else:
            blocks = [self.provider.kv_block_alloc(tokens[0], dtype.value)]
        for n, block in zip(tokens, blocks, strict=True):
            assert (block.num_tokens, block.dtype, block.device) == (n, dtype, DEVICE)
            assert block.num_pages == layout.pages_for(n)
            self.adopt(block, None)

    @precondition(lambda self: self.live)
    @rule(index=INDEX, count=st.integers(1, 3))
    def free(self, index: int, count: int) -> None:
        self.step()
        chosen = {self.pick(index + i).block for i in range(count)}
        if len(chosen) == 1:
            self.provider.kv_block_free(next(iter(chosen)))
        else:
            self.provider.kv_blocks_free(sorted(chosen, key=lambda b: b.handle))
        for block in chosen:
            self.retire(block)

    @precondition(lambda self: self.live)
    @rule(index=INDEX, seed=st.integers(0, 1 << 30))
    def write(self, index: int, seed: int) -> None:
        self.step()
        known = self.pick(index)
        data = random.Random(seed).randbytes(self.nbytes(known.block))
        self.provider.kv_block_write(known.block, data)
        known.data = data

    @precondition(lambda self: self.live)
    @rule(index=INDEX)
    def read(self, index: int) -> None:
        self.step()
        known = self.pick(index)
        self.provider.synchronize()
        data = self.provider.kv_block_read(known.block)
        assert len(data) == self.nbytes(known.block)
        if known.data is not None:
            assert data == known.data, "bytes changed"

    @precondition(lambda self: len(self.live) > 1)
    @rule(pairs=st.lists(st.tuples(INDEX, INDEX), min_size=1, max_size=3))
    def copy(self, pairs: list[tuple[int, int]]) -> None:
        self.step()
        chosen: list[tuple[Known, Known]] = []
        used: set[int] = set()
        for i, j in pairs:
            src, dst = self.pick(i), self.pick(j)
            handles = {src.block.handle, dst.block.handle}
            if len(handles) == 2 and not handles & used:
                chosen.append((src, dst))
                used |= handles
        if not chosen:
            return
        layout = self.provider.kv_layout
        matching = all(
            s.block.dtype == d.block.dtype
            and layout.pages_for(s.block.num_tokens) == layout.pages_for(d.block.num_tokens)
            for s, d in chosen
        )
        blocks = [(s.block, d.block) for s, d in chosen]
        if not matching:
            if len(blocks) == 1:
                self.refused(InvalidBlockError, self.provider.kv_block_copy, *blocks[0])
            else:
                self.refused(InvalidBlockError, self.provider.kv_blocks_copy, blocks)
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
        chosen = list({self.pick(index + i).block: None for i in range(count)})
        if any(b.device == device for b in chosen):
            self.refused(InvalidArgumentError, self.provider.kv_blocks_migrate, chosen, device)
            return
        if not self.fits(device, sum(self.nbytes(b) for b in chosen)):
            self.refused(ResourceExhaustedError, self.provider.kv_blocks_migrate, chosen, device)
            return
        if len(chosen) == 1:
            moved = [self.provider.kv_block_migrate(chosen[0], device)]
        else:
            moved, done = self.provider.kv_blocks_migrate(chosen, device)
            done.synchronize()
        for old, new in zip(chosen, moved, strict=True):
            data = self.live[old.handle].data
            self.retire(old)
            assert new.device == device and new.num_tokens == old.num_tokens
            self.adopt(new, data)

    @precondition(lambda self: self.dead)
    @rule(index=INDEX, op=st.sampled_from(["free", "read", "write", "copy", "migrate", "batch"]))
    def use_a_dead_block(self, index: int, op: str) -> None:
        self.step()
        stale = self.dead[index % len(self.dead)]
        p = self.provider
        if op == "free":
            self.refused(BlockNotFoundError, p.kv_block_free, stale)
        elif op == "read":
            self.refused(BlockNotFoundError, p.kv_block_read, stale)
        elif op == "write":
            self.refused(BlockNotFoundError, p.kv_block_write, stale, b"\1" * self.nbytes(stale))
        elif op == "copy":
            self.refused(BlockNotFoundError, p.kv_block_copy, stale, stale)
        elif op == "migrate":
            self.refused(BlockNotFoundError, p.kv_block_migrate, stale, HOST)
        elif self.live:
            self.refused(BlockNotFoundError, p.kv_blocks_free, [self.pick(index).block, stale])

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
        for device in (DEVICE, OTHER):
            stats = self.provider.memory_stats() if device == DEVICE else None
            live = [k.block for k in self.live.values() if k.block.device == device]
            pages = [p for b in live for p in b.pages]
            assert len(pages) == len(set(pages)), f"a page of {device} is in two live blocks"
            if stats is not None:
                layout = self.provider.kv_layout
                assert stats.kv_blocks_in_use == len(live)
                assert stats.kv_pages_in_use == sum(layout.pages_for(b.num_tokens) for b in live)
                assert stats.used_bytes == self.used(DEVICE)
        assert {b.handle for b in self.provider.live_blocks()} == set(self.live)


def test_block_bookkeeping_matches_the_model(reliability_counts: Counter[str]) -> None:
    BlockMachine.counts = Counter()
    run_state_machine_as_test(BlockMachine, settings=PROFILE)
    for name, value in BlockMachine.counts.items():
        reliability_counts[f"state machine {name}"] += value
    assert BlockMachine.counts["steps"] > 0
