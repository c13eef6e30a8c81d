"""Kernel registry: registration, lookup, listing, refusal to overwrite, and every checkable
registered kernel against its reference on fresh random inputs (the standard ops have checks
of their own, in :mod:`.ops`)."""

from __future__ import annotations

import functools
from typing import Any, TypeVar

from sagellm_backend.dtypes import KernelKind
from sagellm_backend.errors import CapabilityError, KernelExistsError, KernelNotFoundError
from sagellm_backend.ops import STANDARD_OPS
from sagellm_backend.testing.check import (
    Area,
    Check,
    CheckContext,
    CheckSkipped,
    ConformanceFailure,
    expect_refusal,
)

__all__ = ["CHECKS"]

T = TypeVar("T")

SEEDS_PER_DTYPE = 3


def _original(*args: Any) -> str:
    return "original"


def _replacement(*args: Any) -> str:
    return "replacement"


def _registry(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    kinds = ctx.capability.supported_kernels
    kind = kinds[0] if kinds else None
    dtypes = ctx.capability.supported_dtypes[:1]
    name = "conformance_registry"
    spec = p.register_kernel(name, _original, kind=kind, dtypes=[d.value for d in dtypes])
    if (spec.name, spec.impl, spec.kind, spec.dtypes) != (name, _original, kind, frozenset(dtypes)):
        raise ConformanceFailure(
            f"register_kernel returned a spec that differs from the call: {spec}"
        )
    if p.get_kernel(name) is not _original:
        raise ConformanceFailure("get_kernel does not return the registered implementation")
    if p.kernel_spec(name) != spec:
        raise ConformanceFailure("kernel_spec does not return the registered spec")
    if name not in [s.name for s in p.list_kernels()]:
        raise ConformanceFailure("list_kernels() does not list a registered kernel")
    if kind is not None:
        if name not in [s.name for s in p.list_kernels(kind.value)]:
            raise ConformanceFailure(f"list_kernels({kind.value!r}) does not list a kernel of it")
        other = next((k for k in KernelKind if k is not kind), None)
        if other is not None and name in [s.name for s in p.list_kernels(other)]:
            raise ConformanceFailure(f"list_kernels({other.value!r}) lists a {kind.value} kernel")
    expect_refusal(
        "registering an existing name without override is refused (no silent overwrite)",
        KernelExistsError,
        lambda: p.register_kernel(name, _replacement, kind=kind),
    )
    if p.get_kernel(name) is not _original or p.kernel_spec(name) != spec:
        raise ConformanceFailure("a refused registration silently overwrote the existing kernel")
    p.register_kernel(name, _replacement, kind=kind, override=True)
    if p.get_kernel(name) is not _replacement:
        raise ConformanceFailure("register_kernel(..., override=True) did not replace the kernel")


def _unclaimed_kind(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    unclaimed = [k for k in KernelKind if k not in ctx.capability.supported_kernels]
    if not unclaimed:
        raise CheckSkipped("every kernel kind is claimed")
    for kind in unclaimed:
        name = f"conformance_{kind.value}"
        expect_refusal(
            f"registering a kernel of the unclaimed kind {kind.value} is refused",
            CapabilityError,
            functools.partial(p.register_kernel, name, _original, kind=kind),
        )
        expect_refusal(
            f"a refused {kind.value} kernel is not registered",
            KernelNotFoundError,
            functools.partial(p.get_kernel, name),
        )


def _references(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    checkable = [s for s in p.list_kernels() if s.checkable and s.name not in STANDARD_OPS]
    if not checkable:
        raise CheckSkipped(
            "the provider registers no kernel beside the standard ops with a reference and inputs"
        )
    runs = 0
    for spec in checkable:
        dtypes = [d for d in ctx.capability.supported_dtypes if not spec.dtypes or d in spec.dtypes]
        for dtype in dtypes:
            for _ in range(SEEDS_PER_DTYPE):
                seed = ctx.rng.randrange(2**31)
                try:
                    spec.check(seed, dtype)
                except AssertionError as exc:
                    raise ConformanceFailure(
                        f"kernel {spec.name!r} does not match its reference in {dtype.value} "
                        f"(seed {seed}): {exc}"
                    ) from exc
                runs += 1
    ctx.note(f"{len(checkable)} kernels, {runs} runs against their references")


CHECKS = (
    Check(
        "kernels.registry",
        Area.KERNELS,
        "kernels register, look up and list; an existing name is never silently overwritten",
        _registry,
    ),
    Check(
        "kernels.unclaimed_kind",
        Area.KERNELS,
        "registering a kernel of an unclaimed kind is refused with CapabilityError",
        _unclaimed_kind,
    ),
    Check(
        "kernels.reference",
        Area.KERNELS,
        "every registered kernel with a reference, beside the standard ops, matches it on "
        "fresh random inputs",
        _references,
    ),
)
