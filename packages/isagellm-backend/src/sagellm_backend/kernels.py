"""Kernel registry: named device kernels with their reference implementations, and the typed
lookup of the standard ops among them.

A kernel registered with a reference and an input generator can be checked against that
reference on fresh random inputs by anyone (the conformance kit does so for every backend).
A kernel registered under a standard op name (:mod:`sagellm_backend.ops`) is what
``get_op(name)`` returns where the backend's capability claims that op.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.dtypes import DType, KernelKind, coerce
from sagellm_backend.errors import (
    InvalidArgumentError,
    KernelExistsError,
    KernelNotFoundError,
    close_match,
)
from sagellm_backend.frozen import Frozen
from sagellm_backend.ops import STANDARD_OPS

__all__ = ["Comparator", "InputMaker", "KernelInputs", "KernelSpec", "KernelTable"]

KernelInputs = tuple[tuple[Any, ...], dict[str, Any]]
"""Positional and keyword arguments for one kernel call."""

InputMaker = Callable[[int, DType], KernelInputs]
"""``make_inputs(seed, dtype)``: fresh random inputs; the same seed gives equal inputs."""

Comparator = Callable[[Any, Any, DType], None]
"""``compare(result, expected, dtype)``: raises AssertionError if they differ beyond tolerance.

For a standard op that writes into its arguments, ``result`` and ``expected`` are tuples: the
return value, then each argument the op writes (``StandardOp.writes``), after the call."""


def _assert_equal(result: Any, expected: Any, dtype: DType) -> None:
    if result != expected:
        raise AssertionError(f"{dtype.value}: result {result!r} != reference {expected!r}")


class KernelSpec(Frozen):
    """A registered kernel: its implementation and what it may be checked against."""

    name: str
    impl: Callable[..., Any]
    kind: KernelKind | None = None
    dtypes: frozenset[DType] = frozenset()
    reference: Callable[..., Any] | None = None
    make_inputs: InputMaker | None = None
    compare: Comparator = _assert_equal

    @property
    def checkable(self) -> bool:
        return self.reference is not None and self.make_inputs is not None

    def check(self, seed: int, dtype: DType) -> None:
        """Run the kernel and its reference on the same fresh inputs and compare what they made.

        Each side gets its own inputs (generated twice from ``seed``), so a kernel that writes
        into its arguments cannot affect the reference. For a standard op that writes into its
        arguments, those arguments are compared too, after the call.
        """
        if self.reference is None or self.make_inputs is None:
            raise InvalidArgumentError(
                f"kernel {self.name!r} has no reference or input generator to check against",
                hint="register the kernel with reference= and make_inputs= to check it",
            )
        args, kwargs = self.make_inputs(seed, dtype)
        ref_args, ref_kwargs = self.make_inputs(seed, dtype)
        result = self.impl(*args, **kwargs)
        expected = self.reference(*ref_args, **ref_kwargs)
        self.compare(
            self._produced(result, args, kwargs),
            self._produced(expected, ref_args, ref_kwargs),
            dtype,
        )

    def _produced(self, result: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        op = STANDARD_OPS.get(self.name)
        if op is None or not op.writes:
            return result
        written = [
            args[w] if isinstance(w, int) else kwargs[w]
            for w in op.writes
            if (w in kwargs if isinstance(w, str) else w < len(args))
        ]
        return (result, *written)


class KernelTable:
    """Thread-safe name -> KernelSpec table; existing names are only replaced on request."""

    def __init__(self, specs: Iterable[KernelSpec] = ()) -> None:
        self._lock = threading.Lock()
        self._specs: dict[str, KernelSpec] = {s.name: s for s in specs}

    def register(
        self,
        name: str,
        impl: Callable[..., Any],
        *,
        kind: KernelKind | str | None = None,
        dtypes: Iterable[DType | str] = (),
        reference: Callable[..., Any] | None = None,
        make_inputs: InputMaker | None = None,
        compare: Comparator | None = None,
        override: bool = False,
    ) -> KernelSpec:
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgumentError(
                f"kernel name must be a non-empty string, got {name!r}",
                hint="name kernels like 'rms_norm'",
            )
        for what, fn in (("impl", impl), ("reference", reference), ("make_inputs", make_inputs)):
            if fn is not None and not callable(fn):
                raise InvalidArgumentError(
                    f"kernel {name!r}: {what} must be callable, got {type(fn).__name__}",
                    hint=f"pass a function as {what}=",
                )
        if impl is None:
            raise InvalidArgumentError(
                f"kernel {name!r}: impl must be callable, got None",
                hint="pass the function that implements the kernel as impl=",
            )
        if isinstance(dtypes, str):
            dtypes = (dtypes,)
        spec = KernelSpec(
            name=name,
            impl=impl,
            kind=None if kind is None else coerce(KernelKind, kind, "kernel kind"),
            dtypes=frozenset(coerce(DType, d, "dtype") for d in dtypes),
            reference=reference,
            make_inputs=make_inputs,
            compare=compare if compare is not None else _assert_equal,
        )
        with self._lock:
            if name in self._specs and not override:
                raise KernelExistsError(
                    f"a kernel named {name!r} is already registered",
                    hint="pass override=True to replace it, or choose another name",
                )
            self._specs[name] = spec
        return spec

    def spec(self, name: str) -> KernelSpec:
        if not isinstance(name, str):
            raise InvalidArgumentError(
                f"a kernel name is a string, got {type(name).__name__} {name!r}",
                hint="look kernels up by name, such as 'rms_norm'; list_kernels() lists them",
            )
        with self._lock:
            spec = self._specs.get(name)
            if spec is not None:
                return spec
            known = sorted(self._specs)
        near = close_match(str(name), known)
        raise KernelNotFoundError(
            f"no kernel named {name!r}; registered: {', '.join(known) or '(none)'}",
            hint=f"did you mean {near[0]!r}?" if near else "register it with register_kernel()",
        )

    def get(self, name: str) -> Callable[..., Any]:
        return self.spec(name).impl

    def get_op(self, name: str, capability: CapabilityDescriptor) -> Callable[..., Any]:
        """The kernel of the standard op ``name``, which ``capability`` must claim.

        InvalidArgumentError if ``name`` is not a standard kernel op, CapabilityError if the
        capability does not claim it, KernelNotFoundError if it is claimed but not registered.
        """
        self._check_op_name(name)
        capability.require_op(name)
        return self.get(name)

    def find_op(self, name: str, capability: CapabilityDescriptor) -> Callable[..., Any] | None:
        """As :meth:`get_op`, but None where ``capability`` does not claim the op."""
        self._check_op_name(name)
        return self.get(name) if capability.supports_op(name) else None

    @staticmethod
    def _check_op_name(name: str) -> None:
        op = STANDARD_OPS.get(name) if isinstance(name, str) else None
        if op is None:
            kernels = [n for n, o in STANDARD_OPS.items() if o.kind is not None]
            near = close_match(str(name), kernels)
            raise InvalidArgumentError(
                f"{name!r} is not a standard kernel op",
                hint=f"did you mean {near[0]!r}?"
                if near
                else f"standard ops: {', '.join(kernels)}; other kernels: get_kernel()",
            )
        if op.kind is None:
            raise InvalidArgumentError(
                f"{name!r} is not a standard kernel op but a provider method",
                hint=f"call it on the provider: {op.signature}",
            )

    def list(self, kind: KernelKind | str | None = None) -> list[KernelSpec]:
        wanted = None if kind is None else coerce(KernelKind, kind, "kernel kind")
        with self._lock:
            specs = sorted(self._specs.values(), key=lambda s: s.name)
        return [s for s in specs if wanted is None or s.kind == wanted]
