"""The benchmark cases and their report.

Every row compares two ways of doing the same work, timed in the same run on the same provider
(median of ``repeats``, after one warm-up, with the device synchronised inside each timing):

- ``kv copy``: one batched ``kv_blocks_copy`` of N randomly chosen single-page blocks, against
  the per-block ``kv_block_copy`` loop and against one contiguous copy of the same bytes;
- ``kv swap``: a batched swap out to "host" and back in, against the per-block migrate loop and
  against two contiguous copies of the same bytes;
- ``event``: ``record`` twice plus ``elapsed_ms`` through the protocol, against the raw events;
- ``batch metadata``: a decode step's ``BatchMetadata.plan`` against building the same tensors
  from Python lists (:mod:`.batch`), where the backend claims ``batch_metadata``;
- host cost per block of alloc + free, ``kv_blocks_copy`` and ``kv_blocks_migrate`` against the
  plainest code doing the same work (:mod:`.host_cost`, medians of interleaved rounds);
- start-up: ``get_backend("mock")`` in a fresh interpreter against a bare one (:mod:`.startup`).

Each row says what its baseline shows, and our time per item (block, event pair, decode step,
process) next to the ratio.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sagellm_backend.bench.baselines import baselines_for
from sagellm_backend.bench.batch import batch_metadata_case
from sagellm_backend.bench.host_cost import host_cost_cases
from sagellm_backend.bench.startup import startup_case
from sagellm_backend.device import HOST
from sagellm_backend.errors import InvalidArgumentError, ResourceExhaustedError
from sagellm_backend.kv import KVBlock
from sagellm_backend.protocols import BackendProvider

__all__ = ["BenchReport", "Comparison", "run_benchmarks"]

Progress = Callable[[str], None]

SAVED_BY_BATCHING = "what batching saves over one call per block"


@dataclass(frozen=True)
class Comparison:
    """Median seconds of ours and of a baseline doing the same work; ``ratio`` = base / ours."""

    case: str
    ours: str
    baseline: str
    ours_s: float
    baseline_s: float
    nbytes: int = 0
    measures: str = ""
    """What comparing with this baseline shows (the baseline's purpose)."""
    count: int = 1
    """How many ``item``s the timed work covers."""
    item: str = "block"

    @property
    def ratio(self) -> float:
        """How many times faster ours is than the baseline (below 1: slower)."""
        return self.baseline_s / self.ours_s if self.ours_s > 0 else float("inf")

    def to_dict(self) -> dict[str, object]:
        return {
            "case": self.case,
            "ours": self.ours,
            "baseline": self.baseline,
            "ours_s": self.ours_s,
            "baseline_s": self.baseline_s,
            "ratio": self.ratio,
            "bytes": self.nbytes,
            "measures": self.measures,
            "count": self.count,
            "item": self.item,
            "excess_per_item_s": (self.ours_s - self.baseline_s) / self.count,
        }


@dataclass
class BenchReport:
    backend: str
    blocks: int
    page_bytes: int
    repeats: int
    rows: list[Comparison] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "blocks": self.blocks,
            "page_bytes": self.page_bytes,
            "repeats": self.repeats,
            "rows": [r.to_dict() for r in self.rows],
            "skipped": list(self.skipped),
        }

    def format_table(self) -> str:
        head = (
            f"backend {self.backend}: {self.blocks} blocks of one page ({self.page_bytes} bytes), "
            f"median of {self.repeats}"
        )
        lines = [
            head,
            "",
            "| case | ours | baseline | the baseline shows | ours per item | ours - baseline "
            "per item | ours / baseline time | ours is |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            verdict = f"{r.ratio:.2f}x faster" if r.ratio >= 1 else f"{1 / r.ratio:.2f}x slower"
            share = r.ours_s / r.baseline_s
            per_item = f"{r.ours_s / r.count * 1e6:.3f} us per {r.item}"
            excess = f"{(r.ours_s - r.baseline_s) / r.count * 1e6:+.3f} us"
            lines.append(
                f"| {r.case} | {r.ours} | {r.baseline} | {r.measures} | {per_item} | {excess} | "
                f"{share:.3f} | {verdict} |"
            )
        lines += [f"skipped: {reason}" for reason in self.skipped]
        return "\n".join(lines)


def run_benchmarks(
    provider: BackendProvider[Any],
    *,
    blocks: int = 256,
    repeats: int = 7,
    seed: int = 0,
    batch: tuple[int, int] = (64, 128),
    host_batch: int = 1024,
    startup: int = 0,
    against: BackendProvider[Any] | None = None,
    progress: Progress | None = None,
) -> BenchReport:
    """Run every case on ``provider``; its device pool must hold ``2 * blocks`` pages, ``batch``
    (sequences, pages each: the batch metadata case) as many pages as their product, and
    ``2 * host_batch`` pages for the host-cost cases (alloc + free also on ``against``, where
    given). ``startup`` fresh processes time the start-up case (0: skipped).
    """
    seqs, pages = batch
    sizes = {
        "blocks": blocks,
        "repeats": repeats,
        "batch seqs": seqs,
        "batch pages": pages,
        "host batch": host_batch,
    }
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(
                f"{name} must be a positive int, got {value!r}",
                hint="pass sizes and repeats of at least 1",
            )
    if isinstance(startup, bool) or not isinstance(startup, int) or startup < 0:
        raise InvalidArgumentError(
            f"startup must be an int of at least 0, got {startup!r}",
            hint="pass how many fresh processes to time (--startup), or 0 to skip the case",
        )
    say = progress or (lambda _: None)
    layout = provider.kv_layout
    dtype = provider.capability().kv_dtypes[0]
    page_bytes = layout.page_bytes(dtype)
    report = BenchReport(f"{provider.kind} ({provider.device})", blocks, page_bytes, repeats)
    baselines = baselines_for(provider)
    rng = random.Random(seed)
    try:
        pool = provider.kv_blocks_alloc([layout.tokens_per_block] * (2 * blocks), dtype)
    except ResourceExhaustedError as exc:
        raise InvalidArgumentError(
            f"the benchmark needs {2 * blocks} free KV pages on {provider.device}",
            hint="pass a smaller --blocks, or a larger pool in the spec (e.g. num_blocks=...)",
        ) from exc
    nbytes = blocks * page_bytes

    def timed(fn: Callable[[], object]) -> float:
        return _median(fn, provider.synchronize, repeats)

    swapping: list[KVBlock] = []
    try:
        chosen = rng.sample(pool, 2 * blocks)
        pairs = list(zip(chosen[:blocks], chosen[blocks:], strict=True))
        say("kv copy: batched")
        batched = timed(lambda: provider.kv_blocks_copy(pairs))
        say("kv copy: per-block loop")

        def copy_loop() -> None:
            for src, dst in pairs:
                provider.kv_block_copy(src, dst)

        loop = timed(copy_loop)
        report.rows.append(
            Comparison(
                "kv copy",
                "batched",
                "per-block loop",
                batched,
                loop,
                nbytes,
                SAVED_BY_BATCHING,
                blocks,
            )
        )
        floor = None if baselines is None else baselines.contiguous_copy(nbytes)
        if floor is not None:
            say("kv copy: contiguous")
            flat = timed(floor)
            report.rows.append(
                Comparison(
                    "kv copy",
                    "batched",
                    "one contiguous copy",
                    batched,
                    flat,
                    nbytes,
                    "the floor: the device copying the same bytes in one piece",
                    blocks,
                )
            )
        if provider.capability().has_kv_block_migrate:
            swapping = chosen[:blocks]
            _swap(provider, report, swapping, timed, say)
            swap_floor = None if baselines is None else baselines.contiguous_swap(nbytes)
            if swap_floor is not None:
                say("kv swap: contiguous")
                ours = next(r.ours_s for r in report.rows if r.case == "kv swap")
                flat = timed(swap_floor)
                report.rows.append(
                    Comparison(
                        "kv swap",
                        "batched",
                        "contiguous out + in",
                        ours,
                        flat,
                        2 * nbytes,
                        "the floor: the same bytes to host memory and back in one piece",
                        blocks,
                    )
                )
        else:
            report.skipped.append("kv swap: the backend does not migrate (has_kv_block_migrate)")
    finally:
        swapped = set(chosen[:blocks]) if swapping else set()
        provider.kv_blocks_free([b for b in pool if b not in swapped] + swapping)

    if baselines is not None and floor is None:
        report.skipped.append(
            f"kv copy and swap floors: {provider.kind} moves no bytes to move a page"
        )
    say("events")
    raw = None if baselines is None else baselines.raw_event_pair()
    if raw is not None:

        def ours_events() -> None:
            for _ in range(blocks):
                start, end = provider.create_event(), provider.create_event()
                start.record()
                end.record()
                end.synchronize()
                end.elapsed_ms(start)

        report.rows.append(
            Comparison(
                "event record + elapsed_ms",
                "protocol events",
                "raw device events",
                timed(ours_events),
                timed(lambda: [raw() for _ in range(blocks)]),
                measures="the protocol wrapper's cost over the device's own events",
                count=blocks,
                item="event pair",
            )
        )
    elif baselines is None:
        report.skipped.append(f"contiguous copy and raw events: no baselines for {provider.kind}")
    else:
        report.skipped.append(f"events: {provider.kind} has no events beside its own")
    if not provider.capability().supports_op("batch_metadata"):
        report.skipped.append("batch metadata: the backend does not claim batch_metadata")
    elif baselines is None:
        report.skipped.append(f"batch metadata: no baselines for {provider.kind}")
    else:
        say("batch metadata")
        name, ours_s, base_s = batch_metadata_case(
            provider, baselines, timed, seqs=seqs, pages=pages, seed=seed
        )
        report.rows.append(
            Comparison(
                name,
                "plan, persistent buffers",
                "new tensors from lists",
                ours_s,
                base_s,
                measures="what planning into persistent buffers saves over building the "
                "step's tensors anew",
                item="decode step",
            )
        )
    say("host cost")
    measured, skipped = host_cost_cases(
        provider, baselines, batch=host_batch, rounds=repeats, seed=seed, against=against
    )
    report.rows += [
        Comparison(case, ours, base, ours_s, base_s, measures=shows)
        for case, ours, base, ours_s, base_s, shows in measured
    ]
    report.skipped += skipped
    if startup:
        say("start-up")
        ours_s, bare_s = startup_case(startup)
        report.rows.append(
            Comparison(
                "start-up",
                "get_backend('mock') in a fresh interpreter",
                "python -c pass",
                ours_s,
                bare_s,
                measures="the package's share of a start: its import, discovery, a provider",
                item="process",
            )
        )
    return report


def _swap(
    provider: BackendProvider[Any],
    report: BenchReport,
    blocks: list[KVBlock],
    timed: Callable[[Callable[[], object]], float],
    say: Progress,
) -> None:
    """Swap ``blocks`` out to host and back in; ``blocks`` holds the live handles afterwards."""
    device = provider.device

    def batched() -> None:
        out, _ = provider.kv_blocks_migrate(blocks, HOST)
        blocks[:], _ = provider.kv_blocks_migrate(out, device)

    def loop() -> None:
        out = [provider.kv_block_migrate(b, HOST) for b in blocks]
        blocks[:] = [provider.kv_block_migrate(b, device) for b in out]

    say("kv swap: batched")
    ours = timed(batched)
    say("kv swap: per-block loop")
    nbytes = (
        2 * len(blocks) * provider.kv_layout.page_bytes(provider.kv_block_info(blocks[0]).dtype)
    )
    report.rows.append(
        Comparison(
            "kv swap",
            "batched",
            "per-block loop",
            ours,
            timed(loop),
            nbytes,
            SAVED_BY_BATCHING,
            len(blocks),
        )
    )


def _median(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
