"""Standard ops: the typed lookup, and each claimed kernel op against its float64 reference.

A claimed op is looked up with ``get_op`` and must be the kernel ``kernel_spec`` describes, with
a reference and an input generator to check it against. It runs on fresh inputs of
:data:`SEEDS_PER_DTYPE` consecutive seeds in every dtype the backend claims; the torch layer's
generators cycle head sizes 64 and 128 and GQA, MQA and multi-head shapes over consecutive
seeds, and make variable-length batches over caches whose unused slots and pages are NaN. An
unclaimed op is CapabilityError from ``get_op`` and None from ``find_op``; a name that is not a
standard kernel op is InvalidArgumentError from both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.errors import CapabilityError, InvalidArgumentError
from sagellm_backend.ops import KERNEL_OPS, PROVIDER_OPS
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.check import (
    Area,
    Check,
    CheckContext,
    ConformanceFailure,
    Requirement,
    expect_refusal,
)

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


def _claims_op(name: str) -> Requirement:
    def requirement(capability: CapabilityDescriptor) -> str | None:
        return None if capability.supports_op(name) else f"not claimed: op {name}"

    return requirement


def _against_reference(name: str) -> Callable[[CheckContext[Any]], None]:
    def body(ctx: CheckContext[Any]) -> None:
        p = ctx.provider
        kernel = _lookups(p)[0](name)
        spec = p.kernel_spec(name)
        if spec.impl is not kernel:
            raise ConformanceFailure(
                f"get_op({name!r}) is not the kernel kernel_spec({name!r}) describes"
            )
        if not spec.checkable:
            raise ConformanceFailure(
                f"the claimed op {name!r} has no reference or input generator to check it against"
            )
        dtypes = [d for d in ctx.capability.supported_dtypes if not spec.dtypes or d in spec.dtypes]
        if not dtypes:
            raise ConformanceFailure(
                f"{name!r} is claimed, but for none of the backend's dtypes "
                f"({', '.join(d.value for d in ctx.capability.supported_dtypes)})"
            )
        first = ctx.rng.randrange(2**31)
        for dtype in dtypes:
            for seed in range(first, first + SEEDS_PER_DTYPE):
                try:
                    spec.check(seed, dtype)
                except AssertionError as exc:
                    raise ConformanceFailure(
                        f"{name} does not match its float64 reference in {dtype.value} "
                        f"(seed {seed}): {exc}"
                    ) from exc
        ctx.note(f"{len(dtypes)} dtypes x {SEEDS_PER_DTYPE} seeds")

    return body


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
            f"the claimed {op.name} matches its float64 reference on fresh inputs of "
            f"{SEEDS_PER_DTYPE} consecutive seeds in every claimed dtype",
            _against_reference(op.name),
            requires=_claims_op(op.name),
        )
        for op in KERNEL_OPS
    ),
)
