"""A long seeded run of mixed KV operations on one provider, checked against a Python model.

Some faults show only after many operations: a free lost under load, a page handed out twice
once a free list wraps, a counter that drifts, a handle reused. The run issues
:data:`LONG_RUN_OPS` random allocations, frees, writes, reads, copies, migrations and grows
(single and batched, over every KV dtype, and uses of stale handles), and after every one
compares the provider's accounting with the model's; every block's ``kv_block_info`` must say
what the model says (device, dtype, pages, grown pages appended), and every read is compared
byte for byte with what the model says the block holds (a block never written holds what it
held when first read). A failure names
the operation and its index; the report's seed replays the same run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sagellm_backend.device import HOST
from sagellm_backend.dtypes import DType
from sagellm_backend.errors import BlockNotFoundError, ResourceExhaustedError
from sagellm_backend.kv import KVBlock, KVBlockInfo
from sagellm_backend.testing.check import CheckContext, ConformanceFailure, expect_refusal
from sagellm_backend.testing.checks.common import (
    UNKNOWN_POOL_PAGES,
    expect_info,
    keeps_old_pages,
    kv_counts,
    kv_dtypes,
    pool_pages,
)

__all__ = ["LONG_RUN_OPS", "long_run"]

LONG_RUN_OPS = 5000
"""Operations per run."""

_MAX_LIVE = 48
_MAX_PAGES = 16
_VERIFY_EVERY = 1000
_PATTERN_BYTES = 1 << 20


@dataclass
class _Live:
    """The model of one live block: where it is (as checked) and what it holds (None: not known
    yet)."""

    info: KVBlockInfo
    data: bytes | None = None

    @property
    def block(self) -> KVBlock:
        return self.info.block

    @property
    def pages(self) -> int:
        return self.info.num_pages


class _Run:
    def __init__(self, ctx: CheckContext[Any]) -> None:
        p = ctx.provider
        self.ctx, self.p, self.rng = ctx, p, ctx.rng
        self.dtypes = kv_dtypes(ctx)
        self.tpb = p.kv_layout.tokens_per_block
        capacity = min(pool_pages(p, d) or UNKNOWN_POOL_PAGES for d in self.dtypes)
        self.budget = max(1, capacity // 2)
        self.max_pages = max(1, min(_MAX_PAGES, self.budget // _MAX_LIVE))
        self.live: dict[KVBlock, _Live] = {}
        self.retired: list[KVBlock] = []
        self.ids: dict[KVBlock, int] = {}
        """Every handle handed out, numbered in order: failures name blocks so, as the same
        seed replays them (handles may differ from run to run)."""
        self.held: Counter[str] = Counter()
        self.blocks: Counter[str] = Counter()
        self.pages: dict[tuple[str, DType], set[int]] = {}
        self.base = kv_counts(p)
        pattern = ctx.random_bytes(_PATTERN_BYTES)
        self.pattern = pattern + pattern
        self.writes = 0
        self.step = 0
        self.last = "none"
        self.counts: Counter[str] = Counter()
        ops: list[tuple[str, int, Callable[[], None]]] = [
            ("alloc", 6, lambda: self.alloc(1)),
            ("batched alloc", 3, lambda: self.alloc(self.rng.randint(2, 4))),
            ("free", 4, lambda: self.free(1)),
            ("batched free", 2, lambda: self.free(self.rng.randint(2, 4))),
            ("write", 5, self.write),
            ("read", 5, self.read),
            ("stale handle", 1, self.stale),
        ]
        if ctx.capability.has_kv_block_copy:
            ops += [("copy", 3, lambda: self.copy(1)), ("batched copy", 2, lambda: self.copy(3))]
        if ctx.capability.has_kv_block_migrate:
            ops += [
                ("migrate", 3, lambda: self.migrate(1)),
                ("batched migrate", 2, lambda: self.migrate(3)),
            ]
        self.grows = ctx.capability.supports_op("kv_grow")
        if self.grows:
            ops += [("grow", 3, lambda: self.grow(1)), ("batched grow", 2, lambda: self.grow(3))]
        self.names = [name for name, _, _ in ops]
        self.weights = [weight for _, weight, _ in ops]
        self.ops = {name: op for name, _, op in ops}

    # The run.

    def run(self, steps: int) -> Counter[str]:
        for self.step in range(1, steps + 1):
            name = self.rng.choices(self.names, self.weights)[0]
            self.guarded(self.ops[name])
            self.counts[name] += 1
            self.check_counts()
            if self.step % _VERIFY_EVERY == 0:
                self.guarded(self.verify_all)
        self.guarded(self.verify_all)
        self.last = "freeing every block left"
        self.guarded(lambda: self.p.kv_blocks_free([e.block for e in self.live.values()]))
        self.live.clear()
        self.held.clear()
        self.blocks.clear()
        self.check_counts()
        return self.counts

    def guarded(self, op: Callable[[], None]) -> None:
        try:
            op()
        except ConformanceFailure as exc:
            raise self.failure(str(exc)) from exc
        except Exception as exc:
            raise self.failure(f"raised {type(exc).__name__}: {exc}") from exc

    def failure(self, what: str) -> ConformanceFailure:
        return ConformanceFailure(
            f"at operation {self.step} of {LONG_RUN_OPS} ({self.last}): {what}; the same seed "
            "replays the same run"
        )

    def check_counts(self) -> None:
        device = self.p.device
        want = (self.base[0] + self.blocks[device], self.base[1] + self.held[device])
        got = kv_counts(self.p)
        if got != want:
            raise self.failure(
                f"(blocks, pages) in use on {self.p.device} is {got}; the model has {want}"
            )

    # Operations.

    def alloc(self, count: int) -> None:
        dtype = self.rng.choice(self.dtypes)
        pages = [self.rng.randint(1, self.max_pages) for _ in range(count)]
        if len(self.live) + count > _MAX_LIVE or self.held[self.p.device] + sum(pages) > (
            self.budget
        ):
            self.free(count)
            return
        tokens = [(n - 1) * self.tpb + self.rng.randint(1, self.tpb) for n in pages]
        self.last = f"allocating {count} {dtype.value} block(s) of {tokens} tokens"
        if count == 1:
            blocks = [self.p.kv_block_alloc(tokens[0], dtype)]
        else:
            blocks = self.p.kv_blocks_alloc(tokens, dtype)
        if len(blocks) != count:
            raise ConformanceFailure(f"the allocation returned {blocks}")
        for block, n in zip(blocks, pages, strict=True):
            self.add(block, dtype, self.p.device, n, None)
            if self.rng.random() < 0.5:
                self.fill(self.live[block])

    def free(self, count: int) -> None:
        if not self.live:
            self.alloc(1)
            return
        chosen = self.pick(min(count, len(self.live)))
        self.last = f"freeing {self.describe(chosen)}"
        if count == 1:
            self.p.kv_block_free(chosen[0].block)
        else:
            self.p.kv_blocks_free([e.block for e in chosen])
        for entry in chosen:
            self.remove(entry)

    def write(self) -> None:
        if not self.live:
            self.alloc(1)
            return
        [entry] = self.pick(1)
        self.last = f"writing {self.describe([entry])}"
        self.fill(entry)

    def read(self) -> None:
        if not self.live:
            self.alloc(1)
            return
        [entry] = self.pick(1)
        self.last = f"reading {self.describe([entry])}"
        self.check_bytes(entry)

    def stale(self) -> None:
        if not self.retired:
            self.read()
            return
        block = self.rng.choice(self.retired)
        self.last = f"using the stale handle of {self.name(block)} (freed or migrated away)"
        uses: dict[str, Callable[[], object]] = {
            "reading": lambda: self.p.kv_block_read(block),
            "freeing": lambda: self.p.kv_block_free(block),
            "kv_block_info of": lambda: self.p.kv_block_info(block),
        }
        if self.grows:
            uses["growing"] = lambda: self.p.kv_block_grow(block, self.tpb)
        for name, use in uses.items():
            expect_refusal(
                f"{name} a freed or migrated-away block is refused", BlockNotFoundError, use
            )

    def copy(self, count: int) -> None:
        if not self.live:
            self.alloc(1)
            return
        pairs: list[tuple[_Live, _Live]] = []
        used: set[int] = set()
        for src in self.pick(min(count, len(self.live))):
            if src.block in used:
                continue
            dst = self.partner(src, used)
            if dst is None:
                continue
            used |= {src.block, dst.block}
            pairs.append((src, dst))
        if not pairs:
            self.free(1)
            return
        for src, _ in pairs:
            if src.data is None:
                self.check_bytes(src)
        self.last = "copying " + "; ".join(
            f"{self.describe([s])} into {self.describe([d])}" for s, d in pairs
        )
        if count == 1:
            self.p.kv_block_copy(pairs[0][0].block, pairs[0][1].block)
        else:
            self.p.kv_blocks_copy([(s.block, d.block) for s, d in pairs])
        for src, dst in pairs:
            dst.data = src.data

    def migrate(self, count: int) -> None:
        if not self.live:
            self.alloc(1)
            return
        first = self.pick(1)[0]
        where = first.info.device
        target = HOST if where == self.p.device else self.p.device
        candidates = [e for e in self.live.values() if e.info.device == where and e is not first]
        chosen = [first, *self.rng.sample(candidates, min(count - 1, len(candidates)))]
        if self.held[target] + sum(e.pages for e in chosen) > self.budget:
            self.free(1)
            return
        self.last = f"migrating {self.describe(chosen)} to {target}"
        try:
            if count == 1:
                moved = [self.p.kv_block_migrate(first.block, target)]
            else:
                moved = self.p.kv_blocks_migrate([e.block for e in chosen], target)[0]
        except ResourceExhaustedError:
            return  # the target is full; check_counts confirms that nothing changed
        if len(moved) != len(chosen):
            raise ConformanceFailure(f"the migration returned {moved}")
        for entry, block in zip(chosen, moved, strict=True):
            self.remove(entry)
            self.add(block, entry.info.dtype, target, entry.pages, entry.data)

    def grow(self, count: int) -> None:
        if not self.live:
            self.alloc(1)
            return
        chosen = self.pick(min(count, len(self.live)))
        extra = [self.rng.randint(0, 2) for _ in chosen]  # 0: no more pages, a no-op
        need: Counter[str] = Counter()
        for entry, n in zip(chosen, extra, strict=True):
            need[entry.info.device] += n
        if any(self.held[d] + n > self.budget for d, n in need.items()) or any(
            e.pages + n > 2 * self.max_pages for e, n in zip(chosen, extra, strict=True)
        ):
            self.free(1)
            return
        tokens = [
            (e.pages + n - 1) * self.tpb + self.rng.randint(1, self.tpb)
            for e, n in zip(chosen, extra, strict=True)
        ]
        self.last = f"growing {self.describe(chosen)} to {tokens} tokens"
        blocks = [e.block for e in chosen]
        if count == 1:
            grown = [self.p.kv_block_grow(blocks[0], tokens[0])]
        else:
            grown = self.p.kv_blocks_grow(blocks, tokens)
        if grown != blocks:
            raise ConformanceFailure(
                "the grow returned other handles than the blocks' own (a block grows in place)"
            )
        for entry, n in zip(chosen, extra, strict=True):
            old = entry.info
            info = expect_info(
                self.p,
                entry.block,
                f"{self.name(entry.block)} grown by {n} pages",
                dtype=old.dtype,
                device=old.device,
                num_pages=old.num_pages + n,
            )
            if info.pages[: old.num_pages] != old.pages:
                raise ConformanceFailure(
                    f"{self.name(entry.block)} grew from pages {old.pages} to {info.pages}; "
                    "the old pages must stay, first"
                )
            self.claim(info, info.pages[old.num_pages :])
            self.held[old.device] += n
            entry.info = info
            if entry.data is not None and n:
                got = self.p.kv_block_read(entry.block)
                if len(got) != self.nbytes(entry) or not keeps_old_pages(
                    self.p, old.dtype, got, entry.data
                ):
                    raise ConformanceFailure(
                        f"{self.name(entry.block)} grown by {n} pages read back {len(got)} bytes, "
                        "or changed the bytes of its old pages"
                    )
                entry.data = got  # the new pages hold what they held when first read

    def verify_all(self) -> None:
        self.last = f"reading back all {len(self.live)} live blocks"
        for entry in list(self.live.values()):
            self.check_bytes(entry)

    # Model bookkeeping.

    def add(
        self, block: KVBlock, dtype: DType, device: str, pages: int, data: bytes | None
    ) -> None:
        if block in self.ids:
            raise ConformanceFailure(f"the handle of {self.name(block)} was handed out again")
        info = expect_info(
            self.p, block, f"a new {dtype.value} block", dtype=dtype, device=device, num_pages=pages
        )
        self.claim(info, info.pages)
        self.ids[block] = len(self.ids) + 1
        self.live[block] = _Live(info, data)
        self.held[device] += pages
        self.blocks[device] += 1

    def claim(self, info: KVBlockInfo, pages: tuple[int, ...]) -> None:
        """Mark ``pages`` of ``info``'s pool as held by its block; fail if another holds one."""
        taken = self.pages.setdefault((info.device, info.dtype), set())
        shared = taken.intersection(pages)
        if shared:
            raise ConformanceFailure(
                f"{self.name(info.block)} got pages that other live blocks hold: "
                f"{sorted(shared)[:8]}"
            )
        taken.update(pages)

    def remove(self, entry: _Live) -> None:
        """Drop a freed or migrated-away block from the model; its handle must be refused."""
        info = entry.info
        expect_refusal(
            f"{self.name(info.block)} was freed or migrated away (kv_block_info of it is refused)",
            BlockNotFoundError,
            lambda: self.p.kv_block_info(info.block),
        )
        del self.live[info.block]
        self.held[info.device] -= info.num_pages
        self.blocks[info.device] -= 1
        self.pages[info.device, info.dtype].difference_update(info.pages)
        self.retired.append(info.block)
        if len(self.retired) > 2 * _MAX_LIVE:
            self.retired.pop(0)

    def pick(self, count: int) -> list[_Live]:
        return self.rng.sample(list(self.live.values()), count)

    def partner(self, src: _Live, used: set[int]) -> _Live | None:
        """A live block that can take a copy of ``src``, allocated if there is none."""
        for entry in self.live.values():
            if (
                entry is not src
                and entry.block not in used
                and entry.pages == src.pages
                and entry.info.dtype == src.info.dtype
            ):
                return entry
        if len(self.live) >= _MAX_LIVE or self.held[self.p.device] + src.pages > self.budget:
            return None
        dtype = src.info.dtype
        tokens = (src.pages - 1) * self.tpb + self.rng.randint(1, self.tpb)
        self.last = f"allocating a {dtype.value} block of {tokens} tokens to copy into"
        block = self.p.kv_block_alloc(tokens, dtype)
        self.add(block, dtype, self.p.device, src.pages, None)
        self.check_counts()
        return self.live[block]

    def nbytes(self, entry: _Live) -> int:
        return entry.pages * self.p.kv_layout.page_bytes(entry.info.dtype)

    def fill(self, entry: _Live) -> None:
        """Write bytes no earlier write used: a slice of the pattern, stamped on every page."""
        size = self.nbytes(entry)
        if size > _PATTERN_BYTES:
            data = bytearray(self.ctx.random_bytes(size))
        else:
            offset = self.rng.randrange(_PATTERN_BYTES)
            data = bytearray(self.pattern[offset : offset + size])
        self.writes += 1
        page_bytes = size // entry.pages
        width = min(8, page_bytes)
        for page in range(entry.pages):
            stamp = (self.writes << 20 | page).to_bytes(8, "little")
            data[page * page_bytes : page * page_bytes + width] = stamp[:width]
        entry.data = bytes(data)
        self.p.kv_block_write(entry.block, entry.data)

    def check_bytes(self, entry: _Live) -> None:
        info = self.p.kv_block_info(entry.block)
        if info != entry.info:
            raise ConformanceFailure(
                f"kv_block_info of {self.name(entry.block)} changed by itself: (device, dtype, "
                f"pages) went from {entry.info[1:]} to {info[1:]}"
            )
        got = self.p.kv_block_read(entry.block)
        if len(got) != self.nbytes(entry):
            raise ConformanceFailure(
                f"{self.name(entry.block)} read back {len(got)} bytes, not {self.nbytes(entry)}"
            )
        if entry.data is None:
            entry.data = got
        elif got != entry.data:
            first = next(i for i, (x, y) in enumerate(zip(got, entry.data, strict=True)) if x != y)
            raise ConformanceFailure(
                f"{self.describe([entry])} does not hold what was "
                f"last written or copied into it: the first difference is at byte {first}, "
                f"page {first // (len(got) // entry.pages)}"
            )

    def name(self, block: KVBlock) -> str:
        return f"block #{self.ids[block]}"

    def describe(self, entries: list[_Live]) -> str:
        return ", ".join(
            f"{self.name(e.block)} ({e.info.dtype.value}, {e.pages} pages, on {e.info.device})"
            for e in entries
        )


def long_run(ctx: CheckContext[Any], steps: int = LONG_RUN_OPS) -> Counter[str]:
    """Run ``steps`` seeded mixed operations on ``ctx.provider``; the count of each kind."""
    return _Run(ctx).run(steps)
