"""Standard ops: the typed lookup, and each claimed kernel op against the kit's own oracle.

A claimed op is looked up with ``get_op`` and must be the kernel ``kernel_spec`` describes. It
is checked against the oracle of the target's tensor adapter (``TensorAdapter.oracle``): a
float64 reference, an input generator and a comparator that the backend under test does not
supply, so a backend cannot pass by registering a wrong reference or inputs that miss its bug.
It runs on fresh inputs of :data:`SEEDS_PER_DTYPE` consecutive seeds in every dtype the backend
computes in that the oracle covers; the torch layer's generators cycle head sizes 64 and 128
and GQA, MQA and multi-head shapes over consecutive seeds, and make variable-length batches over
caches whose unused slots and pages are NaN. The reference the backend registers, if any, must
agree with the kernel too, on the first seed of each dtype. A target without an oracle for an op
has it checked against the backend's registered reference alone, and the report says so.

An unclaimed op is CapabilityError from ``get_op`` and None from ``find_op``; a name that is not
a standard kernel op is InvalidArgumentError from both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from sagellm_backend.dtypes import DType
from sagellm_backend.errors import CapabilityError, InvalidArgumentError
from sagellm_backend.kernels import KernelSpec
from sagellm_backend.ops import KERNEL_OPS, PROVIDER_OPS
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.check import (
    Area,
    Check,
    CheckContext,
    ConformanceFailure,
    claims_op,
    expect_refusal,
)
from sagellm_backend.testing.target import OpOracle

__all__ = ["CHECKS", "SEEDS_PER_DTYPE"]

T = TypeVar("T")

SEEDS_PER_DTYPE = 4
"""Consecutive seeds each claimed op runs on per dtype: every shape the generators cycle."""


def _lookups(provider: BackendProvider[Any]) -> tuple[Callable[[str], Any], Callable[[str], Any]]:
    """``get_op`` and ``find_op`` for names read from the catalogue at run time (the protocol
    types them per literal name, for engine code)."""
    return getattr(provider, "get_op"), getattr(provider, "find_op")  # noqa: B009


def _lookup(ctx: CheckContext[T]) -> None:
    get_op, find_op = _lookups(ctx.provider)
    claimed = []
    for op in KERNEL_OPS:
        name = op.name
        if not ctx.capability.supports_op(name):
            expect_refusal(
                f"get_op({name!r}) of an op the capability does not claim is refused",
                CapabilityError,
                functools.partial(get_op, name),
            )
            try:
                found = find_op(name)
            except Exception as exc:
                raise ConformanceFailure(
                    f"find_op({name!r}) of an unclaimed op raised {type(exc).__name__}({exc}) "
                    "instead of returning None"
                ) from exc
            if found is not None:
                raise ConformanceFailure(f"find_op({name!r}) of an unclaimed op returned {found!r}")
            continue
        claimed.append(name)
        kernel = get_op(name)
        if not callable(kernel):
            raise ConformanceFailure(f"get_op({name!r}) returned {kernel!r}, not a callable")
        if find_op(name) is not kernel:
            raise ConformanceFailure(
                f"find_op({name!r}) does not return what get_op({name!r}) does"
            )
    for name in ("no_such_op", *(op.name for op in PROVIDER_OPS)):
        for lookup in (get_op, find_op):
            expect_refusal(
                f"{lookup.__name__}({name!r}) of a name that is not a standard kernel op is "
                "refused",
                InvalidArgumentError,
                functools.partial(lookup, name),
            )
    ctx.note(f"claimed kernel ops: {', '.join(claimed) or '(none)'}")


def _against_reference(name: str) -> Callable[[CheckContext[Any]], None]:
    def body(ctx: CheckContext[Any]) -> None:
        p = ctx.provider
        kernel = _lookups(p)[0](name)
        spec = p.kernel_spec(name)
        if spec.impl is not kernel:
            raise ConformanceFailure(
                f"get_op({name!r}) is not the kernel kernel_spec({name!r}) describes"
            )
        first = ctx.rng.randrange(2**31)
        seeds = range(first, first + SEEDS_PER_DTYPE)
        oracle, missing = _oracle(ctx, name)
        if oracle is None:
            _against_own_reference(ctx, spec, seeds, missing)
            return
        dtypes = _dtypes(ctx, name, oracle.dtypes, "the kit's oracle")
        _run(
            functools.partial(oracle.check, kernel),
            dtypes,
            seeds,
            f"{name} does not match the kit's float64 reference",
        )
        detail = f"{len(dtypes)} dtypes x {len(seeds)} seeds"
        if spec.checkable:
            own = [d for d in dtypes if not spec.dtypes or d in spec.dtypes]
            _run(
                spec.check,
                own,
                seeds[:1],
                f"{name} matches the kit's reference but not the reference "
                f"kernel_spec({name!r}) registers",
            )
            detail += f"; the registered reference agrees in {len(own)} dtypes x 1 seed"
        ctx.note(detail)

    return body


def _against_own_reference(
    ctx: CheckContext[Any], spec: KernelSpec, seeds: range, missing: str
) -> None:
    """Where the target has no oracle: the kernel against the reference it registered."""
    name = spec.name
    if not spec.checkable:
        raise ConformanceFailure(
            f"the claimed op {name!r} has nothing to check it against: {missing}, and "
            f"kernel_spec({name!r}) carries no reference or input generator"
        )
    dtypes = _dtypes(ctx, name, spec.dtypes, f"kernel_spec({name!r})")
    _run(
        spec.check,
        dtypes,
        seeds,
        f"{name} does not match the float64 reference kernel_spec({name!r}) registers",
    )
    ctx.note(
        f"{len(dtypes)} dtypes x {len(seeds)} seeds against the backend's own reference only: "
        f"{missing}"
    )


def _oracle(ctx: CheckContext[Any], name: str) -> tuple[OpOracle | None, str]:
    """The target's oracle of ``name``, or None and why there is none."""
    adapter = ctx.target.tensors
    if adapter is None:
        return None, f"target {ctx.target.name!r} supplies no tensor adapter"
    oracle = adapter.oracle(ctx.provider, name)
    if oracle is None:
        return None, f"the tensor adapter of target {ctx.target.name!r} has no oracle for it"
    return oracle, ""


def _dtypes(
    ctx: CheckContext[Any], name: str, covered: frozenset[DType], source: str
) -> list[DType]:
    """The dtypes the backend computes in that ``source`` covers (all where it lists none)."""
    dtypes = [d for d in ctx.capability.supported_dtypes if not covered or d in covered]
    if not dtypes:
        raise ConformanceFailure(
            f"{name!r} is claimed, but none of the backend's dtypes "
            f"({', '.join(d.value for d in ctx.capability.supported_dtypes)}) is one "
            f"{source} covers ({', '.join(sorted(d.value for d in covered))})"
        )
    return dtypes


def _run(
    check: Callable[[int, DType], None], dtypes: list[DType], seeds: range, mismatch: str
) -> None:
    for dtype in dtypes:
        for seed in seeds:
            try:
                check(seed, dtype)
            except AssertionError as exc:
                raise ConformanceFailure(
                    f"{mismatch} in {dtype.value} (seed {seed}): {exc}"
                ) from exc


CHECKS = (
    Check(
        "ops.lookup",
        Area.OPS,
        "get_op returns each claimed op (find_op the same); an unclaimed op is CapabilityError "
        "from get_op and None from find_op; other names are InvalidArgumentError",
        _lookup,
    ),
    *(
        Check(
            f"ops.{op.name}",
            Area.OPS,
            f"the claimed {op.name} matches the kit's float64 reference on fresh inputs of "
            f"{SEEDS_PER_DTYPE} consecutive seeds in every dtype the backend computes in",
            _against_reference(op.name),
            requires=claims_op(op.name),
        )
        for op in KERNEL_OPS
    ),
)
