"""The batch metadata case: the host cost of a decode step's metadata.

``seqs`` sequences of ``pages`` pages each, their lengths advancing by one token a step (the
blocks unchanged, as in decode between growths; a length wraps round to 1 at the block's end).
Ours: ``BatchMetadata.plan`` into persistent buffers, every check included. Baseline: the
straightforward way, building the same six arrays as Python lists (the block table padded) and
a new device tensor from each. Both are timed over :data:`STEPS` steps; the row reports seconds
per step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from sagellm_backend.bench.baselines import Baselines
from sagellm_backend.errors import InvalidArgumentError, ResourceExhaustedError
from sagellm_backend.protocols import BackendProvider

__all__ = ["STEPS", "batch_metadata_case"]

STEPS = 50
"""Decode steps per timing."""

Timer = Callable[[Callable[[], object]], float]


def batch_metadata_case(
    provider: BackendProvider[Any],
    baselines: Baselines,
    timed: Timer,
    *,
    seqs: int,
    pages: int,
    seed: int,
) -> tuple[str, float, float]:
    """(case name, ours, baseline) in seconds per step; blocks are freed before it returns."""
    layout = provider.kv_layout
    tokens = layout.tokens_per_block
    capacity = pages * tokens
    dtype = provider.capability().kv_dtypes[0]
    rng = random.Random(seed)
    try:
        blocks = provider.kv_blocks_alloc([capacity] * seqs, dtype)
    except (ResourceExhaustedError, InvalidArgumentError) as exc:  # too many, or too large
        raise InvalidArgumentError(
            f"the batch metadata case needs {seqs * pages} free KV pages on {provider.device}",
            hint="pass a smaller --batch-seqs or --batch-pages, or a larger pool in the spec "
            "(e.g. num_blocks=...)",
        ) from exc
    try:
        start = [rng.randrange(capacity) for _ in range(seqs)]
        steps = [[1 + (s + k) % capacity for s in start] for k in range(STEPS)]
        metadata = provider.create_batch_metadata(seqs, seqs, pages)

        def ours() -> None:
            for lengths in steps:
                metadata.plan(blocks, lengths)

        block_pages = [provider.kv_block_info(b).pages for b in blocks]

        def from_lists() -> None:
            for lengths in steps:
                _from_lists(baselines, block_pages, lengths, pages, tokens)

        ours_s, base_s = timed(ours), timed(from_lists)
    finally:
        provider.kv_blocks_free(blocks)
    name = f"batch metadata per decode step, {seqs} seqs x {pages} pages"
    return name, ours_s / STEPS, base_s / STEPS


def _from_lists(
    baselines: Baselines,
    blocks: list[tuple[int, ...]],
    lengths: list[int],
    width: int,
    tokens: int,
) -> None:
    rows = [list(pages) + [0] * (width - len(pages)) for pages in blocks]
    last = [length - 1 for length in lengths]
    slots = [
        pages[p // tokens] * tokens + p % tokens for pages, p in zip(blocks, last, strict=True)
    ]
    make = baselines.index_tensor
    make(rows, wide=False)
    make(lengths, wide=False)
    make(list(range(len(blocks) + 1)), wide=False)
    make(last, wide=True)
    make(slots, wide=True)
    make(list(range(len(blocks))), wide=True)
