"""Running checks against a target and reporting what ran, passed, failed and was skipped."""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.errors import BackendError, BackendLoadError, InvalidArgumentError
from sagellm_backend.testing.check import (
    Area,
    Check,
    CheckContext,
    CheckSkipped,
    ConformanceFailure,
)
from sagellm_backend.testing.checks import STANDARD_CHECKS
from sagellm_backend.testing.target import ConformanceTarget

__all__ = [
    "CheckResult",
    "ConformanceReport",
    "Outcome",
    "probe_capability",
    "run_check",
    "run_conformance",
    "select_checks",
    "validate_expected_failures",
]


class Outcome(str, Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    XFAILED = "xfailed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check; ``message`` is the failure, the skip or xfail reason, or notes."""

    check: Check
    outcome: Outcome
    message: str = ""
    seconds: float = 0.0
    world_sizes: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.check.id,
            "area": self.check.area.value,
            "promise": self.check.promise,
            "outcome": self.outcome.value,
            "message": self.message,
            "seconds": round(self.seconds, 4),
            "world_sizes": list(self.world_sizes),
        }


@dataclass(frozen=True)
class ConformanceReport:
    """Every check's result for one target, with the seed that reproduces the run."""

    target: str
    capability: CapabilityDescriptor
    seed: int
    results: tuple[CheckResult, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True if no check failed."""
        return all(r.outcome is not Outcome.FAILED for r in self.results)

    @property
    def counts(self) -> dict[Outcome, int]:
        counts = dict.fromkeys(Outcome, 0)
        for result in self.results:
            counts[result.outcome] += 1
        return counts

    @property
    def world_sizes(self) -> tuple[int, ...]:
        """World sizes at which collective checks ran."""
        return tuple(sorted({size for r in self.results for size in r.world_sizes}))

    def result(self, check_id: str) -> CheckResult:
        for result in self.results:
            if result.check.id == check_id:
                return result
        raise InvalidArgumentError(
            f"no check {check_id!r} ran in this report",
            hint="pass one of the ids in [r.check.id for r in report.results]",
        )

    def summary(self) -> str:
        counts = self.counts
        sizes = ", ".join(map(str, self.world_sizes)) or "none"
        return (
            f"{len(self.results)} checks on {self.target}: "
            + ", ".join(f"{counts[o]} {o.value}" for o in Outcome)
            + f"; collectives ran at world sizes: {sizes}; seed {self.seed}"
        )

    def format_table(self) -> str:
        """A plain-text table: one row per check, then the summary line."""
        rows = [("check", "result", "time", "detail")]
        for r in self.results:
            rows.append((r.check.id, r.outcome.value, f"{r.seconds:.2f}s", r.message))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
            + "  "
            + row[3]
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
        return "\n".join(line.rstrip() for line in lines) + "\n" + self.summary()

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "ok": self.ok,
            "seed": self.seed,
            "counts": {o.value: n for o, n in self.counts.items()},
            "world_sizes": list(self.world_sizes),
            "capability": self.capability.to_dict(),
            "results": [r.to_dict() for r in self.results],
        }


def probe_capability(target: ConformanceTarget[Any]) -> CapabilityDescriptor:
    """The capability matrix of a fresh provider of ``target``; a target that cannot make one
    raises BackendLoadError (a BackendError it raises is passed on)."""
    try:
        provider = target.make_provider()
    except BackendError:
        raise
    except Exception as exc:
        raise BackendLoadError(
            f"the conformance target {target.name!r} could not make a provider: "
            f"{type(exc).__name__}: {exc}",
            hint="fix the target's make_provider; the original error is chained below",
        ) from exc
    try:
        return provider.capability()
    finally:
        provider.close()


def select_checks(
    select: Iterable[str] | None = None, checks: Sequence[Check] = STANDARD_CHECKS
) -> list[Check]:
    """Checks whose area or id is in ``select`` (all if None); an unknown name is refused."""
    if select is None:
        return list(checks)
    wanted = set(select)
    known = {c.id for c in checks} | {a.value for a in Area}
    unknown = sorted(wanted - known)
    if unknown:
        raise InvalidArgumentError(
            f"unknown check or area {', '.join(map(repr, unknown))}",
            hint=f"areas: {', '.join(a.value for a in Area)}; or a check id such as "
            f"{(checks or STANDARD_CHECKS)[0].id!r}",
        )
    return [c for c in checks if c.id in wanted or c.area.value in wanted]


def validate_expected_failures(
    expected_failures: Mapping[str, str], checks: Sequence[Check] = STANDARD_CHECKS
) -> dict[str, str]:
    """Check that every expected failure names a known check and gives a reason."""
    known = {c.id for c in checks}
    for check_id, reason in expected_failures.items():
        if check_id not in known:
            raise InvalidArgumentError(
                f"expected failure for unknown check {check_id!r}",
                hint="use a check id from sagellm_backend.testing.STANDARD_CHECKS",
            )
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidArgumentError(
                f"the expected failure of {check_id!r} gives no reason",
                hint="say why the backend cannot keep this promise, e.g. a tracking issue",
            )
    return dict(expected_failures)


def run_check(
    target: ConformanceTarget[Any],
    check: Check,
    *,
    capability: CapabilityDescriptor,
    seed: int,
    expected_failure: str | None = None,
) -> CheckResult:
    """Run one check. A failure listed as expected becomes XFAILED; an expected failure that
    passes is a failure, so a stale override is noticed and removed."""
    reason = check.skip_reason(capability)
    if reason is not None:
        return CheckResult(check, Outcome.SKIPPED, reason)
    ctx: CheckContext[Any] = CheckContext(target, capability, seed=f"{seed}:{check.id}")
    start = time.perf_counter()
    failure: str | None = None
    skipped: str | None = None
    try:
        check.body(ctx)
    except CheckSkipped as exc:
        skipped = str(exc)
    except ConformanceFailure as exc:
        failure = str(exc)
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        failure = (
            f"raised {type(exc).__name__}: {exc} "
            f"(at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
        )
    finally:
        try:
            ctx.close()
        except Exception as exc:
            failure = failure or f"closing the provider raised {type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    if skipped is not None and failure is None:  # a provider that fails to close still fails
        return CheckResult(check, Outcome.SKIPPED, skipped, seconds)
    sizes = tuple(sorted(ctx.world_sizes))
    if failure is not None:
        message = f"broken promise: {check.promise}: {failure} [seed {seed}]"
        if expected_failure is not None:
            return CheckResult(check, Outcome.XFAILED, expected_failure, seconds, sizes)
        return CheckResult(check, Outcome.FAILED, message, seconds, sizes)
    if expected_failure is not None:
        return CheckResult(
            check,
            Outcome.FAILED,
            f"expected to fail ({expected_failure}) but passed; remove the expected failure",
            seconds,
            sizes,
        )
    return CheckResult(check, Outcome.PASSED, "; ".join(ctx.notes), seconds, sizes)


def run_conformance(
    target: ConformanceTarget[Any],
    *,
    select: Iterable[str] | None = None,
    expected_failures: Mapping[str, str] | None = None,
    seed: int | None = None,
    checks: Sequence[Check] = STANDARD_CHECKS,
) -> ConformanceReport:
    """Run the checks that apply to ``target``'s capability matrix and report every outcome.

    ``select`` limits the run to areas or check ids. ``expected_failures`` maps a check id to
    the reason the backend cannot keep that promise; it is the only way to override a check.
    """
    xfails = validate_expected_failures(expected_failures or {}, checks)
    chosen = select_checks(select, checks)
    run_seed = random.randrange(2**32) if seed is None else seed
    capability = probe_capability(target)
    results = tuple(
        run_check(
            target,
            check,
            capability=capability,
            seed=run_seed,
            expected_failure=xfails.get(check.id),
        )
        for check in chosen
    )
    return ConformanceReport(target.name, capability, run_seed, results)
