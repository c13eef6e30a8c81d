"""The kit catches real mistakes: deliberately broken variants of the mock each fail the check
of the promise they break, with a message that names it."""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pytest

from sagellm_backend import (
    BackendLoadError,
    BlockNotFoundError,
    CapabilityDescriptor,
    DType,
    InvalidArgumentError,
    InvalidBlockError,
    KernelKind,
    KernelSpec,
    KVBlock,
    KVBlockInfo,
    ReduceOp,
)
from sagellm_backend.mock import MockBackendProvider, MockEvent, MockStream, MockTensor
from sagellm_backend.mock.sampling import reference_sample
from sagellm_backend.protocols import Event, Stream
from sagellm_backend.testing import (
    Area,
    Check,
    CheckContext,
    CheckSkipped,
    MockTarget,
    Outcome,
    run_conformance,
    select_checks,
)
from sagellm_backend.testing.checks.long_run import LONG_RUN_OPS


class AcceptsDoubleFree(MockBackendProvider):
    def kv_block_free(self, block: KVBlock, *, after: Event | None = None) -> None:
        with contextlib.suppress(BlockNotFoundError):
            super().kv_block_free(block, after=after)


class CopyMovesNothing(MockBackendProvider):
    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None:
        self.kv_block_read(src)
        self.kv_block_read(dst)


class NegativeEvent:
    """An event whose elapsed_ms runs backwards."""

    def __init__(self, inner: MockEvent) -> None:
        self.inner = inner

    @property
    def enable_timing(self) -> bool:
        return self.inner.enable_timing

    def record(self, stream: Stream | None = None) -> None:
        self.inner.record(stream)

    def query(self) -> bool:
        return self.inner.query()

    def synchronize(self) -> None:
        self.inner.synchronize()

    def elapsed_ms(self, start: Event) -> float:
        assert isinstance(start, NegativeEvent)
        return start.inner.elapsed_ms(self.inner) - 0.001


class NegativeElapsed(MockBackendProvider):
    # The override returns a wrapper, not a MockEvent: that is the fault under test.
    def create_event(self, enable_timing: bool = True) -> NegativeEvent:  # type: ignore[override]
        return NegativeEvent(super().create_event(enable_timing))


class NoWaitStream:
    """A stream whose wait_event does nothing."""

    def __init__(self, inner: MockStream) -> None:
        self.inner = inner

    def record_event(self, event: Event | None = None) -> Event:
        return self.inner.record_event(event)

    def wait_event(self, event: Event) -> None:
        return None

    def wait_stream(self, other: Stream) -> None:
        self.inner.wait_stream(other.inner if isinstance(other, NoWaitStream) else other)

    def query(self) -> bool:
        return self.inner.query()

    def synchronize(self) -> None:
        self.inner.synchronize()

    def __enter__(self) -> NoWaitStream:
        self.inner.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.inner.__exit__(exc_type, exc, tb)


class WaitEventDoesNothing(MockBackendProvider):
    # The override returns a wrapper, not a MockStream: that is the fault under test.
    def create_stream(self) -> NoWaitStream:  # type: ignore[override]
        return NoWaitStream(super().create_stream())


class ClaimsFp32ButRejects(MockBackendProvider):
    def capability(self) -> CapabilityDescriptor:
        cap = super().capability()
        return cap.replace(
            supported_dtypes=[*cap.supported_dtypes, DType.FP32],
            kv_dtypes=[*cap.kv_dtypes, DType.FP32],
        )


class WrongSum(MockBackendProvider):
    def all_reduce(
        self, tensor: MockTensor, op: ReduceOp | str = ReduceOp.SUM, *, timeout: float | None = None
    ) -> MockTensor:
        out = super().all_reduce(tensor, op, timeout=timeout)
        if ReduceOp(op) is ReduceOp.SUM and self.world_size > 1:
            out.copy_(MockTensor([v + 1 for v in out.tolist()], out.dtype))
        return out


class OverwritesKernels(MockBackendProvider):
    def register_kernel(self, name: str, impl: Callable[..., Any], **kwargs: Any) -> KernelSpec:
        kwargs["override"] = True
        return super().register_kernel(name, impl, **kwargs)


class CopiesWithoutClaiming(MockBackendProvider):
    """Claims no KV copy, yet copies."""

    def capability(self) -> CapabilityDescriptor:
        return super().capability().replace(has_kv_block_copy=False)


class BarrierDoesNotWait(MockBackendProvider):
    def barrier(self, *, timeout: float | None = None) -> None:
        return None


class BatchFreeIsNotAtomic(MockBackendProvider):
    def kv_blocks_free(self, blocks: Iterable[KVBlock], *, after: Event | None = None) -> None:
        for block in blocks:
            self.kv_block_free(block, after=after)


class GatherOutOfOrder(MockBackendProvider):
    def all_gather(self, tensor: MockTensor, *, timeout: float | None = None) -> MockTensor:
        out = super().all_gather(tensor, timeout=timeout)
        return MockTensor(list(reversed(out.tolist())), out.dtype)


class LookupIgnoresCapability(MockBackendProvider):
    """Returns any registered kernel by its op name, claimed or not."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.register_kernel("kv_cache_write", _double)

    def get_op(self, name: str) -> Any:
        return self.get_kernel(name)


class FindOpRaises(MockBackendProvider):
    def find_op(self, name: str) -> Any:
        return self.get_op(name)


class SamplesWithoutTopK(MockBackendProvider):
    """``sample`` ignores top-k, and registers a reference that ignores it too."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        spec = self.kernel_spec("sample")

        def no_top_k(draw: Callable[..., MockTensor]) -> Callable[..., MockTensor]:
            def sample(*args: MockTensor) -> MockTensor:
                logits, temperature, top_k, top_p, seeds = args
                return draw(logits, temperature, MockTensor([0.0] * len(top_k)), top_p, seeds)

            return sample

        self.register_kernel(
            "sample",
            no_top_k(spec.impl),
            reference=no_top_k(reference_sample),
            make_inputs=spec.make_inputs,
            compare=spec.compare,
            override=True,
        )


# Faults that show only after many operations, on a re-recorded event, with negative values, in
# a dtype that is not the first, when memory runs out midway through a batch, or on blocks of
# many pages.


class LosesAFreeUnderLoad(MockBackendProvider):
    """Every 300th single free is dropped, as by a free list that overflows under load."""

    frees = 0

    def kv_block_free(self, block: KVBlock, *, after: Event | None = None) -> None:
        self.frees += 1
        if self.frees % 300:
            super().kv_block_free(block, after=after)


class StaleEvent(MockEvent):
    """Recording again keeps the first recording (an event that is never re-armed)."""

    def record(self, stream: Stream | None = None) -> None:
        if self.mark is None:
            super().record(stream)


class KeepsTheFirstRecord(MockBackendProvider):
    def create_event(self, enable_timing: bool = True) -> MockEvent:
        return StaleEvent(super().create_event(enable_timing).scheduler, enable_timing)


class SumsMagnitudes(MockBackendProvider):
    """Sums magnitudes, as an unsigned accumulator would: right on non-negative data only."""

    def all_reduce(
        self, tensor: MockTensor, op: ReduceOp | str = ReduceOp.SUM, *, timeout: float | None = None
    ) -> MockTensor:
        if ReduceOp(op) is ReduceOp.SUM:
            tensor.copy_(MockTensor([abs(v) for v in tensor.tolist()], tensor.dtype))
        return super().all_reduce(tensor, op, timeout=timeout)


class MigratesLaterDtypesWrong(MockBackendProvider):
    """Migrating a block of any KV dtype but the first flips its last byte (a wrong width)."""

    def kv_block_migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        dtype = self.kv_block_info(block).dtype
        moved = super().kv_block_migrate(block, target_device)
        if dtype is not self.capability().kv_dtypes[0]:
            data = bytearray(self.kv_block_read(moved))
            data[-1] ^= 0xFF
            self.kv_block_write(moved, bytes(data))
        return moved


class AllocatesBatchesOneByOne(MockBackendProvider):
    """Checks a batch's counts up front, then allocates block by block: running out of memory
    midway leaves the earlier blocks allocated."""

    def kv_blocks_alloc(self, num_tokens: Sequence[int], dtype: DType | str) -> list[KVBlock]:
        counts = list(num_tokens)
        if any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in counts):
            return super().kv_blocks_alloc(counts, dtype)
        return [self.kv_block_alloc(n, dtype) for n in counts]


class CopiesAtMostEightPages(MockBackendProvider):
    """Copies only the first eight pages of a block (a fixed-size staging buffer)."""

    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None:
        size = 8 * self.kv_layout.page_bytes(self.kv_block_info(src).dtype)
        old = self.kv_block_read(dst)
        super().kv_block_copy(src, dst)
        self.kv_block_write(dst, self.kv_block_read(dst)[:size] + old[size:])


# Faults of the int handle contract: a grow that hands out a new block, pages listed out of
# order, a batched grow that is not all or nothing, handles coerced from other types, and a
# foreign handle taken for a freed one.


class GrowsIntoANewBlock(MockBackendProvider):
    """Grows by copying into a new block and freeing the old one: the handle changes."""

    def kv_blocks_grow(self, blocks: Sequence[KVBlock], num_tokens: Sequence[int]) -> list[KVBlock]:
        grown = []
        for block, n in zip(blocks, num_tokens, strict=True):
            info = self.kv_block_info(block)
            if self.kv_layout.pages_for(n) <= info.num_pages:
                grown.append(block)
                continue
            new = self.kv_block_alloc(n, info.dtype)
            data = self.kv_block_read(block)
            self.kv_block_write(new, data + self.kv_block_read(new)[len(data) :])
            self.kv_block_free(block)
            grown.append(new)
        return grown


class ListsNewestPageFirst(MockBackendProvider):
    """kv_block_info lists a block's pages newest first."""

    def kv_block_info(self, block: KVBlock) -> KVBlockInfo:
        info = super().kv_block_info(block)
        return info._replace(pages=info.pages[::-1])


class InfoDropsTheLastPage(MockBackendProvider):
    """kv_block_info leaves out the last page of a block of several."""

    def kv_block_info(self, block: KVBlock) -> KVBlockInfo:
        info = super().kv_block_info(block)
        return info._replace(pages=info.pages[:-1] or info.pages)


class GrowFlipsAnOldByte(MockBackendProvider):
    """Growing flips the last byte of the old pages (an off-by-one page copy)."""

    def kv_blocks_grow(self, blocks: Sequence[KVBlock], num_tokens: Sequence[int]) -> list[KVBlock]:
        old = [self.kv_block_info(b).num_pages for b in blocks]
        grown = super().kv_blocks_grow(blocks, num_tokens)
        for block, pages in zip(grown, old, strict=True):
            info = self.kv_block_info(block)
            if info.num_pages > pages:
                data = bytearray(self.kv_block_read(block))
                data[pages * self.kv_layout.page_bytes(info.dtype) - 1] ^= 0xFF
                self.kv_block_write(block, bytes(data))
        return grown


class BatchGrowIsNotAtomic(MockBackendProvider):
    def kv_blocks_grow(self, blocks: Sequence[KVBlock], num_tokens: Sequence[int]) -> list[KVBlock]:
        grow = super().kv_blocks_grow
        return [grow([b], [n])[0] for b, n in zip(blocks, num_tokens, strict=True)]


class CoercesHandles(MockBackendProvider):
    """Takes any handle that int() accepts."""

    def kv_block_info(self, block: KVBlock) -> KVBlockInfo:
        return super().kv_block_info(KVBlock(int(block)))


class ForeignIsNotFound(MockBackendProvider):
    """Reports a handle it never gave out as freed."""

    def kv_block_read(self, block: KVBlock) -> bytes:
        try:
            return super().kv_block_read(block)
        except InvalidBlockError as exc:
            raise BlockNotFoundError(str(exc)) from exc


class ListsKernelsWhenClosed(MockBackendProvider):
    """Answers kernel lookups after close()."""

    def list_kernels(self, kind: KernelKind | str | None = None) -> list[KernelSpec]:
        return []


@dataclass(frozen=True)
class Fault:
    provider: type[MockBackendProvider]
    check: str
    names: str
    options: dict[str, object]


FAULTS = [
    Fault(AcceptsDoubleFree, "inputs.double_free", "a double free is refused", {}),
    Fault(CopyMovesNothing, "kv.copy", "kv_block_copy", {}),
    Fault(NegativeElapsed, "streams.elapsed_ms", "elapsed_ms returned", {}),
    Fault(WaitEventDoesNothing, "streams.wait_event", "wait_event did not order work", {}),
    Fault(ClaimsFp32ButRejects, "kv.dtypes", "dtype fp32 is claimed but allocating", {}),
    Fault(WrongSum, "collectives.all_reduce", "all_reduce(sum)", {}),
    Fault(OverwritesKernels, "kernels.registry", "no silent overwrite", {}),
    Fault(CopiesWithoutClaiming, "kv.copy_refused", "without has_kv_block_copy is refused", {}),
    Fault(BarrierDoesNotWait, "collectives.barrier", "although rank 0 entered", {}),
    Fault(BatchFreeIsNotAtomic, "kv.all_or_nothing", "kv_blocks_free with one freed block", {}),
    Fault(GatherOutOfOrder, "collectives.all_gather", "all_gather in", {}),
    Fault(LookupIgnoresCapability, "ops.lookup", "the capability does not claim is refused", {}),
    Fault(FindOpRaises, "ops.lookup", "of an unclaimed op raised CapabilityError", {}),
    Fault(LosesAFreeUnderLoad, "kv.long_run", " of 5000 (", {}),
    Fault(KeepsTheFirstRecord, "streams.wait_event", "in the second round (the event recorded", {}),
    Fault(KeepsTheFirstRecord, "streams.query_synchronize", "recorded again", {}),
    Fault(KeepsTheFirstRecord, "streams.elapsed_ms", "recorded again after more work", {}),
    Fault(SumsMagnitudes, "collectives.all_reduce", "all_reduce(sum)", {}),
    Fault(MigratesLaterDtypesWrong, "kv.migrate", "kv_block_migrate of a bf16 block", {}),
    Fault(AllocatesBatchesOneByOne, "kv.exhaustion", "ran out of memory midway changed", {}),
    Fault(CopiesAtMostEightPages, "kv.copy", "the first at byte", {}),
    Fault(
        SamplesWithoutTopK, "ops.sample", "sample does not match the kit's float64 reference", {}
    ),
    Fault(GrowsIntoANewBlock, "kv.grow", "a block grows in place and keeps its handle", {}),
    Fault(GrowsIntoANewBlock, "kv.long_run", "other handles than the blocks' own", {}),
    Fault(ListsNewestPageFirst, "kv.grow", "keeps the old ones first", {}),
    Fault(InfoDropsTheLastPage, "kv.accounting", "ceil(num_tokens / tokens_per_block) pages", {}),
    Fault(GrowFlipsAnOldByte, "kv.grow", "the old pages do not hold the bytes they held", {}),
    Fault(BatchGrowIsNotAtomic, "kv.all_or_nothing", "kv_blocks_grow with one freed block", {}),
    Fault(BatchGrowIsNotAtomic, "kv.exhaustion", "a batched grow that ran out of memory", {}),
    Fault(CoercesHandles, "inputs.handle_type", "not an int) is refused (kv_block_info)", {}),
    Fault(ForeignIsNotFound, "inputs.foreign_block", "foreign_block (kv_block_read)", {}),
    Fault(ListsKernelsWhenClosed, "provider.close", "refuses kernel lookups", {}),
]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f"{f.provider.__name__}-{f.check}")
def test_the_kit_fails_a_broken_provider(fault: Fault, reliability_counts: Counter[str]) -> None:
    target = MockTarget(provider_class=fault.provider)
    report = run_conformance(target, select=[fault.check], seed=7)
    result = report.result(fault.check)
    reliability_counts["faults injected into providers"] += 1
    assert result.outcome is Outcome.FAILED, report.format_table()
    assert result.message.startswith(f"broken promise: {result.check.promise}")
    assert fault.names in result.message
    assert not report.ok


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f"{f.provider.__name__}-{f.check}")
def test_the_same_check_passes_on_the_faithful_mock(fault: Fault) -> None:
    report = run_conformance(MockTarget(), select=[fault.check], seed=7)
    outcome = report.result(fault.check).outcome
    expected = Outcome.SKIPPED if fault.check.endswith("_refused") else Outcome.PASSED
    assert outcome is expected, report.format_table()


def test_an_expected_failure_needs_a_reason_and_a_known_check() -> None:
    target = MockTarget(provider_class=AcceptsDoubleFree)
    with pytest.raises(InvalidArgumentError, match="gives no reason"):
        run_conformance(target, expected_failures={"inputs.double_free": " "})
    with pytest.raises(InvalidArgumentError, match="unknown check"):
        run_conformance(target, expected_failures={"inputs.tripple_free": "why"})


def test_an_expected_failure_is_reported_as_xfailed_with_its_reason() -> None:
    target = MockTarget(provider_class=AcceptsDoubleFree)
    report = run_conformance(
        target,
        select=["inputs.double_free"],
        expected_failures={"inputs.double_free": "frees are idempotent on this device"},
    )
    result = report.result("inputs.double_free")
    assert result.outcome is Outcome.XFAILED
    assert result.message == "frees are idempotent on this device"
    assert report.ok


def test_an_expected_failure_that_passes_fails_so_it_gets_removed() -> None:
    report = run_conformance(
        MockTarget(), select=["inputs.double_free"], expected_failures={"inputs.double_free": "x"}
    )
    result = report.result("inputs.double_free")
    assert result.outcome is Outcome.FAILED
    assert "remove the expected failure" in result.message


def test_selection_by_area_and_refusal_of_unknown_names() -> None:
    report = run_conformance(MockTarget(), select=["graph"], seed=1)
    assert {r.check.area.value for r in report.results} == {"graph"}
    with pytest.raises(InvalidArgumentError, match="unknown check or area 'gpu'"):
        run_conformance(MockTarget(), select=["gpu"])


def test_unclaimed_capabilities_are_checked_for_refusal_not_skipped_silently() -> None:
    target = MockTarget(
        has_stream=False,
        has_event=False,
        has_kv_block_copy=False,
        has_kv_block_migrate=False,
        has_collective=False,
        supported_dtypes=["fp16"],
    )
    report = run_conformance(target, seed=3)
    assert report.ok, report.format_table()
    for check_id in ("streams.refused", "kv.copy_refused", "kv.migrate_refused", "graph.refused"):
        assert report.result(check_id).outcome is Outcome.PASSED
    skipped = report.result("collectives.all_reduce")
    assert skipped.outcome is Outcome.SKIPPED
    assert skipped.message == "not claimed: has_collective=False"
    assert report.world_sizes == ()


def test_an_unclaimed_reduce_op_must_be_refused() -> None:
    report = run_conformance(
        MockTarget(supported_reduce_ops=["sum", "max"]),
        select=["collectives.unclaimed_reduce_ops", "collectives.all_reduce"],
        seed=5,
    )
    assert report.ok, report.format_table()
    assert report.world_sizes == (1, 2, 4)


def test_a_check_that_raises_unexpectedly_fails_with_the_exception_named() -> None:
    class Crashes(MockBackendProvider):
        def kv_block_write(self, block: KVBlock, data: bytes) -> None:
            raise RuntimeError("device lost")

    report = run_conformance(MockTarget(provider_class=Crashes), select=["kv.write_read"])
    message = report.result("kv.write_read").message
    assert "raised RuntimeError: device lost" in message


def test_a_provider_that_fails_to_close_fails_a_check_that_skipped_after_using_it() -> None:
    class LeaksOnClose(MockBackendProvider):
        used = False

        def kv_block_alloc(self, num_tokens: int, dtype: DType | str) -> KVBlock:
            self.used = True
            return super().kv_block_alloc(num_tokens, dtype)

        def close(self) -> None:
            super().close()
            if self.used:
                raise RuntimeError("close leaked a block")

    def skips(ctx: CheckContext[Any]) -> None:
        ctx.provider.kv_block_alloc(16, "fp16")
        raise CheckSkipped("does not apply")

    check = Check("x.skips", Area.PROVIDER, "the provider closes cleanly", skips)
    report = run_conformance(MockTarget(provider_class=LeaksOnClose), checks=[check])
    result = report.result("x.skips")
    assert result.outcome is Outcome.FAILED and "close leaked a block" in result.message
    with pytest.raises(InvalidArgumentError, match="unknown check or area 'nope'"):
        select_checks(["nope"], checks=())


def test_a_target_that_cannot_make_a_provider_is_a_load_error() -> None:
    class Unmakeable(MockBackendProvider):
        def __init__(self, **options: Any) -> None:
            raise OSError("no device node")

    with pytest.raises(BackendLoadError, match="could not make a provider: OSError"):
        run_conformance(MockTarget(provider_class=Unmakeable))


def test_the_table_lists_every_check_with_skip_reasons_and_world_sizes() -> None:
    report = run_conformance(MockTarget(), seed=11)
    table = report.format_table()
    assert len(table.splitlines()) == len(report.results) + 3
    assert "graph.replay" in table and "not claimed: has_graph_exec=False" in table
    assert "collectives ran at world sizes: 1, 2, 4; seed 11" in table
    assert report.to_dict()["counts"]["failed"] == 0


def _scale_inputs(seed: int, dtype: DType) -> tuple[tuple[Any, ...], dict[str, Any]]:
    rng = random.Random(seed)
    return ([rng.randint(-8, 8) for _ in range(16)],), {}


def _double(values: list[int]) -> list[int]:
    return [2 * v for v in values]


def _double_but_last(values: list[int]) -> list[int]:
    return [*_double(values[:-1]), values[-1]]


class WithKernels(MockBackendProvider):
    """Registers a kernel with a reference and an input generator, as a real backend would."""

    kernel: Callable[[list[int]], list[int]] = staticmethod(_double)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.register_kernel(
            "double", self.kernel, kind="matmul", reference=_double, make_inputs=_scale_inputs
        )


class WithAWrongKernel(WithKernels):
    kernel = staticmethod(_double_but_last)


def test_registered_kernels_are_checked_against_their_references(
    reliability_counts: Counter[str],
) -> None:
    good = run_conformance(MockTarget(provider_class=WithKernels), select=["kernels.reference"])
    assert good.result("kernels.reference").outcome is Outcome.PASSED, good.format_table()
    assert "1 kernels, 6 runs" in good.result("kernels.reference").message
    bad = run_conformance(MockTarget(provider_class=WithAWrongKernel), select=["kernels"])
    result = bad.result("kernels.reference")
    reliability_counts["faults injected into providers"] += 1
    assert result.outcome is Outcome.FAILED
    assert "kernel 'double' does not match its reference in fp16 (seed " in result.message


def test_the_long_run_names_the_operation_and_its_seed_replays_it() -> None:
    target = MockTarget(provider_class=LosesAFreeUnderLoad)
    first = run_conformance(target, select=["kv.long_run"], seed=11).result("kv.long_run")
    again = run_conformance(target, select=["kv.long_run"], seed=11).result("kv.long_run")
    assert first.outcome is Outcome.FAILED
    assert first.message.endswith("[seed 11]") and "the same seed replays the same run" in (
        first.message
    )
    assert first.message == again.message
    good = run_conformance(MockTarget(), select=["kv.long_run"], seed=11).result("kv.long_run")
    counts = [int(part.split()[0]) for part in good.message.split(", ")]
    assert good.outcome is Outcome.PASSED and sum(counts) == LONG_RUN_OPS >= 5000
